"""Helpers for the HTTP server tests: a server in a child process on a free
port, and a raw-socket client that reads responses byte-exactly."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(extra=None):
    env = dict(os.environ)
    paths = [os.path.join(ROOT, "tests")]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.update(extra or {})
    return env


class ServerProcess:
    def __init__(self, proc, port, log_path):
        self.proc = proc
        self.port = port
        self.log_path = log_path

    @property
    def log(self):
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def stop(self, sig=signal.SIGTERM, timeout=15):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


@contextlib.contextmanager
def serve(app="apps.wire_app:app", *args, env=None, port=None, tmp_path=None, wait=True):
    port = port or free_port()
    log_path = os.path.join(tmp_path or "/tmp", f"uringserve-{port}-{time.monotonic_ns()}.log")
    cmd = [sys.executable, "-m", "uringserve", app, "--port", str(port), *args]
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=server_env(env), cwd=ROOT)
    log.close()
    srv = ServerProcess(proc, port, log_path)
    try:
        if wait:
            wait_ready(srv)
        yield srv
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def serve_for_module(tmp_path_factory, app, *args):
    """The body of a module-scoped server fixture (`yield from` it): the
    server for the module's tests, which must stop cleanly after them."""
    with serve(app, *args, tmp_path=str(tmp_path_factory.mktemp("srv"))) as srv:
        yield srv
        assert srv.stop() == 0, srv.log


def wait_ready(srv, timeout=15):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if srv.proc.poll() is not None:
            raise RuntimeError(f"server exited with {srv.proc.returncode}:\n{srv.log}")
        if "running on" in srv.log:
            return
        time.sleep(0.02)
    raise RuntimeError("server did not start:\n" + srv.log)


def connect(port, timeout=5.0):
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


class Response:
    def __init__(self, status, reason, headers, body, raw_head):
        self.status = status
        self.reason = reason
        self.headers = headers  # list of (lowercased name, value) str pairs
        self.body = body
        self.raw_head = raw_head

    def header(self, name):
        vals = [v for n, v in self.headers if n == name]
        return vals[0] if vals else None

    def __repr__(self):
        return f"<Response {self.status} {self.headers} {self.body[:60]!r}>"


class Reader:
    """Reads HTTP/1.1 responses off a socket."""

    def __init__(self, sock):
        self.sock = sock
        self.buf = b""

    def _fill(self):
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("connection closed")
        self.buf += data

    def _until(self, sep):
        while sep not in self.buf:
            self._fill()
        i = self.buf.index(sep)
        out, self.buf = self.buf[:i], self.buf[i + len(sep):]
        return out

    def _exact(self, n):
        while len(self.buf) < n:
            self._fill()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def response(self, head_request=False):
        head = self._until(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        _, status, *reason = lines[0].split(" ", 2)
        headers = []
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers.append((name.strip().lower(), value.strip()))
        hd = dict(headers)
        status = int(status)
        body = b""
        if head_request or status in (204, 304) or status < 200:
            pass
        elif hd.get("transfer-encoding") == "chunked":
            while True:
                size = int(self._until(b"\r\n").split(b";")[0], 16)
                if size == 0:
                    self._until(b"\r\n")
                    break
                body += self._exact(size)
                assert self._exact(2) == b"\r\n"
        elif "content-length" in hd:
            body = self._exact(int(hd["content-length"]))
        else:
            while True:
                try:
                    self._fill()
                except EOFError:
                    break
            body, self.buf = self.buf, b""
        return Response(status, reason[0] if reason else "", headers, body, head)

    def closed(self, timeout=3.0):
        """True when the server closes the connection (EOF or reset)."""
        self.sock.settimeout(timeout)
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return True
                self.buf += data
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False


def children(pid):
    """The pids whose parent is pid, sorted."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except OSError:
                pass
    return sorted(out)


def request(port, raw, head_request=False):
    with connect(port) as s:
        s.sendall(raw)
        return Reader(s).response(head_request)


def get(path="/", host="x"):
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()


def pids_while_one_is_blocked(port, request=None, n=2, gap=0.1, wrap=None):
    """n connections to 127.0.0.1:port, started `gap` s apart, each sending
    `request` (default: GET /block-pid?0.4, a handler that blocks its
    worker, then answers with its pid) and reading the reply. Returns the
    pids in the order the replies came; with workers that share the
    socket by busyness, the first reply's worker was blocked when the
    second connection came, so the two differ. wrap(socket) -> socket
    puts each connection in TLS first."""

    pids = []

    def one():
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            s = wrap(raw) if wrap else raw
            if request is None:
                s.sendall(get("/block-pid?0.4"))
                pids.append(Reader(s).response().body)
            else:
                s.sendall(request)
                pids.append(s.recv(100))

    threads = []
    for _ in range(n):
        threads.append(threading.Thread(target=one))
        threads[-1].start()
        time.sleep(gap)  # the first is being served, its worker blocked
    for t in threads:
        t.join(10)
    return pids

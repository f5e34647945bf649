"""Process models under load: gunicorn with 2 UringWorkers, and
`uringserve --workers 2`, each serving the FastAPI app: 10,000 keep-alive
requests, a worker killed with SIGKILL, a SIGHUP reload, a SIGTERM with a
slow request in flight; no orphan processes afterwards. And uvicorn --workers 2
with uringloop as its loop."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from http_support import ROOT, Reader, children, free_port, get, pids_while_one_is_blocked, server_env  # noqa: E402

E2E = os.path.dirname(os.path.abspath(__file__))
APP = "webapps.fastapi_app:app"


def start(kind, port, log_path, extra=()):
    if kind == "gunicorn":
        cmd = [sys.executable, "-m", "gunicorn", "-k", "uringserve.workers.UringWorker", "-w", "2",
               "-b", f"127.0.0.1:{port}", "--graceful-timeout", "10", "--chdir", E2E, *extra, APP]
    else:
        cmd = [sys.executable, "-m", "uringserve", APP, "--app-dir", E2E, "--port", str(port), "--workers", "2",
               *extra]
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=server_env(), cwd=ROOT,
                            start_new_session=True)
    log.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(open(log_path).read())
        if open(log_path).read().count("Application startup complete.") >= 2:
            break
        time.sleep(0.05)
    else:
        raise RuntimeError("workers did not start:\n" + open(log_path).read())
    return proc


def no_orphans(port):
    """No process is left with our port on its command line."""
    time.sleep(0.2)
    left = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if f"{port}".encode() in f.read() and int(entry) != os.getpid():
                        left.append(int(entry))
            except OSError:
                pass
    return left


def stop_cleanly(proc, port, log):
    """SIGTERM, exit 0, and no process left behind."""
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0, log.read_text()
    assert no_orphans(port) == []


class Load:
    """Threads doing keep-alive GETs. A request that fails on a reused
    connection before any byte of its response is retried once on a new
    connection, as HTTP clients do for idempotent requests; anything else
    is a failure."""

    def __init__(self, port, threads=8):
        self.port = port
        self.ok = 0
        self.failures = []
        self.retried = 0
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(threads)]

    def one(self, sock, reader):
        sock.sendall(get("/"))
        r = reader.response()
        assert r.status == 200, r
        return r

    def run(self):
        sock = reader = None
        while not self.stop.is_set():
            try:
                if sock is None:
                    sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
                    reader = Reader(sock)
                    fresh = True
                else:
                    fresh = False
                try:
                    r = self.one(sock, reader)
                except (EOFError, ConnectionResetError, BrokenPipeError) as exc:
                    sock.close()
                    sock = None
                    if fresh or reader.buf:
                        raise
                    self.retried += 1
                    continue
                self.ok += 1
                if r.header("connection") == "close":
                    sock.close()
                    sock = None
            except Exception as exc:  # noqa: BLE001 - every failure is recorded
                self.failures.append(repr(exc))
                if sock is not None:
                    sock.close()
                sock = None
                time.sleep(0.01)
        if sock is not None:
            sock.close()

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(20)


KINDS = ["gunicorn", "uringserve"]


@pytest.mark.parametrize("kind", KINDS)
def test_ten_thousand_keepalive_requests(kind, tmp_path):
    port = free_port()
    proc = start(kind, port, str(tmp_path / "log"))
    try:
        done = []

        def client(n):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                rd = Reader(s)
                for _ in range(n):
                    s.sendall(get("/"))
                    if rd.response().status == 200:
                        done.append(1)

        threads = [threading.Thread(target=client, args=(1250,)) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert len(done) == 10000
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(30) == 0, open(tmp_path / "log").read()
    assert no_orphans(port) == []


@pytest.mark.parametrize("kind", KINDS)
def test_killed_worker_is_replaced(kind, tmp_path):
    port = free_port()
    log = tmp_path / "log"
    proc = start(kind, port, str(log))
    try:
        with Load(port) as load:
            time.sleep(0.5)
            victim = children(proc.pid)[0]
            os.kill(victim, signal.SIGKILL)
            deadline = time.monotonic() + 20
            while len([p for p in children(proc.pid) if p != victim]) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert len([p for p in children(proc.pid) if p != victim]) == 2
            time.sleep(1.0)
            before = load.ok
            time.sleep(0.5)
            assert load.ok > before  # still serving
        # only requests in flight on the killed worker may fail (one per client connection at most)
        assert len(load.failures) <= len(load.threads), load.failures
        assert load.ok > 100
    finally:
        stop_cleanly(proc, port, log)


@pytest.mark.parametrize("kind", KINDS)
def test_sighup_reload_loses_nothing(kind, tmp_path):
    port = free_port()
    log = tmp_path / "log"
    proc = start(kind, port, str(log))
    try:
        old = set(children(proc.pid))
        with Load(port) as load:
            time.sleep(0.5)
            proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                now = set(children(proc.pid))
                if len(now) == 2 and not (now & old):
                    break
                time.sleep(0.1)
            assert len(set(children(proc.pid))) == 2 and not (set(children(proc.pid)) & old), log.read_text()
            time.sleep(0.5)
        assert load.failures == [], load.failures
        assert load.ok > 100
    finally:
        stop_cleanly(proc, port, log)


@pytest.mark.parametrize("kind", KINDS)
def test_sigterm_lets_slow_request_finish(kind, tmp_path):
    port = free_port()
    log = tmp_path / "log"
    proc = start(kind, port, str(log))
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(get("/slow?seconds=1.5"))
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        r = Reader(s).response()
        assert r.status == 200 and r.body == b'{"slept":1.5}'
    assert proc.wait(30) == 0, log.read_text()
    assert no_orphans(port) == []


def test_gunicorn_boot_error_and_access_log(tmp_path):
    port = free_port()
    r = subprocess.run([sys.executable, "-m", "gunicorn", "-k", "uringserve.workers.UringWorker",
                        "-b", f"127.0.0.1:{port}", "no_such_module_zz:app"], capture_output=True, text=True,
                       env=server_env(), cwd=ROOT, timeout=60)
    assert r.returncode != 0 and "No module named 'no_such_module_zz'" in r.stderr
    log = tmp_path / "log"
    proc = start("gunicorn", port, str(log), extra=("--access-logfile", "-", "--access-logformat",
                                                    'ACCESS %(h)s "%(r)s" %(s)s %(a)s'))
    try:
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"GET /items/5?q=1 HTTP/1.1\r\nHost: x\r\nUser-Agent: probe/1\r\n\r\n")
            assert Reader(s).response().status == 200
        time.sleep(0.3)
        assert 'ACCESS 127.0.0.1 "GET /items/5?q=1 HTTP/1.1" 200 probe/1' in log.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    assert no_orphans(port) == []


@pytest.mark.parametrize("mode", [("--workers", "2"), ("--reload",)])
def test_ctrl_c_while_the_app_imports_stops_quietly(mode, tmp_path):
    """Ctrl-C (SIGINT to the process group) while the parent checks that
    the app imports: exit 0 with no traceback, as with one process, and
    no child left behind."""
    marker = tmp_path / "importing"
    (tmp_path / "slow_import.py").write_text(
        f"import time\nopen({str(marker)!r}, 'w').close()\ntime.sleep(5)\n"
        "async def app(scope, receive, send):\n    pass\n")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "uringserve", "slow_import:app", "--app-dir", str(tmp_path),
                             "--port", str(port), *mode], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=server_env(), cwd=tmp_path, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists()
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0 and "Traceback" not in out and "Error loading" not in out, out
    assert no_orphans(port) == []


def test_workers_cannot_bind(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        r = subprocess.run([sys.executable, "-m", "uringserve", APP, "--app-dir", E2E, "--workers", "2", "--port",
                            str(s.getsockname()[1])], capture_output=True, text=True, env=server_env(), cwd=ROOT,
                           timeout=60)
    assert r.returncode == 1 and "address already in use" in r.stderr
    r = subprocess.run([sys.executable, "-m", "uringserve", APP, "--app-dir", E2E, "--uds", "/nonexistent/dir/x.sock"],
                       capture_output=True, text=True, env=server_env(), cwd=ROOT, timeout=60)
    assert r.returncode == 1 and "No such file or directory".lower() in r.stderr.lower()


def test_reuse_port_and_ttin_ttou(tmp_path):
    port = free_port()
    log = tmp_path / "log"
    proc = start("uringserve", port, str(log), extra=("--reuse-port",))
    try:
        with Load(port, threads=4) as load:
            time.sleep(0.3)
            proc.send_signal(signal.SIGTTIN)
            deadline = time.monotonic() + 20
            while len(children(proc.pid)) < 3 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert len(children(proc.pid)) == 3
            proc.send_signal(signal.SIGTTOU)
            deadline = time.monotonic() + 20
            while len(children(proc.pid)) > 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert len(children(proc.pid)) == 2, log.read_text()
            time.sleep(0.3)
        assert load.failures == [] and load.ok > 50
        text = log.read_text()
        assert "SIGTTIN: adding a worker (3)" in text and "SIGTTOU: removing worker" in text
    finally:
        stop_cleanly(proc, port, log)


def test_worker_retired_at_birth_stops(tmp_path):
    """SIGTTIN and SIGTTOU together: the parent forks a worker and retires
    that same worker at once, before the child has put its own signal
    handling in place. The SIGTERM must not be lost (the worker would serve
    on, one too many), and a worker retired before it served is not a
    startup failure (five of those used to stop the whole server)."""
    port = free_port()
    log = tmp_path / "log"
    proc = start("uringserve", port, str(log))
    try:
        first = set(children(proc.pid))
        for _ in range(8):
            os.kill(proc.pid, signal.SIGTTIN)
            os.kill(proc.pid, signal.SIGTTOU)
            time.sleep(0.2)
        deadline = time.monotonic() + 20
        while set(children(proc.pid)) != first and time.monotonic() < deadline:
            time.sleep(0.05)
        assert set(children(proc.pid)) == first, log.read_text()
        text = log.read_text()
        assert text.count("SIGTTOU: removing worker") == 8 and "keep failing" not in text, text
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(get("/"))
            assert Reader(s).response().status == 200
    finally:
        stop_cleanly(proc, port, log)


def test_gunicorn_max_requests_and_heartbeat(tmp_path):
    """max_requests recycles a worker without losing a request; a worker busy
    for longer than gunicorn's --timeout is not killed (it heartbeats)."""
    port = free_port()
    log = tmp_path / "log"
    proc = start("gunicorn", port, str(log), extra=("--max-requests", "40", "--timeout", "2"))
    try:
        first = set(children(proc.pid))
        with socket.create_connection(("127.0.0.1", port), timeout=20) as slow:
            slow.sendall(get("/slow?seconds=4"))
            with Load(port, threads=2) as load:
                deadline = time.monotonic() + 20
                while not (set(children(proc.pid)) - first) and time.monotonic() < deadline:
                    time.sleep(0.05)
                time.sleep(0.5)
            r = Reader(slow).response()
            assert r.status == 200 and r.body == b'{"slept":4.0}'
        assert set(children(proc.pid)) - first, "no worker was recycled after max_requests"
        assert load.failures == [], load.failures
        text = log.read_text()
        assert "WORKER TIMEOUT" not in text
        assert "Maximum request limit of" in text
    finally:
        stop_cleanly(proc, port, log)


def test_uvicorn_workers_on_uringloop_share_the_socket(tmp_path):
    """uringloop as a drop-in under uvicorn --workers 2 (uvicorn binds once and
    forks; each worker calls create_server(sock=)). While one worker is
    blocked in a handler, the next connection is served by the other."""
    port = free_port()
    log = tmp_path / "log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "apps.wire_app:app", "--app-dir",
                                 os.path.join(ROOT, "tests"), "--port", str(port), "--workers", "2", "--loop",
                                 "uringloop:new_event_loop", "--http", "httptools"], stdout=out,
                                stderr=subprocess.STDOUT, env=server_env(), cwd=ROOT, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while log.read_text().count("Application startup complete") < 2 and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            time.sleep(0.05)
        pids = pids_while_one_is_blocked(port)
        assert len(pids) == 2 and pids[0] != pids[1], (pids, log.read_text())
    finally:
        stop_cleanly(proc, port, log)

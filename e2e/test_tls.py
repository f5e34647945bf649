"""HTTPS and WSS: uringserve with --ssl-certfile, driven by httpx, the
`websockets` client and raw TLS sockets."""

import asyncio
import json
import os
import signal
import socket
import ssl
import sys
import time

import httpx
import pytest
import websockets

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from http_support import ROOT, serve, serve_for_module  # noqa: E402

E2E = os.path.dirname(os.path.abspath(__file__))
CERT = os.path.join(ROOT, "tests", "certs", "localhost.pem")


def client_context():
    return ssl.create_default_context(cafile=CERT)


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    yield from serve_for_module(tmp_path_factory, "apps.wire_app:app", "--ssl-certfile", CERT)


def test_https_requests_bodies_and_keep_alive(tls_server):
    base = f"https://127.0.0.1:{tls_server.port}"
    with httpx.Client(verify=client_context()) as client:
        assert client.get(base + "/").text == "Hello, world!"
        scope = client.get(base + "/scope").json()
        assert scope["scheme"] == "https" and scope["client"][0] == "127.0.0.1"
        assert scope["server"][1] == tls_server.port
        body = os.urandom(3 << 20)
        assert client.post(base + "/echo", content=body).content == body
        assert client.get(base + "/stream").content == b"one,two,three"
        assert len(client.get(base + "/big-stream").content) == 64 * 65536
        ports = {client.get(base + "/scope").json()["client"][1] for _ in range(20)}
        assert len(ports) == 1  # one kept-alive TLS connection
    assert "Exception" not in tls_server.log


def test_a_body_the_app_does_not_read_is_dropped_not_a_reset(tmp_path):
    # The app fails before it reads a 4 MiB body: the client gets its 500
    # and may go on sending the body, as over plain HTTP (lingering close).
    # The server's close_notify goes out with the 500; what comes after it
    # is dropped, and the connection ends with a close, not a reset (which
    # made the client's sends fail, and could destroy the 500 in flight).
    total = 4 << 20
    with serve("apps.wire_app:app", "--ssl-certfile", CERT, tmp_path=str(tmp_path)) as srv, \
            socket.create_connection(("127.0.0.1", srv.port), timeout=10) as raw:
        with client_context().wrap_socket(raw, server_hostname="localhost") as sock:
            sock.sendall(b"POST /raise-before HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % total)
            sock.sendall(b"b" * 65536)
            response = b""
            while b"Internal Server Error" not in response.partition(b"\r\n\r\n")[2]:
                response += sock.recv(65536)
            assert response.startswith(b"HTTP/1.1 500 ") and b"connection: close" in response.lower()
            for _ in range(total // 65536 - 1):
                sock.sendall(b"b" * 65536)
            assert sock.recv(65536) == b""
        assert srv.log.count("Exception in ASGI application") == 1


def test_a_large_file_over_tls(tls_server, tmp_path):
    # http.response.pathsend is a sendfile() into the socketpair: on a
    # blocking descriptor it would wait for the bridge, which runs on the
    # same loop (the loop hung before adopt() made the descriptor non-blocking)
    path = tmp_path / "big.bin"
    data = os.urandom(20 << 20)
    path.write_bytes(data)
    with httpx.Client(verify=client_context(), timeout=20) as client:
        r = client.get(f"https://127.0.0.1:{tls_server.port}/file?{path}")
        assert r.status_code == 200 and r.content == data


def test_many_concurrent_https_clients(tls_server):
    async def one(i):
        async with httpx.AsyncClient(verify=client_context()) as client:
            for j in range(5):
                r = await client.post(f"https://127.0.0.1:{tls_server.port}/echo", content=f"{i}-{j}".encode())
                assert r.text == f"{i}-{j}"

    async def main():
        await asyncio.gather(*[one(i) for i in range(100)])
    asyncio.run(main())


def test_pipelined_requests_over_tls(tls_server):
    with socket.create_connection(("127.0.0.1", tls_server.port)) as raw:
        with client_context().wrap_socket(raw, server_hostname="localhost") as s:
            last = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 10 + last)
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
    assert data.count(b"HTTP/1.1 200 OK") == 11 and data.endswith(b"Hello, world!")


def test_a_client_that_is_not_tls_or_fails_the_handshake_costs_nothing_else(tls_server):
    with socket.create_connection(("127.0.0.1", tls_server.port), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # plain HTTP to the TLS port
        assert s.recv(100) == b""
    with socket.create_connection(("127.0.0.1", tls_server.port)) as raw:
        with pytest.raises(ssl.SSLError):  # a client that does not trust the certificate
            ssl.create_default_context().wrap_socket(raw, server_hostname="localhost")
    with socket.create_connection(("127.0.0.1", tls_server.port), timeout=10) as raw:
        s = client_context().wrap_socket(raw, server_hostname="localhost")
        s.sendall(b"GET /slow?0.3 HTTP/1.1\r\nHost: x\r\n\r\n")
        raw.close()  # gone mid-request, without close_notify
    with httpx.Client(verify=client_context()) as client:
        assert client.get(f"https://127.0.0.1:{tls_server.port}/").text == "Hello, world!"
    assert "Traceback" not in tls_server.log


def test_workers_share_a_tls_socket_by_busyness(tmp_path):
    # the TLS listener is an asyncio server on a socket handed in: its
    # acceptor polls, so a worker whose loop is blocked does not take the
    # next connection (see ARCHITECTURE.md on shared sockets)
    from http_support import pids_while_one_is_blocked

    with serve("apps.wire_app:app", "--ssl-certfile", CERT, "--workers", "2", tmp_path=str(tmp_path)) as srv:
        deadline = time.monotonic() + 15
        while srv.log.count("is serving") < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        pids = pids_while_one_is_blocked(
            srv.port, wrap=lambda s: client_context().wrap_socket(s, server_hostname="localhost"))
        assert len(pids) == 2 and pids[0] != pids[1], pids
        assert srv.stop() == 0, srv.log


def test_wss(tmp_path):
    with serve("webapps.ws_app:app", "--app-dir", E2E, "--ssl-certfile", CERT, tmp_path=str(tmp_path)) as srv:
        async def go():
            url = f"wss://127.0.0.1:{srv.port}"
            async with websockets.connect(url + "/ws", ssl=client_context(), max_size=None) as ws:
                await ws.send("hello")
                assert await ws.recv() == "echo:hello"
                big = os.urandom(2 << 20)
                await ws.send(big)
                assert await ws.recv() == big[::-1]
            async with websockets.connect(url + "/info", ssl=client_context()) as ws:
                assert json.loads(await ws.recv())["scheme"] == "wss"
        asyncio.run(go())
        assert srv.stop() == 0, srv.log


def test_graceful_shutdown_over_tls(tmp_path):
    with serve("apps.wire_app:app", "--ssl-certfile", CERT, tmp_path=str(tmp_path)) as srv:
        async def go():
            async with httpx.AsyncClient(verify=client_context()) as client:
                pending = asyncio.ensure_future(client.get(f"https://127.0.0.1:{srv.port}/slow?1"))
                await asyncio.sleep(0.3)
                srv.proc.send_signal(signal.SIGTERM)
                r = await pending
                assert r.text == "slow done"
        asyncio.run(go())
        assert srv.proc.wait(15) == 0, srv.log


def test_client_certificates_when_required(tmp_path):
    with serve("apps.wire_app:app", "--ssl-certfile", CERT, "--ssl-cert-reqs", "2", "--ssl-ca-certs", CERT,
               tmp_path=str(tmp_path)) as srv:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as raw:
            s = client_context().wrap_socket(raw, server_hostname="localhost")
            with pytest.raises((ssl.SSLError, ConnectionError, EOFError)):  # TLS 1.3: refused after the handshake
                s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                if not s.recv(100):
                    raise EOFError
        ctx = client_context()
        ctx.load_cert_chain(CERT)  # the test certificate doubles as a client certificate
        with httpx.Client(verify=ctx) as client:
            assert client.get(f"https://127.0.0.1:{srv.port}/").text == "Hello, world!"
        assert srv.stop() == 0, srv.log


def test_tls_options_on_the_command_line(tmp_path):
    import subprocess

    from http_support import server_env

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "uringserve", "apps.wire_app:app", *args], capture_output=True,
                              text=True, env=server_env(), cwd=ROOT, timeout=30)

    r = cli("--ssl-keyfile", CERT)
    assert r.returncode == 2 and "--ssl-keyfile needs --ssl-certfile" in r.stderr
    r = cli("--ssl-certfile", str(tmp_path / "missing.pem"))
    assert r.returncode == 2 and "--ssl-certfile: no such file" in r.stderr


def test_gunicorn_certfile_and_keyfile(tmp_path):
    import subprocess

    from http_support import free_port, server_env

    port = free_port()
    log_path = tmp_path / "gunicorn.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-k", "uringserve.workers.UringWorker", "-w", "1",
                                 "-b", f"127.0.0.1:{port}", "--certfile", CERT, "--keyfile", CERT,
                                 "--chdir", os.path.join(ROOT, "tests"), "apps.wire_app:app"],
                                stdout=log, stderr=subprocess.STDOUT, env=server_env(), cwd=ROOT)
    try:
        for _ in range(300):
            if "running on" in log_path.read_text() or proc.poll() is not None:
                break
            time.sleep(0.05)
        with httpx.Client(verify=client_context()) as client:
            assert client.get(f"https://127.0.0.1:{port}/scope").json()["scheme"] == "https"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log_path.read_text()


def test_the_open_file_limit_is_raised_for_tls(tmp_path):
    # three descriptors a TLS connection: the soft limit goes up to the hard one
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))  # the server inherits it
    try:
        with serve("apps.wire_app:app", "--ssl-certfile", CERT, tmp_path=str(tmp_path)) as srv:
            with open(f"/proc/{srv.proc.pid}/limits") as f:
                line = next(line for line in f if line.startswith("Max open files"))
            assert line.split()[3:5] == [str(hard), str(hard)], line
            assert srv.stop() == 0
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

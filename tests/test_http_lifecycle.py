"""Server options, lifespan, shutdown and the command line, each against a
`uringserve` child process."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from http_support import (Reader, children, connect, free_port, get, pids_while_one_is_blocked, request, serve,
                          server_env, ROOT)


def run_cli(*args, env=None, timeout=20):
    return subprocess.run([sys.executable, "-m", "uringserve", *args], capture_output=True, text=True,
                          env=server_env(env), cwd=ROOT, timeout=timeout)


def test_keep_alive_and_header_timeouts_fire_on_time(tmp_path):
    # Idle keep-alive connections and unfinished heads are closed when their
    # time is up, not up to a second later (deadlines were checked once a
    # second). Four tries each, so that a check once a second could not
    # pass them all by luck.
    with serve("apps.wire_app:app", "--timeout-keep-alive", "0.3", "--timeout-request-header", "0.3",
               tmp_path=str(tmp_path)) as srv:
        for _ in range(4):
            with connect(srv.port) as s:
                s.sendall(get("/"))
                rd = Reader(s)
                assert rd.response().status == 200
                t0 = time.monotonic()
                assert rd.closed(timeout=5)
                assert 0.25 < time.monotonic() - t0 < 0.75
            with connect(srv.port) as s:
                t0 = time.monotonic()
                s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # never finished
                assert Reader(s).closed(timeout=5)
                assert 0.2 < time.monotonic() - t0 < 0.75
        assert srv.stop() == 0


def test_a_request_begun_ends_the_keep_alive_wait(tmp_path):
    # The keep-alive timeout is for an idle connection; once the next request
    # has begun, its head has --timeout-request-header (uvicorn cancels its
    # keep-alive timer on the first byte too).
    with serve("apps.wire_app:app", "--timeout-keep-alive", "0.5", "--timeout-request-header", "5",
               tmp_path=str(tmp_path)) as srv:
        with connect(srv.port) as s:
            s.sendall(get("/"))
            rd = Reader(s)
            assert rd.response().status == 200
            time.sleep(0.2)
            s.sendall(b"GET / HTTP/1.1\r\n")
            time.sleep(1.8)  # past the keep-alive deadline, even checked once a second
            s.sendall(b"Host: x\r\n\r\n")
            assert rd.response().status == 200
        assert srv.stop() == 0


def test_a_request_header_timeout_of_zero_is_no_limit(tmp_path):
    with serve("apps.wire_app:app", "--timeout-request-header", "0", tmp_path=str(tmp_path)) as srv:
        with connect(srv.port) as s:
            s.sendall(b"GET / HTTP/1.1\r\n")
            time.sleep(1.5)
            s.sendall(b"Host: x\r\n\r\n")
            assert Reader(s).response().status == 200
        assert srv.stop() == 0


def test_keep_alive_timeout_of_zero_turns_keep_alive_off(tmp_path):
    # as gunicorn's keepalive <= 0: each response says connection: close, so
    # that no client sends a second request into a connection about to close
    with serve("apps.wire_app:app", "--timeout-keep-alive", "0", tmp_path=str(tmp_path)) as srv:
        with connect(srv.port) as s:
            s.sendall(get("/"))
            rd = Reader(s)
            r = rd.response()
            assert r.status == 200 and r.header("connection") == "close"
            assert rd.closed(timeout=5)
        assert srv.stop() == 0


def test_slow_headers_are_cut_off(tmp_path):
    with serve("apps.wire_app:app", "--timeout-request-header", "1", tmp_path=str(tmp_path)) as srv:
        with connect(srv.port) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # never finished
            t0 = time.monotonic()
            assert Reader(s).closed(timeout=5)
            assert time.monotonic() - t0 < 4
        assert request(srv.port, get("/")).status == 200
        assert srv.stop() == 0


def test_limit_concurrency_answers_503(tmp_path):
    with serve("apps.wire_app:app", "--limit-concurrency", "1", tmp_path=str(tmp_path)) as srv:
        with connect(srv.port) as slow:
            slow.sendall(get("/slow?1"))
            time.sleep(0.2)
            r = request(srv.port, get("/"))
            assert r.status == 503 and r.body == b"Service Unavailable"
            assert Reader(slow).response().body == b"slow done"
        assert request(srv.port, get("/")).status == 200
        assert srv.stop() == 0
        # uvicorn's warning and access line
        assert "WARNING:  Exceeded concurrency limit." in srv.log
        assert '"GET / HTTP/1.1" 503 Service Unavailable' in srv.log


@pytest.mark.skipif(sys.version_info < (3, 12), reason="asyncio.eager_task_factory is new in 3.12")
def test_eager_task_factory_runs_apps_inside_create_task(tmp_path):
    # With an eager task factory the app runs, and often finishes, inside
    # the server's create_task(), while its request is still being parsed:
    # pipelined requests, bodies, failures and limits must come out as they
    # do with ordinary tasks.
    with serve("apps.wire_app:app", "--limit-concurrency", "2", env={"WIRE_EAGER_TASKS": "1"},
               tmp_path=str(tmp_path)) as srv:
        with connect(srv.port) as s:
            s.sendall(get("/current-task") + get("/stream") + b"POST /echo HTTP/1.1\r\nHost: x\r\n"
                      b"Content-Length: 5\r\n\r\nhello" + get("/raise-before") + get("/"))
            rd = Reader(s)
            assert rd.response().body == b"Task True"  # the app's own Task, not yet done
            assert rd.response().body == b"one,two,three"
            assert rd.response().body == b"hello"
            assert rd.response().status == 500
            assert rd.closed()  # a failed app closes the connection after its 500
        with connect(srv.port) as s:
            s.sendall(get("/no-response"))
            assert Reader(s).response().status == 500
        with connect(srv.port) as slow:
            slow.sendall(get("/slow?1"))
            time.sleep(0.2)
            assert request(srv.port, get("/")).status == 200  # one task running, limit 2
            assert Reader(slow).response().body == b"slow done"
        assert request(srv.port, get("/")).body == b"Hello, world!"
        assert srv.stop() == 0
    assert srv.log.count("Exception in ASGI application") == 1
    assert "ASGI callable returned without starting response" in srv.log


def test_limit_max_requests_exits(tmp_path):
    with serve("apps.wire_app:app", "--limit-max-requests", "3", tmp_path=str(tmp_path)) as srv:
        for _ in range(3):
            assert request(srv.port, get("/")).status == 200
        assert srv.proc.wait(10) == 0
        assert "Maximum request limit of 3 exceeded" in srv.log


def test_headers_options(tmp_path):
    with serve("apps.wire_app:app", "--header", "X-Extra: yes", "--no-server-header", "--no-date-header",
               tmp_path=str(tmp_path)) as srv:
        r = request(srv.port, get("/"))
        assert r.header("x-extra") == "yes"
        assert r.header("server") is None and r.header("date") is None
        assert srv.stop() == 0
    with serve("apps.wire_app:app", "--header", "X-Extra: yes", tmp_path=str(tmp_path)) as srv:
        r = request(srv.port, get("/own-server"))  # the app's own server header replaces ours only
        assert [v for n, v in r.headers if n == "server"] == ["custom/1"] and r.header("x-extra") == "yes"
        assert request(srv.port, get("/")).header("server") == "uringserve"
        assert srv.stop() == 0


def test_root_path(tmp_path):
    with serve("apps.wire_app:app", "--root-path", "/api", tmp_path=str(tmp_path)) as srv:
        r = request(srv.port, get("/x"))
        assert r.status == 404 and r.body == b"not found: /api/x"
        assert srv.stop() == 0


def test_proxy_headers_trusted_and_not(tmp_path):
    fwd = b"GET /scope HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 203.0.113.7\r\nX-Forwarded-Proto: https\r\n\r\n"
    with serve("apps.wire_app:app", tmp_path=str(tmp_path)) as srv:  # default: trust 127.0.0.1
        scope = json.loads(request(srv.port, fwd).body)
        assert scope["client"] == ["203.0.113.7", 0] and scope["scheme"] == "https"
        for proto, scheme in [(b"wss", "https"), (b"ws", "http")]:  # as a WebSocket proxy may say it
            scope = json.loads(request(srv.port, fwd.replace(b"https", proto)).body)
            assert scope["scheme"] == scheme
        assert srv.stop() == 0
    with serve("apps.wire_app:app", "--forwarded-allow-ips", "10.0.0.0/8", tmp_path=str(tmp_path)) as srv:
        scope = json.loads(request(srv.port, fwd).body)
        assert scope["client"][0] == "127.0.0.1" and scope["scheme"] == "http"
        assert srv.stop() == 0
    with serve("apps.wire_app:app", "--no-proxy-headers", tmp_path=str(tmp_path)) as srv:
        scope = json.loads(request(srv.port, fwd).body)
        assert scope["client"][0] == "127.0.0.1"
        assert srv.stop() == 0


def test_unix_socket(tmp_path):
    path = str(tmp_path / "srv.sock")
    with serve("apps.wire_app:app", "--uds", path, tmp_path=str(tmp_path)) as srv:
        assert oct(os.stat(path).st_mode & 0o777) == "0o666"
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(path)
            s.sendall(get("/scope"))
            scope = json.loads(Reader(s).response().body)
        assert scope["client"] is None and scope["server"] is None
        assert srv.stop() == 0
    assert not os.path.exists(path)


def test_ipv6(tmp_path):
    if not socket.has_ipv6:
        pytest.fail("IPv6 is required on the test machines")
    with serve("apps.wire_app:app", "--host", "::1", tmp_path=str(tmp_path)) as srv:
        with socket.create_connection(("::1", srv.port)) as s:
            s.sendall(get("/scope"))
            scope = json.loads(Reader(s).response().body)
        assert scope["server"] == ["::1", srv.port]
        assert "http://[::1]:" in srv.log
        assert srv.stop() == 0


def test_fd_inherited(tmp_path):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    port = sock.getsockname()[1]
    log = open(tmp_path / "log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "uringserve", "apps.wire_app:app", "--fd", str(sock.fileno())],
                            pass_fds=[sock.fileno()], stdout=log, stderr=subprocess.STDOUT, env=server_env(),
                            cwd=ROOT)
    try:
        deadline = time.monotonic() + 10
        while "running on" not in (tmp_path / "log").read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert request(port, get("/")).status == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sock.close()


def test_env_variables_set_options(tmp_path):
    port = free_port()
    with serve("apps.wire_app:app", tmp_path=str(tmp_path), port=port,
               env={"URINGSERVE_HEADERS": "X-From-Env: 1", "URINGSERVE_SERVER_HEADER": "false"}) as srv:
        r = request(srv.port, get("/"))
        assert r.header("x-from-env") == "1" and r.header("server") is None
        assert srv.stop() == 0


# ---- lifespan and shutdown ----

def test_lifespan_state_and_shutdown(tmp_path):
    marker = tmp_path / "shutdown"
    with serve("apps.wire_app:app", "--lifespan", "on", tmp_path=str(tmp_path),
               env={"WIRE_SHUTDOWN_MARKER": str(marker)}) as srv:
        scope = json.loads(request(srv.port, get("/scope")).body)
        assert scope["state"] == {"greeting": "hello from lifespan"}
        assert srv.stop(signal.SIGINT) == 0
    assert marker.read_text() == "shutdown ran"
    assert "Application startup complete." in srv.log and "Application shutdown complete." in srv.log


def test_lifespan_startup_failure_exits_3(tmp_path):
    r = run_cli("apps.wire_app:app", "--port", str(free_port()), env={"WIRE_FAIL_STARTUP": "1"})
    assert r.returncode == 3, r.stderr
    assert "startup refused by the test" in r.stderr
    assert "Application startup failed. Exiting." in r.stderr


def test_lifespan_unsupported_app(tmp_path):
    with serve("apps.plain_app:app", tmp_path=str(tmp_path)) as srv:
        assert request(srv.port, get("/")).body == b"plain"
        assert srv.stop() == 0
    assert "ASGI 'lifespan' protocol appears unsupported." in srv.log
    # followed, as with uvicorn, by the line that log watchers wait for
    assert "Application startup complete." in srv.log.split("appears unsupported.")[1]
    r = run_cli("apps.plain_app:app", "--port", str(free_port()), "--lifespan", "on")
    assert r.returncode == 3 and "Application startup failed" in r.stderr


def test_graceful_shutdown_lets_the_request_finish(tmp_path):
    with serve("apps.wire_app:app", tmp_path=str(tmp_path)) as srv:
        with connect(srv.port) as s:
            s.sendall(get("/slow?1"))
            time.sleep(0.2)
            srv.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 0.6  # the request still runs for 0.8 s
            with pytest.raises(OSError):  # no longer accepting
                while time.monotonic() < deadline:
                    connect(srv.port).close()
                    time.sleep(0.02)
            r = Reader(s).response()
            assert r.body == b"slow done" and r.header("connection") == "close"
        assert srv.proc.wait(10) == 0


def test_graceful_shutdown_does_not_wait_for_an_idle_clients_fin(tmp_path):
    """A pooled client keeps its idle keep-alive connection open until it
    next uses it. The shutdown closes that connection at once, as uvicorn's:
    it neither waits for the client's FIN (the lingering close's 2 s) nor
    logs that it waits for connections; the client sees the close."""
    with serve("apps.wire_app:app", tmp_path=str(tmp_path)) as srv:
        with connect(srv.port) as s:
            s.sendall(get("/"))
            rd = Reader(s)
            assert rd.response().status == 200
            srv.proc.send_signal(signal.SIGINT)
            assert srv.proc.wait(10) == 0  # with the client's socket still open
            assert rd.closed(timeout=5)
        log = srv.log
    assert "Finished server process" in log
    assert "Waiting for connections to close" not in log


def test_graceful_shutdown_serves_a_new_connections_first_request(tmp_path):
    """Idle keep-alive connections close at once (their clients retry), but a
    connection that has not brought its first request yet gets it served,
    with Connection: close; one that never sends closes after a grace."""
    with serve("apps.wire_app:app", tmp_path=str(tmp_path)) as srv:
        reused, fresh, silent = connect(srv.port), connect(srv.port), connect(srv.port)
        with reused, fresh, silent:
            reused.sendall(get("/"))
            assert Reader(reused).response().status == 200
            time.sleep(0.2)  # all three accepted
            srv.proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)  # the drain has run
            assert Reader(reused).closed(timeout=5)
            fresh.sendall(get("/"))
            r = Reader(fresh).response()
            assert r.status == 200 and r.header("connection") == "close"
            assert Reader(fresh).closed(timeout=5)
            assert Reader(silent).closed(timeout=10)
            assert srv.proc.wait(10) == 0


def test_workers_share_the_socket_by_busyness(tmp_path):
    """--workers share one listening socket. While one worker's loop is busy,
    new connections go to an idle one. (An io_uring accept is an exclusive
    waiter: the kernel wakes one per connection, always the same one, so
    before the fix one worker took every connection and the other idled.)"""
    with serve("apps.wire_app:app", "--workers", "2", tmp_path=str(tmp_path)) as srv:
        deadline = time.monotonic() + 15
        while srv.log.count("is serving") < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        pids = pids_while_one_is_blocked(srv.port)
        assert len(pids) == 2 and pids[0] != pids[1], pids
        assert srv.stop() == 0


def test_graceful_shutdown_timeout_cancels(tmp_path):
    # as uvicorn's: a cancelled app whose response had not started is
    # answered 500 (its connection used to close without a word), one whose
    # response had begun is cut off, and each CancelledError is logged
    with serve("apps.wire_app:app", "--timeout-graceful-shutdown", "0.5", tmp_path=str(tmp_path)) as srv:
        with connect(srv.port) as s, connect(srv.port) as s2:
            s.sendall(get("/slow?30"))
            s2.sendall(get("/slow-stream?30"))
            rd2 = Reader(s2)
            assert rd2._until(b"begun,")
            t0 = time.monotonic()
            srv.proc.send_signal(signal.SIGTERM)
            rd = Reader(s)
            r = rd.response()
            assert r.status == 500 and r.header("connection") == "close" and r.body == b"Internal Server Error"
            assert rd.closed(timeout=10)
            s2.settimeout(10)
            rest = rd2.buf
            while chunk := s2.recv(65536):
                rest += chunk
            assert b"done" not in rest and not rest.endswith(b"0\r\n\r\n")  # cut off: no last chunk
            assert srv.proc.wait(10) == 0
            assert time.monotonic() - t0 < 5
        log = srv.log
        assert "Cancel 2 running task(s), timeout graceful shutdown exceeded" in log
        assert log.count("Exception in ASGI application") == 2
        assert "CancelledError: Task cancelled, timeout graceful shutdown exceeded" in log


def test_a_second_ctrl_c_forces_the_quit(tmp_path):
    # as uvicorn's: the wait for connections ends, and the lifespan shutdown
    # is skipped (the log said the graceful timeout had been exceeded, and
    # the app's shutdown ran anyway)
    with serve("apps.wire_app:app", tmp_path=str(tmp_path)) as srv:
        with connect(srv.port) as s:
            s.sendall(get("/slow?30"))
            time.sleep(0.2)
            t0 = time.monotonic()
            srv.proc.send_signal(signal.SIGINT)
            deadline = time.monotonic() + 10
            while "Waiting for connections to close" not in srv.log and time.monotonic() < deadline:
                time.sleep(0.02)
            srv.proc.send_signal(signal.SIGINT)
            assert Reader(s).closed(timeout=10)
            assert srv.proc.wait(10) == 0
            assert time.monotonic() - t0 < 5
        assert "Cancel 1 running task(s), forced to quit" in srv.log
        assert "Waiting for application shutdown" not in srv.log and "Finished server process" in srv.log


# ---- the command line ----

def test_cli_bad_option():
    r = run_cli("apps.wire_app:app", "--no-such-option")
    assert r.returncode == 2 and "unrecognized arguments: --no-such-option" in r.stderr


def test_cli_port_out_of_range_is_refused_before_the_app_starts():
    # from the environment too (a positive-integer option there gave a traceback)
    for port in ("70000", "-1"):
        r = run_cli("apps.wire_app:app", "--port", port)
        assert r.returncode == 2 and "argument --port: must be 0-65535" in r.stderr, r.stderr
        assert "startup" not in r.stderr
    r = run_cli("apps.wire_app:app", env={"URINGSERVE_PORT": "70000"})
    assert r.returncode == 2 and "invalid value '70000' in URINGSERVE_PORT: must be 0-65535" in r.stderr, r.stderr
    r = run_cli("apps.wire_app:app", env={"URINGSERVE_WORKERS": "0"})
    assert r.returncode == 2 and "in URINGSERVE_WORKERS: must be a positive integer" in r.stderr, r.stderr


def test_cli_missing_module_and_attribute():
    r = run_cli("no_such_module_xyz:app", "--port", str(free_port()))
    assert r.returncode == 1
    assert 'Error loading ASGI app. Could not import module "no_such_module_xyz".' in r.stderr
    r = run_cli("apps.wire_app:nope", "--port", str(free_port()))
    assert r.returncode == 1
    assert 'Attribute "nope" not found in module "apps.wire_app".' in r.stderr


def test_cli_port_in_use():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        r = run_cli("apps.wire_app:app", "--port", str(s.getsockname()[1]))
    assert r.returncode == 1
    assert "error while attempting to bind on address" in r.stderr and "address already in use" in r.stderr


def test_cli_version():
    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.startswith("Running uringserve ")


def test_factory_and_app_dir(tmp_path):
    (tmp_path / "made.py").write_text(
        "def create():\n"
        "    async def app(scope, receive, send):\n"
        "        if scope['type'] != 'http':\n            return\n"
        "        await send({'type': 'http.response.start', 'status': 200, 'headers': []})\n"
        "        await send({'type': 'http.response.body', 'body': b'made'})\n"
        "    return app\n")
    with serve("made:create", "--factory", "--app-dir", str(tmp_path), tmp_path=str(tmp_path)) as srv:
        assert request(srv.port, get("/")).body == b"made"
        assert srv.stop() == 0


def run_embedded(code):
    """A program embedding uringserve, run from the repository root."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=server_env(), cwd=ROOT,
                          timeout=20)


def test_embedding_api(tmp_path):
    code = (
        "import threading, urllib.request, uringserve, sys\n"
        "sys.path.insert(0, 'tests')\n"
        "from apps.plain_app import app\n"
        "cfg = uringserve.Config(app, port=%d, lifespan='off', limit_max_requests=1)\n"
        "srv = uringserve.Server(cfg)\n"
        "t = threading.Timer(0.5, lambda: print(urllib.request.urlopen('http://127.0.0.1:%d/').read()))\n"
        "t.start()\n"
        "print('exit', srv.run())\n" % ((port := free_port()), port))
    r = run_embedded(code)
    assert "b'plain'" in r.stdout and "exit 0" in r.stdout, r.stderr


@pytest.mark.parametrize("reset", [False, True])
def test_app_tasks_start_from_the_context_serve_ran_in(tmp_path, reset):
    # As under uvicorn on asyncio: a contextvar set before serve() is seen by
    # every request, and what one request sets stays in its own copy; with
    # reset_contextvars (uvicorn's --reset-contextvars) every request starts
    # from an empty context.
    code = (
        "import asyncio, contextvars, urllib.request, uringloop, uringserve\n"
        "cvar = contextvars.ContextVar('cvar', default='unset')\n"
        "async def app(scope, receive, send):\n"
        "    seen = cvar.get()\n"
        "    cvar.set('set by a request')\n"
        "    await send({'type': 'http.response.start', 'status': 200, 'headers': []})\n"
        "    await send({'type': 'http.response.body', 'body': seen.encode()})\n"
        "cfg = uringserve.Config(app, port=%d, lifespan='off', limit_max_requests=2, reset_contextvars=%s)\n"
        "srv = uringserve.Server(cfg)\n"
        "def fetch():\n"
        "    return [urllib.request.urlopen('http://127.0.0.1:%d/').read() for _ in range(2)]\n"
        "async def main():\n"
        "    cvar.set('set before serve')\n"
        "    serving = asyncio.ensure_future(srv.serve())\n"
        "    while not srv.started:\n"
        "        await asyncio.sleep(0.01)\n"
        "    print(await asyncio.get_running_loop().run_in_executor(None, fetch))\n"
        "    await serving\n"
        "uringloop.run(main())\n" % ((port := free_port()), reset, port))
    r = run_embedded(code)
    seen = "b'unset'" if reset else "b'set before serve'"
    assert f"[{seen}, {seen}]" in r.stdout, (r.stdout, r.stderr)


def test_log_config_file_and_access_log_format(tmp_path):
    cfg = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"access": {"()": "uringserve.logging.AccessFormatter",
                                  "fmt": "ACCESS %(client_addr)s %(request_line)s %(status_code)s"},
                       "plain": {"format": "PLAIN %(levelname)s %(message)s"}},
        "handlers": {"access": {"class": "logging.StreamHandler", "formatter": "access",
                                "stream": "ext://sys.stdout"},
                     "plain": {"class": "logging.StreamHandler", "formatter": "plain", "stream": "ext://sys.stderr"}},
        "loggers": {"uringserve": {"handlers": ["plain"], "level": "INFO", "propagate": False},
                    "uringserve.access": {"handlers": ["access"], "level": "INFO", "propagate": False}},
    }
    path = tmp_path / "log.json"
    path.write_text(json.dumps(cfg))
    with serve("apps.wire_app:app", "--log-config", str(path), tmp_path=str(tmp_path)) as srv:
        assert request(srv.port, get("/scope?x=1")).status == 200
        assert srv.stop() == 0
    assert "PLAIN INFO Uringserve running on" in srv.log
    assert "ACCESS 127.0.0.1:" in srv.log and "GET /scope?x=1 HTTP/1.1 200 OK" in srv.log
    r = run_cli("apps.wire_app:app", "--log-config", str(tmp_path / "missing.json"))
    assert r.returncode == 2 and "no such file" in r.stderr


def test_request_limits_options(tmp_path):
    with serve("apps.wire_app:app", "--limit-request-line", "20", "--limit-request-fields", "3",
               tmp_path=str(tmp_path)) as srv:
        assert request(srv.port, get("/" + "a" * 30)).status == 414
        many = b"GET / HTTP/1.1\r\nHost: x\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n"
        assert request(srv.port, many).status == 431
        assert request(srv.port, get("/")).status == 200
        assert srv.stop() == 0
    # uvicorn's h11 buffer limit is the size of the whole head here
    with serve("apps.wire_app:app", "--h11-max-incomplete-event-size", "1024", tmp_path=str(tmp_path)) as srv:
        head = b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 100) for i in range(8))
        assert request(srv.port, head + b"\r\n").status == 200  # ~900 bytes
        head += b"".join(b"Y-%d: %s\r\n" % (i, b"v" * 100) for i in range(4))
        assert request(srv.port, head + b"\r\n").status == 431  # ~1350 bytes
        assert srv.stop() == 0


# ---- new code: --reload and SIGHUP ----

def _write_app(path, body):
    """A one-file ASGI app answering `body`; the mtime moves on every write
    even within the file system's timestamp granularity."""
    path.write_text(body)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000 * (1 + int(time.time()) % 1000)))


APP_SOURCE = '''
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": %r})
'''


def _fetch(port):
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
        return r.read()


def _wait_for_body(srv, expected, timeout=15):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if _fetch(srv.port) == expected:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"never served {expected!r}:\n{srv.log}")


def test_reload_serves_the_changed_code_and_survives_broken_code(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    app_file = src / "reload_app_mod.py"
    _write_app(app_file, APP_SOURCE % b"v1")
    with serve("reload_app_mod:app", "--app-dir", str(src), "--reload", "--reload-dir", str(src),
               "--reload-delay", "0.1", tmp_path=str(tmp_path)) as srv:
        assert _fetch(srv.port) == b"v1"
        assert "Started reloader process" in srv.log and str(src) in srv.log
        _write_app(app_file, APP_SOURCE % b"v2")
        _wait_for_body(srv, b"v2")
        assert "StatReload detected changes in" in srv.log and "reload_app_mod.py" in srv.log
        # the v1 worker accepts until it has acted on its SIGTERM (it served
        # v1 once after the broken code below had failed, under ASan)
        deadline = time.monotonic() + 15
        while "stopped (exit code 0)" not in srv.log and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "stopped (exit code 0)" in srv.log, srv.log
        # code that cannot import: the worker running v2 keeps serving
        _write_app(app_file, "this is not python(\n")
        deadline = time.monotonic() + 15
        while "failed to start" not in srv.log and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "failed to start" in srv.log, srv.log
        assert _fetch(srv.port) == b"v2", srv.log
        _write_app(app_file, APP_SOURCE % b"v3")
        _wait_for_body(srv, b"v3")
        # a file that does not match the include globs changes nothing
        n = srv.log.count("detected changes")
        (src / "notes.txt").write_text("x")
        time.sleep(0.5)
        assert srv.log.count("detected changes") == n
        assert srv.stop() == 0, srv.log


def test_reload_starts_once_broken_code_is_fixed(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    app_file = src / "reload_late_mod.py"
    _write_app(app_file, "raise RuntimeError('not yet')\n")
    with serve("reload_late_mod:app", "--app-dir", str(src), "--reload", "--reload-dir", str(src),
               "--reload-delay", "0.1", tmp_path=str(tmp_path), wait=False) as srv:
        deadline = time.monotonic() + 15
        while "Started reloader process" not in srv.log and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "not yet" in srv.log and srv.proc.poll() is None, srv.log
        _write_app(app_file, APP_SOURCE % b"fixed")
        _wait_for_body(srv, b"fixed")
        assert srv.stop() == 0, srv.log


def test_sighup_workers_run_the_code_on_disk(tmp_path):
    # the parent never imports the app, so workers started by SIGHUP import
    # the code as it is then (they forked an interpreter holding v1 before)
    src = tmp_path / "src"
    src.mkdir()
    app_file = src / "hup_app_mod.py"
    _write_app(app_file, APP_SOURCE % b"v1")
    with serve("hup_app_mod:app", "--app-dir", str(src), "--workers", "2", tmp_path=str(tmp_path)) as srv:
        assert _fetch(srv.port) == b"v1"
        _write_app(app_file, APP_SOURCE % b"v2")
        srv.proc.send_signal(signal.SIGHUP)
        _wait_for_body(srv, b"v2")
        deadline = time.monotonic() + 15
        while srv.log.count("stopped (exit code 0)") < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all(_fetch(srv.port) == b"v2" for _ in range(20))
        # code that cannot start is not swapped in: v2 keeps serving (a
        # worker that died at startup once passed for ready, its pipe at EOF)
        _write_app(app_file, "raise RuntimeError('broken deploy')\n")
        srv.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 15
        while srv.log.count("did not start; keeping") < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert srv.log.count("did not start; keeping") == 2, srv.log
        assert all(_fetch(srv.port) == b"v2" for _ in range(20))
        assert srv.stop() == 0, srv.log


def test_workers_with_an_app_that_cannot_load_exit_1(tmp_path):
    r = run_cli("no_such_module_xyz:app", "--workers", "2", "--port", str(free_port()))
    assert r.returncode == 1 and 'Could not import module "no_such_module_xyz"' in r.stderr + r.stdout


# ---- more of uvicorn's options ----

ENV_APP = '''
import os

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": os.environ.get("GREETING", "unset").encode()})
'''


def test_env_file_sets_the_environment_before_the_app_loads(tmp_path):
    (tmp_path / "env_app_mod.py").write_text(ENV_APP)
    env_file = tmp_path / "app.env"
    env_file.write_text('# a comment\nexport GREETING="hello from .env"\n')
    with serve("env_app_mod:app", "--app-dir", str(tmp_path), "--env-file", str(env_file),
               tmp_path=str(tmp_path)) as srv:
        assert _fetch(srv.port) == b"hello from .env"
        assert f"Loading environment from '{env_file}'" in srv.log
        assert srv.stop() == 0
    # a variable already set wins, as with python-dotenv under uvicorn
    with serve("env_app_mod:app", "--app-dir", str(tmp_path), "--env-file", str(env_file),
               env={"GREETING": "from the shell"}, tmp_path=str(tmp_path)) as srv:
        assert _fetch(srv.port) == b"from the shell"
        assert srv.stop() == 0
    r = run_cli("env_app_mod:app", "--env-file", str(tmp_path / "missing.env"))
    assert r.returncode == 2 and "--env-file: no such file" in r.stderr


def test_limit_max_requests_jitter_moves_the_limit():
    """In-process: a server that has served 5 requests with a limit of 3
    stops at once; with a jitter of 10**9 it keeps serving."""
    import asyncio
    import types

    from uringserve.config import Config
    from uringserve.server import Server

    def stops_within(jitter, seconds):
        server = Server(Config("x:y", limit_max_requests=3, limit_max_requests_jitter=jitter,
                               configure_logging=False))
        server.core = types.SimpleNamespace(stats={"requests": 5}, tick=lambda: None)

        async def go():
            try:
                await asyncio.wait_for(server.main_loop(), seconds)
                return True
            except asyncio.TimeoutError:
                return False
        return asyncio.run(go())

    assert stops_within(0, 2)
    assert not stops_within(10**9, 0.5)


def test_use_colors(tmp_path):
    with serve("apps.wire_app:app", "--use-colors", tmp_path=str(tmp_path)) as srv:
        request(srv.port, get("/"))
        assert srv.stop() == 0
    assert "\x1b[32mINFO\x1b[0m:     " in srv.log and "\x1b[32m200 OK\x1b[0m" in srv.log, srv.log
    with serve("apps.wire_app:app", tmp_path=str(tmp_path)) as srv:  # the log is no terminal
        request(srv.port, get("/"))
        assert srv.stop() == 0
    assert "\x1b[" not in srv.log and "INFO:     " in srv.log


ASGI2_APP = '''
def app(*args):  # no signature to tell ASGI 2 from 3 by
    scope = args[0]

    async def instance(receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"asgi2 " + scope["path"].encode()})
    return instance
'''


def test_interface_asgi2_and_uvicorn_options_accepted_or_refused_with_a_reason(tmp_path):  # (--ssl-*: e2e/test_tls.py)
    (tmp_path / "asgi2_mod.py").write_text(ASGI2_APP)
    with serve("asgi2_mod:app", "--app-dir", str(tmp_path), "--interface", "asgi2", "--loop", "uvloop",
               "--http", "httptools", "--lifespan", "off", tmp_path=str(tmp_path)) as srv:
        assert _fetch(srv.port) == b"asgi2 /"
        assert srv.stop() == 0
    assert "--loop uvloop is ignored: uringserve runs on uringloop" in srv.log
    assert "--http httptools is ignored" in srv.log
    r = run_cli("apps.wire_app:app", "--interface", "wsgi")
    assert r.returncode == 2 and "WSGI applications are not served" in r.stderr
    r = run_cli("apps.wire_app:app", "--http2")
    assert r.returncode == 2 and "HTTP/1.1 only" in r.stderr


def test_default_trusted_proxies_are_the_loopback_addresses(monkeypatch):
    # uvicorn's default: FORWARDED_ALLOW_IPS or "127.0.0.1,::1"
    from uringserve.config import Config
    from uringserve.proxy import TrustedHosts

    monkeypatch.delenv("FORWARDED_ALLOW_IPS", raising=False)
    trusted = TrustedHosts(Config("x:y", configure_logging=False).forwarded_allow_ips)
    assert "127.0.0.1" in trusted and "::1" in trusted and "10.0.0.1" not in trusted
    monkeypatch.setenv("FORWARDED_ALLOW_IPS", "10.0.0.0/8")
    trusted = TrustedHosts(Config("x:y", configure_logging=False).forwarded_allow_ips)
    assert "10.0.0.1" in trusted and "127.0.0.1" not in trusted


def test_a_worker_that_stops_answering_is_killed_and_replaced(tmp_path):
    # uvicorn's --timeout-worker-healthcheck: a stopped worker (SIGSTOP) no
    # longer beats, so the parent kills it and starts another
    with serve("apps.wire_app:app", "--workers", "2", "--timeout-worker-healthcheck", "1",
               tmp_path=str(tmp_path)) as srv:
        deadline = time.monotonic() + 15
        while srv.log.count("is serving") < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        workers = children(srv.proc.pid)
        assert len(workers) == 2, srv.log
        time.sleep(2)  # healthy workers are left alone
        assert children(srv.proc.pid) == workers and "health check" not in srv.log
        os.kill(workers[0], signal.SIGSTOP)
        while srv.log.count("is serving") < 3 and time.monotonic() < deadline + 10:
            time.sleep(0.05)
        assert f"Worker [{workers[0]}] did not answer the health check" in srv.log, srv.log
        now = children(srv.proc.pid)
        assert len(now) == 2 and workers[0] not in now and workers[1] in now
        assert request(srv.port, get("/")).status == 200
        assert srv.stop() == 0, srv.log


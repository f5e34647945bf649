"""Random clients against `uringserve` (e2e/stress_clients.py): a few
seconds of well-formed, malformed, pipelined, cut-short and aborted HTTP
requests and WebSocket sessions against an app that also misbehaves on
purpose (e2e/webapps/chaos_app.py). What must hold: a well-behaved client
is answered all along, nothing but the app's own errors is logged (no
exception the server failed to handle, no task left to the garbage
collector), the server's descriptors come back to where they were, and it
stops cleanly. Each of these found a bug when first run."""

import os
import random
import re
import sys
import time

import pytest

import stress_clients

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from http_support import serve  # noqa: E402

E2E = os.path.dirname(os.path.abspath(__file__))
CERT = os.path.join(os.path.dirname(E2E), "tests", "certs", "localhost.pem")

# What the server may log in these runs: the app's deliberate failures.
APP_ERRORS = re.compile(r"RuntimeError: (chaos: |Response content shorter than Content-Length|"
                        r"invalid ASGI response header|Expected ASGI message 'http.response.body')")
NEVER = ["Task was destroyed", "never retrieved", "AssertionError", "InvalidState", "Cannot call write",
         "socket.send() raised", "Fatal Python error", "Unhandled", "Exception in callback"]


def descriptors(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def check_log(log, tls=False):
    never = NEVER
    if tls and sys.version_info < (3, 11):
        # asyncio's SSL transport before 3.11 goes on writing into a TCP
        # transport that a reset has already closed (its is_closing() only
        # knows of close()), and that transport warns from the fifth write:
        # a warning of the standard library's, which 3.11's SSL protocol no
        # longer gives cause for
        never = [bad for bad in NEVER if bad != "socket.send() raised"]
    for bad in never:
        assert bad not in log, f"{bad!r} in the server's log:\n{log[-20000:]}"
    # every traceback ends in one of the app's own errors
    for block in log.split("Traceback (most recent call last):")[1:]:
        last = [line for line in block.splitlines() if line and not line.startswith((" ", "\t"))]
        assert last and APP_ERRORS.match(last[0]), block[:3000]


@pytest.mark.parametrize("kind,tls", [("http", False), ("websocket", False), ("http", True), ("websocket", True)])
def test_random_clients(tmp_path, kind, tls):
    seed = random.randrange(1 << 32)
    args = ["--app-dir", E2E, "--no-access-log"]
    if tls:
        args += ["--ssl-certfile", CERT, "--ssl-keyfile", CERT]
    with serve("webapps.chaos_app:app", *args, tmp_path=str(tmp_path)) as srv:
        before = descriptors(srv.proc.pid)
        stats = stress_clients.run(srv.port, 6, seed, "http" if kind == "http" else "ws", tls)
        # floors that show the run exercised the server, not a speed check:
        # under ASan, beside the other xdist worker's heaviest tests, a run
        # has made 474 HTTP and 67 WebSocket connections (2026-12-06)
        assert stats["health"] > 10 and stats["connections"] > (200 if kind == "http" else 30), (seed, stats)
        # what the clients left is closed once the server has seen them go
        # (the lingering close waits up to 2 s for a client's FIN)
        deadline = time.monotonic() + 10
        while descriptors(srv.proc.pid) > before and time.monotonic() < deadline:
            time.sleep(0.1)
        assert descriptors(srv.proc.pid) <= before, (seed, before, descriptors(srv.proc.pid))
        assert srv.stop() == 0, srv.log
        log = srv.log
    try:
        check_log(log, tls)
    except AssertionError as exc:
        raise AssertionError(f"seed {seed}: {exc}") from None

"""Shared fixtures: every loop test runs on uringloop and on stock asyncio."""

import asyncio
import os
import socket
import ssl

import pytest

import uringloop

LOOP_KINDS = ("uringloop", "asyncio")


def make_loop(kind):
    if kind == "uringloop":
        loop = uringloop.new_event_loop()
        assert isinstance(loop, uringloop.Loop)
        return loop
    return asyncio.SelectorEventLoop()


@pytest.fixture(params=LOOP_KINDS)
def loop_kind(request):
    return request.param


@pytest.fixture
def loop(loop_kind):
    lp = make_loop(loop_kind)
    asyncio.set_event_loop(lp)
    yield lp
    if not lp.is_closed():
        if not lp.is_running():
            lp.run_until_complete(lp.shutdown_default_executor())
        lp.close()
    asyncio.set_event_loop(None)


def open_fds():
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture
def no_fd_leak():
    """Fails the test if it leaves file descriptors open."""
    before = open_fds()
    yield
    import gc
    gc.collect()
    leaked = open_fds() - before
    # an fd listed but already gone again is not a leak
    leaked = {fd for fd in leaked if os.path.exists(f"/proc/self/fd/{fd}")}
    assert not leaked, {fd: os.readlink(f"/proc/self/fd/{fd}") for fd in leaked}


TEST_CERT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "certs", "localhost.pem")


def tls_contexts():
    """(server, client) SSLContexts for `localhost` with the test certificate."""
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(TEST_CERT)
    return server_ctx, ssl.create_default_context(cafile=TEST_CERT)


def run(loop, coro, timeout=10):
    return loop.run_until_complete(asyncio.wait_for(coro, timeout))


def close_with_reset(sock):
    """Closes sock so that the peer gets an RST (SO_LINGER with a zero timeout)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()


def full_unix_dgram_peer(path):
    """A non-blocking Unix datagram socket bound at `path` that reads
    nothing, and another connected to it that has filled its queue with
    b"o" datagrams: (peer, sender, how many)."""
    peer = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    peer.bind(path)
    peer.setblocking(False)
    sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sender.connect(path)
    sender.setblocking(False)
    filled = 0
    while True:
        try:
            sender.send(b"o")
            filled += 1
        except BlockingIOError:
            return peer, sender, filled

def tcp_pair():
    """A connected pair of non-blocking TCP sockets on loopback."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        a = socket.create_connection(listener.getsockname())
        b, _ = listener.accept()
    a.setblocking(False)
    b.setblocking(False)
    return a, b


# Some of CPython's asyncio tests (tests/cpython/) call skipTest() when the
# loop under test misbehaves (test_sock_client_connect_racing skips on
# EISCONN, for one), which would hide a regression among the suite's own
# skips. There, only the skips CPython makes for every loop pass as skips;
# any other is reported as a failure.
CPYTHON_EXPECTED_SKIPS = (
    # test_subprocess: CPython skips its MultiLoopChildWatcher tests everywhere
    "bpo-38323: MultiLoopChildWatcher has a race condition",
    # test_events: a test of the selector loop's internals
    "loop is not a BaseSelectorEventLoop",
    # test_tasks: reference-leak tests, which need a debug build of CPython
    "has no attribute 'gettotalrefcount'",
)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not report.skipped or call.excinfo is None or "tests/cpython/" not in item.nodeid:
        return
    reason = str(call.excinfo.value)
    if not any(expected in reason for expected in CPYTHON_EXPECTED_SKIPS):
        report.outcome = "failed"
        report.longrepr = f"unexpected skip in CPython's asyncio suite (a failure it turns into a skip?): {reason}"

"""The HTTP server's listener, driven in-process through the C server object
(`uringloop._core.HttpServer`) so that the test decides exactly when the
loop enters the ring."""

import asyncio
import socket

import pytest

import uringloop
from uringloop._core import HttpServer

from conftest import close_with_reset
from http_support import Reader, get


async def hello(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


def log_error(message, exc):
    raise AssertionError(f"server logged an error: {message} {exc!r}")


def listener():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    return s


def read_response(sock):
    rd = Reader(sock)
    r = rd.response()
    return r, rd.closed(timeout=5)


def test_stop_accepting_serves_the_connection_it_was_woken_for():
    """A connection arrives while the loop is busy, and the server stops
    accepting before the loop enters the ring again. The kernel woke our
    accept for it (one waiter per connection on a listening socket), so if
    we neither accept it nor pass it on, it stays in the backlog of a socket
    that other processes still hold, and they are never told. It must be
    served (with Connection: close) and the server's descriptor closed."""
    loop = uringloop.new_event_loop()
    lsock = listener()
    sibling = lsock.dup()  # a sibling worker's hold on the socket: the kernel keeps the backlog
    client = None
    try:

        async def main():
            nonlocal client
            core = HttpServer(loop, hello, log_error)
            core.listen(lsock)
            await asyncio.sleep(0.05)  # the accept is armed and waiting
            # All of this runs without the loop entering the ring: the
            # connection is complete in the kernel and its wakeup is queued.
            client = socket.create_connection(lsock.getsockname(), timeout=5)
            client.sendall(get("/"))
            core.stop_accepting()
            lsock.close()  # as the shutdown does: the server keeps its own descriptor
            core.drain()
            r, closed = await loop.run_in_executor(None, read_response, client)
            assert r.status == 200 and r.body == b"ok"
            assert r.header("connection") == "close"
            assert closed
            client.close()  # the server closes after the client (lingering close)
            for _ in range(100):
                if not core.stats["connections"] and not core.accepting:
                    break
                await asyncio.sleep(0.01)
            assert core.stats["connections"] == 0 and not core.accepting

        loop.run_until_complete(asyncio.wait_for(main(), 20))
        # The server let go of the socket: a connection made now waits in
        # the backlog for the sibling, and nothing in this process took it.
        with socket.create_connection(sibling.getsockname(), timeout=5):
            sibling.settimeout(5)
            conn, _ = sibling.accept()
            conn.close()
    finally:
        if client is not None:
            client.close()
        sibling.close()
        loop.close()


def test_out_of_descriptors_waits_and_logs_instead_of_spinning():
    """With the descriptor limit reached, a multishot accept ends with
    EMFILE at once, and armed again at once it fails again at once: a core
    spun at 100% while connections waited. Now the error is logged once and
    accepting waits for the next tick, as asyncio waits a second; the
    connections left in the backlog are served once descriptors are free."""
    import os
    import resource
    import time

    errors = []
    loop = uringloop.new_event_loop()
    lsock = listener()
    clients = [socket.socket() for _ in range(8)]  # made now: no descriptor needed to connect them
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:

        async def main():
            core = HttpServer(loop, hello, lambda message, exc: errors.append(message))
            await asyncio.sleep(0.05)
            # (an accept takes the limit in force when it is armed)
            resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 2, hard))
            try:
                core.listen(lsock)
                for c in clients:
                    c.settimeout(5)
                    c.connect(lsock.getsockname())
                await asyncio.sleep(0.1)
                cpu0 = time.process_time()
                await asyncio.sleep(1.0)  # no tick: the listener stays starved
                cpu = time.process_time() - cpu0
            finally:
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            assert cpu < 0.25, f"the loop spun while out of descriptors ({cpu:.2f} s of CPU in 1 s)"
            assert len(errors) == 1 and "[Errno 24]" in errors[0], errors
            core.tick()  # a second has passed: accept again, now that descriptors are free
            for c in clients:
                c.sendall(get("/"))
            rs = await asyncio.gather(*(loop.run_in_executor(None, Reader(c).response) for c in clients))
            assert [r.status for r in rs] == [200] * len(clients)
            core.stop_accepting()
            core.cancel_all()

        loop.run_until_complete(asyncio.wait_for(main(), 20))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        for c in clients:
            c.close()
        lsock.close()
        loop.close()


def test_adopt_on_a_closed_loop_closes_the_descriptor():
    """adopt() takes a descriptor its caller has given up (the TLS bridge
    detaches its end of a socketpair): when it refuses it, it closes it."""
    import os

    loop = uringloop.new_event_loop()
    core = HttpServer(loop, hello, log_error)
    loop.close()
    ours, theirs = socket.socketpair()
    fd = theirs.detach()
    try:
        with pytest.raises(RuntimeError, match="needs a running uringloop"):
            core.adopt(fd, None, None)
        with pytest.raises(OSError):
            os.fstat(fd)
    finally:
        ours.close()


def test_an_invalid_default_header_is_named_whatever_the_iterable():
    """headers= (uvicorn's --header) may be any iterable of pairs; the error
    names the pair it refuses. The message used to be built from the list
    made of a generator after that list was freed (a use-after-free the
    ASan+UBSan pass reports)."""
    loop = uringloop.new_event_loop()
    try:
        for headers in ([(b"x-bad", b"a\r\nb")], (pair for pair in [(b"x-bad", b"a\r\nb")])):
            with pytest.raises(ValueError, match="invalid header.*x-bad"):
                HttpServer(loop, hello, log_error, headers=headers)
        HttpServer(loop, hello, log_error, headers=(pair for pair in [(b"x-good", b"yes")]))
    finally:
        loop.close()


async def _connections_after(core, seconds):
    """The server's connection count once it is 0, or after `seconds`."""
    end = asyncio.get_running_loop().time() + seconds
    while core.stats["connections"] and asyncio.get_running_loop().time() < end:
        await asyncio.sleep(0.01)
    return core.stats["connections"]


def _drain_with_one_client(after_response):
    """A client gets one response on a keep-alive connection, then does
    `after_response(client)` and keeps its socket open; the server drains.
    Returns (connections 1 s after the drain, whether the client saw the
    server close, connections once the client has closed)."""
    loop = uringloop.new_event_loop()
    lsock = listener()
    client = None
    try:

        async def main():
            nonlocal client
            core = HttpServer(loop, hello, log_error)
            core.listen(lsock)
            client = socket.create_connection(lsock.getsockname(), timeout=5)
            client.sendall(get("/"))
            rd = Reader(client)
            r = await loop.run_in_executor(None, rd.response)
            assert r.status == 200 and r.header("connection") != "close"
            after_response(client)
            await asyncio.sleep(0.05)  # what the client sent has come
            core.stop_accepting()
            core.drain()
            during = await _connections_after(core, 1.0)  # the lingering close waits 2 s
            closed = await loop.run_in_executor(None, rd.closed, 5)
            client.close()
            return during, closed, await _connections_after(core, 5.0)

        return loop.run_until_complete(asyncio.wait_for(main(), 20))
    finally:
        if client is not None:
            client.close()
        lsock.close()
        loop.close()


def test_a_drain_closes_an_idle_connection_without_waiting_for_its_client():
    """An idle keep-alive connection with nothing of a next request closes
    at once on a drain: nothing a reset could destroy. A pooled client
    closes its end only when it next uses the connection, and waiting for
    its FIN held up the server's exit by the 2 s of the lingering close
    (uvicorn closes idle connections at once)."""
    during, closed, after = _drain_with_one_client(lambda client: None)
    assert during == 0
    assert closed and after == 0


def test_a_drain_lingers_where_a_next_request_has_begun():
    """Where part of a next request has come, the drain's close lingers: the
    server shuts down its sending side and reads until the client's FIN, so
    that the unread bytes do not turn the close into a reset."""
    during, closed, after = _drain_with_one_client(lambda client: client.sendall(b"GET / HT"))
    assert during == 1
    assert closed and after == 0


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["ipv4", "ipv6"])
def test_a_request_from_a_client_that_reset_still_has_its_client_address(family):
    """A client sends a request and resets the connection before the server
    has read it. The request is still read and run (its bytes were
    received), and scope["client"] is the client's address, which uvicorn
    has from accept(): the kernel's getpeername() fails once the peer has
    reset, so the server must ask the socket for the address it was
    connected to."""
    loop = uringloop.new_event_loop()
    host = "127.0.0.1" if family == socket.AF_INET else "::1"
    lsock = socket.socket(family)
    lsock.bind((host, 0))
    lsock.listen(16)
    scopes = []

    async def app(scope, receive, send):
        if scope["type"] == "http":
            scopes.append(scope)
        await hello(scope, receive, send)

    try:

        async def main():
            core = HttpServer(loop, app, lambda message, exc: None)  # the reset's send error may be logged
            core.listen(lsock)
            await asyncio.sleep(0.05)  # the accept is armed and waiting
            # no yield to the loop from here to the reset
            client = socket.create_connection(lsock.getsockname()[:2], timeout=5)
            client.sendall(get("/"))
            client_addr = client.getsockname()[:2]
            close_with_reset(client)
            for _ in range(500):
                if scopes:
                    break
                await asyncio.sleep(0.01)
            assert scopes and scopes[0]["client"] == client_addr
            assert scopes[0]["server"] == lsock.getsockname()[:2]
            core.stop_accepting()
            core.drain()
            await _connections_after(core, 5.0)

        loop.run_until_complete(asyncio.wait_for(main(), 20))
    finally:
        lsock.close()
        loop.close()

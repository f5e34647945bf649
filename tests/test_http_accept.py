"""The HTTP server's listener, driven in-process through the C server object
(`uringloop._core.HttpServer`) so that the test decides exactly when the
loop enters the ring."""

import asyncio
import socket

import uringloop
from uringloop._core import HttpServer

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

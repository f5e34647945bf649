"""The HTTP server's sends, and what waits for them to complete.

The server sends a connection's queued responses with a quiet send
(`ue_op_arm_quiet`) when nothing waits for that send to complete: its
success is learnt only once the `io_uring_enter` that submitted it returns,
and on a keep-alive connection that enter sleeps until the next request.
A send that something does wait for (a close after the response, an error
response queued behind it) must stay an ordinary send, whose completion
ends the wait.

These tests drive the C server in-process on a uringloop that has nothing
else to wake it (no timers, no other sockets): the client runs in an
executor thread, and the loop hears from it only when it is done. A send
wrongly made quiet leaves the client waiting for a close that comes only
after its 3 s timeout."""

import asyncio
import socket

import pytest

import uringloop
from uringloop._core import HttpServer

from http_support import Reader, get

BIG = 60 * 1024  # under the server's high-water mark (64 KiB): a quiet send's size
BIG_BODY = bytes(range(256)) * (BIG // 256)  # what /big answers


calls = []  # the paths the app was called for, in order


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    calls.append(scope["path"])
    size = {"/big": BIG, "/4k": 4096, "/1k": 1024}.get(scope["path"])
    body = bytes(range(256)) * (size // 256) if size else b"ok"
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def log_error(message, exc):
    raise AssertionError(f"server logged an error: {message} {exc!r}")


def serve_one_client(client_side, buffers=None, keepalive_timeout=60.0, drain=False):
    """Runs `client_side(sock)` in a thread against an in-process server on
    a fresh uringloop, whose only other wake-up is the thread's end; returns
    what it returned, once the server has let the connection go. With
    `buffers`, the server's send buffer and the client's receive buffer
    get that size (the accepted socket inherits the listener's). With
    `drain`, it is called `client_side(sock, drain)`, where `drain()` makes
    the server begin its graceful shutdown (HttpServer.drain())."""
    loop = uringloop.new_event_loop()
    lsock = socket.socket()
    if buffers:
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffers)
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(16)

    async def main():
        # keep-alive and header deadlines far beyond the client's timeouts:
        # no server timer ends a wait either
        core = HttpServer(loop, app, log_error, keepalive_timeout=keepalive_timeout, header_timeout=60.0)
        core.listen(lsock)
        client = socket.socket()
        client.settimeout(5)
        if buffers:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffers)
        client.connect(lsock.getsockname())
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            args = (client, lambda: loop.call_soon_threadsafe(core.drain)) if drain else (client,)
            result = await loop.run_in_executor(None, client_side, *args)
        finally:
            client.close()
        for _ in range(200):
            if not core.stats["connections"]:
                break
            await asyncio.sleep(0.01)
        assert core.stats["connections"] == 0
        core.stop_accepting()
        return result

    try:
        return loop.run_until_complete(asyncio.wait_for(main(), 30))
    finally:
        lsock.close()
        loop.close()


def read_what_the_apps_that_ran_answered(sock):
    """After the server began its graceful shutdown: how many apps ran,
    their responses, whether the server then closed, and any bytes after."""
    answered = len(calls)
    rd = Reader(sock)
    got = [rd.response() for _ in range(answered)]
    return answered, got, rd.closed(timeout=5), rd.buf


def responses_then_close(raw, count, half_close=False):
    def client_side(sock):
        sock.sendall(raw)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        rd = Reader(sock)
        got = [rd.response() for _ in range(count)]
        return got, rd.closed(timeout=3)

    return client_side


@pytest.mark.parametrize(
    "raw, statuses, half_close",
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", [200], False),
        (b"GET / HTTP/1.0\r\nHost: x\r\n\r\n", [200], False),
        (get("/") + get("/big") + b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", [200, 200, 200], False),
        (get("/"), [200], True),
        (get("/") + b"GARBAGE\x01\r\n\r\n", [200, 400], False),
    ],
    ids=["connection-close", "http-1.0", "pipelined-then-close", "client-half-closed", "error-after-a-response"],
)
def test_the_close_after_the_last_response_follows_it(raw, statuses, half_close):
    """The server closes a connection once its last response is out: that
    send must complete by itself, not with the loop's next wake-up."""
    got, closed = serve_one_client(responses_then_close(raw, len(statuses), half_close))
    assert [r.status for r in got] == statuses
    assert got[0].body == b"ok"
    assert closed, "the server did not close the connection after its last response"


def test_keep_alive_responses_need_no_other_wake_up():
    """Request after request on one keep-alive connection, each sent only
    once the response before it is in: every response goes out with the
    wait that follows it, and nothing is held back until a later event."""

    def client_side(sock):
        rd = Reader(sock)
        bodies = []
        for i in range(200):
            sock.sendall(get("/big" if i % 3 == 0 else "/"))
            bodies.append(rd.response().body)
        return bodies

    bodies = serve_one_client(client_side)
    assert len(bodies) == 200
    assert all(b == (BIG_BODY if i % 3 == 0 else b"ok") for i, b in enumerate(bodies))


@pytest.mark.parametrize("path, size", [("/4k", 4096), ("/big", BIG)])
def test_responses_the_kernel_cannot_take_at_once_all_arrive_in_order(path, size):
    """A client asks for response after response, each once the server has
    had time to send the one before (2 ms), and reads nothing until it has
    asked for them all; the socket buffers are small. Each response is a
    send of its own, and once the buffers are full the kernel refuses one
    (EAGAIN, for a quiet send) or takes part of it. The rest must go out,
    in order, once the client reads."""
    import time

    n = 100

    def client_side(sock):
        for _ in range(n):
            sock.sendall(get(path))
            time.sleep(0.002)
        rd = Reader(sock)
        return [rd.response() for _ in range(n)]

    got = serve_one_client(client_side, buffers=4096)
    expected = bytes(range(256)) * (size // 256)
    assert [r.status for r in got] == [200] * n
    assert all(r.body == expected for r in got)


def test_a_client_that_does_not_read_has_a_bounded_queue_of_responses():
    """A client pipelines 100 requests for 60 KiB responses and reads
    nothing. A response is complete once queued, so the server used to run
    all 100 apps and queue 6 MB; it now stops parsing while its send queue
    is over the high-water mark, as uvicorn's send() waits for the transport
    to drain: at most the 32 pipelined requests and a few more are run
    before the client reads. Then every response arrives, in order."""
    import time

    n = 100
    calls.clear()

    def client_side(sock):
        sock.sendall(b"".join(get("/big") for _ in range(n)))
        time.sleep(0.5)
        run_before_reading = len(calls)
        rd = Reader(sock)
        return run_before_reading, [rd.response() for _ in range(n)]

    run_before_reading, got = serve_one_client(client_side, buffers=4096)
    assert run_before_reading <= 40, run_before_reading
    assert len(got) == n and all(r.status == 200 and r.body == BIG_BODY for r in got)
    assert len(calls) == n


def test_the_keep_alive_timeout_waits_for_a_slow_reader():
    """The keep-alive timeout runs from the last response's completion, and
    a response is complete once queued: a client still reading must not be
    cut off when it expires (the connection used to be closed at once, its
    unsent responses dropped). It closes once the client has read it all
    and stayed idle."""
    import time

    n = 40

    def client_side(sock):
        sock.sendall(b"".join(get("/big") for _ in range(n)))
        time.sleep(1.0)  # twice the keep-alive timeout, reading nothing
        rd = Reader(sock)
        got = [rd.response() for _ in range(n)]
        return got, rd.closed(timeout=5)

    got, closed = serve_one_client(client_side, buffers=4096, keepalive_timeout=0.5)
    assert len(got) == n and all(r.status == 200 and r.body == BIG_BODY for r in got)
    assert closed, "the idle connection was not closed after the keep-alive timeout"


def test_a_graceful_shutdown_lets_a_slow_reader_have_its_responses():
    """The drain closes a connection with no request in progress, and a
    response is complete once queued: the responses still owed to a client
    that had not read them were dropped by that close. They now go out
    first, every one whose app ran, then the close (the requests the server
    had not begun are not answered, as with any shutdown)."""
    import time

    calls.clear()

    def client_side(sock, drain):
        sock.sendall(b"".join(get("/big") for _ in range(40)))
        time.sleep(0.3)
        drain()
        time.sleep(0.3)
        return read_what_the_apps_that_ran_answered(sock)

    _, got, closed, _ = serve_one_client(client_side, buffers=4096, drain=True)
    assert len(got) >= 20 and all(r.status == 200 and r.body == BIG_BODY for r in got)
    assert closed


def test_a_client_that_half_closes_still_gets_the_responses_queued_for_it():
    """A client pipelines requests for large responses, half-closes, and
    reads only later. The FIN found no request in progress (every response
    complete, being queued) and closed at once, dropping what was queued;
    then it let those go out but dropped the requests held back while they
    waited. Now every request is answered, then the connection closes."""
    import time

    n = 40
    calls.clear()

    def client_side(sock):
        sock.sendall(b"".join(get("/big") for _ in range(n)))
        time.sleep(0.3)
        held = n - len(calls)
        sock.shutdown(socket.SHUT_WR)
        time.sleep(0.3)
        rd = Reader(sock)
        got = [rd.response() for _ in range(n)]
        return held, got, rd.closed(timeout=5)

    held, got, closed = serve_one_client(client_side, buffers=4096)
    assert held >= 5, "the test meant the FIN to find requests held back"
    assert all(r.status == 200 and r.body == BIG_BODY for r in got)
    assert len(calls) == n
    assert closed


def test_a_graceful_shutdown_after_a_half_close_drops_only_the_requests_held():
    """A client half-closes while requests are held back, then the server
    begins its graceful shutdown: the responses of the apps that ran still
    go out, the requests held are not begun (as with any shutdown), and the
    connection closes."""
    import time

    n = 40
    calls.clear()

    def client_side(sock, drain):
        sock.sendall(b"".join(get("/big") for _ in range(n)))
        time.sleep(0.3)
        sock.shutdown(socket.SHUT_WR)
        time.sleep(0.1)
        drain()
        time.sleep(0.3)
        return read_what_the_apps_that_ran_answered(sock)

    answered, got, closed, extra = serve_one_client(client_side, buffers=4096, drain=True)
    assert answered < n
    assert all(r.status == 200 and r.body == BIG_BODY for r in got)
    assert closed and extra == b""
    assert len(calls) == answered


def test_a_quiet_send_the_kernel_refuses_is_sent_when_there_is_room():
    """The EAGAIN of a quiet send, made certain: on a Unix socketpair
    (adopted, as the TLS bridge's is) with an 8 KiB send buffer, each 1 KiB
    response goes whole while any room is left, until the buffer is full and
    the quiet send of the next finds none at all and is refused. It must be
    sent again once the client reads (a refused quiet send counted as a
    failed send would kill the connection), and every response arrive, in
    order."""
    import time

    n = 20
    loop = uringloop.new_event_loop()

    async def main():
        core = HttpServer(loop, app, log_error, keepalive_timeout=60.0, header_timeout=60.0)
        ours, theirs = socket.socketpair()
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # the kernel doubles it
        core.adopt(theirs.detach(), None, None)
        ours.settimeout(5)

        def client_side():
            for _ in range(n):
                ours.sendall(get("/1k"))
                time.sleep(0.02)  # each response is a send of its own
            rd = Reader(ours)
            return [rd.response() for _ in range(n)]

        try:
            return await loop.run_in_executor(None, client_side)
        finally:
            ours.close()

    try:
        got = loop.run_until_complete(asyncio.wait_for(main(), 30))
    finally:
        loop.close()
    expected = bytes(range(256)) * 4
    assert [r.status for r in got] == [200] * n
    assert all(r.body == expected for r in got)

"""add/remove_reader/writer and every sock_* method over real sockets, on
uringloop and on stock asyncio, with the same assertions."""

import asyncio
import errno
import os
import socket
import tempfile

import pytest

from conftest import close_with_reset, full_unix_dgram_peer, run, tcp_pair

pytestmark = pytest.mark.usefixtures("no_fd_leak")


def test_reader_is_level_triggered(loop):
    a, b = socket.socketpair()
    a.setblocking(False)
    calls = []

    def on_readable():
        calls.append(1)
        if len(calls) == 3:
            # data is left unread: readiness is reported again each time
            a.recv(100)
            loop.remove_reader(a)
            loop.call_soon(loop.stop)

    loop.add_reader(a, on_readable)
    b.send(b"x")
    loop.run_forever()
    assert len(calls) == 3
    assert not loop.remove_reader(a)
    a.close()
    b.close()


def test_reader_replace_and_remove(loop):
    a, b = socket.socketpair()
    seen = []
    loop.add_reader(a.fileno(), seen.append, "old")
    loop.add_reader(a.fileno(), lambda: (seen.append("new"), a.recv(10), loop.stop()))
    b.send(b"x")
    loop.run_forever()
    assert seen == ["new"]
    assert loop.remove_reader(a.fileno()) is True
    assert loop.remove_reader(a.fileno()) is False
    a.close()
    b.close()


def test_writer_fires_and_removes(loop):
    a, b = socket.socketpair()
    fired = []

    def on_writable():
        fired.append(1)
        assert loop.remove_writer(a)
        loop.stop()

    loop.add_writer(a, on_writable)
    loop.run_forever()
    assert fired == [1]
    a.close()
    b.close()


def test_reader_and_writer_on_same_fd(loop):
    a, b = socket.socketpair()
    events = set()

    def done():
        if events == {"r", "w"}:
            loop.remove_reader(a)
            loop.remove_writer(a)
            loop.stop()

    loop.add_reader(a, lambda: (events.add("r"), a.recv(10), done()))
    loop.add_writer(a, lambda: (events.add("w"), loop.remove_writer(a), done()))
    b.send(b"x")
    loop.call_later(5, loop.stop)
    loop.run_forever()
    assert events == {"r", "w"}
    loop.remove_reader(a)
    a.close()
    b.close()


def test_cancelled_reader_handle_stops_callbacks(loop):
    a, b = socket.socketpair()
    calls = []
    loop.add_reader(a, lambda: calls.append(1))
    b.send(b"x")
    loop.call_later(0.05, loop.stop)
    loop.run_forever()
    assert calls
    loop.remove_reader(a)
    n = len(calls)
    loop.call_later(0.05, loop.stop)
    loop.run_forever()
    assert len(calls) == n
    a.close()
    b.close()


def test_remove_reader_and_writer_of_a_socket_closed_while_registered(loop):
    # asyncio's selectors find a registration by the object it was made
    # with, so a socket closed while registered (fileno() is -1 by then) can
    # still be removed; anyio's socket streams rely on it when a receive or
    # send waits on a socket that another task closes.
    a, b = socket.socketpair()
    c, d = socket.socketpair()
    calls = []
    loop.add_reader(a, calls.append, "r")
    loop.add_writer(c, calls.append, "w")
    a.close()
    c.close()
    try:
        assert loop.remove_reader(a) is True
        assert loop.remove_writer(c) is True
        loop.call_later(0.05, loop.stop)
        loop.run_forever()
        assert calls == []
        with pytest.raises(ValueError):  # closed, and no longer registered
            loop.remove_reader(a)
    finally:
        b.close()
        d.close()


def test_a_socket_closed_while_its_reader_is_registered_is_closed_for_its_peer(loop):
    # The registration stays until remove_reader(), as in asyncio, but it must
    # not keep the socket open: the peer sees EOF once the program closes it.
    a, b = socket.socketpair()
    c, d = socket.socketpair()
    loop.add_reader(a, print)
    loop.add_writer(c, print)
    loop.run_until_complete(asyncio.sleep(0.02))  # the watches are armed
    a.close()
    c.close()
    loop.run_until_complete(asyncio.sleep(0.02))
    b.settimeout(2)
    d.settimeout(2)
    try:
        assert b.recv(10) == b""
        assert d.recv(10) == b""
        assert loop.remove_reader(a) is True
        assert loop.remove_writer(c) is True
    finally:
        b.close()
        d.close()


def test_add_reader_on_a_regular_file_is_refused(loop):
    # epoll cannot watch a regular file, and asyncio passes its EPERM on
    # rather than calling the callback in a loop.
    with tempfile.TemporaryFile() as f:
        with pytest.raises(PermissionError):
            loop.add_reader(f.fileno(), print)
        with pytest.raises(PermissionError):
            loop.add_writer(f, print)
        assert loop.remove_reader(f.fileno()) is False
        assert loop.remove_writer(f) is False


def test_an_fd_number_reused_after_remove_reader_is_watched_anew(loop):
    a, b = socket.socketpair()
    fd = a.fileno()
    loop.add_reader(fd, print)
    loop.run_until_complete(asyncio.sleep(0.02))
    c, d = socket.socketpair()
    a.close()
    os.dup2(c.fileno(), fd)  # the old number, another socket
    c.close()
    loop.remove_reader(fd)
    seen = asyncio.Event()
    loop.add_reader(fd, seen.set)
    d.send(b"x")
    try:
        loop.run_until_complete(asyncio.wait_for(seen.wait(), 2))
    finally:
        loop.remove_reader(fd)
        os.close(fd)
        for s in (b, d):
            s.close()


def test_add_reader_and_writer_refuse_a_negative_fd_with_the_selectors_message(loop):
    class NoFile:
        def fileno(self):
            return -1

    for add in (loop.add_reader, loop.add_writer):
        for fd in (-1, NoFile()):
            with pytest.raises(ValueError, match="^Invalid file descriptor: -1$"):
                add(fd, print)
        with pytest.raises(ValueError, match="^Invalid file object: 'x'$"):
            add("x", print)


@pytest.mark.parametrize("add", ["add_reader", "add_writer"])
def test_add_reader_on_closed_fd_raises(loop, add):
    # The loop's first watch: uringloop makes its epoll set then, and the
    # closed fd's number must not go to the set before the fd is refused
    # (epoll_ctl() would then say EINVAL, the set being asked to watch itself).
    a, b = socket.socketpair()
    fd = a.fileno()
    a.close()
    b.close()
    with pytest.raises(OSError) as info:
        getattr(loop, add)(fd, print)
    assert info.value.errno == errno.EBADF
    with pytest.raises(ValueError):
        getattr(loop, add)(-1, print)


def test_io_completes_while_callbacks_keep_the_loop_busy(loop):
    # A task that yields with sleep(0) keeps the ready queue from ever being
    # empty, so the loop never blocks; I/O must still be polled each turn.
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)

    async def main():
        spins = 0
        got = loop.create_task(loop.sock_recv(a, 100))
        await asyncio.sleep(0)
        b.send(b"while busy")
        while not got.done() and spins < 100_000:
            spins += 1
            await asyncio.sleep(0)
        assert got.done(), "the receive never completed while the loop stayed busy"
        assert got.result() == b"while busy"
        received = []

        class Collect(asyncio.Protocol):
            def data_received(self, data):
                received.append(data)

        transport, _ = await loop.create_connection(Collect, sock=b)
        a.send(b"to the transport")
        spins = 0
        while not received and spins < 100_000:
            spins += 1
            await asyncio.sleep(0)
        assert received == [b"to the transport"]
        transport.close()
        await asyncio.sleep(0)

    try:
        run(loop, main())
    finally:
        a.close()
        b.close()


def test_sock_tcp_client_server(loop):
    async def main():
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        client = socket.socket()
        client.setblocking(False)
        accept = asyncio.ensure_future(loop.sock_accept(listener))
        await loop.sock_connect(client, listener.getsockname())
        conn, addr = await accept
        assert addr == client.getsockname()
        assert conn.gettimeout() == 0 and not os.get_blocking(conn.fileno())
        assert conn.type == socket.SOCK_STREAM  # the flag is not shown, as asyncio's conn shows none
        await loop.sock_sendall(client, b"hello")
        assert await loop.sock_recv(conn, 100) == b"hello"
        buf = bytearray(10)
        await loop.sock_sendall(conn, b"world")
        n = await loop.sock_recv_into(client, buf)
        assert buf[:n] == b"world"
        client.shutdown(socket.SHUT_WR)
        assert await loop.sock_recv(conn, 100) == b""
        for s in (listener, client, conn):
            s.close()

    run(loop, main())


def test_sock_unix_stream(loop):
    async def main():
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "s")
            listener = socket.socket(socket.AF_UNIX)
            listener.bind(path)
            listener.listen()
            listener.setblocking(False)
            client = socket.socket(socket.AF_UNIX)
            client.setblocking(False)
            accept = asyncio.ensure_future(loop.sock_accept(listener))
            await loop.sock_connect(client, path)
            conn, _ = await accept
            await loop.sock_sendall(client, b"unix")
            assert await loop.sock_recv(conn, 10) == b"unix"
            for s in (listener, client, conn):
                s.close()

    run(loop, main())


def test_sock_sendall_large_and_partial(loop):
    payload = os.urandom(8 * 1024 * 1024)

    async def main():
        a, b = tcp_pair()
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
        sender = asyncio.ensure_future(loop.sock_sendall(a, payload))
        got = bytearray()
        while len(got) < len(payload):
            got += await loop.sock_recv(b, 1 << 16)
        await sender
        assert bytes(got) == payload
        a.close()
        b.close()

    run(loop, main(), timeout=30)


def test_sock_sendall_that_fits_completes_without_yielding(loop):
    # asyncio (and uvloop) send at once and return without suspending when
    # the kernel takes everything; code orders its next steps on that. Here
    # a receive left pending is cancelled right after the reply was sent:
    # had sock_sendall() yielded, that receive would have taken the reply
    # and the next one would wait forever.
    async def main():
        a, b = tcp_pair()
        ran = []
        loop.call_soon(ran.append, "callback")
        await loop.sock_sendall(a, b"no yield")
        assert ran == []
        assert await loop.sock_recv(b, 100) == b"no yield"

        pending = asyncio.ensure_future(loop.sock_recv(a, 1))
        await asyncio.sleep(0.01)
        await loop.sock_sendall(b, b"1")
        pending.cancel()
        assert await asyncio.wait_for(loop.sock_recv(a, 1), 5) == b"1"
        # 3.12's wait_for() runs a receive that completes at once without
        # yielding, so the cancellation may not have been delivered yet
        with pytest.raises(asyncio.CancelledError):
            await pending
        a.close()
        b.close()

    run(loop, main())


def test_sock_sendall_over_4gib_sends_every_byte():
    """A buffer of 4 GiB + 10 bytes: an SQE's length field is 32 bits, so an
    unclamped length went out as 10 bytes and sendall reported success."""
    import mmap
    import subprocess

    import uringloop

    size = (1 << 32) + 10
    payload = mmap.mmap(-1, size)  # untouched pages: reads come from the zero page

    async def main():
        a, b = tcp_pair()
        b.setblocking(True)
        sink = subprocess.Popen(["dd", "of=/dev/null", "bs=4M"], stdin=b, stderr=subprocess.PIPE, text=True)
        b.close()
        try:
            await asyncio.get_running_loop().sock_sendall(a, payload)
        finally:
            a.close()
            report = sink.communicate(timeout=60)[1]
        assert report.splitlines()[-1].startswith(f"{size} bytes"), report

    lp = uringloop.new_event_loop()
    try:
        run(lp, main(), timeout=120)
    finally:
        lp.close()
        payload.close()


def test_sock_udp_sendto_recvfrom(loop):
    async def main():
        a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for s in (a, b):
            s.bind(("127.0.0.1", 0))
            s.setblocking(False)
        await loop.sock_sendto(a, b"dgram", b.getsockname())
        data, addr = await loop.sock_recvfrom(b, 100)
        assert data == b"dgram" and addr == a.getsockname()
        buf = bytearray(100)
        await loop.sock_sendto(b, b"back", ("localhost", a.getsockname()[1]))
        n, addr = await loop.sock_recvfrom_into(a, buf)
        assert buf[:n] == b"back" and addr == b.getsockname()
        await loop.sock_sendto(a, b"truncated", b.getsockname())
        n, _ = await loop.sock_recvfrom_into(b, buf, 4)
        assert buf[:n] == b"trun"
        a.close()
        b.close()

    run(loop, main())


def test_sock_udp_ipv6(loop):
    async def main():
        a = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        a.bind(("::1", 0))
        a.setblocking(False)
        await loop.sock_sendto(a, b"six", a.getsockname())
        data, addr = await loop.sock_recvfrom(a, 100)
        assert data == b"six" and addr[:2] == a.getsockname()[:2]
        a.close()

    run(loop, main())


def test_sock_connect_refused(loop):
    async def main():
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            addr = probe.getsockname()  # bound, never listening
        s = socket.socket()
        s.setblocking(False)
        with pytest.raises(ConnectionRefusedError) as info:
            await loop.sock_connect(s, addr)
        assert "Connect call failed" in str(info.value)
        s.close()

    run(loop, main())


def test_sock_connect_unix_errors_are_connects_own(loop):
    """connect() on a Unix socket fails at once (no EINPROGRESS), and asyncio
    raises its error as connect() gave it: "[Errno 2] No such file or
    directory", not the "Connect call failed" of a TCP connect that failed
    later (redis-py's tests match the message). Also through
    create_unix_connection()."""
    async def main():
        with tempfile.TemporaryDirectory() as d:
            missing = os.path.join(d, "missing.sock")
            refusing = os.path.join(d, "refusing.sock")
            with socket.socket(socket.AF_UNIX) as bound:
                bound.bind(refusing)  # a socket file nobody listens on
                for path, exc_type, code in ((missing, FileNotFoundError, errno.ENOENT),
                                             (refusing, ConnectionRefusedError, errno.ECONNREFUSED)):
                    with socket.socket(socket.AF_UNIX) as s:
                        s.setblocking(False)
                        with pytest.raises(exc_type) as info:
                            await loop.sock_connect(s, path)
                    assert str(info.value) == f"[Errno {code}] {os.strerror(code)}"
                    with pytest.raises(exc_type) as info:
                        await loop.create_unix_connection(asyncio.Protocol, path)
                    assert str(info.value) == f"[Errno {code}] {os.strerror(code)}"

    run(loop, main())


def test_sock_recv_error_is_oserror(loop):
    async def main():
        a, b = tcp_pair()
        close_with_reset(b)
        with pytest.raises(ConnectionResetError):
            while await loop.sock_recv(a, 100):
                pass
        a.close()

    run(loop, main())


def test_sendall_to_reset_peer_raises(loop):
    async def main():
        a, b = tcp_pair()
        close_with_reset(b)
        await asyncio.sleep(0.01)
        with pytest.raises((ConnectionResetError, BrokenPipeError)):
            for _ in range(100):
                await loop.sock_sendall(a, b"x" * 65536)
        a.close()

    run(loop, main())


def test_cancelled_sock_recv_loses_no_data(loop):
    async def main():
        a, b = tcp_pair()
        received = bytearray()
        for i in range(50):
            task = asyncio.ensure_future(loop.sock_recv(b, 1024))
            await asyncio.sleep(0)
            # the data and the cancellation race each other
            a.send(b"%03d" % i)
            task.cancel()
            try:
                received += await task
            except asyncio.CancelledError:
                pass
        a.close()
        while True:
            chunk = await loop.sock_recv(b, 1024)
            if not chunk:
                break
            received += chunk
        b.close()
        assert bytes(received) == b"".join(b"%03d" % i for i in range(50))

    run(loop, main())


def test_concurrent_sock_recvs_on_one_socket_are_served_in_call_order(loop, loop_kind):
    # asyncio's second sock_recv() replaces the first, which never completes;
    # uringloop had both in the kernel at once, and the kernel served the
    # later call first. Now they queue: each call gets the bytes in the
    # order it was made, a cancelled one in the queue is skipped.
    async def main():
        a, b = tcp_pair()
        first = asyncio.ensure_future(loop.sock_recv(b, 3))
        second = asyncio.ensure_future(loop.sock_recv(b, 3))
        gone = asyncio.ensure_future(loop.sock_recv_into(b, bytearray(3)))
        third = asyncio.ensure_future(loop.sock_recv(b, 3))
        await asyncio.sleep(0.01)
        gone.cancel()
        a.send(b"abcdefghi")
        if loop_kind == "asyncio":
            done, _ = await asyncio.wait([first, second, third], timeout=0.5)
            assert done == {third} and third.result() == b"abc"
            first.cancel()
            second.cancel()
        else:
            assert await asyncio.gather(first, second, third) == [b"abc", b"def", b"ghi"]
        assert gone.cancelled()
        a.close()
        b.close()

    run(loop, main())


def test_concurrent_sock_sendalls_on_one_socket_do_not_interleave(loop, loop_kind):
    if loop_kind == "asyncio":
        pytest.skip("asyncio's second sock_sendall() replaces the first's writer: the first never completes")
    payload = os.urandom(4 * 1024 * 1024)

    async def main():
        a, b = tcp_pair()
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
        senders = [asyncio.ensure_future(loop.sock_sendall(a, payload)),
                   asyncio.ensure_future(loop.sock_sendall(a, b"SECOND")),
                   asyncio.ensure_future(loop.sock_sendall(a, payload[::-1]))]
        got = bytearray()
        while len(got) < 2 * len(payload) + 6:
            got += await loop.sock_recv(b, 1 << 16)
        await asyncio.gather(*senders)
        assert bytes(got) == payload + b"SECOND" + payload[::-1]
        a.close()
        b.close()

    run(loop, main(), timeout=30)


def test_cancelled_sock_recv_into_loses_no_data(loop):
    async def main():
        a, b = tcp_pair()
        received = bytearray()
        buf = bytearray(1024)
        for i in range(50):
            task = asyncio.ensure_future(loop.sock_recv_into(b, buf))
            await asyncio.sleep(0)
            a.send(b"%03d" % i)
            task.cancel()
            try:
                n = await task
                received += buf[:n]
            except asyncio.CancelledError:
                pass
        a.close()
        while n := await loop.sock_recv_into(b, buf):
            received += buf[:n]
        b.close()
        assert bytes(received) == b"".join(b"%03d" % i for i in range(50))

    run(loop, main())


def test_cancelled_sock_accept_loses_no_connection(loop):
    async def main():
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        task = asyncio.ensure_future(loop.sock_accept(listener))
        await asyncio.sleep(0)
        client = socket.create_connection(listener.getsockname())
        task.cancel()
        try:
            conn, _ = await task
        except asyncio.CancelledError:
            conn, _ = await loop.sock_accept(listener)
        client.send(b"kept")
        assert await loop.sock_recv(conn, 10) == b"kept"
        for s in (listener, client, conn):
            s.close()

    run(loop, main())


def test_cancelled_sock_connect_does_not_connect_later(loop):
    """A connect cancelled while refused must not retry behind our back: the
    next sock_connect after listen() connects, or is refused once, and never
    finds the socket connected by the cancelled attempt (EISCONN)."""

    async def main():
        listener = socket.socket()
        sock = socket.socket()
        listener.bind(("127.0.0.1", 0))
        addr = listener.getsockname()
        sock.setblocking(False)
        task = asyncio.ensure_future(loop.sock_connect(sock, addr))
        await asyncio.sleep(0)
        task.cancel()
        listener.listen()
        outcomes = []
        for _ in range(3):
            try:
                await loop.sock_connect(sock, addr)
            except OSError as exc:
                outcomes.append(exc.errno)
            else:
                outcomes.append("connected")
                break
        assert outcomes in (["connected"], [errno.ECONNREFUSED, "connected"]), outcomes
        with pytest.raises(asyncio.CancelledError):
            await task
        conn, _ = listener.accept()
        for s in (listener, sock, conn):
            s.close()

    run(loop, main())


def test_sock_sendfile(loop):
    data = os.urandom(300_000)

    async def main():
        with tempfile.TemporaryFile() as f:
            f.write(data)
            f.seek(0)
            a, b = tcp_pair()
            sender = asyncio.ensure_future(loop.sock_sendfile(a, f, offset=1000, count=200_000))
            got = bytearray()
            while len(got) < 200_000:
                got += await loop.sock_recv(b, 65536)
            assert await sender == 200_000
            assert bytes(got) == data[1000:201_000]
            assert f.tell() == 201_000
            a.close()
            b.close()

    run(loop, main())


def every_sock_call(loop, sock):
    """One coroutine of each sock_* method on `sock`, by name."""
    addr = ("127.0.0.1", 9)
    return {
        "sock_recv": lambda: loop.sock_recv(sock, 1),
        "sock_recv_into": lambda: loop.sock_recv_into(sock, bytearray(1)),
        "sock_recvfrom": lambda: loop.sock_recvfrom(sock, 1),
        "sock_recvfrom_into": lambda: loop.sock_recvfrom_into(sock, bytearray(1)),
        "sock_sendall": lambda: loop.sock_sendall(sock, b"x"),
        "sock_sendto": lambda: loop.sock_sendto(sock, b"x", addr),
        "sock_connect": lambda: loop.sock_connect(sock, addr),
        "sock_accept": lambda: loop.sock_accept(sock),
    }


def test_debug_mode_requires_nonblocking_socket(loop):
    loop.set_debug(True)

    async def main():
        with socket.socket() as s:  # blocking
            for name, call in every_sock_call(loop, s).items():
                with pytest.raises(ValueError, match="the socket must be non-blocking"):
                    await call()
                assert s.fileno() >= 0, name

    run(loop, main())


def test_sock_calls_refuse_an_ssl_socket(loop):
    ssl = pytest.importorskip("ssl")

    async def main():
        ctx = ssl.create_default_context()
        with ctx.wrap_socket(socket.socket(), do_handshake_on_connect=False, server_hostname="x") as s:
            s.setblocking(False)
            for name, call in every_sock_call(loop, s).items():
                with pytest.raises(TypeError, match="^Socket cannot be of type SSLSocket$"):
                    await call()

    run(loop, main())


def test_sock_calls_refuse_a_transports_transport_socket(loop):
    """get_extra_info("socket") is a TransportSocket, which from 3.11 has
    none of the socket methods the sock_* calls use: each call fails with
    AttributeError naming the method, as on asyncio, and nothing is read
    from or written to the transport's socket behind its back."""
    got = []

    class Keep(asyncio.Protocol):
        def data_received(self, data):
            got.append(data)

    async def main():
        srv = await loop.create_server(Keep, "127.0.0.1", 0)
        tr, _ = await loop.create_connection(asyncio.Protocol, *srv.sockets[0].getsockname())
        ts = tr.get_extra_info("socket")
        methods = {"sock_sendall": "send"}
        for name, call in every_sock_call(loop, ts).items():
            method = methods.get(name, name[len("sock_"):])
            with pytest.raises(AttributeError, match=f"^'TransportSocket' object has no attribute '{method}'$"):
                await call()
        tr.write(b"only this")
        await asyncio.sleep(0.05)
        assert b"".join(got) == b"only this"
        tr.close()
        srv.close()
        await srv.wait_closed()

    run(loop, main())


def test_sock_op_on_closed_socket(loop):
    async def main():
        a, b = tcp_pair()
        a.close()
        for name, call in every_sock_call(loop, a).items():
            with pytest.raises(OSError) as info:
                await call()
            assert info.value.errno == errno.EBADF, name
            assert info.value.strerror == os.strerror(errno.EBADF), name
        b.close()

    run(loop, main())


def test_sock_calls_that_would_wait_on_a_transports_socket_are_refused(loop):
    """asyncio's _ensure_fd_no_transport(): a sock_* call that has to wait
    on a descriptor a live transport owns raises RuntimeError (one that
    completes at once does not); once the transport is closed, the number
    is free for sock_* calls again."""

    async def main():
        srv = await loop.create_server(asyncio.Protocol, "127.0.0.1", 0)
        addr = srv.sockets[0].getsockname()
        s = socket.socket()
        s.setblocking(False)
        await loop.sock_connect(s, addr)
        tr, _ = await loop.create_connection(asyncio.Protocol, sock=s)
        await loop.sock_sendall(s, b"fits")  # sent at once: no check, as on asyncio
        for call in (lambda: loop.sock_recv(s, 10), lambda: loop.sock_recv_into(s, bytearray(5)),
                     lambda: loop.sock_sendall(s, b"x" * 50_000_000)):
            with pytest.raises(RuntimeError, match=f"^File descriptor {s.fileno()} is used by transport "):
                await call()
        fd = s.fileno()
        tr.close()
        await asyncio.sleep(0.01)
        with socket.socket() as again:
            again.setblocking(False)
            await loop.sock_connect(again, addr)
            assert again.fileno() == fd  # the same number, no transport now
            await loop.sock_sendall(again, b"x" * 5_000_000)
        srv.close()
        await srv.wait_closed()

    run(loop, main())


def test_sock_connect_errors_are_asyncios(loop):
    """connect() runs in the call, as asyncio's does: its own error comes as
    socket.connect() raised it, a failure found later is "Connect call
    failed", and the next connect() after one reports the kernel's
    ECONNABORTED once before it connects."""

    async def main():
        with socket.socket() as s:
            s.setblocking(False)
            with pytest.raises(OSError) as info:  # TCP refuses a multicast peer at once
                await loop.sock_connect(s, ("224.0.0.1", 80))
            assert (info.value.errno, info.value.strerror) == (errno.ENETUNREACH, os.strerror(errno.ENETUNREACH))
        with socket.socket() as listener, socket.socket() as s:
            listener.bind(("127.0.0.1", 0))
            addr = listener.getsockname()
            s.setblocking(False)
            outcomes = []
            for attempt in range(3):
                if attempt == 1:
                    listener.listen()
                try:
                    await loop.sock_connect(s, addr)
                except OSError as exc:
                    outcomes.append((type(exc), exc.errno, exc.strerror))
                else:
                    outcomes.append("connected")
            assert outcomes == [(ConnectionRefusedError, errno.ECONNREFUSED, f"Connect call failed {addr}"),
                                (ConnectionAbortedError, errno.ECONNABORTED, os.strerror(errno.ECONNABORTED)),
                                "connected"]

    run(loop, main())


def test_sock_argument_errors_are_the_socket_modules(loop):
    """asyncio hands the arguments to the socket method, so a bad address,
    a read-only buffer or a negative size raises what that method raises,
    with its message; a host given as bytes, as a name or as the socket
    module's "" is sent to."""

    def raised(call):
        try:
            call()
        except Exception as exc:
            return type(exc), str(exc)
        raise AssertionError("no error")

    async def araised(call):
        try:
            await call()
        except Exception as exc:
            return type(exc), str(exc)
        raise AssertionError("no error")

    async def main():
        a, b = socket.socketpair()
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        rx.bind(("127.0.0.1", 0))
        try:
            await check_against_the_socket_module(a, udp, rx)
        finally:
            for sock in (a, b, udp, rx):
                sock.close()

    async def check_against_the_socket_module(a, udp, rx):
        for sock in (a, udp, rx):
            sock.setblocking(False)
        port = rx.getsockname()[1]
        cases = [
            (udp, "sendto", (b"x", None)),
            (udp, "sendto", (b"x", ("127.0.0.1",))),
            (udp, "sendto", (b"x", ("127.0.0.1", 1, 2))),
            (udp, "sendto", (b"x", ("127.0.0.1", "x"))),
            (udp, "sendto", (b"x", ("127.0.0.1", 70000))),
            (udp, "sendto", (b"x", ("127.0.0.1", -1))),
            (udp, "sendto", (b"x", (5, 9))),
            (a, "sendto", (b"x", None)),
            (a, "sendto", (b"x", 5)),
            (a, "recv_into", (b"abc",)),
            (a, "recv_into", (memoryview(bytearray(6))[::2],)),
            (udp, "recvfrom_into", (b"abc",)),
            (a, "recv", (-1,)),
            (udp, "recvfrom", (-1,)),
            (a, "recv", (1.5,)),
            (a, "recv", ("5",)),
            (udp, "recvfrom", (1.5,)),
            (udp, "recvfrom_into", (bytearray(3), 1.5)),
            (udp, "recvfrom_into", (bytearray(3), 5)),
            (udp, "sendto", (b"x", ("<broadcast>", 9))),  # the socket module's name; no SO_BROADCAST
        ]
        for sock, name, args in cases:
            expected = raised(lambda: getattr(sock, name)(*args))
            got = await araised(lambda: getattr(loop, f"sock_{name}")(sock, *args))
            assert got == expected, (name, args)
        await loop.sock_sendto(udp, b"by bytes", (b"127.0.0.1", port))
        await loop.sock_sendto(udp, b"by name", ("localhost", port))
        await loop.sock_sendto(udp, b"to any", ("", port))  # "": the socket module's any address
        assert (await loop.sock_recvfrom(rx, 100))[0] == b"by bytes"
        assert (await loop.sock_recvfrom(rx, 100))[0] == b"by name"
        assert (await loop.sock_recvfrom(rx, 100))[0] == b"to any"

    run(loop, main())


def test_a_receive_of_zero_bytes_returns_at_once(loop):
    # socket.recv(0) and recv_into() of an empty buffer return without a
    # syscall, and asyncio returns their b"" and 0 at once; io_uring's
    # receive of 0 bytes would wait for data
    async def main():
        a, b = tcp_pair()
        try:
            assert await asyncio.wait_for(loop.sock_recv(a, 0), 1) == b""
            assert await asyncio.wait_for(loop.sock_recv_into(a, bytearray()), 1) == 0
            b.send(b"kept")
            assert await asyncio.wait_for(loop.sock_recv(a, 0), 1) == b""
            assert await loop.sock_recv(a, 10) == b"kept"
        finally:
            a.close()
            b.close()

    run(loop, main())


def test_sock_send_to_a_full_unix_datagram_peer_waits_and_keeps_the_data(loop):
    # A Unix datagram socket whose peer is full: an io_uring send copies the
    # data out of the request before failing with EAGAIN, and the kernel's
    # retry then sent an empty datagram (sock_sendall and sock_sendto
    # returned success). Both must wait for room and send the datagram whole.
    async def main():
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "srv")
            srv, cli, filled = full_unix_dgram_peer(path)
            sendall = asyncio.ensure_future(loop.sock_sendall(cli, b"via sock_sendall"))
            await asyncio.sleep(0.05)
            assert not sendall.done()  # the peer is full
            got = [srv.recv(100)]
            await asyncio.wait_for(sendall, 5)
            sendto = asyncio.ensure_future(loop.sock_sendto(cli, b"via sock_sendto", path))
            await asyncio.sleep(0.05)
            got.append(srv.recv(100))
            assert await asyncio.wait_for(sendto, 5) == len(b"via sock_sendto")
            while True:
                try:
                    got.append(srv.recv(100))
                except BlockingIOError:
                    break
            assert got == [b"o"] * filled + [b"via sock_sendall", b"via sock_sendto"]
            cli.close()
            srv.close()

    run(loop, main())

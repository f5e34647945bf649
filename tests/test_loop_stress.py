"""Random stress of the stream transports (plain and TLS) and the `sock_*`
operations, on uringloop and on stock asyncio: an echo server and many
clients that write random sizes in random pieces, pause and resume reading
on both sides, half-close, close or abort at random moments, and cancel
`sock_*` calls with timeouts. Then re-entrancy: random transport calls
from inside every protocol callback, on stream transports (TCP, Unix, TLS),
pipes and subprocesses. Seeded (the seed is in the failure message).
What must hold: every echo that completes is byte for byte what was sent,
nothing hangs, no descriptor is left open, every transport is lost exactly
once, and the loop's exception handler is not called."""

import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import time

import pytest

import uringloop

from conftest import tls_contexts

SECONDS = 3


def run_collecting_errors(loop, main):
    errors = []
    loop.set_exception_handler(lambda loop, context: errors.append(context))
    return loop.run_until_complete(main()), errors


class EchoServer(asyncio.Protocol):
    def __init__(self, rng):
        self.rng = rng

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.transport.write(data)
        r = self.rng.random()
        if r < 0.02:
            self.transport.pause_reading()
            asyncio.get_running_loop().call_later(self.rng.random() * 0.01, self._resume)
        elif r < 0.025:
            self.transport.abort()
        elif r < 0.03:
            self.transport.close()

    def _resume(self):
        if not self.transport.is_closing():
            self.transport.resume_reading()

    def eof_received(self):
        return self.rng.random() < 0.5  # keep the connection half-open, or close it

    def pause_writing(self):
        self.transport.pause_reading()

    def resume_writing(self):
        self._resume()


class EchoClient(asyncio.Protocol):
    def __init__(self, rng, payload):
        self.rng, self.payload = rng, payload
        self.got = bytearray()
        loop = asyncio.get_running_loop()
        self.lost, self.done = loop.create_future(), loop.create_future()

    def connection_made(self, transport):
        self.transport = transport
        if not self.payload:
            self.done.set_result(None)
        i = 0
        while i < len(self.payload):
            n = self.rng.choice([1, 100, 1000, 20000, 70000, 200000])
            transport.write(self.payload[i:i + n])
            i += n
        if self.rng.random() < 0.3 and transport.can_write_eof():
            transport.write_eof()

    def data_received(self, data):
        self.got += data
        if len(self.got) >= len(self.payload) and not self.done.done():
            self.done.set_result(None)
        if self.rng.random() < 0.01:
            self.transport.pause_reading()
            asyncio.get_running_loop().call_later(
                0.005, lambda: self.transport.is_closing() or self.transport.resume_reading())

    def connection_lost(self, exc):
        for fut in (self.lost, self.done):
            if not fut.done():
                fut.set_result(None)


async def echo_once(rng, port, client_ssl, stats):
    loop = asyncio.get_running_loop()
    size = rng.choice([0, 1, 500, 5000, 50000, 300000, 1000000])
    payload = (rng.randbytes(4096) * (size // 4096 + 1))[:size]
    extra = {"ssl": client_ssl, "server_hostname": "localhost"} if client_ssl else {}
    transport, client = await loop.create_connection(lambda: EchoClient(rng, payload), "127.0.0.1", port, **extra)
    if rng.random() < 0.1:
        await asyncio.sleep(rng.random() * 0.01)
        transport.abort()
    else:
        await wait_or_describe(client, client.done, payload)
        got = bytes(client.got)
        assert got == payload[:len(got)], "corrupt echo"
        stats["complete" if len(got) == len(payload) else "cut"] += 1
        if client_ssl and not isinstance(loop, uringloop.Loop) and not transport.is_reading():
            # stock asyncio never ends a TLS connection closed after the
            # peer's EOF came in while reading was paused; uringloop does
            # (test_loop_tls.py::test_close_after_the_peer_ended_while_reading_was_paused)
            transport.resume_reading()
        transport.close()
    await wait_or_describe(client, client.lost, payload)


async def wait_or_describe(client, fut, payload):
    """Waits for one of the client's futures; on a timeout, says where the
    client's transport stands (the test's failure message has the seed)."""
    try:
        await asyncio.wait_for(fut, 20)
    except asyncio.TimeoutError:
        t = client.transport
        ssl_protocol = getattr(t, "_ssl_protocol", None)
        raise AssertionError({"waited for": "done" if fut is client.done else "lost", "got": len(client.got),
                              "sent": len(payload), "reading": t.is_reading(), "closing": t.is_closing(),
                              "ssl state": getattr(ssl_protocol, "_state", None),
                              "tcp transport": repr(getattr(ssl_protocol, "_transport", None))}) from None


@pytest.mark.parametrize("tls", [False, True])
def test_stream_transports_under_random_clients(loop, no_fd_leak, tls):
    seed = random.randrange(1 << 32)
    rng = random.Random(seed)
    server_ssl, client_ssl = tls_contexts() if tls else (None, None)

    async def main():
        loop = asyncio.get_running_loop()
        echoes = []
        server = await loop.create_server(lambda: echoes.append(EchoServer(rng)) or echoes[-1], "127.0.0.1", 0,
                                          ssl=server_ssl)
        port = server.sockets[0].getsockname()[1]
        stats = {"complete": 0, "cut": 0}
        end = time.monotonic() + SECONDS
        while time.monotonic() < end:
            await asyncio.gather(*(echo_once(rng, port, client_ssl, stats) for _ in range(rng.randint(1, 60))))
        server.close()
        # From 3.12 wait_closed() waits for every connection, and a server
        # side left paused or half-open by the random clients never ends.
        # Not a transport that has let go of its loop: stock asyncio's socket
        # transport does so when it closes, and when its close() had waited
        # for the write buffer to drain it does not count that loss, so
        # abort() would then fail (AttributeError, 3.11)
        for echo in echoes:
            if getattr(echo.transport, "_loop", True) is not None:
                echo.transport.abort()
        await server.wait_closed()
        return stats

    try:
        stats, errors = run_collecting_errors(loop, main)
    except AssertionError as exc:
        raise AssertionError(f"seed {seed}: {exc}") from None
    assert stats["complete"] > 50, (seed, stats)
    assert not errors, (seed, errors[:5])


def test_sock_operations_under_random_cancellations(loop, no_fd_leak):
    seed = random.randrange(1 << 32)
    rng = random.Random(seed)

    async def echo(conn):
        loop = asyncio.get_running_loop()
        with conn:
            try:
                while data := await loop.sock_recv(conn, rng.choice([1, 100, 65536])):
                    await loop.sock_sendall(conn, data)
            except OSError:
                pass

    async def accept(lsock, tasks):
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(lsock)
            conn.setblocking(False)
            task = loop.create_task(echo(conn))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    async def client(port, stats):
        loop = asyncio.get_running_loop()
        s = socket.socket()
        s.setblocking(False)
        sender = None
        try:
            await asyncio.wait_for(loop.sock_connect(s, ("127.0.0.1", port)), rng.choice([0.0001, 1, 5]))
            payload = rng.randbytes(rng.choice([1, 1000, 100000, 1000000]))

            async def receive():
                got = bytearray()
                while len(got) < len(payload):
                    if rng.random() < 0.5:
                        data = await loop.sock_recv(s, 65536)
                    else:
                        buf = bytearray(70000)
                        data = buf[:await loop.sock_recv_into(s, buf)]
                    if not data:
                        break
                    got += data
                return bytes(got)

            sender = loop.create_task(loop.sock_sendall(s, payload))
            got = await asyncio.wait_for(receive(), rng.choice([0.001, 0.01, 5]))
            await sender
            assert got == payload, "corrupt echo"
            stats["complete"] += 1
        except asyncio.TimeoutError:
            stats["cancelled"] += 1
        except OSError:
            stats["error"] += 1
        finally:
            if sender is not None and not sender.done():
                sender.cancel()
                await asyncio.gather(sender, return_exceptions=True)
            s.close()

    async def main():
        loop = asyncio.get_running_loop()
        lsock = socket.create_server(("127.0.0.1", 0))
        lsock.setblocking(False)
        tasks = set()
        acceptor = loop.create_task(accept(lsock, tasks))
        stats = {"complete": 0, "cancelled": 0, "error": 0}
        end = time.monotonic() + SECONDS
        while time.monotonic() < end:
            await asyncio.gather(*(client(lsock.getsockname()[1], stats) for _ in range(rng.randint(1, 40))))
        acceptor.cancel()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(acceptor, *tasks, return_exceptions=True)
        lsock.close()
        return stats

    stats, errors = run_collecting_errors(loop, main)
    assert stats["complete"] > 20 and stats["cancelled"] > 10, (seed, stats)
    assert not errors, (seed, errors[:5])


# ---- transport calls from inside the protocol's callbacks ----

CALLS = ["write", "big_write", "writelines", "writelines_of_bytearrays", "close", "abort", "pause_reading",
         "resume_reading", "write_eof", "limits", "set_protocol", "sizes", "close_soon", "nothing"]
# What a call made at a moment it does not fit may raise, as on asyncio (a write after write_eof(), ...).
REFUSALS = (RuntimeError, ValueError, NotImplementedError, AttributeError)


def _shared_transport_call(tr, rng, name):
    """The calls every transport kind has (close, abort, limits, sizes, a
    close from the ready queue); other names do nothing."""
    if name == "close":
        tr.close()
    elif name == "abort":
        tr.abort()
    elif name == "limits":
        tr.set_write_buffer_limits(high=rng.choice([0, 1, 100, 65536, None]))
    elif name == "sizes":
        tr.get_write_buffer_size(), tr.get_write_buffer_limits(), tr.is_closing(), tr.get_extra_info("sockname")
    elif name == "close_soon":
        asyncio.get_running_loop().call_soon(tr.close)


class Reentrant(asyncio.Protocol):
    """Each callback makes random transport calls: a close from
    pause_writing(), a write from connection_lost(), a new protocol from
    data_received(), and the list given to writelines() cleared, or an item
    of it grown, from the pause_writing() that the writing calls."""

    def __init__(self, rng, book, transport=None, depth=0):
        self.rng, self.book, self.transport, self.depth = rng, book, transport, depth
        self.batch = []

    def act(self):
        for _ in range(self.rng.randrange(3)):
            try:
                self.call(self.rng.choice(CALLS))
            except REFUSALS:
                pass

    def call(self, name):
        tr, rng = self.transport, self.rng
        if name == "write":
            tr.write(rng.randbytes(rng.choice([1, 100, 5000, 70000])))
        elif name == "big_write":
            tr.write(b"z" * rng.choice([1 << 20, 3 << 20]))
        elif name == "writelines":
            tr.writelines([b"w" * rng.randrange(1, 100000) for _ in range(rng.randrange(1, 5))])
        elif name == "writelines_of_bytearrays":
            self.batch = [bytearray(rng.randrange(1, 300000)) for _ in range(rng.randrange(1, 5))]
            tr.writelines(self.batch)
        elif name == "pause_reading":
            tr.pause_reading()
        elif name == "resume_reading":
            tr.resume_reading()
        elif name == "write_eof" and tr.can_write_eof():
            tr.write_eof()
        elif name == "set_protocol" and self.depth < 3:
            tr.set_protocol(rng.choice([Reentrant, ReentrantBuffered])(rng, self.book, tr, self.depth + 1))
        else:
            _shared_transport_call(tr, rng, name)

    def connection_made(self, transport):
        self.transport = transport
        self.book["made"].append(transport)
        self.act()

    def data_received(self, data):
        if self.rng.random() < 0.3:
            self.batch.clear()
        self.act()

    def eof_received(self):
        self.act()
        return self.rng.random() < 0.5

    def pause_writing(self):
        if self.batch and self.rng.random() < 0.5:
            self.batch.clear()
        elif self.batch:
            try:
                self.batch[0].extend(b"x" * 1000)
            except BufferError:  # exported while it is being written
                pass
        self.act()

    def resume_writing(self):
        self.act()

    def connection_lost(self, exc):
        self.book["lost"][id(self.transport)] = self.book["lost"].get(id(self.transport), 0) + 1
        self.act()


class ReentrantBuffered(Reentrant, asyncio.BufferedProtocol):
    """Reentrant as a BufferedProtocol: the calls also come from inside
    get_buffer() and buffer_updated(), whose buffers are of random sizes,
    some of them memoryview slices; set_protocol() switches between the two
    kinds mid-stream."""

    def get_buffer(self, sizehint):
        self.act()
        buffer = bytearray(self.rng.choice([1, 7, 1024, 65536, 262144]))
        if len(buffer) > 1 and self.rng.random() < 0.3:
            return memoryview(buffer)[1:]
        return buffer

    def buffer_updated(self, nbytes):
        self.data_received(None)


def reentrant_protocol(rng, book):
    return rng.choice([Reentrant, ReentrantBuffered])(rng, book)


async def _end_every_transport(book, end):
    """Ends (abort or close) each transport that has not been lost, and
    waits up to 10 s for every connection_lost()."""
    for transport in book["made"]:
        if id(transport) not in book["lost"]:  # asyncio's abort() after its connection_lost() fails
            end(transport)
    deadline = time.monotonic() + 10
    while len(book["lost"]) < len(book["made"]) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)


def _check_reentrant_run(loop, main, seed, book, tolerated=lambda context: False):
    """Runs main() on the loop, then closes it: more than 100 transports
    made, each lost exactly once, nothing reported but what `tolerated`
    accepts."""
    try:
        _, errors = run_collecting_errors(loop, main)
    except AssertionError as exc:
        raise AssertionError(f"seed {seed}: {exc}") from None
    finally:
        loop.close()
    assert len(book["made"]) > 100, seed
    counts = [book["lost"].get(id(t), 0) for t in book["made"]]
    assert counts == [1] * len(counts), (seed, [(t, n) for t, n in zip(book["made"], counts) if n != 1][:5])
    errors = [context for context in errors if not tolerated(context)]
    assert not errors, (seed, errors[:5])


@pytest.mark.parametrize("family", ["tcp", "unix"])
def test_transport_calls_from_inside_every_protocol_callback(no_fd_leak, family, tmp_path):
    """Random transport calls from inside every protocol callback, on both
    ends, with Protocols and BufferedProtocols (switched by set_protocol()
    too): nothing crashes or hangs, every transport's connection_lost() runs
    exactly once (to whichever protocol it has then), no descriptor is left,
    and the exception handler hears nothing.
    On uringloop only: stock asyncio fails it with its own errors (a close()
    and an abort() from callbacks schedule connection_lost() twice, the
    second meeting a transport already torn down; resume_reading() after
    close() adds a reader for a closed descriptor). Over TLS, see the next
    test."""
    loop = uringloop.new_event_loop()
    seed = random.randrange(1 << 32)
    rng = random.Random(seed)
    book = {"made": [], "lost": {}}
    path = str(tmp_path / "s")

    async def connect():
        if family == "unix":
            return await loop.create_unix_connection(lambda: reentrant_protocol(rng, book), path)
        return await loop.create_connection(lambda: reentrant_protocol(rng, book), "127.0.0.1", port)

    async def main():
        nonlocal port
        if family == "unix":
            server = await loop.create_unix_server(lambda: reentrant_protocol(rng, book), path)
        else:
            server = await loop.create_server(lambda: reentrant_protocol(rng, book), "127.0.0.1", 0)
            port = server.sockets[0].getsockname()[1]
        end = time.monotonic() + SECONDS
        while time.monotonic() < end:
            await asyncio.wait_for(connect(), 10)
            await asyncio.sleep(rng.random() * 0.005)
        server.close()
        await _end_every_transport(book, lambda transport: transport.abort())
        await server.wait_closed()

    port = None
    _check_reentrant_run(loop, main, seed, book)


# What asyncio's SSL protocol itself reports under these calls, on both loops
# (uringloop runs it too, with its per-record methods in C): a write from
# connection_lost() makes it call pause_writing() or resume_writing() on the
# app protocol it has already dropped, and a close() that follows an abort()
# or a peer's close_notify asks a state change it refuses.
SSLPROTO_OWN_ERRORS = (
    (AttributeError, "'NoneType' object has no attribute 'pause_writing'"),
    (AttributeError, "'NoneType' object has no attribute 'resume_writing'"),
    (RuntimeError, "cannot switch state from SSLProtocolState.UNWRAPPED to SSLProtocolState.SHUTDOWN"),
)


def _is_sslproto_own_error(context):
    exc = context.get("exception")
    return any(type(exc) is kind and str(exc).startswith(text) for kind, text in SSLPROTO_OWN_ERRORS)


def _is_selector_transport_own_error(context):
    """Stock asyncio only (3.11-3.13): an app protocol that aborts from
    inside resume_writing() makes the selector transport's _write_ready()
    call _call_connection_lost() after abort() has scheduled it, and the
    scheduled call fails on the closed socket. uringloop does not do this:
    tests/test_loop_transports.py::test_abort_inside_resume_writing_loses_the_connection_once."""
    exc, handle = context.get("exception"), repr(context.get("handle"))
    return (type(exc) is AttributeError and str(exc) == "'NoneType' object has no attribute 'close'"
            and "_SelectorSocketTransport._call_connection_lost" in handle)


def test_tls_transport_calls_from_inside_every_protocol_callback(loop, no_fd_leak):
    """The same random calls over TLS, on both ends of connections made
    with ssl= (uringloop's SSL protocol is asyncio's with its per-record
    methods in C, so these calls reach that C code from every callback):
    nothing crashes or hangs, every app transport's connection_lost() runs
    exactly once, no descriptor is left. The exception handler may hear
    only the errors asyncio's SSL protocol itself makes under these calls
    (SSLPROTO_OWN_ERRORS), on both loops, and on stock asyncio the selector
    transport's own double connection loss; anything else fails."""
    seed = random.randrange(1 << 32)
    rng = random.Random(seed)
    book = {"made": [], "lost": {}}
    server_ctx, client_ctx = tls_contexts()
    timeouts = {"ssl_handshake_timeout": 5, "ssl_shutdown_timeout": 2}

    async def main():
        server = await loop.create_server(lambda: reentrant_protocol(rng, book), "127.0.0.1", 0, ssl=server_ctx, **timeouts)
        port = server.sockets[0].getsockname()[1]
        end = time.monotonic() + SECONDS
        while time.monotonic() < end:
            await asyncio.wait_for(
                loop.create_connection(lambda: reentrant_protocol(rng, book), "127.0.0.1", port, ssl=client_ctx,
                                       server_hostname="localhost", **timeouts), 10)
            await asyncio.sleep(rng.random() * 0.005)
        server.close()
        await _end_every_transport(book, lambda transport: transport.abort())
        await server.wait_closed()

    if isinstance(loop, uringloop.Loop):
        tolerated = _is_sslproto_own_error
    else:
        tolerated = lambda context: _is_sslproto_own_error(context) or _is_selector_transport_own_error(context)
    _check_reentrant_run(loop, main, seed, book, tolerated=tolerated)


def test_pipe_transport_calls_from_inside_every_protocol_callback(no_fd_leak):
    """The same random calls on pipe transports: a read and a write pipe
    transport on each os.pipe(), made without pause until the time is up.
    Calls a one-way pipe does not have raise, as asyncio's (AttributeError,
    NotImplementedError). uringloop only: stock asyncio reports errors of its
    own here too (connection_lost() scheduled after the transport was torn
    down, a write pipe's reader callback after close)."""
    seed = random.randrange(1 << 32)
    rng = random.Random(seed)
    book = {"made": [], "lost": {}}
    loop = uringloop.new_event_loop()

    async def main():
        end = time.monotonic() + SECONDS
        while time.monotonic() < end:
            r, w = os.pipe()
            await loop.connect_read_pipe(lambda: Reentrant(rng, book), os.fdopen(r, "rb", buffering=0))
            await loop.connect_write_pipe(lambda: Reentrant(rng, book), os.fdopen(w, "wb", buffering=0))
            await asyncio.sleep(rng.random() * 0.005)
        await _end_every_transport(book, lambda transport: transport.close())

    _check_reentrant_run(loop, main, seed, book)


# ---- subprocess transports: calls from inside the SubprocessProtocol's callbacks ----

SUBPROCESS_CALLS = ["write", "big_write", "close_stdin", "write_eof", "pause_reading", "resume_reading", "close_pipe",
                    "kill", "terminate", "close", "signal", "queries", "nothing"]
# The child echoes its stdin to stdout, and the first bytes of each read to stderr.
ECHO_CHILD = "import os\nwhile d := os.read(0, 65536):\n    os.write(1, d)\n    os.write(2, d[:10])\n"


class ReentrantSubprocess(asyncio.SubprocessProtocol):
    """Each callback makes random calls on the subprocess transport and on
    its pipe transports: kill() from pipe_data_received(), a write to stdin
    from process_exited(), close() from pipe_connection_lost(), ..."""

    def __init__(self, rng, book):
        self.rng, self.book = rng, book
        self.transport, self.pipes = None, ()

    def act(self):
        for _ in range(self.rng.randrange(3)):
            try:
                self.call(self.rng.choice(SUBPROCESS_CALLS))
            except REFUSALS + (ProcessLookupError,):
                pass

    def call(self, name):
        tr, rng = self.transport, self.rng
        stdin, out = tr.get_pipe_transport(0), tr.get_pipe_transport(rng.choice([1, 2]))
        if name == "write" and stdin:
            stdin.write(rng.randbytes(rng.choice([1, 100, 5000, 70000])))
        elif name == "big_write" and stdin:
            stdin.write(b"z" * (1 << 20))
        elif name == "close_stdin" and stdin:
            stdin.close()
        elif name == "write_eof" and stdin and stdin.can_write_eof():
            stdin.write_eof()
        elif name == "pause_reading" and out:
            out.pause_reading()
        elif name == "resume_reading" and out:
            out.resume_reading()
        elif name == "close_pipe" and out:
            out.close()
        elif name == "kill":
            tr.kill()
        elif name == "terminate":
            tr.terminate()
        elif name == "close":
            tr.close()
        elif name == "signal":
            tr.send_signal(signal.SIGCONT)
        elif name == "queries":
            tr.get_returncode(), tr.get_pid(), tr.is_closing()

    def connection_made(self, transport):
        self.transport = transport
        self.pipes = [fd for fd in (0, 1, 2) if transport.get_pipe_transport(fd)]
        self.book["made"].append(self)
        self.act()

    def pipe_data_received(self, fd, data):
        self.act()

    def _count(self, what):
        self.book[what][id(self)] = self.book[what].get(id(self), 0) + 1
        self.act()

    def pipe_connection_lost(self, fd, exc):
        self._count(f"pipe_lost_{fd}")

    def process_exited(self):
        self._count("exited")

    def connection_lost(self, exc):
        self._count("lost")


def test_subprocess_transport_calls_from_inside_every_protocol_callback(loop, no_fd_leak):
    """Random calls on a subprocess transport and its pipes from inside
    every SubprocessProtocol callback, with stderr a pipe, STDOUT or
    DEVNULL: nothing crashes or hangs, process_exited() and
    connection_lost() run once per child and pipe_connection_lost() once
    per pipe, every child is reaped, no descriptor is left, and the
    exception handler hears nothing. On both loops."""
    seed = random.randrange(1 << 32)
    rng = random.Random(seed)
    kinds = ["exited", "lost"] + [f"pipe_lost_{fd}" for fd in (0, 1, 2)]
    book = {"made": [], **{kind: {} for kind in kinds}}

    async def main():
        transports = []
        end = time.monotonic() + SECONDS
        while time.monotonic() < end:
            stderr = rng.choice([subprocess.PIPE, subprocess.STDOUT, subprocess.DEVNULL])
            transport, _ = await loop.subprocess_exec(lambda: ReentrantSubprocess(rng, book), sys.executable, "-c",
                                                      ECHO_CHILD, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                                      stderr=stderr)
            transports.append(transport)
            await asyncio.sleep(rng.random() * 0.01)
        for transport in transports:
            transport.close()  # kills a child still running
        deadline = time.monotonic() + 10
        while len(book["lost"]) < len(book["made"]) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return [transport.get_pid() for transport in transports]

    try:
        pids, errors = run_collecting_errors(loop, main)
    finally:
        loop.close()
    assert len(book["made"]) > 50, seed
    for protocol in book["made"]:
        expected = {"exited": 1, "lost": 1, **{f"pipe_lost_{fd}": 1 for fd in protocol.pipes}}
        counts = {kind: book[kind].get(id(protocol), 0) for kind in kinds}
        assert {kind: n for kind, n in counts.items() if n} == expected, (seed, protocol.pipes, counts)
    for pid in pids:
        with pytest.raises(ChildProcessError):  # reaped
            os.waitpid(pid, os.WNOHANG)
    assert not errors, (seed, errors[:5])


# ---- datagram transports: calls from inside the DatagramProtocol's callbacks ----

DATAGRAM_CALLS = ["send", "send", "big_send", "burst", "close", "abort", "limits", "set_protocol", "sizes",
                  "close_soon", "nothing"]


class ReentrantDatagram(asyncio.DatagramProtocol):
    """Each callback makes random calls on the datagram transport: bursts
    that fill a Unix datagram peer's queue (so pause_writing() comes),
    close() or abort() from pause_writing(), a send from connection_lost()
    or error_received(), a new protocol from datagram_received()."""

    def __init__(self, rng, book, transport=None, depth=0, peer=None):
        self.rng, self.book, self.transport, self.depth, self.peer = rng, book, transport, depth, peer
        self.in_error = False

    def act(self):
        for _ in range(self.rng.randrange(3)):
            try:
                self.call(self.rng.choice(DATAGRAM_CALLS))
            except REFUSALS:
                pass

    def send(self, data):
        if self.transport.get_extra_info("peername") is not None:
            self.transport.sendto(data)
        elif self.peer is not None:  # unconnected: to whoever sent last
            self.transport.sendto(data, self.peer)

    def call(self, name):
        tr, rng = self.transport, self.rng
        if name == "send":
            self.send(rng.randbytes(rng.choice([1, 100, 1400])))
        elif name == "big_send":
            self.send(b"z" * rng.choice([8000, 60000]))
        elif name == "burst":
            for _ in range(rng.randrange(50, 300)):
                self.send(b"b" * 1000)
        elif name == "set_protocol" and self.depth < 3:
            tr.set_protocol(ReentrantDatagram(rng, self.book, tr, self.depth + 1, self.peer))
        else:
            _shared_transport_call(tr, rng, name)

    def connection_made(self, transport):
        self.transport = transport
        self.book["made"].append(transport)
        self.act()

    def datagram_received(self, data, addr):
        self.peer = addr or self.peer
        self.act()

    def error_received(self, exc):
        # error_received() comes from inside sendto() (as in asyncio): acting
        # again from a nested one would recurse once per datagram of a burst
        if not self.in_error:
            self.in_error = True
            try:
                self.act()
            finally:
                self.in_error = False

    def pause_writing(self):
        self.book["paused"] += 1
        self.act()

    def resume_writing(self):
        self.act()

    def connection_lost(self, exc):
        self.book["lost"][id(self.transport)] = self.book["lost"].get(id(self.transport), 0) + 1
        self.act()


def test_datagram_transport_calls_from_inside_every_protocol_callback(no_fd_leak, tmp_path):
    """The same on datagram endpoints, in pairs: UDP (one bound, one
    connected to it) and Unix datagram sockets (both bound, one connected).
    Nothing crashes or hangs, every transport's connection_lost() runs
    exactly once, pause_writing() came, no descriptor is left, and the
    exception handler hears nothing. uringloop only: stock asyncio reports
    FileNotFoundError from the reader it adds after connection_made(), for
    an endpoint closed inside connection_made()."""
    seed = random.randrange(1 << 32)
    rng = random.Random(seed)
    book = {"made": [], "lost": {}, "paused": 0}
    loop = uringloop.new_event_loop()

    def protocol():
        return ReentrantDatagram(rng, book)

    async def make_pair(i):
        if rng.random() < 0.5:
            first, _ = await loop.create_datagram_endpoint(protocol, local_addr=("127.0.0.1", 0))
            await loop.create_datagram_endpoint(protocol, remote_addr=first.get_extra_info("sockname"))
            return
        first_path, second_path = str(tmp_path / f"a{i}"), str(tmp_path / f"b{i}")
        await loop.create_datagram_endpoint(protocol, local_addr=first_path, family=socket.AF_UNIX)
        try:
            await loop.create_datagram_endpoint(protocol, local_addr=second_path, remote_addr=first_path,
                                                family=socket.AF_UNIX)
        except ConnectionRefusedError:  # the first closed itself in its connection_made()
            pass

    async def main():
        end, i = time.monotonic() + SECONDS, 0
        while time.monotonic() < end:
            i += 1
            await make_pair(i)
            await asyncio.sleep(rng.random() * 0.005)
        await _end_every_transport(book, lambda transport: transport.abort())

    _check_reentrant_run(loop, main, seed, book)
    assert book["paused"] > 0, seed

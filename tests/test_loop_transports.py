"""Stream transports and servers over real sockets, on uringloop and stock
asyncio with the same assertions: protocols, flow control both ways,
half-close, abort, closing from callbacks, TLS, Unix sockets, many
connections, and faults (resets, writes after close, servers closed with
clients attached), with file descriptors counted before and after."""

import array
import asyncio
import contextvars
import gc
import logging
import os
import re
import socket
import sys
import tempfile
import time
import warnings

import pytest

import uringloop
import uringloop._net

from conftest import close_with_reset, full_unix_dgram_peer, run, tcp_pair, tls_contexts
from http_support import pids_while_one_is_blocked

pytestmark = pytest.mark.usefixtures("no_fd_leak")


class Recorder(asyncio.Protocol):
    """Records every callback, to check order and exactly-once."""

    def __init__(self, loop):
        self.events = []
        self.data = bytearray()
        self.transport = None
        self.lost = loop.create_future()
        self.eof = loop.create_future()
        self.keep_open_on_eof = False

    def connection_made(self, transport):
        self.events.append("made")
        self.transport = transport

    def data_received(self, data):
        self.data += data

    def eof_received(self):
        self.events.append("eof")
        self.eof.set_result(None)
        return self.keep_open_on_eof

    def connection_lost(self, exc):
        self.events.append(("lost", type(exc).__name__ if exc else None))
        self.lost.set_result(exc)


class Echo(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.transport.write(data)


async def echo_server(loop, **kw):
    server = await loop.create_server(Echo, "127.0.0.1", 0, **kw)
    return server, server.sockets[0].getsockname()


async def connected_to_raw_peer(loop, protocol_factory):
    """A transport connected to a plain blocking socket we drive by hand."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    tr, pr = await loop.create_connection(protocol_factory, *listener.getsockname())
    peer, _ = listener.accept()
    listener.close()
    return tr, pr, peer


async def write_until_paused(tr, protocol, chunk):
    """Writes `chunk` until protocol.paused is set by its pause_writing()
    (at most 200 times: far more than the kernel's buffers take)."""
    for _ in range(200):
        tr.write(chunk)
        if protocol.paused:
            return
        await asyncio.sleep(0)


async def drain_peer_until(peer, done):
    """Reads and drops what reaches the raw peer until done()."""
    peer.setblocking(False)
    while not done():
        try:
            peer.recv(1 << 20)
        except BlockingIOError:
            pass
        await asyncio.sleep(0.001)



async def drain_peer_into(peer, got, done):
    """Reads what reaches the raw peer into `got` until done()."""
    peer.setblocking(False)
    while not done():
        try:
            got += peer.recv(1 << 20)
        except BlockingIOError:
            await asyncio.sleep(0.001)


def test_echo_protocol_roundtrip_and_callbacks_once(loop):
    async def main():
        server, addr = await echo_server(loop)
        tr, pr = await loop.create_connection(lambda: Recorder(loop), *addr)
        assert isinstance(tr, asyncio.Transport)
        assert tr.get_extra_info("peername") == addr
        assert tr.get_extra_info("sockname") == tr.get_extra_info("socket").getsockname()
        assert tr.get_extra_info("nonexistent", 42) == 42
        tr.write(b"hello ")
        tr.writelines([b"wor", bytearray(b"ld")])
        while len(pr.data) < 11:
            await asyncio.sleep(0.001)
        assert bytes(pr.data) == b"hello world"
        tr.close()
        assert tr.is_closing()
        await pr.lost
        assert pr.events == ["made", ("lost", None)]
        server.close()
        await server.wait_closed()

    run(loop, main())


def one_connection_server(loop):
    """A protocol factory for a server that takes one connection, and two
    futures: its transport (at connection_made) and connection_lost's
    exception."""
    made, lost = loop.create_future(), loop.create_future()

    class Server(asyncio.Protocol):
        def connection_made(self, tr):
            made.set_result(tr)

        def connection_lost(self, exc):
            lost.set_result(exc)

    return Server, made, lost


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_extra_info_outlives_the_peers_reset_and_the_close(loop, host):
    """asyncio takes a socket transport's two addresses when it makes the
    transport, so they are still given after the peer has reset the
    connection (the kernel's getpeername() then fails) and after the
    transport has closed its socket. uringloop keeps them in C instead of
    in a dict; this is the test that they are taken early all the same."""

    async def main():
        Server, accepted, lost = one_connection_server(loop)
        server = await loop.create_server(Server, host, 0)
        client = socket.socket(server.sockets[0].family)
        client.connect(server.sockets[0].getsockname())
        tr = await accepted
        assert tr._sock.gettimeout() == 0.0 and not os.get_blocking(tr._sock.fileno())  # accepted non-blocking
        client_addr, server_addr = client.getsockname(), client.getpeername()
        close_with_reset(client)
        assert isinstance(await lost, ConnectionResetError)
        assert tr.is_closing()
        assert tr.get_extra_info("peername") == client_addr
        assert tr.get_extra_info("sockname") == server_addr
        assert len(client_addr) == (2 if host == "127.0.0.1" else 4)
        assert tr.get_extra_info("socket").fileno() == -1  # closed: nothing left to ask the kernel
        server.close()
        await server.wait_closed()

    run(loop, main())


@pytest.mark.parametrize("debug", [False, True], ids=["", "debug"])
@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_a_connection_reset_before_its_transport_still_gives_its_peer(loop, host, debug, caplog):
    """A client that connects and resets at once, before the server's loop
    has run: the connection is still accepted and its transport made, and
    its peername is the client's address, which asyncio has from accept().
    uringloop's multishot accept gives no address and the kernel's
    getpeername() fails once the peer has reset, so it must ask otherwise.
    In debug mode the accept's log line names the client too."""
    loop.set_debug(debug)
    caplog.set_level(logging.DEBUG, logger="asyncio")

    async def main():
        Server, made, lost = one_connection_server(loop)
        server = await loop.create_server(Server, host, 0)
        client = socket.socket(server.sockets[0].family)
        client.connect(server.sockets[0].getsockname())  # done by the kernel's backlog
        client_addr = client.getsockname()
        close_with_reset(client)  # before the loop runs again
        tr = await made
        assert tr.get_extra_info("peername") == client_addr
        assert tr.get_extra_info("sockname") == server.sockets[0].getsockname()
        assert isinstance(await lost, ConnectionResetError)
        assert tr.get_extra_info("peername") == client_addr
        server.close()
        await server.wait_closed()
        return client_addr

    client_addr = run(loop, main())
    accepts = [r.getMessage() for r in caplog.records if "got a new connection from" in r.getMessage()]
    if debug:
        assert len(accepts) == 1 and f"got a new connection from {client_addr!r}:" in accepts[0]
    else:
        assert accepts == []


async def transport_and_its_peer(loop, what):
    """A transport of the kind `what` that nothing closes, and the far end
    of its socket or pipe, by which a test sees the transport's end closed."""
    if what in ("tcp", "unix"):
        made = loop.create_future()

        class Server(asyncio.Protocol):
            def connection_made(self, tr):
                made.set_result(tr)

        if what == "tcp":
            server = await loop.create_server(Server, "127.0.0.1", 0)
            peer = socket.create_connection(server.sockets[0].getsockname())
        else:
            path = tempfile.mktemp(prefix="uringloop-", suffix=".sock")
            server = await loop.create_unix_server(Server, path)
            peer = socket.socket(socket.AF_UNIX)
            peer.connect(path)
            os.unlink(path)
        tr = await made
        server.close()
        return tr, peer
    r, w = os.pipe()
    if what == "read_pipe":
        tr, _ = await loop.connect_read_pipe(asyncio.Protocol, open(r, "rb", 0))
        return tr, open(w, "wb", 0)
    tr, _ = await loop.connect_write_pipe(asyncio.Protocol, open(w, "wb", 0))
    return tr, open(r, "rb", 0)


@pytest.mark.parametrize("what", ["tcp", "unix", "read_pipe", "write_pipe"])
def test_a_transport_never_closed_warns_when_collected(loop, what):
    """asyncio's transports warn "unclosed transport" (a ResourceWarning
    naming the transport) when they are collected without having been
    closed, and close their socket or pipe then, so that it does not warn
    in turn. A loop that is closed lets go of its transports."""

    async def main():
        tr, peer = await transport_and_its_peer(loop, what)
        return repr(tr).split()[1], peer

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        fd_part, peer = run(loop, main())
        loop.close()
        gc.collect()
    with peer:
        # (the socket's own warning may come too: the collector finalizes
        # the objects of a cycle in any order, asyncio's as well)
        unclosed = [w for w in caught if str(w.message).startswith("unclosed transport <")]
        assert len(unclosed) == 1, [str(w.message) for w in caught]
        assert unclosed[0].category is ResourceWarning
        assert isinstance(unclosed[0].source, asyncio.BaseTransport)  # source=: the transport
        assert fd_part in str(unclosed[0].message)  # "fd=N" of the transport's own repr
        if what == "read_pipe":
            with pytest.raises(BrokenPipeError):
                peer.write(b"x")
        elif what == "write_pipe":
            assert peer.read(1) == b""
        else:
            peer.settimeout(5)
            assert peer.recv(1) == b""  # the server's end is closed


def test_a_transport_collected_unclosed_leaves_its_servers_count(loop, loop_kind):
    """A Server's wait_closed() waits for its transports from 3.12 on (a
    count on 3.12, a WeakSet on 3.13), and one collected without being
    closed after the server was closed leaves through _detach() (asyncio's
    __del__ from 3.13), which wakes the waiter; without it wait_closed()
    would never return. uringloop does so on every version. The transport
    here pauses its reading, so that nothing of the loop's holds it while
    it runs."""
    if loop_kind == "asyncio" and sys.version_info[:2] == (3, 12):
        pytest.skip("asyncio 3.12's __del__ does not _detach(): its wait_closed() would wait forever")

    def unclosed():  # in the warnings recorded below
        return [w for w in caught if str(w.message).startswith("unclosed transport <")]

    async def main():
        made = loop.create_future()

        class Server(asyncio.Protocol):
            def connection_made(self, tr):
                tr.pause_reading()
                made.set_result(None)

        server = await loop.create_server(Server, "127.0.0.1", 0)
        with socket.create_connection(server.sockets[0].getsockname()) as client:
            await made
            server.close()
            closed = asyncio.ensure_future(server.wait_closed())
            for i in range(50):  # (uringloop: until the kernel has let go of the cancelled receive)
                await asyncio.sleep(0.001 * i)
                gc.collect()
                if unclosed():
                    break
            assert len(unclosed()) == 1, [str(w.message) for w in caught]
            await asyncio.wait_for(closed, 5)
            client.settimeout(5)
            assert client.recv(1) == b""

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        run(loop, main())
    assert len(unclosed()) == 1


def test_the_extra_dict_has_asyncios_keys_and_takes_new_ones(loop):
    """transport._extra is the dict asyncio's get_extra_info() reads:
    "socket", "sockname" and "peername", the same socket object that
    get_extra_info() gave before, and a key put there is then given by
    get_extra_info() (uringloop makes the dict when it is first read)."""

    async def main():
        server, addr = await echo_server(loop)
        tr, pr = await loop.create_connection(lambda: Recorder(loop), *addr)
        sock = tr.get_extra_info("socket")
        assert sock is tr.get_extra_info("socket")
        assert tr.get_extra_info("sslcontext", "none") == "none"
        extra = tr._extra
        assert set(extra) == {"socket", "sockname", "peername"}
        assert extra["socket"] is sock
        assert extra["peername"] == addr and extra["sockname"] == sock.getsockname()
        extra["custom"] = "value"
        assert tr.get_extra_info("custom") == "value"
        assert tr._extra is extra
        tr.close()
        await pr.lost
        server.close()
        await server.wait_closed()

    run(loop, main())


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_extra_info_addresses_are_one_object_each(loop, host):
    """get_extra_info("peername") and ("sockname") give the same object
    every time, and _extra then holds that object, as asyncio's dict does
    (uringloop makes each tuple when it is first asked for). For a client
    and a server transport."""

    async def main():
        Server, accepted, _ = one_connection_server(loop)
        server = await loop.create_server(Server, host, 0)
        addr = server.sockets[0].getsockname()
        tr, pr = await loop.create_connection(lambda: Recorder(loop), host, addr[1])
        for t in (tr, await accepted):
            for key in ("peername", "sockname"):
                first = t.get_extra_info(key)
                assert first is not None and first is t.get_extra_info(key), key
            assert t._extra["peername"] is t.get_extra_info("peername")
            assert t._extra["sockname"] is t.get_extra_info("sockname")
        assert tr.get_extra_info("peername") == addr
        tr.close()
        await pr.lost
        server.close()
        await server.wait_closed()

    run(loop, main())


def test_transport_reprs_have_asyncios_layout(loop):
    """"<Name [closing |closed ]fd=N read=polling|idle write=<polling|idle,
    bufsize=N>>", as asyncio's socket and datagram transports show it."""

    def shows(tr, pattern):
        assert re.fullmatch(r"<\w+ " + pattern + ">", repr(tr)), repr(tr)

    async def main():
        tr, pr, peer = await connected_to_raw_peer(loop, lambda: Recorder(loop))
        shows(tr, r"fd=\d+ read=polling write=<idle, bufsize=0>")
        tr.pause_reading()
        shows(tr, r"fd=\d+ read=idle write=<idle, bufsize=0>")
        tr.resume_reading()
        tr.write(b"x" * (16 << 20))  # more than the socket buffers hold: the peer does not read
        shows(tr, r"fd=\d+ read=polling write=<polling, bufsize=[1-9]\d*>")
        tr.close()
        assert repr(tr).split()[1] == "closing"
        tr.abort()
        await pr.lost
        shows(tr, r"closed fd=\d+")
        peer.close()

        dg, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, local_addr=("127.0.0.1", 0))
        shows(dg, r"fd=\d+ read=polling write=<idle, bufsize=0>")
        dg.pause_reading()
        shows(dg, r"fd=\d+ read=idle write=<idle, bufsize=0>")
        dg.close()
        await asyncio.sleep(0.01)
        shows(dg, r"closed fd=\d+")

        r, w = os.pipe()
        rp, rpr = await loop.connect_read_pipe(lambda: Recorder(loop), os.fdopen(r, "rb", 0))
        wp, _ = await loop.connect_write_pipe(asyncio.Protocol, os.fdopen(w, "wb", 0))
        shows(rp, r"fd=\d+ polling")
        shows(wp, r"fd=\d+ idle bufsize=0")
        wp.close()
        await rpr.lost
        shows(rp, r"closed fd=\d+ closed")
        return wp

    wp = run(loop, main())
    loop.close()
    shows(wp, r"closed fd=\d+ closed")


def test_write_takes_asyncios_types_and_writelines_any_bytes_like(loop):
    # asyncio's write() takes bytes, bytearray and memoryview only;
    # writelines() joins (from 3.12: takes a memoryview of) each item, so
    # any bytes-like object goes. uringloop's write() took any buffer.
    async def main():
        tr, pr, peer = await connected_to_raw_peer(loop, asyncio.Protocol)
        with pytest.raises(TypeError, match="^data argument must be a bytes-like object, not 'array'$"):
            tr.write(array.array("B", b"no"))
        tr.write(b"a")
        tr.write(bytearray(b"b"))
        tr.write(memoryview(b"c"))
        tr.writelines([array.array("B", b"d")])
        tr.close()
        peer.setblocking(False)
        got = b""
        while len(got) < 4:
            got += await loop.sock_recv(peer, 10)
        assert got == b"abcd"
        peer.close()

    run(loop, main())


def test_writelines_refuses_a_bad_item_before_writing_any(loop):
    # asyncio joins the items (from 3.12: takes a memoryview of each) before
    # it writes: an item that is not bytes-like raises that step's error and
    # nothing goes out. uringloop wrote the items before it.
    async def main():
        tr, pr, peer = await connected_to_raw_peer(loop, asyncio.Protocol)
        with pytest.raises(TypeError) as info:
            tr.writelines([b"sent?", "text"])
        assert str(info.value) == ("memoryview: a bytes-like object is required, not 'str'"
                                   if sys.version_info >= (3, 12)
                                   else "sequence item 1: expected a bytes-like object, str found")
        with pytest.raises(TypeError):
            tr.writelines(5)
        tr.write(b"next")
        await asyncio.sleep(0.05)  # uringloop sends at the end of the iteration
        peer.settimeout(5)
        assert peer.recv(100) == b"next"
        tr.close()
        peer.close()

    run(loop, main())


def test_a_strided_memoryview_is_a_fatal_write_error(loop):
    """A memoryview that is not C-contiguous is not bytes-like. asyncio
    offers it to send() or os.write(), which raise BufferError: a fatal
    error of the transport (the exception handler hears it, the protocol's
    connection_lost() gets it) and nothing is sent. 3.11's writelines()
    refuses it at its join instead. uringloop sent the view's bytes."""
    strided = memoryview(b"abcdef")[::2]
    refused_by_join = sys.version_info < (3, 12)

    async def check(tr, pr, write, message):
        errors = []
        loop.set_exception_handler(lambda lp, ctx: errors.append(ctx))
        write(tr)
        exc = await asyncio.wait_for(pr.lost, 5)
        loop.set_exception_handler(None)
        assert isinstance(exc, BufferError) and tr.is_closing()
        assert [(c["message"], c["exception"]) for c in errors] == [(message, exc)]

    async def main():
        tr, pr, peer = await connected_to_raw_peer(loop, lambda: Recorder(loop))
        await check(tr, pr, lambda tr: tr.write(strided), "Fatal write error on socket transport")
        peer.settimeout(5)
        assert peer.recv(100) == b""
        peer.close()

        tr, pr, peer = await connected_to_raw_peer(loop, lambda: Recorder(loop))
        if refused_by_join:
            with pytest.raises(TypeError, match="^sequence item 1: expected a bytes-like object, memoryview found$"):
                tr.writelines([b"x", strided])
            tr.write_eof()
        else:
            await check(tr, pr, lambda tr: tr.writelines([b"x", strided]), "Fatal write error on socket transport")
        peer.settimeout(5)
        assert peer.recv(100) == b""  # not even the b"x" before it
        tr.close()
        peer.close()

        rfd, wfd = os.pipe()
        with os.fdopen(wfd, "wb", buffering=0) as pipe:
            tr, pr = await loop.connect_write_pipe(lambda: Recorder(loop), pipe)
            await check(tr, pr, lambda tr: tr.write(strided), "Fatal write error on pipe transport")
        assert os.read(rfd, 100) == b""
        os.close(rfd)

        server_ctx, client_ctx = tls_contexts()
        server = await loop.create_server(asyncio.Protocol, "127.0.0.1", 0, ssl=server_ctx)
        tr, pr = await loop.create_connection(lambda: Recorder(loop), *server.sockets[0].getsockname(),
                                              ssl=client_ctx, server_hostname="localhost")
        await check(tr, pr, lambda tr: tr.write(strided), "Fatal error on SSL protocol")
        server.close()
        await server.wait_closed()

    run(loop, main())


def test_writelines_sends_every_item_when_pause_writing_empties_the_list(loop, loop_kind):
    """The protocol's pause_writing() runs while writelines() writes, and
    may change the list it was given (a producer that clears its batch once
    it is told to stop). asyncio joins the items before it writes, so all of
    them go out; uringloop's C writelines() went on reading the caller's
    list as the items were written, and crashed on 3.10 and 3.11."""
    chunk = 1 << 23  # more than the socket takes at once: the first write pauses

    class ClearsOnPause(asyncio.Protocol):
        def __init__(self):
            self.batch = [b"a" * chunk, b"b" * chunk, b"c" * chunk]

        def pause_writing(self):
            self.batch.clear()

    async def main():
        tr, pr, peer = await connected_to_raw_peer(loop, ClearsOnPause)
        tr.set_write_buffer_limits(high=1, low=0)
        tr.writelines(pr.batch)
        if loop_kind == "uringloop":  # paused while writing: the case under test (asyncio 3.12's
            assert pr.batch == []     # writelines() does not call pause_writing() at all)
        got = await loop.run_in_executor(None, read_exactly, peer, 3 * chunk)
        assert got[:1] + got[chunk:chunk + 1] + got[-1:] == b"abc"
        tr.close()
        peer.close()

    run(loop, main(), timeout=30)


def read_exactly(sock, n):
    sock.settimeout(10)
    buf = bytearray()
    while len(buf) < n:
        data = sock.recv(n - len(buf))
        if not data:
            break
        buf += data
    return bytes(buf)


_cvar = contextvars.ContextVar("uringloop_test_cvar", default="outer")


class _ContextNotes:
    """Records the context variable each protocol callback sees."""

    def __init__(self, loop, reply=b""):
        self.seen = {"factory": _cvar.get()}
        self.reply = reply
        self.lost = loop.create_future()

    def _note(self, name):
        self.seen.setdefault(name, _cvar.get())

    def _send_reply(self):
        if self.reply:
            self.transport.set_write_buffer_limits(high=1, low=0)
            self.transport.write(self.reply)  # pauses; resumes when it drains
            self.reply = b""

    def connection_made(self, transport):
        self._note("connection_made")
        self.transport = transport

    def pause_writing(self):
        self._note("pause_writing")

    def resume_writing(self):
        self._note("resume_writing")

    def eof_received(self):
        self._note("eof_received")

    def connection_lost(self, exc):
        self._note("connection_lost")
        self.lost.set_result(None)


class ContextRecorder(_ContextNotes, asyncio.BufferedProtocol):
    def get_buffer(self, sizehint):
        self._note("get_buffer")
        return bytearray(65536)

    def buffer_updated(self, nbytes):
        self._note("buffer_updated")
        self._send_reply()


class ContextRecorderPlain(_ContextNotes, asyncio.Protocol):
    def data_received(self, data):
        self._note("data_received")
        self._send_reply()


@pytest.mark.parametrize("buffered", [True, False], ids=["BufferedProtocol", "Protocol"])
def test_protocol_callbacks_run_in_the_context_that_made_the_transport(loop, buffered):
    # asyncio's reader and writer handles copy the context current when the
    # server starts serving or the connection is made; uringloop's C
    # transports ran every callback in the loop's own context ("outer").
    cls = ContextRecorder if buffered else ContextRecorderPlain
    servers = []

    def server_factory():
        servers.append(cls(loop, reply=b"r" * (4 << 20)))
        return servers[-1]

    async def client(addr):
        _cvar.set("client")
        tr, pr = await loop.create_connection(lambda: cls(loop), *addr)
        _cvar.set("client, later")
        tr.write(b"hello")
        tr.write_eof()
        await pr.lost
        return pr

    async def main():
        _cvar.set("server")
        server = await loop.create_server(server_factory, "127.0.0.1", 0)
        _cvar.set("main, later")
        pr = await loop.create_task(client(server.sockets[0].getsockname()))
        await servers[0].lost
        server.close()
        await server.wait_closed()
        return pr

    client_pr = run(loop, main())
    data_cb = "buffer_updated" if buffered else "data_received"
    assert {k: v for k, v in client_pr.seen.items() if k != "get_buffer"} == dict.fromkeys(
        ["factory", "connection_made", data_cb, "eof_received", "connection_lost"], "client")
    # pause_writing() runs inside write(), here called from the data callback
    expected = ["factory", "connection_made", data_cb, "pause_writing", "resume_writing", "eof_received",
                "connection_lost"] + (["get_buffer"] if buffered else [])
    assert servers[0].seen == dict.fromkeys(expected, "server")


@pytest.mark.parametrize("how", ["close", "abort"])
def test_connection_lost_runs_where_close_was_called(loop, how):
    # asyncio schedules connection_lost() with call_soon() inside close() or
    # abort(), so it sees the caller's context, not the transport's.
    async def main():
        server, addr = await echo_server(loop)
        _cvar.set("made")
        tr, pr = await loop.create_connection(lambda: ContextRecorderPlain(loop), *addr)

        async def closer():
            _cvar.set("closer")
            getattr(tr, how)()

        await loop.create_task(closer())
        await pr.lost
        server.close()
        await server.wait_closed()
        return pr.seen

    seen = run(loop, main())
    assert seen["connection_made"] == "made" and seen["connection_lost"] == "closer"


def test_pipe_callbacks_run_in_the_context_that_connected_the_pipe(loop):
    async def main():
        _cvar.set("pipe")
        rfd, wfd = os.pipe()
        tr, pr = await loop.connect_read_pipe(lambda: ContextRecorderPlain(loop), os.fdopen(rfd, "rb", 0))
        _cvar.set("later")
        os.write(wfd, b"data")
        os.close(wfd)
        await pr.lost
        return pr

    pr = run(loop, main())
    assert pr.seen == dict.fromkeys(["factory", "connection_made", "data_received", "eof_received",
                                     "connection_lost"], "pipe")


def test_tcp_nodelay_also_on_sockets_made_with_proto_0(loop_kind):
    # socket.socket() gives proto 0, and so do the connections accepted on
    # it; asyncio's helper then skips TCP_NODELAY (the check below is the
    # opposite there), uringloop sets it on every TCP transport, as uvloop.
    import uringloop

    lp = uringloop.new_event_loop() if loop_kind == "uringloop" else asyncio.SelectorEventLoop()

    async def main():
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        accepted = lp.create_future()

        class Server(asyncio.Protocol):
            def connection_made(self, transport):
                accepted.set_result(transport)

        server = await lp.create_server(Server, sock=listener)
        sock = socket.socket()
        sock.connect(listener.getsockname())
        client, _ = await lp.create_connection(asyncio.Protocol, sock=sock)
        server_side = await accepted
        nodelay = [t.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
                   for t in (client, server_side)]
        assert [t.get_extra_info("socket").proto for t in (client, server_side)] == [0, 0]
        client.close()
        server_side.close()
        server.close()
        await server.wait_closed()
        return nodelay

    try:
        nodelay = run(lp, main())
    finally:
        lp.close()
    assert nodelay == ([1, 1] if loop_kind == "uringloop" else [0, 0])


def test_buffered_protocol(loop):
    class Buffered(asyncio.BufferedProtocol):
        def __init__(self):
            self.buf = bytearray(7)  # smaller than what arrives: get_buffer is called again
            self.got = bytearray()
            self.lost = loop.create_future()

        def get_buffer(self, sizehint):
            return self.buf

        def buffer_updated(self, nbytes):
            self.got += self.buf[:nbytes]

        def connection_lost(self, exc):
            self.lost.set_result(exc)

    async def main():
        server, addr = await echo_server(loop)
        tr, pr = await loop.create_connection(Buffered, *addr)
        payload = os.urandom(100_000)
        tr.write(payload)
        while len(pr.got) < len(payload):
            await asyncio.sleep(0.001)
        assert bytes(pr.got) == payload
        tr.close()
        await pr.lost
        server.close()
        await server.wait_closed()

    run(loop, main())


class _Collecting(asyncio.Protocol):
    def __init__(self):
        self.got = bytearray()

    def data_received(self, data):
        self.got += data


async def _feed_accepted(loop, protocol, payload, received):
    """Serves one accepted TCP socket to `protocol` and sends it `payload`
    in one send() from the peer; waits until received() reaches its
    length. Returns the exception handler's reports."""
    errors = []
    loop.set_exception_handler(lambda loop, context: errors.append(context))
    a, b = tcp_pair()
    transport, _ = await loop.connect_accepted_socket(lambda: protocol, a)
    try:
        b.sendall(payload)
        deadline = time.monotonic() + 10
        while received() < len(payload) and time.monotonic() < deadline and not errors:
            await asyncio.sleep(0.001)
    finally:
        transport.abort()
        b.close()
    return errors


def test_a_buffered_protocol_replaced_in_buffer_updated_hands_the_rest_to_the_new_one(loop):
    """A BufferedProtocol that sets a plain Protocol from inside its first
    buffer_updated(): the bytes after those in its 7-byte buffer go to the
    new protocol's data_received(), in order. uringloop receives the 10 KB
    as one chunk and fed the rest to the plain protocol's get_buffer()
    (AttributeError, the transport closed); asyncio reads again for the
    new protocol, as uringloop now does."""
    payload = os.urandom(10_000)
    plain = _Collecting()

    class Switching(asyncio.BufferedProtocol):
        buf, got = bytearray(7), bytearray()

        def connection_made(self, transport):
            self.transport = transport

        def get_buffer(self, sizehint):
            return self.buf

        def buffer_updated(self, nbytes):
            self.got += self.buf[:nbytes]
            self.transport.set_protocol(plain)

    old = Switching()
    errors = run(loop, _feed_accepted(loop, old, payload, lambda: len(old.got) + len(plain.got)))
    assert not errors
    assert bytes(old.got) == payload[:7] and bytes(plain.got) == payload[7:]


def test_pause_reading_in_buffer_updated_holds_the_rest(loop):
    """pause_reading() from inside buffer_updated(): nothing more is
    delivered until resume_reading(), and then the rest, in order. uringloop
    went on feeding the rest of a chunk it had received while paused."""
    payload = os.urandom(10_000)

    class Pausing(asyncio.BufferedProtocol):
        buf, got, paused, early = bytearray(1000), bytearray(), False, 0

        def connection_made(self, transport):
            self.transport = transport

        def get_buffer(self, sizehint):
            return self.buf

        def buffer_updated(self, nbytes):
            self.early += self.paused  # called while paused
            self.got += self.buf[:nbytes]
            self.paused = True
            self.transport.pause_reading()
            loop.call_later(0.005, self.resume)

        def resume(self):
            self.paused = False
            self.transport.resume_reading()

    protocol = Pausing()
    errors = run(loop, _feed_accepted(loop, protocol, payload, lambda: len(protocol.got)))
    assert not errors
    assert protocol.early == 0
    assert bytes(protocol.got) == payload


def test_a_protocol_replaced_inside_get_buffer_gets_every_byte():
    """A BufferedProtocol that sets a plain Protocol from inside
    get_buffer(): the buffer it returns gets nothing, and every byte goes
    to the new protocol's data_received(). uringloop only: asyncio 3.11
    reads into the old protocol's buffer and then calls the new protocol's
    buffer_updated() (for a plain protocol an AttributeError that closes
    the transport; for a buffered one a count of bytes that are not in its
    buffer). uringloop did the same before."""
    loop = uringloop.new_event_loop()
    payload = os.urandom(10_000)
    plain = _Collecting()

    class Switching(asyncio.BufferedProtocol):
        updated = 0

        def connection_made(self, transport):
            self.transport = transport

        def get_buffer(self, sizehint):
            self.transport.set_protocol(plain)
            return bytearray(7)

        def buffer_updated(self, nbytes):
            self.updated += 1

    old = Switching()
    try:
        errors = run(loop, _feed_accepted(loop, old, payload, lambda: len(plain.got)))
    finally:
        loop.close()
    assert not errors
    assert old.updated == 0 and bytes(plain.got) == payload


class _CountsFlow:
    """Counts pause_writing() and resume_writing() calls."""

    paused = 0
    resumed = 0

    def pause_writing(self):
        self.paused += 1

    def resume_writing(self):
        self.resumed += 1


def test_write_flow_control_pauses_and_resumes(loop):
    class Producer(_CountsFlow, asyncio.Protocol):
        def __init__(self):
            self.lost = loop.create_future()

        def connection_lost(self, exc):
            self.lost.set_result(exc)

    async def main():
        # a peer that does not read until told to
        tr, pr, peer = await connected_to_raw_peer(loop, Producer)
        tr.set_write_buffer_limits(high=64 * 1024, low=16 * 1024)
        assert tr.get_write_buffer_limits() == (16 * 1024, 64 * 1024)
        await write_until_paused(tr, pr, b"x" * 65536)
        assert pr.paused == 1 and tr.get_write_buffer_size() > 64 * 1024
        # drain from the other side: the producer is resumed once
        await drain_peer_until(peer, lambda: tr.get_write_buffer_size() == 0)
        assert pr.resumed == 1
        tr.close()
        await pr.lost
        peer.close()

    run(loop, main(), timeout=30)


def test_writes_while_paused_still_end_in_resume_writing(loop):
    """A write made while the protocol is paused must not empty the buffer
    behind resume_writing()'s back: redis-py's writelines([head, 5 MB, tail])
    to a fast reader once left the protocol paused with nothing queued, and
    its drain() waited until its timeout."""

    class Producer(_CountsFlow, asyncio.Protocol):
        pass

    def drain_peer(peer):
        got = 0
        while True:
            try:
                data = peer.recv(1 << 20)
            except BlockingIOError:
                return got
            got += len(data)

    async def main():
        tr, pr, peer = await connected_to_raw_peer(loop, Producer)
        peer.setblocking(False)
        tr.set_write_buffer_limits(high=1, low=0)
        written = 8 << 20
        tr.write(b"x" * written)
        assert pr.paused == 1 and tr.get_write_buffer_size() > 0
        received = 0
        for _ in range(64):  # the peer reads between writes, with no loop iteration in between
            received += drain_peer(peer)
            tr.write(b"y")
            written += 1
        deadline = time.monotonic() + 10
        while received < written and time.monotonic() < deadline:
            received += drain_peer(peer)
            await asyncio.sleep(0.001)
        assert received == written
        await asyncio.sleep(0.01)
        assert tr.get_write_buffer_size() == 0 and pr.resumed == 1
        tr.close()
        peer.close()

    run(loop, main(), timeout=30)


def test_abort_inside_resume_writing_loses_the_connection_once():
    """A protocol that aborts its transport from inside resume_writing():
    connection_lost() runs once and the exception handler hears nothing.
    uringloop only: asyncio 3.11-3.13's _write_ready() goes on after
    resume_writing() as if nothing happened, finds the buffer empty and the
    transport closing, and calls _call_connection_lost() itself; the one
    abort() had already scheduled then fails on the closed socket
    ("'NoneType' object has no attribute 'close'" to the exception handler).
    The TLS stress test met that through asyncio's SSL protocol."""
    loop = uringloop.new_event_loop()
    errors = []
    loop.set_exception_handler(lambda _, context: errors.append(context))

    class Aborting(asyncio.Protocol):
        def __init__(self):
            self.lost = []
            self.paused = False

        def pause_writing(self):
            self.paused = True

        def resume_writing(self):
            self.transport.abort()

        def connection_made(self, transport):
            self.transport = transport

        def connection_lost(self, exc):
            self.lost.append(exc)

    async def main():
        tr, pr, peer = await connected_to_raw_peer(loop, Aborting)
        tr.set_write_buffer_limits(high=1 << 16)
        await write_until_paused(tr, pr, b"x" * (1 << 20))
        assert pr.paused
        await drain_peer_until(peer, lambda: pr.lost)
        await asyncio.sleep(0.05)
        peer.close()
        return pr.lost

    try:
        lost = run(loop, main())
    finally:
        loop.close()
    assert lost == [None] and not errors



class _FlowRecorder(_CountsFlow, Recorder):
    """A Recorder that also counts pause_writing() and resume_writing()."""


def _squeezed(tr):
    """Shrinks the transport's socket buffer, so that 200 KB do not fit."""
    tr.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)


def test_a_large_write_the_kernel_refuses_pauses_before_the_next_callback(loop):
    """One write above the high-water mark: asyncio offers it to the kernel
    in write() and pauses there for what is refused; uringloop may hold it
    for the iteration's send (stream_may_defer) and pauses when that send
    comes back short, before any other callback. Either way the protocol is
    paused by the time the writer next runs, resumed once the peer reads,
    and every byte arrives in order."""

    async def main():
        tr, pr, peer = await connected_to_raw_peer(loop, lambda: _FlowRecorder(loop))
        _squeezed(tr)
        tr.set_write_buffer_limits(high=64 * 1024, low=16 * 1024)
        payload = bytes(range(256)) * 800  # 200 KB
        tr.write(payload)
        await asyncio.sleep(0)
        assert pr.paused == 1 and tr.get_write_buffer_size() > 64 * 1024
        got = bytearray()
        await drain_peer_into(peer, got, lambda: len(got) == len(payload))
        assert bytes(got) == payload
        await asyncio.sleep(0.01)
        assert (pr.paused, pr.resumed, tr.get_write_buffer_size()) == (1, 1, 0)
        tr.close()
        await pr.lost
        peer.close()

    run(loop, main(), timeout=30)


@pytest.mark.parametrize("then", ["close", "write_eof", "write_again", "abort"])
def test_a_large_write_then_another_call_in_the_same_callback(loop, then):
    """A write above the high-water mark followed at once by close(),
    write_eof(), a second large write or abort(): the peer gets the bytes
    in order (after abort(), what the kernel took), then the end."""

    async def main():
        tr, pr, peer = await connected_to_raw_peer(loop, lambda: _FlowRecorder(loop))
        tr.set_write_buffer_limits(high=64 * 1024)
        first, second = b"a" * 100_000, b"b" * 150_000
        tr.write(first)
        expected = first
        if then == "close":
            tr.close()
        elif then == "write_eof":
            tr.write_eof()
        elif then == "write_again":
            tr.write(second)
            expected += second
            tr.write_eof()
        else:
            tr.abort()
        got = await loop.run_in_executor(None, recv_to_end, peer)
        if then == "abort":
            assert expected.startswith(got)
        else:
            assert got == expected
        tr.close()
        await pr.lost
        peer.close()

    run(loop, main(), timeout=30)


def test_large_writes_with_drain_reach_a_slow_reader(loop):
    """writer.write(100 KB) then drain(), fifty times, to a reader that
    takes 16 KB at a time in another thread: nothing waits for a send
    completion that never comes, and every byte arrives."""
    chunk = bytes(range(256)) * 400
    total = 50 * len(chunk)

    def slow_reader(sock):
        got = bytearray()
        sock.settimeout(10)
        while len(got) < total:
            data = sock.recv(16384)
            if not data:
                break
            got += data
        return bytes(got)

    async def main():
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        reader, writer = await asyncio.open_connection(*listener.getsockname())
        peer, _ = listener.accept()
        listener.close()
        received = loop.run_in_executor(None, slow_reader, peer)
        for _ in range(50):
            writer.write(chunk)
            await writer.drain()
        assert await received == chunk * 50
        writer.close()
        await writer.wait_closed()
        peer.close()

    run(loop, main(), timeout=30)


def test_pause_reading_loses_nothing(loop):
    async def main():
        tr, pr, peer = await connected_to_raw_peer(loop, lambda: Recorder(loop))
        sent = bytearray()
        for i in range(20):
            tr.pause_reading()
            assert not tr.is_reading()
            before = len(pr.data)
            msg = b"%04d" % i * 1000
            peer.sendall(msg)
            sent += msg
            await asyncio.sleep(0.01)
            assert len(pr.data) == before  # nothing delivered while paused
            tr.resume_reading()
            assert tr.is_reading()
        while len(pr.data) < len(sent):
            await asyncio.sleep(0.001)
        assert bytes(pr.data) == bytes(sent)
        tr.close()
        await pr.lost
        peer.close()

    run(loop, main())


def test_large_and_small_messages_keep_order_across_pauses(loop):
    # Large reads move a uringloop socket from the shared buffer ring to
    # reads at delivery, small ones move it back: every switch, with pauses
    # in between, must keep the bytes whole and in order, up to EOF.
    async def main():
        tr, pr, peer = await connected_to_raw_peer(loop, lambda: Recorder(loop))
        sent = bytearray()
        sizes = [200_000, 7, 70_000, 10_000, 1, 150_000, 3_000, 300_000, 20]
        for i, size in enumerate(sizes):
            msg = bytes([i + 65]) * size
            if i % 3 == 1:
                tr.pause_reading()
                before = len(pr.data)
                peer.sendall(msg)
                sent += msg
                await asyncio.sleep(0.02)
                assert len(pr.data) == before  # nothing delivered while paused
                tr.resume_reading()
            else:  # off the loop: more than the socket buffers hold
                await loop.run_in_executor(None, peer.sendall, msg)
                sent += msg
            while len(pr.data) < len(sent):
                await asyncio.sleep(0.001)
            assert bytes(pr.data) == bytes(sent)
        await loop.run_in_executor(None, peer.sendall, b"Z" * 100_000)
        peer.shutdown(socket.SHUT_WR)
        await pr.lost
        assert bytes(pr.data) == bytes(sent) + b"Z" * 100_000
        assert pr.events == ["made", "eof", ("lost", None)]
        peer.close()

    run(loop, main())


def test_large_reads_take_everything_the_socket_holds(loop):
    # On uringloop a socket in bulk mode learns of data from a poll that
    # fires when data arrives; a read takes at most 120 KiB, so what stays
    # in the socket after it must be read without waiting for more to come.
    async def main():
        tr, pr, peer = await connected_to_raw_peer(loop, lambda: Recorder(loop))
        await loop.run_in_executor(None, peer.sendall, b"a" * 200_000)  # bulk mode
        while len(pr.data) < 200_000:
            await asyncio.sleep(0.001)
        tr.pause_reading()
        await loop.run_in_executor(None, peer.sendall, b"b" * 300_000)  # all queued
        await asyncio.sleep(0.02)
        tr.resume_reading()  # and nothing more arrives from now on
        for _ in range(2000):
            if len(pr.data) == 500_000:
                break
            await asyncio.sleep(0.001)
        assert bytes(pr.data) == b"a" * 200_000 + b"b" * 300_000
        tr.close()
        await pr.lost
        peer.close()

    run(loop, main())


def test_large_messages_on_many_connections_at_once(loop):
    # Many sockets in bulk mode at once (on uringloop each learns of data
    # from its poll and reads at its turn to deliver, at most 120 KiB a
    # read): every one gets all its bytes, in order.
    async def main():
        pairs = [await connected_to_raw_peer(loop, lambda: Recorder(loop)) for _ in range(48)]
        for _, pr, peer in pairs:  # one at a time, into bulk mode
            await loop.run_in_executor(None, peer.sendall, b"a" * 200_000)
            while len(pr.data) < 200_000:
                await asyncio.sleep(0.001)
        rest = [os.urandom(997) * 300 + bytes([i]) for i in range(len(pairs))]
        for _, _, peer in pairs:
            peer.setblocking(False)
        await asyncio.gather(*(loop.sock_sendall(peer, r) for (_, _, peer), r in zip(pairs, rest)))
        for _ in range(5000):
            if all(len(pr.data) == 200_000 + len(r) for (_, pr, _), r in zip(pairs, rest)):
                break
            await asyncio.sleep(0.001)
        for (tr, pr, peer), r in zip(pairs, rest):
            assert bytes(pr.data) == b"a" * 200_000 + r
            tr.close()
            await pr.lost
            peer.close()

    run(loop, main())


def test_many_connections_each_writing_many_chunks_in_one_callback(loop):
    # On uringloop the sends of one iteration take their msghdr and iovec
    # from one scratch area per loop, which the kernel copies as it submits:
    # 120 sockets flushing 70 chunks each fill it twice over, so the loop
    # submits in the middle of a flush and starts the area again. Every peer
    # must get its own bytes, whole and in order.
    async def main():
        pairs = [await connected_to_raw_peer(loop, lambda: Recorder(loop)) for _ in range(120)]
        chunks = [[bytes([i % 251]) * 3 + j.to_bytes(2, "big") for j in range(70)] for i in range(len(pairs))]
        for (tr, _, _), mine in zip(pairs, chunks):  # all in this callback: one flush
            for c in mine:
                tr.write(c)
        for (tr, pr, peer), mine in zip(pairs, chunks):
            want = b"".join(mine)
            got = bytearray()
            peer.settimeout(5)
            while len(got) < len(want):
                got += await loop.run_in_executor(None, peer.recv, 65536)
            assert bytes(got) == want
            tr.close()
            await pr.lost
            peer.close()

    run(loop, main())


def test_eof_right_behind_large_data_is_seen(loop):
    # On uringloop a socket in bulk mode learns of data from an
    # edge-triggered poll: data and a FIN that both arrive before the loop
    # looks again give one completion, and the EOF must still be found once
    # the data is read (eof_received never came, and the peer waited).
    async def main():
        tr, pr, peer = await connected_to_raw_peer(loop, lambda: Recorder(loop))
        await loop.run_in_executor(None, peer.sendall, b"a" * 200_000)  # bulk mode
        while len(pr.data) < 200_000:
            await asyncio.sleep(0.001)
        peer.sendall(b"b" * 50_000)  # both before the loop runs again
        peer.shutdown(socket.SHUT_WR)
        await asyncio.wait_for(pr.eof, 5)
        assert bytes(pr.data) == b"a" * 200_000 + b"b" * 50_000
        await pr.lost
        peer.close()

    run(loop, main())


def test_an_exception_from_connection_lost_is_reported_with_a_handle(loop):
    # asyncio calls connection_lost() from a Handle: the handler's context
    # has "Exception in callback …(None)", the exception and that handle;
    # from 3.13 the handler runs in that handle's context
    handled = []
    loop.set_exception_handler(lambda lp, ctx: handled.append(ctx))

    class Raising(Recorder):
        def connection_lost(self, exc):
            super().connection_lost(exc)
            raise RuntimeError("connection_lost failed")

    async def main():
        tr, pr, peer = await connected_to_raw_peer(loop, lambda: Raising(loop))
        tr.close()
        await pr.lost
        await asyncio.sleep(0.01)
        peer.close()
        [ctx] = handled
        assert isinstance(ctx["exception"], RuntimeError) and str(ctx["exception"]) == "connection_lost failed"
        # (3.13 shows a callback's arguments only in debug mode)
        assert re.fullmatch(r"Exception in callback \S+\((None)?\)", ctx["message"]), ctx["message"]
        assert not ctx["handle"].cancelled()

    run(loop, main())


def test_connection_lost_runs_after_callbacks_scheduled_before_it(loop):
    # asyncio schedules connection_lost() with call_soon(), after every
    # callback scheduled before the transport was lost. StreamReader relies
    # on it: a task woken by data_received() must run before
    # connection_lost(exc) sets the reader's exception, or its readexactly()
    # waits forever (seen in a stress run). On uringloop a socket in bulk
    # mode whose read filled its 120 KiB buffer queues itself for the next
    # read before its protocol runs; connection_lost() must not run from
    # that earlier place in the queue.
    class Aborter(Recorder):
        def data_received(self, data):
            super().data_received(data)
            if len(self.data) > 200_000 and not self.transport.is_closing():
                loop.call_soon(self.events.append, "scheduled before abort")
                self.transport.abort()

    async def main():
        tr, pr, peer = await connected_to_raw_peer(loop, lambda: Aborter(loop))
        await loop.run_in_executor(None, peer.sendall, b"a" * 100_000)  # bulk mode
        while len(pr.data) < 100_000:
            await asyncio.sleep(0.001)
        tr.pause_reading()
        sending = loop.run_in_executor(None, peer.sendall, b"b" * 300_000)
        await asyncio.sleep(0.05)
        tr.resume_reading()  # a full 120 KiB read, with more waiting behind it
        await asyncio.wait_for(pr.lost, 5)
        assert pr.events == ["made", "scheduled before abort", ("lost", None)]
        try:
            await sending
        except OSError:
            pass
        peer.close()

    run(loop, main())

def test_peer_reset_after_large_messages(loop):
    async def main():
        tr, pr, peer = await connected_to_raw_peer(loop, lambda: Recorder(loop))
        peer.sendall(b"x" * 100_000)
        while len(pr.data) < 100_000:
            await asyncio.sleep(0.001)
        close_with_reset(peer)
        exc = await asyncio.wait_for(pr.lost, 5)
        assert isinstance(exc, ConnectionResetError)
        assert pr.events == ["made", ("lost", "ConnectionResetError")]

    run(loop, main())


def test_half_close_both_ways(loop):
    async def main():
        tr, pr, peer = await connected_to_raw_peer(loop, lambda: Recorder(loop))
        pr.keep_open_on_eof = True  # set before the peer shuts its side below
        # the peer shuts its side: eof_received, and we can still write
        peer.shutdown(socket.SHUT_WR)
        await pr.eof
        assert not tr.is_closing()
        tr.write(b"after eof")
        assert tr.can_write_eof()
        tr.write_eof()
        with pytest.raises(RuntimeError):
            tr.write(b"too late")
        # off the loop: the loop must keep running to send
        assert await loop.run_in_executor(None, recv_to_eof, peer) == b"after eof"
        tr.close()
        await pr.lost
        peer.close()

    run(loop, main())


def test_eof_closes_when_protocol_does_not_keep_open(loop):
    async def main():
        tr, pr, peer = await connected_to_raw_peer(loop, lambda: Recorder(loop))
        peer.sendall(b"bye")
        peer.shutdown(socket.SHUT_WR)
        await pr.lost
        assert bytes(pr.data) == b"bye"
        assert pr.events == ["made", "eof", ("lost", None)]
        peer.close()

    run(loop, main())


def test_close_flushes_pending_writes_then_fin(loop):
    payload = os.urandom(3 * 1024 * 1024)

    async def main():
        tr, pr, peer = await connected_to_raw_peer(loop, lambda: Recorder(loop))
        tr.write(payload)
        tr.close()  # with data still queued: it is sent, then FIN
        peer.setblocking(False)
        got = bytearray()
        while True:
            try:
                chunk = peer.recv(1 << 20)
            except BlockingIOError:
                await asyncio.sleep(0.001)
                continue
            if not chunk:
                break
            got += chunk
        assert bytes(got) == payload
        await pr.lost
        peer.close()

    run(loop, main(), timeout=30)


def test_a_write_after_close_that_empties_the_queue_ends_the_connection(loop):
    # asyncio lets write() follow close() while the buffer drains (3.10's
    # SSL protocol writes its close_notify that way, after closing its
    # transport). uringloop's small write waits for the iteration's flush,
    # so its buffer is not empty at close(); a write past the high-water
    # mark is then offered to the kernel at once, and when that emptied the
    # queue the close waited for a send completion that never came: no
    # connection_lost(), the fd left open. (asyncio sent the small write at
    # once, so its buffer was empty at close() and it drops the second.)
    small, large = b"a" * 100, b"b" * 5000

    async def main():
        tr, pr, peer = await connected_to_raw_peer(loop, lambda: Recorder(loop))
        tr.set_write_buffer_limits(high=1000)
        tr.write(small)
        tr.close()
        tr.write(large)
        assert await asyncio.wait_for(pr.lost, 5) is None
        assert pr.events == ["made", ("lost", None)]
        got = await loop.run_in_executor(None, recv_to_eof, peer)
        peer.close()
        assert got in (small, small + large)

    run(loop, main())


def recv_to_eof(peer, timeout=5):
    """All a blocking raw socket receives until the transport's end reaches it."""
    peer.settimeout(timeout)
    got = b""
    while chunk := peer.recv(100):
        got += chunk
    return got


def recv_to_end(peer, timeout=5):
    """As recv_to_eof(), also when the end is a reset."""
    peer.settimeout(timeout)
    got = bytearray()
    try:
        while chunk := peer.recv(1 << 16):
            got += chunk
    except ConnectionResetError:
        pass
    return bytes(got)


def test_abort_drops_writes_and_reaches_peer(loop):
    async def main():
        tr, pr, peer = await connected_to_raw_peer(loop, lambda: Recorder(loop))
        tr.write(b"x" * 10_000_000)
        tr.abort()
        exc = await pr.lost
        assert exc is None and tr.is_closing()
        assert pr.events.count(("lost", None)) == 1
        peer.settimeout(5)
        total = 0
        try:
            while chunk := peer.recv(1 << 20):
                total += len(chunk)
        except ConnectionResetError:
            pass
        assert total < 10_000_000  # the queue was dropped, the peer saw the end
        peer.close()

    run(loop, main())


@pytest.mark.parametrize("how", ["close", "write-close", "abort"])
def test_socket_is_closed_in_the_iteration_after_close(loop, how):
    # asyncio queues connection_lost() (and the socket's close) with
    # call_soon() from close()/abort(), behind what was already queued and
    # ahead of what comes later: a task that closes, yields once and then
    # blocks the loop waiting on the peer finds the peer has seen the end.
    # anyio does this when a TLS handshake fails (abort, checkpoint, then the
    # caller joins a thread that serves the other side).
    async def main():
        tr, pr, peer = await connected_to_raw_peer(loop, lambda: Recorder(loop))
        if how == "write-close":
            tr.write(b"last words")
        getattr(tr, "abort" if how == "abort" else "close")()
        await asyncio.sleep(0)
        assert pr.lost.done()
        assert recv_to_eof(peer) == (b"last words" if how == "write-close" else b"")
        peer.close()

    run(loop, main())


def test_abort_keeps_what_the_kernel_took_at_write(loop):
    # asyncio's write() sends at once, so abort() right after it only drops
    # what the kernel refused; aiohttp aborts a WebSocket transport right
    # after writing the 101 response, and the client must still get it.
    async def main():
        tr, pr, peer = await connected_to_raw_peer(loop, lambda: Recorder(loop))
        tr.write(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
        tr.abort()
        await pr.lost
        assert recv_to_eof(peer) == b"HTTP/1.1 101 Switching Protocols\r\n\r\n"
        peer.close()

    run(loop, main())


def test_close_inside_data_received(loop):
    class CloseOnData(Recorder):
        def data_received(self, data):
            super().data_received(data)
            self.transport.close()
            self.transport.write(b"ignored")  # after close: dropped, no error

    async def main():
        server, addr = await echo_server(loop)
        tr, pr = await loop.create_connection(lambda: CloseOnData(loop), *addr)
        tr.write(b"ping")
        await pr.lost
        assert bytes(pr.data) == b"ping"
        assert pr.events == ["made", ("lost", None)]
        for _ in range(10):
            tr.write(b"more")  # writes after close never raise
        server.close()
        await server.wait_closed()

    run(loop, main())


def test_peer_reset_mid_write(loop):
    async def main():
        tr, pr, peer = await connected_to_raw_peer(loop, lambda: Recorder(loop))
        close_with_reset(peer)
        for _ in range(50):
            tr.write(b"y" * 65536)
            await asyncio.sleep(0.001)
            if pr.lost.done():
                break
        exc = await pr.lost
        assert isinstance(exc, (ConnectionResetError, BrokenPipeError))
        assert len([e for e in pr.events if e[0] == "lost"]) == 1

    run(loop, main())


def test_server_closed_with_clients_attached(loop):
    async def main():
        server, addr = await echo_server(loop)
        clients = [await loop.create_connection(lambda: Recorder(loop), *addr) for _ in range(5)]
        assert server.is_serving()
        server.close()
        assert not server.is_serving()
        # a closed server refuses new connections at once
        with pytest.raises(ConnectionRefusedError):
            s = socket.create_connection(addr, timeout=2)
            s.close()
        # existing connections keep working until they close
        tr, pr = clients[0]
        tr.write(b"still")
        while len(pr.data) < 5:
            await asyncio.sleep(0.001)
        for tr, pr in clients:
            tr.close()
            await pr.lost
        await server.wait_closed()

    run(loop, main())


def test_closing_a_server_leaves_a_shared_listening_socket_listening(loop):
    """A listening socket shared with another holder (a sibling worker
    process, as with uvicorn --workers) keeps listening for it when this
    loop's server on it closes: closing stops our accepts, not the socket."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(16)
    addr = lsock.getsockname()
    sibling = lsock.dup()

    async def main():
        server = await loop.create_server(lambda: Recorder(loop), sock=lsock)
        tr, pr = await loop.create_connection(lambda: Recorder(loop), *addr)
        tr.close()
        await pr.lost
        server.close()
        await server.wait_closed()

    try:
        run(loop, main())
        with socket.create_connection(addr, timeout=5) as c:
            sibling.settimeout(5)
            conn, _ = sibling.accept()
            with conn:
                c.sendall(b"x")
                assert conn.recv(1) == b"x"
    finally:
        sibling.close()


SHARED_SOCKET_WORKER = r"""
import asyncio, os, socket, sys, time
import uringloop
kind, fd = sys.argv[1], int(sys.argv[2])
loop = uringloop.new_event_loop() if kind == "uringloop" else asyncio.SelectorEventLoop()

class BlockThenSayPid(asyncio.Protocol):
    def connection_made(self, tr):
        self.tr = tr
    def data_received(self, data):
        time.sleep(0.4)  # a slow handler: this process's loop is blocked
        self.tr.write(str(os.getpid()).encode())
        self.tr.close()

async def main():
    await loop.create_server(BlockThenSayPid, sock=socket.socket(fileno=fd))
    print("ready", flush=True)
    await asyncio.sleep(30)

loop.run_until_complete(main())
"""


def test_processes_sharing_a_socket_share_its_connections(loop_kind):
    """Two processes serve one listening socket (create_server(sock=), as
    uvicorn --workers does). While one is blocked in a handler, the next
    connection goes to the other, as it does with asyncio's loop."""
    import subprocess
    import sys

    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(16)
    addr = lsock.getsockname()
    workers = [subprocess.Popen([sys.executable, "-c", SHARED_SOCKET_WORKER, loop_kind, str(lsock.fileno())],
                                pass_fds=[lsock.fileno()], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        for w in workers:
            assert w.stdout.readline().strip() == "ready"
        pids = pids_while_one_is_blocked(addr[1], request=b"x")
        assert len(pids) == 2 and pids[0] != pids[1], pids
    finally:
        for w in workers:
            w.kill()
            w.wait()
            w.stdout.close()
        lsock.close()


OUT_OF_FDS_SERVER = r"""
import asyncio, os, resource, socket, sys
import uringloop
kind, how = sys.argv[1], sys.argv[2]
loop = uringloop.new_event_loop() if kind == "uringloop" else asyncio.SelectorEventLoop()
errors, made = [], []
loop.set_exception_handler(lambda lp, ctx: errors.append(ctx["message"]))

class Count(asyncio.Protocol):
    def connection_made(self, tr):
        made.append(tr)

async def main():
    # lowered before the server starts: io_uring's accept takes the limit
    # when it is armed
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 16, hard))
    if how == "sock":
        lsock = socket.socket()
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(16)
        srv = await loop.create_server(Count, sock=lsock)
    else:
        srv = await loop.create_server(Count, "127.0.0.1", 0)
    addr = srv.sockets[0].getsockname()
    clients = [socket.socket() for _ in range(3)]
    hog = []
    try:
        while True:
            hog.append(os.dup(0))
    except OSError:
        pass
    for c in clients:
        c.setblocking(False)
        try:
            c.connect(addr)
        except BlockingIOError:
            pass
    for _ in range(100):
        if errors:
            break
        await asyncio.sleep(0.01)
    during = len(made)
    for fd in hog:
        os.close(fd)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    for _ in range(500):
        if len(made) == 3:
            break
        await asyncio.sleep(0.01)
    print(errors[:1], during, len(made), flush=True)

loop.run_until_complete(main())
"""


@pytest.mark.parametrize("how", ["sock", "host"])
def test_out_of_descriptors_pauses_accepting_then_resumes(loop_kind, how):
    """EMFILE on accept: the exception handler hears of it, accepting pauses
    (the connections wait in the backlog) and resumes a second later, as in
    asyncio; for a socket from sock= (polled) and one the loop bound."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", OUT_OF_FDS_SERVER, loop_kind, how], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("] ")[0] + "]" == "['socket.accept() out of system resource']", r.stdout
    during, after = map(int, r.stdout.split("] ")[1].split())
    assert during < 3 and after == 3, r.stdout


def test_streams_api_and_many_connections(loop):
    handlers = []

    async def handle(reader, writer):
        handlers.append(asyncio.current_task())
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    async def client(port, i):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        msg = b"%d " % i * 50
        writer.write(msg)
        await writer.drain()
        assert await reader.readexactly(len(msg)) == msg
        writer.close()
        await writer.wait_closed()

    async def main():
        server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=1000)
        port = server.sockets[0].getsockname()[1]
        await asyncio.gather(*(client(port, i) for i in range(1000)))
        # The server's ends see their clients' EOF in their own time (not
        # before the clients' wait_closed(), on either loop); the transports
        # they close would be collected unclosed with the loop otherwise.
        await asyncio.gather(*handlers)
        server.close()
        await server.wait_closed()

    run(loop, main(), timeout=60)
    assert len(handlers) == 1000


def test_unix_server_and_connection(loop):
    async def main():
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "sock")
            server = await loop.create_unix_server(Echo, path)
            tr, pr = await loop.create_unix_connection(lambda: Recorder(loop), path)
            tr.write(b"over unix")
            while len(pr.data) < 9:
                await asyncio.sleep(0.001)
            assert bytes(pr.data) == b"over unix"
            tr.close()
            await pr.lost
            server.close()
            await server.wait_closed()

    run(loop, main())


def test_unix_server_socket_file_left_by_default_before_3_13(loop):
    """asyncio before 3.13 leaves the socket file of a closed Unix server;
    the default of cleanup_socket= follows the running Python."""
    async def main():
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "sock")
            server = await loop.create_unix_server(Echo, path)
            server.close()
            await server.wait_closed()
            assert os.path.exists(path) == (sys.version_info < (3, 13))

    run(loop, main())


@pytest.mark.parametrize("how", ["path", "sock"])
def test_unix_server_cleanup_socket_unlinks_its_file(how):
    """cleanup_socket=True (3.13's argument, accepted on every Python as
    uvloop does) removes the file when the server closes, but not a file
    that has replaced it at that path, nor an abstract-namespace name."""
    loop = uringloop.new_event_loop()

    async def serve_and_close(path, replace_file=False):
        if how == "path":
            server = await loop.create_unix_server(Echo, path, cleanup_socket=True)
        else:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(path)
            server = await loop.create_unix_server(Echo, sock=sock, cleanup_socket=True)
        if replace_file:
            os.unlink(path)
            open(path, "w").close()
        server.close()
        await server.wait_closed()

    async def main():
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "sock")
            await serve_and_close(path)
            assert not os.path.exists(path)
            await serve_and_close(path, replace_file=True)
            assert os.path.isfile(path)  # someone else's file now
            await serve_and_close("\0uringloop-cleanup-%d" % os.getpid())
            server = await loop.create_unix_server(Echo, path + "2", cleanup_socket=False)
            server.close()
            await server.wait_closed()
            assert os.path.exists(path + "2")

    try:
        run(loop, main())
    finally:
        loop.close()


def test_unix_server_leaves_no_socket_open_when_the_stale_file_check_raises(monkeypatch):
    """Something other than an OSError out of the check for a stale socket
    file (aiohttp's tests run under blockbuster, whose BlockingError is one)
    propagates, and the listening socket is not left open behind it.

    uringloop only: asyncio 3.11-3.13 make the socket before that check and
    leave it to the garbage collector (a ResourceWarning)."""
    loop = uringloop.new_event_loop()

    def refused_stat(path, *args, **kwargs):
        raise RuntimeError("blocking call refused")

    async def main():
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "sock")
            open(path, "w").close()
            monkeypatch.setattr(uringloop._net.os, "stat", refused_stat)
            with pytest.raises(RuntimeError, match="refused"):
                await loop.create_unix_server(Echo, path)
            monkeypatch.undo()

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            run(loop, main())
            gc.collect()
    finally:
        loop.close()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)], [str(w.message) for w in caught]


def test_tls_server_client_and_start_tls(loop):
    server_ctx, client_ctx = tls_contexts()

    async def handle(reader, writer):
        line = await reader.readline()
        if line == b"STARTTLS\n":
            writer.write(b"OK\n")
            await writer.drain()
            await writer.start_tls(server_ctx)
            line = await reader.readline()
        writer.write(line.upper())
        await writer.drain()
        writer.close()

    async def main():
        plain = await asyncio.start_server(handle, "127.0.0.1", 0)
        tls = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
        # TLS from the first byte
        r, w = await asyncio.open_connection("127.0.0.1", tls.sockets[0].getsockname()[1],
                                             ssl=client_ctx, server_hostname="localhost")
        assert w.get_extra_info("sslcontext") is client_ctx
        assert w.get_extra_info("peercert")["subject"]
        w.write(b"secret\n")
        assert await r.readline() == b"SECRET\n"
        w.close()
        await w.wait_closed()
        # upgrade in the middle of a connection
        r, w = await asyncio.open_connection("127.0.0.1", plain.sockets[0].getsockname()[1])
        w.write(b"STARTTLS\n")
        assert await r.readline() == b"OK\n"
        await w.start_tls(client_ctx, server_hostname="localhost")
        w.write(b"upgraded\n")
        assert await r.readline() == b"UPGRADED\n"
        w.close()
        await w.wait_closed()
        for s in (plain, tls):
            s.close()
            await s.wait_closed()

    run(loop, main())


def test_tls_large_and_small_records_both_ways(loop):
    # TLS over a socket whose reads switch between the buffer ring and
    # bulk reads: megabytes, then a few bytes, then megabytes again.
    server_ctx, client_ctx = tls_contexts()

    async def handle(reader, writer):
        while size := int((await reader.readline()) or b"0"):
            writer.write(await reader.readexactly(size))
            await writer.drain()
        writer.close()

    async def main():
        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
        r, w = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1],
                                             ssl=client_ctx, server_hostname="localhost")
        for size in (3_000_000, 5, 200_000, 1, 1_500_000):
            payload = os.urandom(size)
            w.write(b"%d\n" % size + payload)
            assert await r.readexactly(size) == payload
        w.write(b"0\n")
        assert await r.read() == b""
        w.close()
        await w.wait_closed()
        server.close()
        await server.wait_closed()

    run(loop, main())


def test_loop_sendfile_over_transport(loop):
    data = os.urandom(2_000_000)

    async def main():
        tr, pr, peer = await connected_to_raw_peer(loop, lambda: Recorder(loop))
        with tempfile.TemporaryFile() as f:
            f.write(data)
            f.seek(0)
            tr.write(b"HEAD")
            sender = asyncio.ensure_future(loop.sendfile(tr, f, offset=10))
            peer.setblocking(False)
            got = bytearray()
            while len(got) < 4 + len(data) - 10:
                try:
                    got += peer.recv(1 << 20)
                except BlockingIOError:
                    await asyncio.sleep(0.001)
            assert await sender == len(data) - 10
            assert bytes(got) == b"HEAD" + data[10:]
        tr.close()
        await pr.lost
        peer.close()

    run(loop, main())


class DatagramRecorder(asyncio.DatagramProtocol):
    def __init__(self, loop):
        self.datagrams = []
        self.errors = []
        self.transport = None
        self.got = asyncio.Event()
        self.lost = loop.create_future()

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.datagrams.append((data, addr))
        self.got.set()

    def error_received(self, exc):
        self.errors.append(exc)
        self.got.set()

    def connection_lost(self, exc):
        self.lost.set_result(exc)


class UdpEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.transport.sendto(data.upper(), addr)


def test_udp_endpoints_unconnected_and_connected(loop):
    async def main():
        srv_tr, _ = await loop.create_datagram_endpoint(UdpEcho, local_addr=("127.0.0.1", 0))
        addr = srv_tr.get_extra_info("sockname")
        # unconnected: explicit addresses
        tr, pr = await loop.create_datagram_endpoint(lambda: DatagramRecorder(loop), local_addr=("127.0.0.1", 0))
        for i in range(50):
            tr.sendto(b"msg %d" % i, addr)
        while len(pr.datagrams) < 50:
            pr.got.clear()
            await pr.got.wait()
        assert sorted(d for d, _ in pr.datagrams) == sorted(b"MSG %d" % i for i in range(50))
        assert all(a == addr for _, a in pr.datagrams)
        tr.close()
        await pr.lost
        # connected: sendto() without an address, anything else refused
        tr, pr = await loop.create_datagram_endpoint(lambda: DatagramRecorder(loop), remote_addr=addr)
        tr.sendto(b"connected")
        await pr.got.wait()
        assert pr.datagrams == [(b"CONNECTED", addr)]
        with pytest.raises(ValueError):
            tr.sendto(b"x", ("127.0.0.1", 9))
        tr.close()
        await pr.lost
        srv_tr.close()

    run(loop, main())


def test_udp_sendto_after_close_is_dropped():
    # asyncio (3.11) drops it only on a connected endpoint; an unconnected
    # one sent it while closing and, once closed, failed in its error path
    # (AttributeError). uringloop drops it either way, as uvloop does.
    import uringloop

    lp = uringloop.new_event_loop()
    errors = []
    lp.set_exception_handler(lambda loop, ctx: errors.append(ctx))

    async def main():
        rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        rx.bind(("127.0.0.1", 0))
        rx.setblocking(False)
        tr, pr = await lp.create_datagram_endpoint(lambda: DatagramRecorder(lp), local_addr=("127.0.0.1", 0))
        tr.close()
        tr.sendto(b"while closing", rx.getsockname())
        await pr.lost
        for _ in range(6):
            tr.sendto(b"after close", rx.getsockname())
        await asyncio.sleep(0.05)
        with pytest.raises(BlockingIOError):
            rx.recv(100)
        rx.close()

    try:
        run(lp, main())
    finally:
        lp.close()
    assert errors == []


async def _endpoint_refused_by_its_peer(loop, protocol_class):
    """A UDP endpoint connected to a port nobody listens on, once its
    protocol has been told (ICMP port unreachable): (transport, protocol,
    the peer's address)."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", 0))
    addr = probe.getsockname()
    probe.close()
    tr, pr = await loop.create_datagram_endpoint(lambda: protocol_class(loop), remote_addr=addr)
    for _ in range(50):
        tr.sendto(b"anyone?")
        await asyncio.sleep(0.01)
        if pr.errors:
            break
    assert pr.errors and isinstance(pr.errors[0], ConnectionRefusedError)
    return tr, pr, addr


def test_udp_error_received_for_refused_port(loop):
    async def main():
        tr, pr, _ = await _endpoint_refused_by_its_peer(loop, DatagramRecorder)
        assert not tr.is_closing()  # errors are reported, the endpoint lives on
        tr.close()
        await pr.lost

    run(loop, main())



def test_udp_reading_goes_on_after_error_received_raises(loop):
    """asyncio's reader stays registered when error_received() raises: the
    exception goes to the handler and the next datagram is delivered."""
    handled = []
    loop.set_exception_handler(lambda lp, ctx: handled.append(ctx.get("exception")))

    class Raising(DatagramRecorder):
        def error_received(self, exc):
            super().error_received(exc)
            raise RuntimeError("error_received failed")

    async def main():
        tr, pr, addr = await _endpoint_refused_by_its_peer(loop, Raising)
        peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        peer.bind(addr)
        peer.sendto(b"after the error", tr.get_extra_info("sockname"))
        for _ in range(100):
            if pr.datagrams:
                break
            await asyncio.sleep(0.01)
        assert [d for d, _ in pr.datagrams] == [b"after the error"]
        assert any(isinstance(e, RuntimeError) and str(e) == "error_received failed" for e in handled), handled
        peer.close()
        tr.close()
        await pr.lost

    run(loop, main())


def test_an_exception_from_datagram_received_is_reported_and_reading_goes_on(loop):
    handled = []
    loop.set_exception_handler(lambda lp, ctx: handled.append(ctx))

    class Raising(DatagramRecorder):
        def datagram_received(self, data, addr):
            super().datagram_received(data, addr)
            if data == b"raise":
                raise RuntimeError("datagram_received failed")

    async def main():
        tr, pr = await loop.create_datagram_endpoint(lambda: Raising(loop), local_addr=("127.0.0.1", 0))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
            for data in (b"raise", b"after"):
                tx.sendto(data, tr.get_extra_info("sockname"))
                pr.got.clear()
                await pr.got.wait()
        assert [d for d, _ in pr.datagrams] == [b"raise", b"after"]
        assert not tr.is_closing()
        [ctx] = handled
        assert isinstance(ctx["exception"], RuntimeError) and str(ctx["exception"]) == "datagram_received failed"
        assert ctx["message"].startswith("Exception in callback ")
        assert not ctx["handle"].cancelled()  # the reader's handle, as asyncio's context has it
        tr.close()
        await pr.lost

    run(loop, main())


@pytest.mark.parametrize("family", ["udp", "unix"])
def test_a_datagram_burst_arrives_whole_and_in_order_across_pause_and_resume(loop, family, tmp_path):
    """Several datagrams waiting at each wake-up, of sizes up to 60 KiB, with
    reading paused and resumed in the middle: none lost, none reordered.
    UDP drops what its receive buffer cannot hold, so the sender keeps at
    most 8 datagrams and 128 KiB unread."""
    sizes = [1 + (i * 7919) % 60000 for i in range(300)]

    async def main():
        if family == "udp":
            tr, pr = await loop.create_datagram_endpoint(lambda: DatagramRecorder(loop), local_addr=("127.0.0.1", 0))
            tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            tx.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        else:
            path = str(tmp_path / "rx")
            tr, pr = await loop.create_datagram_endpoint(lambda: DatagramRecorder(loop), local_addr=path,
                                                         family=socket.AF_UNIX)
            tx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        tr.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        dest = tr.get_extra_info("sockname")
        tx.setblocking(False)
        sent = 0
        paused_once = False
        for _ in range(4000):
            while sent < len(sizes):
                unread = range(len(pr.datagrams), sent)
                if len(unread) >= 8 or sum(sizes[i] for i in unread) + sizes[sent] > 128 << 10:
                    break
                try:
                    tx.sendto(bytes([sent % 251]) * sizes[sent], dest)
                except BlockingIOError:
                    break
                sent += 1
            if not paused_once and len(pr.datagrams) > 20:
                paused_once = True
                tr.pause_reading()
                before = len(pr.datagrams)
                while sent < len(sizes) and len(range(before, sent)) < 8:  # some wait while paused
                    try:
                        tx.sendto(bytes([sent % 251]) * min(sizes[sent], 1000), dest)
                    except BlockingIOError:
                        break
                    sizes[sent] = min(sizes[sent], 1000)
                    sent += 1
                await asyncio.sleep(0.05)
                assert len(pr.datagrams) == before  # nothing delivered while paused
                tr.resume_reading()
            if len(pr.datagrams) == len(sizes):
                break
            await asyncio.sleep(0.001)
        assert paused_once
        assert [len(d) for d, _ in pr.datagrams] == sizes
        assert all(d == bytes([i % 251]) * sizes[i] for i, (d, _) in enumerate(pr.datagrams))
        tx.close()
        tr.close()
        await pr.lost

    run(loop, main())


def test_datagram_received_runs_in_the_context_the_endpoint_was_made_in(loop):
    var = contextvars.ContextVar("var", default="unset")

    class Seeing(DatagramRecorder):
        def datagram_received(self, data, addr):
            super().datagram_received(var.get(), addr)

    async def main():
        var.set("at creation")
        tr, pr = await loop.create_datagram_endpoint(lambda: Seeing(loop), local_addr=("127.0.0.1", 0))
        var.set("later")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
            tx.sendto(b"x", tr.get_extra_info("sockname"))
            await pr.got.wait()
        assert [d for d, _ in pr.datagrams] == ["at creation"]
        tr.close()
        await pr.lost

    run(loop, main())


async def _drain_dgrams(sock):
    """Reads until nothing more comes for 50 ms (the transport may send
    whenever a datagram leaves the queue)."""
    got = []
    while True:
        try:
            got.append(sock.recv(100))
        except BlockingIOError:
            await asyncio.sleep(0.05)
            try:
                got.append(sock.recv(100))
            except BlockingIOError:
                return got


def test_unix_datagram_to_a_full_peer_waits_and_is_not_lost(loop, loop_kind):
    # uringloop queues the datagram to an io_uring send, which polls the
    # socket once: when the room the poll saw is taken again before the
    # retry (another sender), the op ends with EAGAIN. That is no error for
    # the protocol (asyncio keeps the datagram buffered); it was reported to
    # error_received() and the datagram dropped.
    # 3.13 counts 8 bytes of header per buffered datagram; asyncio 3.13.0
    # forgets to take them off again (later CPython sources do)
    header = 8 if sys.version_info >= (3, 13) else 0
    left = 8 if loop_kind == "asyncio" and sys.version_info[:3] == (3, 13, 0) else 0

    async def main():
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "srv")
            srv, other, _ = full_unix_dgram_peer(path)
            tr, pr = await loop.create_datagram_endpoint(lambda: DatagramRecorder(loop), remote_addr=path,
                                                         family=socket.AF_UNIX)
            tr.sendto(b"mine")  # the peer is full: it waits in the transport
            await asyncio.sleep(0.05)
            assert tr.get_write_buffer_size() == 4 + header
            srv.recv(100)  # room for one...
            other.send(b"o")  # ...taken before the loop looks
            await asyncio.sleep(0.05)
            got = await _drain_dgrams(srv)
            assert got.count(b"mine") == 1 and pr.errors == []
            assert tr.get_write_buffer_size() == left
            tr.close()
            await pr.lost
            other.close()
            srv.close()

    run(loop, main())


def test_datagram_abort_with_a_send_waiting(loop):
    # abort() drops the buffer; the send op waiting on the full peer must
    # end with it (it completed later and popped the empty buffer:
    # IndexError in the exception handler, and the datagram went out after
    # abort()).
    async def main():
        calls = []
        loop.set_exception_handler(lambda lp, ctx: calls.append(ctx))
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "srv")
            srv, other, _ = full_unix_dgram_peer(path)
            tr, pr = await loop.create_datagram_endpoint(lambda: DatagramRecorder(loop), remote_addr=path,
                                                         family=socket.AF_UNIX)
            tr.sendto(b"mine")
            await asyncio.sleep(0.05)
            tr.abort()
            assert await pr.lost is None
            got = await _drain_dgrams(srv)
            assert b"mine" not in got
            assert calls == []
            other.close()
            srv.close()

    run(loop, main())

def test_datagram_sendto_empty_follows_the_running_pythons_asyncio(loop):
    # asyncio sends a zero-length datagram from 3.13 on; before, sendto(b"")
    # did nothing. uringloop sent it on every version.
    async def main():
        rx, pr = await loop.create_datagram_endpoint(lambda: DatagramRecorder(loop), local_addr=("127.0.0.1", 0))
        tx, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, remote_addr=rx.get_extra_info("sockname"))
        tx.sendto(b"")
        tx.sendto(b"last")
        while not any(d == b"last" for d, _ in pr.datagrams):
            pr.got.clear()
            await asyncio.wait_for(pr.got.wait(), 5)
        tx.close()
        rx.close()
        return [d for d, _ in pr.datagrams]

    expected = [b"", b"last"] if sys.version_info >= (3, 13) else [b"last"]
    assert run(loop, main()) == expected


def test_unix_datagram_endpoint(loop):
    async def main():
        with tempfile.TemporaryDirectory() as d:
            srv_path, cli_path = os.path.join(d, "srv"), os.path.join(d, "cli")
            srv_tr, _ = await loop.create_datagram_endpoint(UdpEcho, local_addr=srv_path, family=socket.AF_UNIX)
            tr, pr = await loop.create_datagram_endpoint(lambda: DatagramRecorder(loop), local_addr=cli_path,
                                                         family=socket.AF_UNIX)
            tr.sendto(b"unix dgram", srv_path)
            await pr.got.wait()
            assert pr.datagrams == [(b"UNIX DGRAM", srv_path)]
            tr.close()
            await pr.lost
            srv_tr.close()

    run(loop, main())


def test_datagram_endpoint_on_a_socketpair_sends_to_its_peer():
    # A connected socket whose peer has no name (getpeername() gives ''):
    # asyncio (3.11) called sendto(data, None) and failed with TypeError.
    import uringloop

    lp = uringloop.new_event_loop()
    errors = []
    lp.set_exception_handler(lambda loop, ctx: errors.append(ctx))

    async def main():
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        theirs.setblocking(False)
        tr, pr = await lp.create_datagram_endpoint(lambda: DatagramRecorder(lp), sock=ours)
        theirs.send(b"ping")
        await pr.got.wait()
        tr.sendto(b"pong")
        got = await asyncio.wait_for(lp.sock_recv(theirs, 100), 5)
        tr.close()
        await pr.lost
        theirs.close()
        return pr.datagrams, got

    try:
        datagrams, got = run(lp, main())
    finally:
        lp.close()
    assert (datagrams, got, errors) == ([(b"ping", None)], b"pong", [])


def test_closing_the_loop_with_connections_left_open(loop):
    # A program that ends with connections still open: loop.close() cancels
    # their ops. On uringloop the final completions armed new reads behind
    # that cancel, so close() waited out its 1 s limit and the transports,
    # with their sockets, were never freed.
    async def main():
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        return server, [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]

    kept = run(loop, main())
    started = time.monotonic()
    loop.close()
    assert time.monotonic() - started < 0.5
    # closing one afterwards fails as on asyncio (call_soon on a closed
    # loop), and queues nothing that would keep it alive
    with pytest.raises(RuntimeError, match="closed"):
        kept[1][0][1].close()
    with pytest.raises(RuntimeError, match="closed"):
        kept[1][1][1].transport.abort()
    del kept  # left to the garbage collector, as asyncio leaves them: no_fd_leak checks


def test_an_error_reading_a_protocols_buffer_methods_is_raised():
    """uringloop tells a BufferedProtocol by its get_buffer and
    buffer_updated attributes. An error other than AttributeError while
    reading them (a MemoryError) is raised by set_protocol(); before, it was
    swallowed and a BufferedProtocol was then fed as a plain Protocol."""

    class Failing(asyncio.BufferedProtocol):
        def __getattribute__(self, name):
            if name == "get_buffer":
                raise MemoryError("no room")
            return object.__getattribute__(self, name)

    async def main():
        loop = asyncio.get_running_loop()
        server = await loop.create_server(asyncio.Protocol, "127.0.0.1", 0)
        transport, protocol = await loop.create_connection(asyncio.Protocol, *server.sockets[0].getsockname())
        with pytest.raises(MemoryError, match="no room"):
            transport.set_protocol(Failing())
        assert transport.get_protocol() is protocol  # unchanged
        transport.close()
        server.close()
        await server.wait_closed()

    uringloop.run(main())

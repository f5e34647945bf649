"""--ssl-*: TLS terminated in the server process.

The HTTP server in C reads and writes sockets itself and knows nothing of
TLS. A TLS listener is therefore an asyncio server on uringloop with asyncio's
SSL protocol (its handshake and shutdown timeouts, close_notify, a peer that
leaves without it), and each decrypted connection reaches the C server
through a socketpair, which the server adopts like an accepted connection,
with the TLS peer's addresses for the scope. Everything the C server does
(pipelining, limits, timeouts, WebSocket upgrades, graceful shutdown) then
works over TLS unchanged; the price is one more hop through the kernel for
every byte (see bench/README.md).
"""

import asyncio
import socket
import ssl


def create_ssl_context(certfile, keyfile=None, password=None, ssl_version=ssl.PROTOCOL_TLS_SERVER,
                       cert_reqs=ssl.CERT_NONE, ca_certs=None, ciphers="TLSv1"):
    """The server's SSLContext, from uvicorn's --ssl-* options."""
    ctx = ssl.SSLContext(int(ssl_version))
    ctx.load_cert_chain(certfile, keyfile, (lambda: password) if password else None)
    ctx.verify_mode = ssl.VerifyMode(int(cert_reqs))
    if ca_certs:
        ctx.load_verify_locations(ca_certs)
    if ciphers:
        ctx.set_ciphers(ciphers)
    return ctx


def _addr(addr):
    """An address as the scope has it: (host, port), None for none."""
    return (addr[0], addr[1]) if isinstance(addr, tuple) and len(addr) >= 2 else None


class TLSBridge(asyncio.Protocol):
    """One TLS connection, from the end of its handshake: decrypted bytes go
    to the C server through a socketpair, its answers back through TLS.
    Each side stops reading while the other cannot keep up."""

    def __init__(self, core):
        self.core = core
        self.tls = None
        self.plain = None  # the transport on our end of the socketpair
        self.early = []  # what arrived over TLS before that transport was made
        self.tls_closed = False

    # -- the TLS side (this protocol) --

    def connection_made(self, transport):
        self.tls = transport
        # the addresses first: once detached, the fd is adopt()'s to close
        client = _addr(transport.get_extra_info("peername"))
        server = _addr(transport.get_extra_info("sockname"))
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.core.adopt(theirs.detach(), client, server)
        except BaseException:
            ours.close()
            transport.abort()
            raise
        loop = asyncio.get_running_loop()
        loop.create_task(self._connect(loop, ours))

    async def _connect(self, loop, sock):
        try:
            self.plain, _ = await loop.connect_accepted_socket(lambda: _PlainSide(self), sock)
        except OSError:
            sock.close()
            self.tls.abort()
            return
        if self.tls_closed:
            self.plain.close()
            return
        for data in self.early:
            self.plain.write(data)
        self.early = None

    def data_received(self, data):
        if self.plain is None:
            self.early.append(data)
        elif not self.plain.is_closing():  # else the server side is gone: nobody to read it
            self.plain.write(data)

    def eof_received(self):
        # close_notify: TLS has no half-close, the server sees the end
        if self.plain is not None and self.plain.can_write_eof():
            self.plain.write_eof()
        return False

    def pause_writing(self):
        if self.plain is not None:
            self.plain.pause_reading()

    def resume_writing(self):
        if self.plain is not None:
            self.plain.resume_reading()

    def connection_lost(self, exc):
        self.tls_closed = True
        if self.plain is None:
            return
        if exc is None and not self.plain.get_write_buffer_size():
            self.plain.close()  # the server sees the end after all the client sent
        else:
            # Nobody is left to read an answer. What the server has not taken
            # of the client's bytes is dropped: close() would wait to hand
            # it over, and a server that has stopped reading until its own
            # answers are read (an HTTP connection past its 64 KiB bound, a
            # WebSocket whose app waits in send() while its messages pile up
            # to --ws-max-queue) would wait for us in turn, both descriptors
            # left open for good.
            self.plain.abort()

    # -- called by the plain side --

    def from_server(self, data):
        if not self._tls_gone():
            self.tls.write(data)

    def _tls_gone(self):
        """Whether the TLS connection can take no more. Its TCP transport
        may be lost (a reset) while the SSL protocol above it is told only
        when that transport's connection_lost() comes: what is written
        before then is counted and dropped, and warned about from the fifth
        write on, and uringloop hands the plain side everything one batch
        of completions brought, so that can be several writes."""
        if self.tls_closed or self.tls.is_closing():
            return True
        tcp = getattr(getattr(self.tls, "_ssl_protocol", None), "_transport", None)
        return tcp is not None and tcp.is_closing()

    def server_done(self, exc):
        if not self.tls_closed:
            if exc is None:
                self.tls.close()  # after what is queued, with close_notify
            else:
                self.tls.abort()


class _PlainSide(asyncio.Protocol):
    """Our end of the socketpair: what the C server sends goes out over TLS."""

    def __init__(self, bridge):
        self.bridge = bridge

    def data_received(self, data):
        self.bridge.from_server(data)

    def eof_received(self):
        # The server shut down its side (it closes after a response):
        # TLS cannot half-close, so the TLS connection ends here.
        self.bridge.server_done(None)
        return False

    def pause_writing(self):
        if not self.bridge.tls_closed:
            self.bridge.tls.pause_reading()

    def resume_writing(self):
        if not self.bridge.tls_closed:
            self.bridge.tls.resume_reading()

    def connection_lost(self, exc):
        self.bridge.server_done(exc)

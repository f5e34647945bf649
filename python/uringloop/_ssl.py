"""TLS for uringloop: asyncio's SSLProtocol, with C versions of the methods
every record goes through.

The state machine (handshake, shutdown, timeouts, flow-control transitions,
errors) is asyncio's own ``sslproto.SSLProtocol``. ``_core.SSLProtocolCore``
and ``_core.SSLAppTransportCore`` (server/us_ssl.c) come first in the MRO
and replace ``get_buffer``, ``buffer_updated``, ``_do_read``, ``_do_write``,
``_process_outgoing``, ``_write_appdata`` and the app transport's ``write``
with C translations of the same code, reading and writing the same instance
fields. They are translations of Python 3.11's sslproto, whose translated
methods are the same, line for line, in 3.12 and 3.13 (3.13 changed only
methods that stay in Python: ``_abort``, ``_do_read__buffered``, handshake
and shutdown). 3.10 (the sslproto before 3.11's rewrite) and versions not
checked yet use asyncio's class in Python.

One behaviour differs from asyncio's, on purpose and as in uvloop, on every
version: after our close_notify has gone out (``close()``), application
data the peer still sends is read and dropped while its close_notify or EOF
is awaited. asyncio hands that data to ``unwrap()``, which fails
("application data after close notify"), and aborts: the peer, still
sending a request body an HTTP server chose not to read, gets a reset that
can destroy the response it was sent. And one hang is gone (3.11+): a
close() after the peer's EOF came in while the app had paused reading ends
the connection, which asyncio left open for good.
"""

import ssl
import sys

from asyncio import sslproto

from . import _core

FAST_PATH = (3, 11) <= sys.version_info[:2] <= (3, 13)
# 3.10 has the sslproto before 3.11's rewrite: an _SSLPipe under the protocol
OLD_SSLPROTO = sys.version_info[:2] < (3, 11)


class _DroppingLateData:
    """3.11's SSLProtocol, minus the reset: in the SHUTDOWN state, what the
    peer sent after our close_notify is read and dropped before unwrap().
    Also minus a hang: a close() after the peer's EOF came in while the app
    had paused reading ends the connection."""

    def _start_shutdown(self):
        # asyncio's eof_received() in WRAPPED, with the app's reading paused,
        # moves to FLUSHING and waits for resume_reading(); its close() then
        # finds FLUSHING and returns without arming the shutdown timeout, so
        # the connection and its descriptor stayed open for good (as on
        # asyncio 3.11-3.13; uvloop closes). The app that closes will not
        # resume: the shutdown goes on, its unread data unread. From the
        # next callback, not from here: this close() may come from inside a
        # _do_flush() (the app paused and closed in data_received()), which
        # then moves on to SHUTDOWN itself.
        if (self._state == sslproto.SSLProtocolState.FLUSHING and self._app_reading_paused
                and self._shutdown_timeout_handle is None):
            if self._app_transport is not None:
                self._app_transport._closed = True
            self._shutdown_timeout_handle = self._loop.call_later(self._ssl_shutdown_timeout,
                                                                  self._check_shutdown_timeout)
            self._loop.call_soon(self._flush_after_close)
            return
        super()._start_shutdown()

    def _flush_after_close(self):
        if self._state == sslproto.SSLProtocolState.FLUSHING:
            self._do_flush()

    def _do_shutdown(self):
        if not self._eof_received and not self._drop_appdata():
            return
        super()._do_shutdown()

    def _drop_appdata(self):
        """False when the TLS stream was broken: the shutdown has then
        failed, as asyncio fails it."""
        try:
            while self._sslobj.read(self.max_size):
                pass
        except sslproto.SSLAgainErrors:
            pass
        except ssl.SSLZeroReturnError:
            pass  # the peer's close_notify: unwrap() completes the shutdown
        except ssl.SSLError as exc:
            self._on_shutdown_complete(exc)
            return False
        # the dropped records may have been what kept the TCP transport
        # paused (an app that had paused reading): what comes after them,
        # the peer's close_notify, must still be read
        self._control_ssl_reading()
        return True


if FAST_PATH:
    class _SSLAppTransport(_core.SSLAppTransportCore, sslproto._SSLProtocolTransport):
        pass

    class SSLProtocol(_core.SSLProtocolCore, _DroppingLateData, sslproto.SSLProtocol):
        def _get_app_transport(self):
            # asyncio's, with the transport class above
            if self._app_transport is None:
                if self._app_transport_created:
                    raise RuntimeError("Creating _SSLProtocolTransport twice")
                self._app_transport = _SSLAppTransport(self._loop, self)
                self._app_transport_created = True
            return self._app_transport

    _core._ssl_setup(sslproto.SSLProtocolState, sslproto.SSLAgainErrors, ssl.SSLObject,
                     sslproto.SSLProtocol._write_appdata)
elif OLD_SSLPROTO:
    class _SSLPipe(sslproto._SSLPipe):
        def feed_ssldata(self, data, only_handshake=False):
            # the late data dropped before unwrap(), as _DroppingLateData does
            if self._state == sslproto._SHUTDOWN and data:
                self._incoming.write(data)
                data = b""
                try:
                    while self._sslobj.read(self.max_size):
                        pass
                except ssl.SSLError:
                    pass  # want-read or the peer's close_notify; a broken stream fails unwrap() too
            return super().feed_ssldata(data, only_handshake)

    class SSLProtocol(sslproto.SSLProtocol):
        def connection_made(self, transport):
            super().connection_made(transport)  # makes asyncio's pipe, then ours is that one
            self._sslpipe.__class__ = _SSLPipe

        def _start_shutdown(self):
            super()._start_shutdown()
            # 3.10's app transport pauses reading by pausing the TCP
            # transport, and 3.10 has no shutdown timeout: the late data
            # and the peer's close_notify behind it must still be read
            if self._in_shutdown and self._sslpipe is not None and self._transport is not None:
                self._transport.resume_reading()
else:
    class SSLProtocol(_DroppingLateData, sslproto.SSLProtocol):
        pass

"""The datagram transport of uringloop: UDP and Unix datagram sockets.

Reading is the C ``DgramReader`` (server/us_dgram.c): one io_uring RECVMSG
in flight, each datagram handed to ``_datagram_received`` from the ready
queue, and what else is waiting read in the same turn; pause_reading()
cancels the op (a datagram that completes before the cancel is kept and
delivered first on resume). ``sendto`` tries the kernel at once, as asyncio
does; when the socket is full the datagram is buffered and the loop's writer
watch (an io_uring poll) says when to try again, as in asyncio's selector
transport. Not an io_uring send: a Unix datagram socket whose peer is full
copies the data out of the request before it fails with EAGAIN, and the
kernel's retry of the request then sends an empty datagram (seen on 6.18).
Semantics follow asyncio's selector datagram transport.
"""

import collections
import sys

from asyncio import transports, trsock
from asyncio.log import logger

_FULL, _FAILED = object(), object()  # outcomes of DatagramTransport._try_send
# From 3.13 on asyncio sends empty datagrams (before, sendto(b"") did nothing)
# and counts 8 bytes of header per buffered datagram, so that empty ones count
# towards the high-water mark
_SENDS_EMPTY = sys.version_info >= (3, 13)
_HEADER_SIZE = 8 if _SENDS_EMPTY else 0


class DatagramTransport(transports._FlowControlMixin, transports.DatagramTransport):
    def __init__(self, loop, sock, protocol, address=None, extra=None):
        # _sock is set last: a transport whose making failed (out of memory)
        # leaves the socket to its caller, and __del__ finds nothing to close
        self._sock = None
        self._closing = False
        super().__init__(extra, loop)
        self._extra["socket"] = trsock.TransportSocket(sock)
        try:
            self._extra["sockname"] = sock.getsockname()
        except OSError:
            self._extra["sockname"] = None
        if "peername" not in self._extra:
            try:
                self._extra["peername"] = sock.getpeername()
            except OSError:
                self._extra["peername"] = None
        self._sock_fd = sock.fileno()
        self._protocol = protocol
        self._address = address
        self._buffer = collections.deque()
        self._buffer_size = 0
        self._paused = False
        self._conn_lost = 0
        self._writing = False  # the writer watch is armed
        self._reader = loop._dgram_reader(sock, self._datagram_received, self._read_error)
        self._sock = sock

    def __repr__(self):
        # asyncio's layout, with this class's name
        closing = "closed " if self._sock is None else "closing " if self._closing else ""
        if self._sock is None or self._loop.is_closed():
            return f"<DatagramTransport {closing}fd={self._sock_fd}>"
        read = "idle" if self._paused else "polling"
        size = self.get_write_buffer_size()
        write = f"<{'polling' if size else 'idle'}, bufsize={size}>"
        return f"<DatagramTransport {closing}fd={self._sock_fd} read={read} write={write}>"

    # ---- reading ----

    def _start_reading(self):
        if self._paused or self._closing or self._sock is None:
            return
        self._reader.start()

    def _datagram_received(self, data, addr):
        """Called by the reader for each datagram. What datagram_received()
        raises goes to the exception handler and reading goes on, as with
        asyncio's reader callback (uvloop closes the transport instead)."""
        self._protocol.datagram_received(data, addr)

    def _read_error(self, exc):
        """Called by the reader when a receive failed (an OSError)."""
        self._protocol.error_received(exc)

    def pause_reading(self):
        if self._closing or self._paused:
            return
        self._paused = True
        self._reader.stop()

    def resume_reading(self):
        if self._closing or not self._paused:
            return
        self._paused = False
        self._start_reading()

    def is_reading(self):
        return not self._paused and not self._closing

    # ---- writing ----

    def get_write_buffer_size(self):
        return self._buffer_size

    def sendto(self, data, addr=None):
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"data argument must be a bytes-like object, not {type(data).__name__!r}")
        if not data and not _SENDS_EMPTY:
            return
        if self._address:
            if addr not in (None, self._address):
                raise ValueError(f"Invalid address: must be None or {self._address}")
            addr = self._address
        # After close() (or a failure) the datagram is dropped, connected or
        # not. asyncio checks only connected endpoints, so an unconnected one
        # went on to the closed socket and failed with AttributeError.
        if self._conn_lost:
            if self._conn_lost >= 5:
                logger.warning("socket.send() raised exception.")
            self._conn_lost += 1
            return
        if not self._buffer and self._try_send(data, addr) is not _FULL:
            return
        self._buffer.append((bytes(data), addr))
        self._buffer_size += len(data) + _HEADER_SIZE
        if not self._writing:
            self._writing = True
            self._loop._add_writer(self._sock_fd, self._on_writable)
        self._maybe_pause_protocol()

    def _try_send(self, data, addr):
        """Sends one datagram: None when sent, _FULL when the socket refused
        it for now, _FAILED when it is dropped (error_received() was told,
        or the transport failed)."""
        try:
            # a connected socket sends with send(); also one whose peer has
            # no name (socket.socketpair() gives ''), where asyncio called
            # sendto(data, None) and failed with TypeError
            peer = self._extra["peername"]
            if peer or (addr is None and peer is not None):
                self._sock.send(data)
            else:
                self._sock.sendto(data, addr)
            return None
        except (BlockingIOError, InterruptedError):
            return _FULL
        except OSError as exc:
            self._protocol.error_received(exc)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc, "Fatal write error on datagram transport")
        return _FAILED

    def _on_writable(self):
        while self._buffer:
            data, addr = self._buffer.popleft()
            self._buffer_size -= len(data) + _HEADER_SIZE
            result = self._try_send(data, addr)
            if result is _FULL:
                self._buffer.appendleft((data, addr))  # still full: wait again
                self._buffer_size += len(data) + _HEADER_SIZE
                break
            if result is _FAILED:
                return
        self._maybe_resume_protocol()
        if not self._buffer:
            self._stop_writing()
            if self._closing and not self._conn_lost:
                self._conn_lost += 1
                self._loop.call_soon(self._call_connection_lost, None)

    def _stop_writing(self):
        if self._writing:
            self._writing = False
            self._loop._remove_writer(self._sock_fd)

    # ---- closing ----

    def is_closing(self):
        return self._closing

    def close(self):
        if self._closing:
            return
        self._closing = True
        self._reader.close()
        if not self._buffer:
            self._conn_lost += 1
            self._loop.call_soon(self._call_connection_lost, None)

    def abort(self):
        self._force_close(None)

    def _fatal_error(self, exc, message="Fatal error on transport"):
        if not isinstance(exc, OSError):
            self._loop.call_exception_handler({"message": message, "exception": exc,
                                               "transport": self, "protocol": self._protocol})
        self._force_close(exc)

    def _force_close(self, exc):
        if self._conn_lost:
            return
        self._buffer.clear()
        self._buffer_size = 0
        self._closing = True
        self._reader.close()
        self._stop_writing()
        self._conn_lost += 1
        self._loop.call_soon(self._call_connection_lost, exc)

    def _call_connection_lost(self, exc):
        try:
            self._protocol.connection_lost(exc)
        finally:
            # The cancelled RECVMSG may still hold the socket in the kernel
            # for an iteration; the fd itself is closed now.
            if self._sock is not None:
                self._sock.close()
            self._sock = None
            self._protocol = None

    def __del__(self, _warn=__import__("warnings").warn):
        if getattr(self, "_sock", None) is not None and not self._closing:
            _warn(f"unclosed transport {self!r}", ResourceWarning, source=self)
            self._sock.close()

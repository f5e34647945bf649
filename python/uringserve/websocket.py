"""WebSockets: the ASGI ``websocket`` scope over a uringloop transport.

The C server parses the upgrade request and, once nothing else is in flight
on that connection, hands its socket here with the scope it built. Frames
are handled by the sans-I/O protocol of the ``websockets`` package (RFC 6455
framing, masking, fragmentation, ping/pong, the close handshake) on top of
uringloop's C stream transport; this module maps them onto ASGI messages.
"""

import asyncio
import dataclasses
import http
import logging
import os
import re
import socket
import struct

from websockets.exceptions import InvalidState, PayloadTooBig, ProtocolError
from websockets.extensions.permessage_deflate import PerMessageDeflate, enable_server_permessage_deflate
from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.server import ServerProtocol

try:
    from websockets.speedups import apply_mask
except ImportError:  # the package built without its C extension
    from websockets.utils import apply_mask

logger = logging.getLogger("uringserve.error")

# seconds a closing connection may take to send what is queued
CLOSE_TIMEOUT = 10


@dataclasses.dataclass(frozen=True)
class WebSocketSettings:
    """uvicorn's --ws-* options, with its defaults."""

    max_size: int = 16 * 1024 * 1024  # a larger message (decompressed) closes with 1009
    # received messages the app has not taken yet: at this many the socket
    # is no longer read (the client's sends then wait on TCP), as the
    # websockets package's max_queue does
    max_queue: int = 32
    ping_interval: float | None = 20.0  # keepalive pings; None: none
    ping_timeout: float | None = 20.0  # no pong by then: close with 1011; None: wait
    per_message_deflate: bool = True  # negotiate permessage-deflate when the client offers it


class ClientDisconnected(OSError):
    """send() on a WebSocket the client has closed (ASGI 2.4)."""


class _Inbox:
    """Received ASGI messages waiting for the app's receive(), and the one
    waiter an ASGI app can have (asyncio.Queue's generality costs a fair
    share of an echo's time). The messages are a list read from `head`,
    emptied whenever it has all been read: an idle connection's inbox is an
    empty list (a deque keeps a 64-slot block, ~600 bytes, even empty)."""

    __slots__ = ("items", "head", "waiter")

    def __init__(self):
        self.items = []
        self.head = 0
        self.waiter = None

    def __len__(self):
        return len(self.items) - self.head

    def put(self, message):
        self.items.append(message)
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self, loop):
        items = self.items
        while self.head == len(items):
            self.waiter = loop.create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        message = items[self.head]
        if self.head + 1 == len(items):
            items.clear()  # frees the list's storage
            self.head = 0
        else:
            items[self.head] = None
            self.head += 1
        return message


class WebSocketHandler:
    """Called by the C server with (fd, scope, bytes read past the head)."""

    def __init__(self, loop, app, access_hook=None, settings=None):
        self.loop = loop
        self.app = app
        self.access_hook = access_hook
        self.settings = settings or WebSocketSettings()
        self.sessions = set()

    def __call__(self, fd, scope, leftover):
        sock = socket.socket(fileno=fd)
        session = WebSocketSession(self, scope, sock, leftover)
        self.sessions.add(session)
        session.task = self.loop.create_task(session.run())

    async def shutdown(self, timeout):
        """Close every session with 1012 (service restart), wait up to `timeout`."""
        sessions = list(self.sessions)
        for s in sessions:
            s.server_close(1012)
        tasks = [s.task for s in sessions if s.task is not None and not s.task.done()]
        if tasks:
            done, pending = await asyncio.wait(tasks, timeout=timeout)
            for s in sessions:
                s.shut_down = True
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1)


# the request headers websockets' ServerProtocol.accept() looks at
_HANDSHAKE_HEADERS = frozenset((b"host", b"connection", b"upgrade", b"origin", b"sec-websocket-key",
                                b"sec-websocket-version", b"sec-websocket-extensions", b"sec-websocket-protocol"))

_BAD_NAME = re.compile(rb"[^!#$%&'*+\-.^_`|~0-9A-Za-z]")


def _checked_headers(headers):
    """The app's response headers as (bytes, bytes), refusing what would
    break the response (CR, LF or NUL in a value, a name that is no token),
    as the HTTP path refuses it."""
    checked = []
    for name, value in headers or ():
        name, value = bytes(name), bytes(value)
        if not name or _BAD_NAME.search(name) or any(c in value for c in b"\r\n\0"):
            raise RuntimeError(f"invalid response header {name!r}: {value!r}")
        checked.append((name, value))
    return checked


class WebSocketSession(asyncio.Protocol):
    def __init__(self, handler, scope, sock, leftover):
        self.handler = handler
        self.sock = sock
        self.leftover = leftover
        self.scope = self._websocket_scope(scope)
        self.settings = settings = handler.settings
        # websockets' recommended deflate settings (12-bit windows, memLevel
        # 5: about 64 KiB of zlib state a connection instead of 256 KiB)
        extensions = enable_server_permessage_deflate(None) if settings.per_message_deflate else None
        self.proto = ServerProtocol(extensions=extensions, max_size=settings.max_size)
        self.transport = None
        self.request = None
        self.messages = _Inbox()
        self.inbuf = bytearray()  # the start of a frame not complete yet (see data_received)
        self.fast_in = True  # data frames are parsed here, not by the protocol
        self.fast_out = False  # after the handshake: frames built here
        self.deflate = None  # the negotiated permessage-deflate, inflating whole messages here
        self.connect_sent = False
        self.accepted = False
        self.closed = False
        self.response_sent = False
        self.denial = None  # [status, headers, body chunks] of a denial response being sent
        self.task = None
        self.shut_down = False  # its task was cancelled by the server's shutdown
        self.fragments = None
        self.fragment_text = False
        self.failed = False  # we failed the connection: later messages are not the app's
        self.read_paused = False
        self.write_paused = False
        self.lost = False  # connection_lost() came
        self.drain_waiter = None
        self.ping_timer = None  # the next keepalive ping, or its pong's deadline
        self.ping_payload = None  # of the ping whose pong we wait for

    @staticmethod
    def _websocket_scope(scope):
        scope = dict(scope)
        scope["type"] = "websocket"
        scope["scheme"] = "wss" if scope.get("scheme") == "https" else "ws"
        scope.pop("method", None)
        protocols = []
        for name, value in scope["headers"]:
            if name == b"sec-websocket-protocol":
                protocols += [p.strip() for p in value.decode("latin-1").split(",") if p.strip()]
        scope["subprotocols"] = protocols
        scope["extensions"] = {"websocket.http.response": {}}
        return scope

    def _raw_request(self):
        """The upgrade request for the `websockets` protocol, with only the
        headers its handshake reads: the request stays alive in its parser
        for the whole connection, and a browser's cookies and user agent
        would be a second copy of what the scope holds."""
        scope = self.scope
        target = scope["raw_path"].decode("latin-1")
        if scope["query_string"]:
            target += "?" + scope["query_string"].decode("latin-1")
        lines = [f"GET {target} HTTP/1.1"]
        lines += [f"{n.decode('latin-1')}: {v.decode('latin-1')}" for n, v in scope["headers"]
                  if n in _HANDSHAKE_HEADERS]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    # -- running the app --

    async def run(self):
        loop = asyncio.get_running_loop()
        try:
            self.transport, _ = await loop.connect_accepted_socket(lambda: self, self.sock)
            self.proto.receive_data(self._raw_request())
            events = self.proto.events_received()
            self.request = events[0] if events else None
            if self.request is None:
                raise RuntimeError("unparsable WebSocket handshake")
            if self.leftover:
                self.data_received(self.leftover)
            try:
                await self.handler.app(self.scope, self.receive, self.send)
            except BaseException as exc:
                # a CancelledError of the app's own making (or of a cancel()
                # of its own) is its failure, as uvicorn reports it; the
                # shutdown's cancel ends the task
                if isinstance(exc, (KeyboardInterrupt, SystemExit)) or (
                        isinstance(exc, asyncio.CancelledError) and self.shut_down):
                    raise
                if not (self.closed and isinstance(exc, OSError)):
                    logger.error("Exception in ASGI application", exc_info=(type(exc), exc, exc.__traceback__))
                if not self.response_sent:
                    self._reject(500, "Internal Server Error")
                else:
                    self.server_close(1011)
                return
            if self.denial is not None:
                self._send_denial()  # ended without its last body message
            elif not self.response_sent:
                # the app neither accepted nor closed: its bug, answered as
                # uvicorn and hypercorn answer it
                logger.error("ASGI callable returned without sending handshake.")
                self._reject(500, "Internal Server Error")
            elif not self.closed:
                self.server_close(1000)
        finally:
            self.handler.sessions.discard(self)
            if self.transport is not None and not self.proto.close_expected() and not self.closed:
                self.transport.close()

    async def receive(self):
        if not self.connect_sent:
            self.connect_sent = True
            return {"type": "websocket.connect"}
        message = await self.messages.get(self.handler.loop)
        if self.read_paused and len(self.messages) <= self.settings.max_queue // 4 and self.transport is not None:
            self.read_paused = False
            self.transport.resume_reading()
        return message

    async def send(self, message):
        kind = message["type"]
        if not self.response_sent:
            if kind == "websocket.accept" and self._failed_early():
                # nothing can answer the handshake: the accept goes nowhere,
                # and receive() reports the disconnect, as it would for a
                # client that left right after the 101
                self.response_sent = self.accepted = self.closed = True
                if self.transport is not None:
                    self.transport.close()
            elif kind == "websocket.accept":
                response = self.proto.accept(self.request)
                sub = message.get("subprotocol")
                if sub:
                    response.headers["Sec-WebSocket-Protocol"] = sub
                for name, value in _checked_headers(message.get("headers")):
                    response.headers[name.decode("latin-1")] = value.decode("latin-1")
                self.proto.send_response(response)
                self._start_fast_path()
                self.response_sent = self.accepted = True
                self._log(101)
                self._flush()
                self._schedule_ping()
            elif kind == "websocket.close" and self.denial is None:
                self._reject(403, "")
            elif kind == "websocket.http.response.start" and self.denial is None:
                status = int(message["status"])
                if not 200 <= status <= 599:
                    raise RuntimeError(f"invalid HTTP status code {status}: a response's status is 200 to 599")
                self.denial = [status, _checked_headers(message.get("headers")), []]
            elif kind == "websocket.http.response.body" and self.denial is not None:
                self.denial[2].append(bytes(message.get("body", b"")))
                if not message.get("more_body", False):
                    self._send_denial()
            else:
                expected = ("'websocket.http.response.body'" if self.denial is not None else
                            "'websocket.accept', 'websocket.close' or 'websocket.http.response.start'")
                raise RuntimeError(f"Expected ASGI message {expected}, but got {kind!r}.")
            return
        # the client may have gone (its FIN reached the protocol, or a send
        # failed and the transport is closing) before connection_lost() told
        # us: either way it is ClientDisconnected
        if self.closed or self.proto.state is State.CLOSED or self.transport.is_closing():
            self.closed = True  # an app that lets this propagate is not logged as failing
            raise ClientDisconnected("the WebSocket is closed")
        if kind == "websocket.send":
            data = message.get("bytes")
            if data is not None:
                self._send_message(Opcode.BINARY, data)
            elif message.get("text") is not None:
                self._send_message(Opcode.TEXT, message["text"].encode())
            else:
                raise RuntimeError("websocket.send needs 'bytes' or 'text'")
            if self.write_paused:
                await self._drain()
        elif kind == "websocket.close":
            self.server_close(message.get("code") or 1000, message.get("reason") or "")
        else:
            raise RuntimeError(f"Unexpected ASGI message {kind!r} on an accepted WebSocket.")

    # -- frames --
    #
    # Unfragmented data frames, the bulk of any session, are framed and
    # parsed here, compressed or not; the sans-I/O protocol is kept for the
    # rest (the handshake, control frames, fragments, errors). It is only
    # ever given whole frames, so that its parser always stands at a frame
    # boundary when a frame goes past it, and the extension objects are its
    # own, called as it would call them, so that their state (the deflate
    # contexts) is the same whichever side handled a message.

    def _start_fast_path(self):
        """After the handshake, with the extensions it negotiated."""
        self.fast_out = True
        extensions = self.proto.extensions
        if len(extensions) == 1 and isinstance(extensions[0], PerMessageDeflate):
            self.deflate = extensions[0]
        elif extensions:
            self.fast_in = False  # an extension we do not know: every frame to the protocol

    def _send_message(self, opcode, data):
        if not self.fast_out or self.proto.state is not State.OPEN:
            try:
                if opcode is Opcode.BINARY:
                    self.proto.send_binary(data)
                else:
                    self.proto.send_text(data)
            except InvalidState:
                self.closed = True
                raise ClientDisconnected("the WebSocket is closing") from None
            self._flush()
            return
        b0 = 0x80 | opcode
        if self.proto.extensions:
            frame = Frame(opcode, data)
            for extension in self.proto.extensions:
                frame = extension.encode(frame)
            data = frame.data
            b0 |= frame.rsv1 << 6 | frame.rsv2 << 5 | frame.rsv3 << 4
        n = len(data)
        if n < 126:
            head = struct.pack("!BB", b0, n)
        elif n < 65536:
            head = struct.pack("!BBH", b0, 126, n)
        else:
            head = struct.pack("!BBQ", b0, 127, n)
        if n < 16384:
            self.transport.write(head + data)
        else:  # the transport sends both in one writev: no copy of a large payload
            self.transport.write(head)
            self.transport.write(data)

    def _split_frames(self, buf):
        """Delivers the whole frames at the start of buf; returns the rest
        (buf itself when no frame was whole)."""
        pos, end_of_buf = 0, len(buf)
        max_size = self.settings.max_size
        while end_of_buf - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            length, start = b1 & 0x7F, pos + 2
            if length == 126:
                if end_of_buf - pos < 4:
                    break
                length, start = int.from_bytes(buf[pos + 2:pos + 4], "big"), pos + 4
            elif length == 127:
                if end_of_buf - pos < 10:
                    break
                length, start = int.from_bytes(buf[pos + 2:pos + 10], "big"), pos + 10
            if b1 & 0x80:
                start += 4
            if length > max_size:
                # the protocol refuses it (1009) from its header; from here on
                # it gets every byte, whole frames or not
                self.fast_in = False
                self._to_protocol(buf[pos:])
                return b""
            end = start + length
            if end > end_of_buf:
                break
            opcode, flags = b0 & 0x0F, b0 & 0xF0
            if ((opcode == 1 or opcode == 2) and b1 & 0x80 and self.fragments is None
                    and self.proto.state is State.OPEN):
                if flags == 0x80:
                    self._deliver(opcode == 1, apply_mask(buf[start:end], buf[start - 4:start]))
                    pos = end
                    continue
                if flags == 0xC0 and self.deflate is not None:
                    data = self._inflate(opcode, apply_mask(buf[start:end], buf[start - 4:start]))
                    if data is not None:
                        self._deliver(opcode == 1, data)
                    pos = end
                    continue
            self._to_protocol(buf[pos:end])
            pos = end
        return buf[pos:] if pos else buf

    def _inflate(self, opcode, data):
        """A whole compressed message, inflated by the negotiated extension;
        None, and the connection failed as the protocol fails it, if it is
        corrupt or inflates past the size limit."""
        try:
            return self.deflate.decode(Frame(Opcode(opcode), data, rsv1=True), max_size=self.settings.max_size).data
        except PayloadTooBig as exc:
            self.proto.fail(1009, str(exc))
        except ProtocolError as exc:
            self.proto.fail(1002, str(exc))
        return None

    def _to_protocol(self, data):
        self.proto.receive_data(bytes(data))
        for frame in self.proto.events_received():
            self._on_frame(frame)

    # -- helpers --

    # -- keepalive: a client that stops answering (gone without a FIN, a
    # dead NAT entry) is closed with 1011 instead of holding its socket

    def _schedule_ping(self):
        if self.settings.ping_interval and not self.closed:
            self.ping_timer = self.handler.loop.call_later(self.settings.ping_interval, self._send_ping)

    def _send_ping(self):
        self.ping_timer = None
        if self.closed or self.proto.state is not State.OPEN:
            return
        self.ping_payload = os.urandom(4)  # tells its pong from unsolicited ones
        self.proto.send_ping(self.ping_payload)
        self._flush()
        if self.settings.ping_timeout:
            self.ping_timer = self.handler.loop.call_later(self.settings.ping_timeout, self._ping_timed_out)
        else:
            self._schedule_ping()

    def _on_pong(self, data):
        if self.ping_payload is None or bytes(data) != self.ping_payload:
            return
        self.ping_payload = None
        if self.settings.ping_timeout and self.ping_timer is not None:
            self.ping_timer.cancel()  # the deadline: the next ping waits for this pong
            self._schedule_ping()

    def _ping_timed_out(self):
        self.ping_timer = self.ping_payload = None
        if self.closed or self.proto.state is not State.OPEN:
            return
        self.closed = True
        self.proto.fail(1011, "keepalive ping timeout")
        self._flush()
        self.transport.close()
        # a peer that reads nothing would hold what is queued (and the socket)
        self.handler.loop.call_later(CLOSE_TIMEOUT, self._abort_if_open)

    def _stop_keepalive(self):
        if self.ping_timer is not None:
            self.ping_timer.cancel()
            self.ping_timer = None

    def _log(self, status):
        if self.handler.access_hook is not None:
            scope = dict(self.scope, method="GET", http_version="1.1")
            self.handler.access_hook(scope, status)

    def _failed_early(self):
        """Whether the connection ended before the app answered the
        handshake: the client left, or sent frames the protocol refused
        before its 101 (it has then sent its EOF and reads nothing more)."""
        return self.lost or self.proto.eof_sent

    def _reject(self, status, text):
        if self.response_sent:
            return
        self.response_sent = True
        self.closed = True
        if self._failed_early():
            if self.transport is not None:
                self.transport.close()
            return
        response = self.proto.reject(status, text)
        self.proto.send_response(response)
        self._log(status)
        self._flush()
        if self.transport is not None:
            self.transport.close()

    def _send_denial(self):
        """The WebSocket Denial Response extension (advertised in the scope):
        the app's own HTTP response instead of the handshake, then close."""
        status, headers, chunks = self.denial
        self.denial = None
        body = b"".join(chunks)
        try:
            phrase = http.HTTPStatus(status).phrase
        except ValueError:
            phrase = ""
        head = [f"HTTP/1.1 {status} {phrase}".encode("latin-1")]
        names = set()
        for name, value in headers:
            names.add(name.lower())
            head.append(bytes(name) + b": " + bytes(value))
        if b"content-length" not in names:
            head.append(b"Content-Length: %d" % len(body))
        head.append(b"Connection: close")
        self.response_sent = True
        self.closed = True
        if self.transport is not None and not self._failed_early():
            self._log(status)
            self.transport.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
        if self.transport is not None:
            self.transport.close()

    def _flush(self):
        if self.transport is None:
            return
        for data in self.proto.data_to_send():
            if data:
                self.transport.write(data)
            elif self.transport.can_write_eof():
                self.transport.write_eof()

    def server_close(self, code, reason=""):
        if self.closed or not self.accepted:
            if not self.response_sent:
                self._reject(503 if code == 1012 else 403, "")
            return
        self.closed = True
        if self.proto.state is not State.OPEN:
            return  # already closing: the protocol failed it, or a close frame crossed ours
        self.proto.send_close(code, reason)
        self._flush()

    async def _drain(self):
        """Waits while the transport holds more than its high-water mark:
        an app sending faster than the client reads is held here instead of
        queueing without bound."""
        while self.write_paused:
            self.drain_waiter = self.handler.loop.create_future()
            try:
                await self.drain_waiter
            except ClientDisconnected:
                self.closed = True  # the client went while we waited (EOF or lost)
                raise
            finally:
                self.drain_waiter = None

    def _wake_drain(self, exc=None):
        waiter = self.drain_waiter
        if waiter is not None and not waiter.done():
            if exc is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(exc)

    # -- asyncio.Protocol --

    def pause_writing(self):
        self.write_paused = True

    def resume_writing(self):
        self.write_paused = False
        self._wake_drain()

    def data_received(self, data):
        if not self.fast_in:
            self._to_protocol(data)
        elif self.inbuf:
            # a large frame comes in many reads: grow one buffer (amortized)
            # and copy only what follows the frames delivered
            self.inbuf += data
            rest = self._split_frames(self.inbuf)
            if rest is not self.inbuf:
                self.inbuf = bytearray(rest)
        else:
            rest = self._split_frames(data)
            if rest:
                self.inbuf = bytearray(rest)
        self._flush()
        if self.proto.close_expected() and self.transport is not None:
            self.transport.close()

    def _on_frame(self, frame):
        op = frame.opcode
        if self.failed and op in (Opcode.TEXT, Opcode.BINARY, Opcode.CONT):
            return
        if op in (Opcode.TEXT, Opcode.BINARY):
            if frame.fin:
                self._deliver(op == Opcode.TEXT, frame.data)
            else:
                self.fragments, self.fragment_text = [frame.data], op == Opcode.TEXT
        elif op == Opcode.CONT and self.fragments is not None:
            self.fragments.append(frame.data)
            if frame.fin:
                data, self.fragments = b"".join(self.fragments), None
                self._deliver(self.fragment_text, data)
        elif op == Opcode.PONG:
            self._on_pong(frame.data)
        elif op == Opcode.CLOSE:
            self.closed = True

    def _deliver(self, text, data):
        if text:
            # websockets' sans-I/O protocol leaves UTF-8 to its user: a text
            # message that is not UTF-8 fails the connection with 1007
            try:
                data = data.decode()
            except UnicodeDecodeError:
                if self.proto.state is State.OPEN:
                    self.proto.fail(1007, "invalid UTF-8 in a text message")
                self.failed = True
                return
            self.messages.put({"type": "websocket.receive", "text": data})
        else:
            self.messages.put({"type": "websocket.receive", "bytes": data})
        if len(self.messages) >= self.settings.max_queue and not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()

    def eof_received(self):
        if self.inbuf:  # a frame cut short: the protocol judges it
            self._to_protocol(self.inbuf)
            self.inbuf = bytearray()
        self.proto.receive_eof()
        self._flush()
        # The client is gone as far as the WebSocket goes: an app waiting to
        # send learns it now. The transport closes once what is queued is
        # out; a client that half-closed and never reads gets a reset after
        # CLOSE_TIMEOUT instead of holding the connection.
        self.write_paused = False
        self._wake_drain(ClientDisconnected("the WebSocket is closed"))
        self.handler.loop.call_later(CLOSE_TIMEOUT, self._abort_if_open)
        return False

    def _abort_if_open(self):
        if self.transport is not None and not self.lost:
            self.transport.abort()

    def connection_lost(self, exc):
        self.closed = self.lost = True
        self._stop_keepalive()
        self.write_paused = False
        self._wake_drain(ClientDisconnected("the WebSocket is closed"))
        # the client's close frame, if one came (the protocol's close_code is
        # only set once it has seen EOF, which a server closing first never
        # feeds it); none is 1006
        rcvd = self.proto.close_rcvd
        self.messages.put({"type": "websocket.disconnect", "code": rcvd.code if rcvd else 1006,
                                  "reason": rcvd.reason if rcvd else ""})

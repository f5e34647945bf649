"""uringserve's own WebSocket frame parsing and framing (the fast path of
python/uringserve/websocket.py) against the `websockets` sans-I/O protocol
it stands in for: the same byte streams, cut at random places, must give
the app the same messages and the client the same bytes, errors included."""

import asyncio
import random

import pytest
from websockets.frames import Close, Frame, Opcode

from uringserve.websocket import WebSocketHandler, WebSocketSession, WebSocketSettings


class FakeTransport:
    def __init__(self):
        self.out = bytearray()
        self.eof = self.closed = False

    def write(self, data):
        assert not self.eof
        self.out += data

    def can_write_eof(self):
        return True

    def write_eof(self):
        self.eof = True

    def close(self):
        self.closed = True

    def is_closing(self):
        return self.closed

    def pause_reading(self):
        pass

    def resume_reading(self):
        pass


SCOPE = {
    "type": "http", "scheme": "http", "path": "/", "raw_path": b"/", "query_string": b"",
    "headers": [(b"host", b"x"), (b"upgrade", b"websocket"), (b"connection", b"Upgrade"),
                (b"sec-websocket-key", b"dGhlIHNhbXBsZSBub25jZQ=="), (b"sec-websocket-version", b"13")],
}


DEFLATE_SCOPE = dict(SCOPE, headers=SCOPE["headers"] + [
    (b"sec-websocket-extensions", b"permessage-deflate; client_max_window_bits")])


def open_session(fast, max_size=1 << 20, max_queue=1 << 30, deflate=False):
    """A session past its handshake, on a fake transport; fast=False sends
    every byte and every message through the sans-I/O protocol."""
    settings = WebSocketSettings(max_size=max_size, max_queue=max_queue, ping_interval=None,
                                 per_message_deflate=deflate)
    scope = DEFLATE_SCOPE if deflate else SCOPE
    session = WebSocketSession(WebSocketHandler(None, None, settings=settings), scope, None, b"")
    session.transport = FakeTransport()
    session.proto.receive_data(session._raw_request())
    session.request = session.proto.events_received()[0]
    session.proto.send_response(session.proto.accept(session.request))
    session.proto.data_to_send()
    session.response_sent = session.accepted = True
    if fast:
        session._start_fast_path()
    else:
        session.fast_in = False
    return session


def received(session):
    return list(session.messages.items), bytes(session.transport.out), session.transport.eof, session.proto.state


def feed(session, stream, cuts):
    pos = 0
    for cut in sorted(cuts) + [len(stream)]:
        if cut > pos:
            session.data_received(stream[pos:cut])
            pos = cut


def masked(frame):
    return frame.serialize(mask=True)


def random_stream(rng):
    """Client frames as a client sends them: whole messages of sizes around
    every length encoding, fragmented ones, control frames in between."""
    parts = []
    for _ in range(rng.randint(1, 12)):
        kind = rng.random()
        size = rng.choice([0, 1, 125, 126, 127, 1000, 65535, 65536, 70000, rng.randint(0, 3000)])
        if kind < 0.4:
            parts.append(masked(Frame(Opcode.BINARY, rng.randbytes(size))))
        elif kind < 0.7:
            text = "".join(rng.choice("aé€𝄞") for _ in range(size // 4))
            parts.append(masked(Frame(Opcode.TEXT, text.encode())))
        elif kind < 0.85:
            parts.append(masked(Frame(Opcode.PING, rng.randbytes(rng.randint(0, 125)))))
        else:
            first = rng.choice([Opcode.TEXT, Opcode.BINARY])
            parts.append(masked(Frame(first, b"ab", fin=False)))
            parts.append(masked(Frame(Opcode.PING, b"p")))
            parts.append(masked(Frame(Opcode.CONT, b"cd" * rng.randint(0, 100), fin=False)))
            parts.append(masked(Frame(Opcode.CONT, b"ef")))
    return b"".join(parts)


@pytest.mark.parametrize("seed", range(40))
def test_random_streams_cut_anywhere_give_what_the_protocol_gives(seed):
    rng = random.Random(seed)
    stream = random_stream(rng)
    if seed % 4 == 0:  # a close frame, then data that must be ignored
        stream += masked(Frame(Opcode.CLOSE, Close(1000, "bye").serialize())) + masked(Frame(Opcode.TEXT, b"late"))
    cuts = [rng.randint(0, len(stream)) for _ in range(rng.choice([0, 1, 5, 50]))]
    fast, slow = open_session(True), open_session(False)
    feed(fast, stream, cuts)
    feed(slow, stream, [])
    assert received(fast) == received(slow)
    assert fast.messages.items  # the stream was not all control frames


@pytest.mark.parametrize("seed", range(15))
def test_compressed_and_plain_messages_mixed_under_permessage_deflate(seed):
    """Under permessage-deflate a client may still send a message
    uncompressed (RSV1 clear): those take the fast path, the compressed ones
    go to the protocol, whose inflater must see all of them, in order."""
    from websockets.extensions.permessage_deflate import PerMessageDeflate

    rng = random.Random(seed)
    client = PerMessageDeflate(False, False, 12, 12)  # the parameters the server answers with
    parts = []
    for i in range(20):
        frame = Frame(rng.choice([Opcode.TEXT, Opcode.BINARY]), (b"abc%d " % i) * rng.randint(0, 3000))
        parts.append(frame.serialize(mask=True, extensions=[client]) if rng.random() < 0.6 else masked(frame))
    stream = b"".join(parts)
    cuts = [rng.randint(0, len(stream)) for _ in range(rng.choice([0, 3, 30]))]
    fast, slow = open_session(True, deflate=True), open_session(False, deflate=True)
    assert [e.name for e in fast.proto.extensions] == ["permessage-deflate"]
    to_protocol = []
    fast._to_protocol = to_protocol.append
    feed(fast, stream, cuts)
    feed(slow, stream, [])
    assert received(fast) == received(slow) and len(fast.messages) == 20
    assert to_protocol == []  # whole messages, compressed or not, all took the fast path


def _compressed(data, opcode=Opcode.BINARY, fin=True):
    """data deflated as a client under the negotiated parameters would, as
    one masked frame with RSV1 set (without its 4-byte empty block)."""
    import zlib

    deflate = zlib.compressobj(wbits=-12)
    body = (deflate.compress(data) + deflate.flush(zlib.Z_SYNC_FLUSH))[:-4]
    return bytes([(0x80 if fin else 0) | 0x40 | opcode, 0x80 | 126 if len(body) > 125 else 0x80 | len(body)]) + (
        len(body).to_bytes(2, "big") if len(body) > 125 else b"") + b"\0\0\0\0" + body


@pytest.mark.parametrize("bad", ["corrupt", "inflates past the limit", "rsv1 on a continuation",
                                 "compressed fragments past the limit"])
def test_compressed_protocol_errors_are_answered_as_the_protocol_answers_them(bad):
    body = {
        "corrupt": bytes([0xC2, 0x84, 0, 0, 0, 0]) + b"\xff\xff\xff\xff",
        "inflates past the limit": _compressed(b"\0" * 100_000),
        "rsv1 on a continuation": _compressed(b"a" * 10, fin=False)[:1].replace(b"\x42", b"\x02")
        + _compressed(b"a" * 10, fin=False)[1:] + bytes([0xC0, 0x81, 0, 0, 0, 0]) + b"x",
        "compressed fragments past the limit": masked(Frame(Opcode.BINARY, b"\0" * 600, fin=False))
        + masked(Frame(Opcode.CONT, b"\0" * 600)),
    }[bad]
    stream = _compressed(b"before") + body + _compressed(b"after")
    for cuts in ([], list(range(0, len(stream), 2))):
        fast, slow = open_session(True, max_size=1000, deflate=True), open_session(False, max_size=1000, deflate=True)
        feed(fast, stream, cuts)
        feed(slow, stream, [])
        assert received(fast) == received(slow)
        assert fast.messages.items[0] == {"type": "websocket.receive", "bytes": b"before"}
        out = bytes(fast.transport.out)
        assert out[0] == 0x88 and int.from_bytes(out[2:4], "big") in (1002, 1009), out[:40]


def test_compressed_messages_sent_are_the_protocols_frames():
    outs = []
    for fast in (True, False):
        rng = random.Random(7)
        session = open_session(fast, deflate=True)
        for i in range(30):  # context takeover: each message is compressed against the ones before
            data = (b"message %d " % (i % 7)) * rng.randint(0, 2000)
            asyncio.run(session.send({"type": "websocket.send", "bytes": data}))
        outs.append(bytes(session.transport.out))
    assert outs[0] == outs[1] and outs[0][0] == 0xC2  # RSV1: compressed


def test_byte_at_a_time():
    stream = b"".join(masked(Frame(Opcode.BINARY, bytes(range(n % 256)) * (n // 256 + 1))) for n in (0, 125, 126, 300))
    fast, slow = open_session(True), open_session(False)
    feed(fast, stream, range(len(stream)))
    feed(slow, stream, [])
    assert received(fast) == received(slow) and len(fast.messages) == 4


@pytest.mark.parametrize("bad", [
    "unmasked", "rsv1 without an extension", "reserved opcode", "oversize header", "oversize frame",
    "oversize fragments",
    "invalid utf-8", "control frame too long", "continuation without a start", "new message inside a fragmented one",
])
def test_protocol_errors_are_answered_as_the_protocol_answers_them(bad):
    good = masked(Frame(Opcode.TEXT, b"before"))
    body = {
        "unmasked": Frame(Opcode.BINARY, b"x").serialize(mask=False),
        "rsv1 without an extension": bytes([0xC2, 0x81, 0, 0, 0, 0]) + b"x",
        "reserved opcode": bytes([0x83, 0x80, 0, 0, 0, 0]),
        "oversize header": bytes([0x82, 0xFF]) + (1 << 40).to_bytes(8, "big") + b"\0\0\0\0" + b"x" * 100,
        "oversize frame": masked(Frame(Opcode.BINARY, b"x" * 1001)),
        "oversize fragments": masked(Frame(Opcode.BINARY, b"x" * 700, fin=False))
        + masked(Frame(Opcode.CONT, b"x" * 700)),
        "invalid utf-8": masked(Frame(Opcode.TEXT, b"\xff\xfe")),
        "control frame too long": bytes([0x89, 0xFE, 0, 200, 0, 0, 0, 0]) + b"p" * 200,
        "continuation without a start": masked(Frame(Opcode.CONT, b"x")),
        "new message inside a fragmented one": masked(Frame(Opcode.TEXT, b"a", fin=False))
        + masked(Frame(Opcode.TEXT, b"b")),
    }[bad]
    stream = good + body + masked(Frame(Opcode.TEXT, b"after"))
    for cuts in ([], [len(good) + 1], list(range(0, len(stream), 3))):
        fast, slow = open_session(True, max_size=1000), open_session(False, max_size=1000)
        feed(fast, stream, cuts)
        feed(slow, stream, [])
        assert received(fast) == received(slow)
        out = bytes(fast.transport.out)
        assert out[0] == 0x88 and int.from_bytes(out[2:4], "big") in (1002, 1007, 1009), out[:40]


def test_a_frame_cut_short_by_eof_is_judged_by_the_protocol():
    class Loop:
        def call_later(self, delay, fn):
            pass

    stream = masked(Frame(Opcode.BINARY, b"x" * 300))
    results = []
    for fast in (True, False):
        session = open_session(fast)
        session.handler.loop = Loop()
        session.data_received(stream[:100])
        session.eof_received()
        results.append(received(session))
    assert results[0] == results[1]


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 200_000])
def test_frames_sent_are_the_protocols_frames(size):
    payload = random.Random(size).randbytes(size)
    outs = []
    for fast in (True, False):
        session = open_session(fast)
        asyncio.run(session.send({"type": "websocket.send", "bytes": payload}))
        asyncio.run(session.send({"type": "websocket.send", "text": "é" * (size // 2)}))
        outs.append(bytes(session.transport.out))
    assert outs[0] == outs[1]

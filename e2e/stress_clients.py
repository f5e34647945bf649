"""Random clients for e2e/test_stress.py: many short connections that send
well-formed, malformed, cut-short and pipelined HTTP/1.1 requests or
WebSocket frames in random pieces, and leave in random ways (read it all,
read a little and abort, half-close, abort mid-request). Seeded, so that a
failing run can be replayed. The clients run on asyncio's own loop."""

import asyncio
import base64
import random
import ssl
import struct
import sys
import time

HTTP_PATHS = ["/echo", "/health", "/raise", "/raise-mid", "/nothing", "/start-twice", "/stream", "/slow", "/big",
              "/bad-header", "/short", "/no-read"]


class Chaos:
    def __init__(self, port, seed, tls=False):
        self.port = port
        self.rng = random.Random(seed)
        self.ssl = None
        if tls:
            self.ssl = ssl.create_default_context()
            self.ssl.check_hostname = False
            self.ssl.verify_mode = ssl.CERT_NONE
        self.stats = {"connections": 0, "health": 0}
        self.transports = []  # every connection made, for the end of the run

    def bytes(self, n):
        return self.rng.randbytes(n)

    # -- HTTP --

    def http_request(self):
        rng, path = self.rng, self.rng.choice(HTTP_PATHS)
        r = rng.random()
        if r < 0.05:
            return b"GARBAGE" + self.bytes(rng.randint(1, 300)) + b"\r\n\r\n"
        if r < 0.08:
            return b"GET %s HTTP/1.1\r\nX-Long: %s\r\n\r\n" % (path.encode(), b"a" * rng.randint(5000, 100000))
        if r < 0.1:
            return b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"H%d: v\r\n" % i for i in range(200)) + b"\r\n"
        if r < 0.12:
            return b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
        if r < 0.14:
            return b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"
        if r < 0.16:
            return b"GET %s HTTP/1.0\r\n\r\n" % path.encode()
        if r < 0.2:
            key = base64.b64encode(self.bytes(16))
            return (b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                    b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n" +
                    self.bytes(rng.randint(0, 200)))
        body = self.bytes(rng.choice([0, 1, 100, 5000, 70000]))
        head = b"%s %s HTTP/1.1\r\nHost: x\r\n" % (b"POST" if body else b"GET", path.encode())
        if body and rng.random() < 0.5:
            out, i = head + b"Transfer-Encoding: chunked\r\n\r\n", 0
            while i < len(body):
                chunk = body[i:i + rng.randint(1, 9000)]
                i += len(chunk)
                out += b"%x\r\n%s\r\n" % (len(chunk), chunk)
            return out + b"0\r\n\r\n"
        return head + b"Content-Length: %d\r\n\r\n" % len(body) + body

    async def _drain(self, reader, timeout):
        try:
            while await asyncio.wait_for(reader.read(65536), timeout):
                pass
        except (asyncio.TimeoutError, OSError):
            pass
        except AttributeError:
            # the client's own asyncio before 3.11: its SSL transport's
            # resume_reading() after the connection is lost fails this way
            if sys.version_info >= (3, 11) or self.ssl is None:
                raise

    async def _write_in_pieces(self, writer, data):
        """False if it aborted the connection on the way."""
        rng = self.rng
        while data:
            n = rng.choice([1, 7, 100, 4096, len(data)])
            writer.write(data[:n])
            data = data[n:]
            if rng.random() < 0.2:
                await writer.drain()
                await asyncio.sleep(rng.random() * 0.005)
            if rng.random() < 0.02:
                writer.transport.abort()
                return False
        return True

    async def _connect(self):
        """(reader, writer), or None if the server refused."""
        try:
            streams = await asyncio.open_connection("127.0.0.1", self.port, ssl=self.ssl)
        except OSError:
            return None
        self.stats["connections"] += 1
        self.transports.append(streams[1].transport)
        return streams

    async def http_connection(self):
        rng, streams = self.rng, await self._connect()
        if streams is None:
            return
        reader, writer = streams
        try:
            data = b"".join(self.http_request() for _ in range(rng.randint(1, 5)))
            if not await self._write_in_pieces(writer, data):
                return
            if rng.random() < 0.2 and self.ssl is None:
                writer.write_eof()
            if rng.random() < 0.3:
                await self._drain(reader, 0.01)
                writer.transport.abort()
                return
            await self._drain(reader, 0.3)
        except OSError:
            pass
        finally:
            writer.close()

    # -- WebSocket --

    def frame(self, opcode, payload, fin=True, mask=True, rsv=0):
        b0 = (0x80 if fin else 0) | rsv << 4 | opcode
        n, m = len(payload), 0x80 if mask else 0
        if n < 126:
            head = struct.pack("!BB", b0, m | n)
        elif n < 65536:
            head = struct.pack("!BBH", b0, m | 126, n)
        else:
            head = struct.pack("!BBQ", b0, m | 127, n)
        if not mask:
            return head + payload
        key = self.bytes(4)
        stream = (key * (n // 4 + 1))[:n]
        return head + key + (int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")

    def ws_frames(self):
        rng, r = self.rng, self.rng.random()
        if r < 0.5:
            return self.frame(1, b"t" * rng.randint(0, 3000))
        if r < 0.65:
            return self.frame(2, self.bytes(rng.choice([0, 10, 5000, 70000, 300000])))
        if r < 0.72:  # fragmented, with a ping in between
            parts = [self.bytes(rng.randint(0, 100)) for _ in range(rng.randint(2, 5))]
            out = self.frame(2, parts[0], fin=False)
            for i, p in enumerate(parts[1:]):
                if rng.random() < 0.3:
                    out += self.frame(9, b"ping")
                out += self.frame(0, p, fin=i == len(parts) - 2)
            return out
        bad = [self.frame(9, self.bytes(rng.randint(0, 125))), self.frame(10, b"unsolicited"),
               self.frame(1, b"\xff\xfe not utf-8"), self.frame(1, b"unmasked", mask=False),
               self.frame(9, b"x" * 200), self.frame(3, b"reserved opcode"), self.frame(1, b"rsv", rsv=2),
               self.frame(0, b"continuation of nothing"),
               self.frame(8, struct.pack("!H", rng.choice([1000, 1001, 4000, 999, 1005, 5000])) + b"bye"),
               self.bytes(rng.randint(1, 50)), self.frame(2, self.bytes(2 << 20)), self.frame(1, b"hello")]
        return rng.choice(bad)

    async def ws_session(self):
        rng, streams = self.rng, await self._connect()
        if streams is None:
            return
        reader, writer = streams
        deflate = b"Sec-WebSocket-Extensions: permessage-deflate\r\n" if rng.random() < 0.3 else b""
        writer.write(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Key: " + base64.b64encode(self.bytes(16)) +
                     b"\r\nSec-WebSocket-Version: 13\r\n" + deflate + b"\r\n")
        try:
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            if not await self._write_in_pieces(writer, b"".join(self.ws_frames() for _ in range(rng.randint(1, 10)))):
                return
            r = rng.random()
            if r < 0.2:
                writer.transport.abort()
                return
            if r < 0.4:
                writer.write(self.frame(8, struct.pack("!H", 1000)))
            if r < 0.5 and self.ssl is None:
                writer.write_eof()
            await self._drain(reader, rng.choice([0.01, 0.2, 1]))
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass
        finally:
            writer.close()

    # -- the run --

    async def health(self):
        """A well-behaved client all along: the server must keep answering."""
        while True:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port, ssl=self.ssl)
            self.transports.append(writer.transport)
            writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"ok"), 10)
            assert head.startswith(b"HTTP/1.1 200"), head
            self.stats["health"] += 1
            writer.close()
            await asyncio.sleep(0.05)

    async def run(self, seconds, kind="http", concurrency=64):
        session = self.http_connection if kind == "http" else self.ws_session
        health = asyncio.ensure_future(self.health())
        slots = asyncio.Semaphore(concurrency)
        tasks = set()

        async def one():
            async with slots:
                await session()

        end = time.monotonic() + seconds
        while time.monotonic() < end and not health.done():
            async with slots:
                pass
            task = asyncio.ensure_future(one())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            await asyncio.sleep(0)
        await asyncio.gather(*tasks)
        if health.done():
            health.result()  # its failure
        health.cancel()
        await self._close_all()
        return self.stats

    async def _close_all(self):
        """Close every socket the clients opened. writer.close() leaves a
        socket open while its transport still has data to send (the server
        is not reading) or, with TLS, while it waits for the server's
        close_notify; asyncio.run() then closes the loop without closing
        them, and such a socket stays open until the garbage collector
        finds its transport: the server would rightly keep that connection
        and the test would count it as left behind."""
        for transport in self.transports:
            # Not one that has let go of its loop: stock asyncio's socket
            # transport does so when it closes, and when its close() had
            # waited for the write buffer to drain it does not count that
            # loss, so abort() would then fail (AttributeError, 3.11)
            if getattr(transport, "_loop", True) is not None:
                transport.abort()
        self.transports = []
        for _ in range(3):  # the transports close their sockets in callbacks
            await asyncio.sleep(0)


def run(port, seconds, seed, kind="http", tls=False):
    return asyncio.run(Chaos(port, seed, tls).run(seconds, kind))

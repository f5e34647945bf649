"""uringserve's TLS bridge (python/uringserve/tls.py) on uringloop, with a
real TLS client: the test plays the C server's end of the socketpair, so
that it decides when that end goes away.

Found by e2e/test_stress.py: when one side of the bridge is gone, the other
may still deliver several chunks before the lost side's connection_lost()
arrives (uringloop hands a protocol everything a batch of completions
brought), and the bridge wrote each of them into the closed transport,
which warns "socket.send() raised exception." from the fifth write on."""

import asyncio
import logging
import socket

import pytest

import uringloop
from uringserve.tls import TLSBridge

from conftest import run, tls_contexts

RESET = b"\x01\x00\x00\x00\x00\x00\x00\x00"


class StubCore:
    """Stands in for the C server: keeps the descriptor it is handed."""

    def __init__(self):
        self.adopted = asyncio.Queue()

    def adopt(self, fd, client, server):
        self.adopted.put_nowait(socket.socket(fileno=fd))


@pytest.fixture
def bridged():
    """A TLS client connected through a TLSBridge; yields (loop, start),
    start() giving (bridge, client reader, client writer, the server's end
    of the socketpair)."""
    loop = uringloop.new_event_loop()
    server_ctx, client_ctx = tls_contexts()
    core, bridges, cleanup = StubCore(), [], []

    def factory():
        bridges.append(TLSBridge(core))
        return bridges[-1]

    async def start():
        srv = await loop.create_server(factory, "127.0.0.1", 0, ssl=server_ctx)
        cleanup.append(srv)
        reader, writer = await asyncio.open_connection(*srv.sockets[0].getsockname(), ssl=client_ctx,
                                                       server_hostname="localhost")
        end = await asyncio.wait_for(core.adopted.get(), 5)
        end.setblocking(False)
        cleanup.append(end)
        writer.write(b"ping")
        assert await loop.sock_recv(end, 100) == b"ping"
        await loop.sock_sendall(end, b"pong")
        assert await reader.readexactly(4) == b"pong"
        return bridges[0], reader, writer, end

    yield loop, start
    for thing in cleanup:
        thing.close()
    loop.run_until_complete(asyncio.sleep(0.05))
    loop.close()


async def wait_until(predicate):
    for _ in range(1000):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError("never happened")


def test_what_the_client_sends_after_the_server_side_is_gone_is_dropped_quietly(bridged, caplog):
    loop, start = bridged

    async def main():
        bridge, reader, writer, end = await start()
        writer.write(b"unread")
        await asyncio.sleep(0.05)
        end.close()  # the server drops the connection with bytes unread: our end reads ECONNRESET
        await wait_until(bridge.plain.is_closing)
        for _ in range(10):  # what the TLS side delivers before the plain side's connection_lost()
            bridge.data_received(b"more from the client")
        await wait_until(lambda: bridge.tls_closed)  # the TLS connection ends with the server side
        writer.close()

    with caplog.at_level(logging.WARNING, logger="asyncio"):
        run(loop, main())
    assert not [r for r in caplog.records if "socket.send() raised" in r.getMessage()]


def test_what_the_server_sends_after_the_client_is_gone_is_dropped_quietly(bridged, caplog):
    loop, start = bridged

    async def main():
        bridge, reader, writer, end = await start()
        # the client resets the connection (SO_LINGER 0, then close)
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET)
        writer.transport.abort()
        # the server's TCP transport reads ECONNRESET; the SSL protocol above
        # it is told an iteration later
        ssl_protocol = bridge.tls._ssl_protocol
        await wait_until(lambda: ssl_protocol._transport is None or ssl_protocol._transport.is_closing())
        for _ in range(10):  # what the C server sends before that
            bridge.from_server(b"answer")
        await wait_until(lambda: bridge.tls_closed)

    with caplog.at_level(logging.WARNING, logger="asyncio"):
        run(loop, main())
    assert not [r for r in caplog.records if "socket.send() raised" in r.getMessage()]


def test_a_tls_connection_lost_while_the_server_is_not_reading_lets_the_server_side_go(bridged):
    # Found by e2e/test_stress.py (on 3.10, about one run in twenty): the C
    # server stops reading while its answers wait for the client to read
    # them, so what the client sent last stays in the bridge's buffer. When
    # the TLS connection was lost then, close() waited to hand that over to
    # a server that was waiting for it: both descriptors left open for good.
    loop, start = bridged

    async def main():
        bridge, reader, writer, end = await start()
        writer.write(b"x" * (8 << 20))  # more than the socketpair holds: the bridge keeps the rest
        for _ in range(500):
            if bridge.plain.get_write_buffer_size():
                break
            await asyncio.sleep(0.01)
        assert bridge.plain.get_write_buffer_size()
        bridge.tls.abort()  # the TLS connection ends (a reset, or ssl_shutdown_timeout)
        for _ in range(300):
            if bridge.plain._closed:
                break
            await asyncio.sleep(0.01)
        assert bridge.plain._closed  # the server's end is told, although it never read
        writer.close()

    run(loop, main())

"""uvicorn's --ws-* options on uringserve: permessage-deflate, keepalive
pings, the message size limit, and --ws none. Raw sockets where the wire
itself is what is checked, the `websockets` client elsewhere."""

import asyncio
import os
import socket
import struct
import sys
import time
import zlib

import httpx
import pytest
import websockets
from websockets.exceptions import ConnectionClosed

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from http_support import serve, serve_for_module  # noqa: E402
from uringserve.__main__ import build_parser  # noqa: E402
from test_websockets import release_and_count_held  # noqa: E402

E2E = os.path.dirname(os.path.abspath(__file__))
DEFLATE_TAIL = b"\x00\x00\xff\xff"  # RFC 7692 7.2.1: stripped by the sender, put back to inflate


def _serve(tmp_path, *options):
    return serve("webapps.ws_app:app", "--app-dir", E2E, *options, tmp_path=str(tmp_path))


def _handshake(port, extensions=None):
    """A raw client socket after a 101; returns (socket, response head)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    head = (b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n")
    if extensions:
        head += b"Sec-WebSocket-Extensions: " + extensions + b"\r\n"
    s.sendall(head + b"\r\n")
    response = b""
    while b"\r\n\r\n" not in response:
        response += s.recv(1)  # a byte at a time: no frame consumed
    assert response.startswith(b"HTTP/1.1 101"), response
    return s, response.lower()


def _recv_exact(s, n):
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            raise EOFError(f"EOF after {len(data)} of {n} bytes")
        data += chunk
    return data


def _read_frame(s):
    """One server frame (servers do not mask): (rsv1, opcode, payload)."""
    b0, b1 = _recv_exact(s, 2)
    n = b1 & 0x7F
    if n == 126:
        n = struct.unpack("!H", _recv_exact(s, 2))[0]
    elif n == 127:
        n = struct.unpack("!Q", _recv_exact(s, 8))[0]
    return bool(b0 & 0x40), b0 & 0x0F, _recv_exact(s, n)


def _client_frame(opcode, payload, rsv1=False):
    """A final client frame, masked with the all-zero key (the payload then
    goes as it is)."""
    n = len(payload)
    length = bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack("!H", n) if n < 65536 else \
        bytes([0x80 | 127]) + struct.pack("!Q", n)
    return bytes([0x80 | (0x40 if rsv1 else 0) | opcode]) + length + b"\0\0\0\0" + payload


@pytest.fixture(scope="module")
def default_server(tmp_path_factory):
    yield from serve_for_module(tmp_path_factory, "webapps.ws_app:app", "--app-dir", E2E)


def test_permessage_deflate_is_negotiated_and_compresses_both_ways(default_server):
    s, head = _handshake(default_server.port, b"permessage-deflate; client_max_window_bits")
    with s:
        assert b"sec-websocket-extensions: permessage-deflate" in head, head
        # an uncompressed text message (compression is per message): the
        # echo of 100 KB comes back compressed, RSV1 set
        s.sendall(_client_frame(0x1, b"x" * 100_000))
        rsv1, opcode, payload = _read_frame(s)
        assert rsv1 and opcode == 0x1 and len(payload) < 2000, (rsv1, opcode, len(payload))
        inflate = zlib.decompressobj(wbits=-15)  # the server keeps its context between messages
        assert inflate.decompress(payload + DEFLATE_TAIL) == b"echo:" + b"x" * 100_000
        # a compressed message from the client (within the 12-bit window it
        # was given) is inflated before the app sees it
        deflate = zlib.compressobj(wbits=-12)
        body = deflate.compress(b"hello " * 50) + deflate.flush(zlib.Z_SYNC_FLUSH)
        assert body.endswith(DEFLATE_TAIL)
        s.sendall(_client_frame(0x1, body[:-4], rsv1=True))
        rsv1, opcode, payload = _read_frame(s)
        assert rsv1 and inflate.decompress(payload + DEFLATE_TAIL) == b"echo:" + b"hello " * 50


def test_a_deflating_client_round_trips_large_messages(default_server):
    async def go():
        async with websockets.connect(f"ws://127.0.0.1:{default_server.port}/ws", max_size=None) as ws:
            assert [e.name for e in ws.protocol.extensions] == ["permessage-deflate"]
            text = "".join(f"line {i}\n" for i in range(200_000))  # 2.3 MB, compressible but not uniform
            await ws.send(text)
            assert await ws.recv() == "echo:" + text
            data = os.urandom(1 << 20)  # incompressible
            await ws.send(data)
            assert await ws.recv() == data[::-1]
    asyncio.run(go())


def test_no_deflate_when_turned_off_or_not_offered(tmp_path, default_server):
    s, head = _handshake(default_server.port)  # the client offers nothing
    s.close()
    assert b"sec-websocket-extensions" not in head
    with _serve(tmp_path, "--ws-per-message-deflate", "false") as srv:
        s, head = _handshake(srv.port, b"permessage-deflate")
        with s:
            assert b"sec-websocket-extensions" not in head
            s.sendall(_client_frame(0x1, b"y" * 1000))
            rsv1, opcode, payload = _read_frame(s)
            assert not rsv1 and payload == b"echo:" + b"y" * 1000
        assert srv.stop() == 0, srv.log


def test_the_size_limit_counts_inflated_bytes(tmp_path):
    with _serve(tmp_path, "--ws-max-size", "1000") as srv:
        async def go():
            async with websockets.connect(f"ws://127.0.0.1:{srv.port}/ws", max_size=None) as ws:
                await ws.send("a" * 1000)
                assert await ws.recv() == "echo:" + "a" * 1000
            for message in ("b" * 1001, "c" * 1_000_000):  # the second is a few hundred bytes on the wire
                async with websockets.connect(f"ws://127.0.0.1:{srv.port}/ws", max_size=None) as ws:
                    await ws.send(message)
                    with pytest.raises(ConnectionClosed) as closed:
                        await ws.recv()
                    assert closed.value.rcvd.code == 1009
        asyncio.run(go())
        assert srv.stop() == 0, srv.log


def test_max_queue_sets_how_much_is_read_ahead_of_the_app(tmp_path):
    """The app takes nothing until /hold-release. With the default of 32
    queued messages the server stops reading and 300 messages of 64 KiB
    cannot all be sent (e2e/test_websockets.py); with --ws-max-queue 1000
    the server reads them all ahead of the app."""
    with _serve(tmp_path, "--ws-max-queue", "1000") as srv:
        async def go():
            async with websockets.connect(f"ws://127.0.0.1:{srv.port}/hold", compression=None) as ws:
                for _ in range(300):
                    await asyncio.wait_for(ws.send(b"h" * 65536), 5)
                assert await release_and_count_held(srv.port, 300) == {"received": 300, "bytes": 300 * 65536}
        asyncio.run(go())
        assert srv.stop() == 0, srv.log


def test_keepalive_pings_and_a_silent_client_is_closed_with_1011(tmp_path):
    with _serve(tmp_path, "--ws-ping-interval", "0.3", "--ws-ping-timeout", "0.5") as srv:
        s, _ = _handshake(srv.port)
        with s:
            # answered pings keep the connection well past the timeout
            payloads = set()
            t0 = time.monotonic()
            for _ in range(4):
                rsv1, opcode, payload = _read_frame(s)
                assert opcode == 0x9 and len(payload) == 4, (opcode, payload)
                payloads.add(payload)
                s.sendall(_client_frame(0xA, payload))
            assert len(payloads) == 4 and time.monotonic() - t0 > 1.0
            # a pong that answers nothing does not count: then silence
            rsv1, opcode, payload = _read_frame(s)
            assert opcode == 0x9
            s.sendall(_client_frame(0xA, b"nope"))
            rsv1, opcode, payload = _read_frame(s)
            assert opcode == 0x8 and struct.unpack("!H", payload[:2])[0] == 1011, (opcode, payload)
            assert payload[2:] == b"keepalive ping timeout"
            assert s.recv(1) == b""  # and the server closes the TCP connection
        # the app learnt of it as an abnormal closure: no close frame came
        for _ in range(100):
            last = httpx.get(f"http://127.0.0.1:{srv.port}/last-disconnect").json()
            if last:
                break
            time.sleep(0.02)
        assert last == {"code": 1006, "reason": ""}
        assert srv.stop() == 0, srv.log


def test_a_ping_interval_of_0_sends_no_pings(tmp_path):
    with _serve(tmp_path, "--ws-ping-interval", "0") as srv:
        s, _ = _handshake(srv.port)
        with s:
            s.settimeout(1.0)
            with pytest.raises(socket.timeout):
                s.recv(1)
            s.sendall(_client_frame(0x1, b"still here"))
            s.settimeout(5)
            assert _read_frame(s) == (False, 0x1, b"echo:still here")
        assert srv.stop() == 0, srv.log


def test_ws_none_serves_upgrade_requests_as_http(tmp_path):
    with _serve(tmp_path, "--ws", "none") as srv:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
            data = b""
            while b"http still works" not in data:
                chunk = s.recv(4096)
                assert chunk, data
                data += chunk
        assert data.startswith(b"HTTP/1.1 200"), data
        assert srv.stop() == 0, srv.log


def run_cli_args(*args):
    return build_parser().parse_args(list(args))


def test_ws_options_on_the_command_line():
    parsed = run_cli_args("m:app", "--ws-per-message-deflate", "false", "--ws-max-queue", "4",
                          "--ws-ping-interval", "0")
    assert parsed.ws_per_message_deflate is False and parsed.ws_max_queue == 4 and parsed.ws_ping_interval == 0
    assert run_cli_args("m:app", "--ws-per-message-deflate").ws_per_message_deflate is True
    assert run_cli_args("m:app").ws_max_size == 16777216
    for bad in (["--ws-per-message-deflate", "maybe"], ["--ws", "h11"], ["--ws-max-size", "0"]):
        with pytest.raises(SystemExit) as exited:
            run_cli_args("m:app", *bad)
        assert exited.value.code == 2


def test_a_gunicorn_worker_subclass_sets_ws_options_in_config_kwargs(tmp_path):
    import signal
    import subprocess

    from http_support import ROOT, free_port, server_env

    port = free_port()
    log_path = tmp_path / "gunicorn.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-k", "webapps.ws_worker.QuietWorker", "-w", "1",
                                 "-b", f"127.0.0.1:{port}", "--chdir", E2E, "webapps.ws_app:app"],
                                stdout=log, stderr=subprocess.STDOUT, env=server_env(), cwd=ROOT)
    try:
        deadline = time.monotonic() + 30
        while "Application startup complete." not in log_path.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        s, head = _handshake(port, b"permessage-deflate")
        with s:
            assert b"sec-websocket-extensions" not in head  # ws_per_message_deflate=False
            assert _read_frame(s)[1] == 0x9  # ws_ping_interval=0.2
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log_path.read_text()

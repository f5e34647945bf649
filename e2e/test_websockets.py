"""WebSockets through uringserve: a Starlette app driven by the
`websockets` client over real sockets."""

import asyncio
import os
import socket
import struct
import sys
import time

import httpx
import pytest
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from http_support import serve, serve_for_module  # noqa: E402

E2E = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def ws_server(tmp_path_factory):
    yield from serve_for_module(tmp_path_factory, "webapps.ws_app:app", "--app-dir", E2E)


def _upgrade_request(path):
    return (b"GET %s HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n") % path


def _read_head(s):
    """The handshake response, read a byte at a time: no frame consumed."""
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(1)
    return head


def test_echo_text_binary_large_and_fragmented(ws_server):
    async def go():
        async with websockets.connect(f"ws://127.0.0.1:{ws_server.port}/ws", max_size=None) as ws:
            await ws.send("hello")
            assert await ws.recv() == "echo:hello"
            await ws.send(b"\x01\x02\x03")
            assert await ws.recv() == b"\x03\x02\x01"
            big = "x" * (3 * 1024 * 1024)
            await ws.send(big)
            assert await ws.recv() == "echo:" + big
            await ws.send(["frag", "mented"])  # a fragmented message
            assert await ws.recv() == "echo:fragmented"
            pong = await ws.ping()
            await asyncio.wait_for(pong, 5)
    asyncio.run(go())


def test_many_concurrent_sessions(ws_server):
    async def one(i):
        async with websockets.connect(f"ws://127.0.0.1:{ws_server.port}/ws") as ws:
            for j in range(20):
                await ws.send(f"{i}-{j}")
                assert await ws.recv() == f"echo:{i}-{j}"
    async def go():
        await asyncio.gather(*[one(i) for i in range(100)])
    asyncio.run(go())


def test_subprotocol_scope_and_close_codes(ws_server):
    async def go():
        async with websockets.connect(f"ws://127.0.0.1:{ws_server.port}/ws", subprotocols=["chat.v2"]) as ws:
            assert ws.subprotocol == "chat.v2"
            await ws.send("close-me")
            with pytest.raises(ConnectionClosed) as info:
                await ws.recv()
            assert info.value.rcvd.code == 4001 and info.value.rcvd.reason == "asked to"
        async with websockets.connect(f"ws://127.0.0.1:{ws_server.port}/info?a=1") as ws:
            import json
            assert json.loads(await ws.recv()) == {"path": "/info", "scheme": "ws", "query": "a=1",
                                                   "type": "websocket"}
        # behind a trusted proxy (127.0.0.1 by default), its X-Forwarded-Proto
        # names the scheme, as http(s) or ws(s) (wss was ignored)
        for proto in ("https", "wss"):
            async with websockets.connect(f"ws://127.0.0.1:{ws_server.port}/info",
                                          additional_headers={"X-Forwarded-Proto": proto}) as ws:
                assert json.loads(await ws.recv())["scheme"] == "wss"
        with pytest.raises(InvalidStatus) as refused:
            async with websockets.connect(f"ws://127.0.0.1:{ws_server.port}/refuse"):
                pass
        assert refused.value.response.status_code == 403
        # an app that returns without a word is a failed one, as for uvicorn
        # and hypercorn (it was refused with 403, as if it had closed)
        with pytest.raises(InvalidStatus) as failed:
            async with websockets.connect(f"ws://127.0.0.1:{ws_server.port}/silent"):
                pass
        assert failed.value.response.status_code == 500
    asyncio.run(go())
    assert "ASGI callable returned without sending handshake." in ws_server.log


def test_a_browser_handshake_keeps_every_header_in_the_scope(ws_server):
    # The websockets protocol parses only the headers its handshake reads
    # (the rest would be a second copy for the connection's lifetime); the
    # app still sees every header, and the handshake still negotiates the
    # subprotocol and permessage-deflate the client offers.
    cookie = "session=" + "c" * 6000
    sent = {"Cookie": cookie, "User-Agent": "Mozilla/5.0 test",
            "Accept-Language": "en-GB,en;q=0.7", "Cache-Control": "no-cache", "X-Custom": "kept"}

    async def go():
        async with websockets.connect(f"ws://127.0.0.1:{ws_server.port}/headers", subprotocols=["chat.v2"],
                                      additional_headers=sent, origin="https://app.example") as ws:
            import json
            seen = dict(json.loads(await ws.recv()))
            assert ws.subprotocol == "chat.v2"
            assert [type(e).__name__ for e in ws.protocol.extensions] == ["PerMessageDeflate"]
            await ws.send("compressed " * 100)
            assert await ws.recv() == "compressed " * 100
        return seen

    seen = asyncio.run(go())
    for name, value in sent.items():
        assert seen[name.lower()] == value
    assert seen["origin"] == "https://app.example"
    for name in ("host", "upgrade", "connection", "sec-websocket-key", "sec-websocket-version",
                 "sec-websocket-extensions", "sec-websocket-protocol"):
        assert name in seen


def test_an_app_cancelled_of_itself_is_a_failed_one(tmp_path):
    """A CancelledError the app raises is its failure, as uvicorn treats
    it: logged, and answered 500 before the accept, or closed with 1011
    after it. Before, the connection was dropped without an answer."""
    async def go(port):
        with pytest.raises(InvalidStatus) as failed:
            async with websockets.connect(f"ws://127.0.0.1:{port}/cancelled"):
                pass
        assert failed.value.response.status_code == 500
        async with websockets.connect(f"ws://127.0.0.1:{port}/cancelled?after=accept") as ws:
            with pytest.raises(ConnectionClosed) as closed:
                await ws.recv()
            assert closed.value.rcvd.code == 1011
    with serve("webapps.ws_app:app", "--app-dir", E2E, tmp_path=str(tmp_path)) as srv:
        asyncio.run(go(srv.port))
        assert srv.stop() == 0
        log = srv.log
    assert log.count("Exception in ASGI application") == 2
    assert log.count("asyncio.exceptions.CancelledError") == 2


def test_denial_response_reaches_the_client(ws_server):
    # The scope advertises "websocket.http.response": Starlette's
    # send_denial_response() is answered with the app's own status, headers
    # and body (it was a 500 before).
    async def go():
        with pytest.raises(InvalidStatus) as denied:
            async with websockets.connect(f"ws://127.0.0.1:{ws_server.port}/deny"):
                pass
        return denied.value.response
    response = asyncio.run(go())
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.body == b"no entry no entry no entry "
    assert "Exception in ASGI application" not in ws_server.log


def _denied_on_a_server_of_its_own(tmp_path, path):
    """The denial response a WebSocket client gets at `path`, and the log of
    the server it came from (one of its own: the app error is logged)."""
    async def go(port):
        with pytest.raises(InvalidStatus) as denied:
            async with websockets.connect(f"ws://127.0.0.1:{port}{path}"):
                pass
        return denied.value.response

    with serve("webapps.ws_app:app", "--app-dir", E2E, tmp_path=str(tmp_path)) as srv:
        response = asyncio.run(go(srv.port))
        assert srv.stop() == 0
    return response, srv.log


def test_denial_response_headers_are_checked(tmp_path):
    # a CR LF in a header value is an app error (500, logged), not a header
    response, log = _denied_on_a_server_of_its_own(tmp_path, "/deny-injected")
    assert response.status_code == 500 and "set-cookie" not in response.headers
    assert "invalid response header b'x-evil'" in log


def test_a_denial_response_with_a_status_that_is_not_final_is_refused(tmp_path):
    # a 101 denial would have told the client its handshake succeeded
    response, log = _denied_on_a_server_of_its_own(tmp_path, "/deny-interim")
    assert response.status_code == 500
    assert "invalid HTTP status code 101" in log


def test_the_app_sees_the_clients_close_code(ws_server):
    # websocket.disconnect carried 1006 for every client close: the code was
    # read from the protocol's close_code, which is set only after an EOF
    # the server, closing first, never fed it.
    async def go():
        ws = await websockets.connect(f"ws://127.0.0.1:{ws_server.port}/ws")
        await ws.send("x")
        assert await ws.recv() == "echo:x"
        await ws.close(code=4321, reason="done here")
    asyncio.run(go())
    for _ in range(100):
        last = httpx.get(f"http://127.0.0.1:{ws_server.port}/last-disconnect").json()
        if last.get("code") == 4321:  # (another test's client may have left before)
            break
        time.sleep(0.02)
    assert last == {"code": 4321, "reason": "done here"}


def test_a_text_message_that_is_not_utf8_closes_with_1007(ws_server):
    with socket.create_connection(("127.0.0.1", ws_server.port), timeout=5) as s:
        s.sendall(_upgrade_request(b"/ws"))
        assert _read_head(s).startswith(b"HTTP/1.1 101")
        data = b""
        s.sendall(bytes([0x81, 0x82, 0, 0, 0, 0]) + b"\xff\xfe")  # text, masked (zero key), not UTF-8
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    # a close frame from the server (before: the connection just dropped)
    assert data[0] == 0x88 and int.from_bytes(data[2:4], "big") == 1007, data


def test_http_on_the_same_server_and_client_abort(ws_server):
    async def go():
        ws = await websockets.connect(f"ws://127.0.0.1:{ws_server.port}/ws")
        await ws.send("x")
        assert await ws.recv() == "echo:x"
        ws.transport.abort()  # no close frame: the app sees a disconnect
        await asyncio.sleep(0.2)
    asyncio.run(go())
    assert httpx.get(f"http://127.0.0.1:{ws_server.port}/").text == "http still works"
    assert "Exception in ASGI application" not in ws_server.log



@pytest.mark.parametrize("path", [b"/ws", b"/refuse", b"/deny"])
def test_frames_the_protocol_refuses_before_the_handshake_is_answered(tmp_path, path):
    # A client that sends an unmasked frame (refused) right behind its
    # upgrade request, then neither reads nor closes: the server closes the
    # connection, and whatever the app answers (accept, close, a denial
    # response) goes nowhere quietly; the echo app sees a disconnect.
    with serve("webapps.ws_app:app", "--app-dir", E2E, tmp_path=str(tmp_path)) as srv:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
            s.sendall(_upgrade_request(path) + b"\x81\x05hello")
            assert s.recv(4096) == b""  # closed by the server, nothing else sent
        if path == b"/ws":
            deadline = time.monotonic() + 5
            while not httpx.get(f"http://127.0.0.1:{srv.port}/last-disconnect").json() and \
                    time.monotonic() < deadline:
                time.sleep(0.05)
            assert httpx.get(f"http://127.0.0.1:{srv.port}/last-disconnect").json()["code"] == 1006
        assert httpx.get(f"http://127.0.0.1:{srv.port}/").text == "http still works"
        assert srv.stop() == 0
        log = srv.log
    for bad in ("Exception in ASGI application", "never retrieved", "Traceback"):
        assert bad not in log, log


def _masked_text(payload):
    mask = os.urandom(4)
    return bytes([0x81, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def test_a_burst_of_messages_in_one_write_is_received_in_order(ws_server):
    # 3,000 small messages in one write: far more than --ws-max-queue (32),
    # so the server stops reading while the app takes them, and more arrive
    # while earlier ones wait in the session's inbox. The app must receive
    # every one once, in order, and then the next burst after the first has
    # been drained.
    with socket.create_connection(("127.0.0.1", ws_server.port), timeout=10) as s:
        s.sendall(_upgrade_request(b"/ws"))
        assert _read_head(s).startswith(b"HTTP/1.1 101")
        got = bytearray()
        for burst in range(2):
            texts = [f"{burst}-{i}".encode() for i in range(3000)]
            s.sendall(b"".join(_masked_text(t) for t in texts))
            want = b"".join(bytes([0x81, len(b"echo:" + t)]) + b"echo:" + t for t in texts)
            got.clear()
            while len(got) < len(want):
                got += s.recv(65536)
            assert bytes(got) == want


def test_a_protocol_error_after_a_message_ends_the_session_quietly(tmp_path):
    # A message, then an unmasked frame in the same write: the protocol
    # fails the connection (1002) while the app is about to answer the
    # message. The app's send() raises ClientDisconnected (Starlette ends
    # the endpoint), and the session's own closing handshake is skipped,
    # not attempted on a closing protocol.
    with serve("webapps.ws_app:app", "--app-dir", E2E, tmp_path=str(tmp_path)) as srv:
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
                s.sendall(_upgrade_request(b"/ws"))
                assert _read_head(s).startswith(b"HTTP/1.1 101")
                s.sendall(_masked_text(b"a") + b"\x81\x05hello")
                out = b""
                while True:
                    data = s.recv(4096)
                    if not data:
                        break
                    out += data
                assert out[0] == 0x88 and out[2:4] == (1002).to_bytes(2, "big"), out  # close 1002, then EOF
        assert httpx.get(f"http://127.0.0.1:{srv.port}/").text == "http still works"
        assert srv.stop() == 0
        log = srv.log
    for bad in ("Exception in ASGI application", "never retrieved", "Traceback", "socket.send() raised"):
        assert bad not in log, log


def test_a_client_that_half_closes_while_the_app_waits_to_send(tmp_path):
    # The client sends large messages to a raw ASGI echo app and reads
    # nothing, so the app's send() waits for the transport to drain; then
    # the client half-closes. That send() raises ClientDisconnected, which
    # this app lets propagate: the client left, so it is not logged as an
    # application error.
    with serve("webapps.chaos_app:app", "--app-dir", E2E, tmp_path=str(tmp_path)) as srv:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.sendall(_upgrade_request(b"/ws-echo"))
            assert _read_head(s).startswith(b"HTTP/1.1 101")
            message = os.urandom(1 << 20)
            mask = os.urandom(4)
            frame = struct.pack("!BBQ", 0x82, 0xFF, len(message)) + mask + \
                (int.from_bytes(message, "big") ^ int.from_bytes(mask * (len(message) // 4), "big")).to_bytes(
                    len(message), "big")
            for _ in range(4):
                s.sendall(frame)
            time.sleep(0.5)  # the echo fills the socket buffers and the app waits to send
            s.shutdown(socket.SHUT_WR)
            time.sleep(0.5)
        assert httpx.get(f"http://127.0.0.1:{srv.port}/health").text == "ok"
        assert srv.stop() == 0
        log = srv.log
    assert "Exception in ASGI application" not in log, log


def _flood_state(port):
    return httpx.get(f"http://127.0.0.1:{port}/flood-count").json()


def _wait_for_flood_state(port, state, timeout=5.0):
    deadline = time.monotonic() + timeout
    while _flood_state(port)["state"] != state and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _flood_state(port)["state"] == state


def test_a_client_that_does_not_read_holds_the_sender_back(ws_server):
    """The app sends 2000 messages of 64 KiB to a client that reads none:
    send() must wait once the transport is above its high-water mark (it
    queued all 125 MiB before). The client then half-closes without a close
    frame: the waiting send() ends with a disconnect (ClientDisconnected,
    an OSError, which Starlette turns into WebSocketDisconnect), not with
    an exception from the frame protocol."""
    port = ws_server.port
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(_upgrade_request(b"/flood"))
    assert _read_head(s).startswith(b"HTTP/1.1 101")
    time.sleep(1.0)  # the app sends as much as it is let
    state = _flood_state(port)
    assert state["state"] == "sending" and state["sent"] < 400, state
    s.shutdown(socket.SHUT_WR)
    _wait_for_flood_state(port, "disconnected")
    s.close()
    assert "Exception in ASGI application" not in ws_server.log



def _server_fd_open(pid, server_port, client_port):
    """Whether the server process still has a descriptor on its side of this
    TCP connection (a socket it has closed may linger in the kernel, with
    inode 0, until the client reads or times out; that is no fd of ours)."""
    with open("/proc/net/tcp") as f:
        inodes = {line.split()[9] for line in f.readlines()[1:]
                  if int(line.split()[1].split(":")[1], 16) == server_port
                  and int(line.split()[2].split(":")[1], 16) == client_port}
    links = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            links.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass
    return any(f"socket:[{inode}]" in links for inode in inodes - {"0"})


def test_a_half_closed_client_that_never_reads_is_reset(ws_server):
    """Closing waits for what the transport has queued to go out; a client
    that half-closes and then reads nothing would hold the connection and
    that memory for good. The server aborts it after 10 s (CLOSE_TIMEOUT).
    One 64 MiB message: far more than any kernel socket buffer takes, so
    most of it is still in the transport when the app is told the client is
    gone (with 64 KiB messages the app stops near the high-water mark, and
    a kernel that grows the send buffer after the FIN took the rest)."""
    port, pid = ws_server.port, ws_server.proc.pid
    s = socket.create_connection(("127.0.0.1", port))
    client_port = s.getsockname()[1]
    s.sendall(_upgrade_request(b"/flood?count=1&size=67108864"))
    assert _read_head(s).startswith(b"HTTP/1.1 101")
    _wait_for_flood_state(port, "sending")
    time.sleep(0.3)  # the message is queued and the kernel's buffers full
    s.shutdown(socket.SHUT_WR)
    _wait_for_flood_state(port, "disconnected")
    assert _server_fd_open(pid, port, client_port)  # its queue cannot reach us
    deadline = time.monotonic() + 15
    while _server_fd_open(pid, port, client_port) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _server_fd_open(pid, port, client_port)
    s.close()


async def release_and_count_held(port, count):
    """Lets the /hold app read, then waits until it has taken `count`
    messages; returns what it counted."""
    async with httpx.AsyncClient() as client:
        await client.get(f"http://127.0.0.1:{port}/hold-release")
        for _ in range(200):
            held = (await client.get(f"http://127.0.0.1:{port}/hold-release")).json()
            if held["received"] == count:
                break
            await asyncio.sleep(0.05)
    return held


def test_messages_the_app_does_not_take_stop_the_reading(ws_server):
    """The app takes no message for a while: the server stops reading the
    socket after a few (it read them all into memory before), so the
    client's sends wait; once the app reads again, every message arrives."""
    port = ws_server.port

    async def go():
        # uncompressed: deflated, 300 messages of one repeated byte would all
        # fit in the kernel's socket buffers
        async with websockets.connect(f"ws://127.0.0.1:{port}/hold", max_size=None, compression=None) as ws:
            sent = 0

            async def send_all():
                nonlocal sent
                for _ in range(300):
                    await ws.send(b"h" * 65536)
                    sent += 1
            sender = asyncio.create_task(send_all())
            await asyncio.sleep(1.0)
            assert sent < 250, sent  # 300 x 64 KiB; the kernel's buffers hold some
            held = asyncio.create_task(release_and_count_held(port, 300))
            await asyncio.wait_for(sender, 10)
            assert await held == {"received": 300, "bytes": 300 * 65536}
    asyncio.run(go())

def test_shutdown_closes_open_websockets_with_1012(tmp_path):
    import signal

    with serve("webapps.ws_app:app", "--app-dir", E2E, tmp_path=str(tmp_path)) as srv:
        async def go():
            async with websockets.connect(f"ws://127.0.0.1:{srv.port}/ws") as ws:
                await ws.send("a")
                assert await ws.recv() == "echo:a"
                srv.proc.send_signal(signal.SIGTERM)
                with pytest.raises(ConnectionClosed) as info:
                    await asyncio.wait_for(ws.recv(), 10)
                assert info.value.rcvd.code == 1012
        asyncio.run(go())
        assert srv.proc.wait(15) == 0, srv.log


def test_upgrade_during_shutdown_is_refused_with_503(tmp_path):
    """A connection accepted before the drain is kept for its first request
    (see server_drain); if that request is a WebSocket upgrade, the answer is
    503, not a session that would outlive the server."""
    import signal
    import socket
    import time

    from http_support import Reader

    with serve("webapps.ws_app:app", "--app-dir", E2E, tmp_path=str(tmp_path)) as srv:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
            time.sleep(0.2)  # accepted
            srv.proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)  # the drain has run
            s.sendall(_upgrade_request(b"/ws"))
            r = Reader(s).response()
            assert r.status == 503 and r.header("connection") == "close"
        assert srv.proc.wait(15) == 0, srv.log

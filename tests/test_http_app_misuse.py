"""uringserve under an app that misuses receive() and send() at random
(tests/apps/misuse_app.py) and clients that send random requests, on
keep-alive connections, some abandoned halfway, in plain HTTP and over TLS
(--ssl-*). What must hold, for every seed: every byte the server sends
parses as HTTP/1.1 (h11 as the client, a response cut short by a close
being the only tolerated fault), no request is refused by a reset, nothing
hangs, the server stays up and serves a plain request afterwards, its log
has no loop-level error, and it holds no more descriptors than before.
e2e/test_stress.py is the converse: random, malformed and aborted clients
against an app with a fixed set of misbehaviours, its responses unparsed."""

import asyncio
import os
import random
import socket
import ssl
import threading
import time
import traceback

import h11
import pytest
import websockets
from websockets.asyncio.client import connect as ws_connect

from conftest import TEST_CERT
from http_support import connect, serve

SECONDS = 4
# h11's words for a response cut short by a close: uringserve closes a
# connection whose app failed after the response began
CUT_SHORT = ("peer closed connection without sending complete message body",)
# what the server's log must never say
LOG_ALARMS = ("Fatal Python error", "Segmentation", "Exception in callback", "Task exception was never retrieved",
              "Task was destroyed but it is pending", "SystemError", "AddressSanitizer", "runtime error:")


def _server_fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def _client_tls():
    context = ssl.create_default_context(cafile=TEST_CERT)
    context.check_hostname = False
    return context


def _connect(port, tls):
    sock = connect(port, timeout=10)
    return _client_tls().wrap_socket(sock, server_hostname="localhost") if tls else sock


def _send_request(conn, sock, rng, seed, history):
    """Sends one random request; False when the client abandons the
    connection halfway (after part of the body)."""
    framing = rng.choice(["none", "length", "chunked", "abandon"])
    body = b"q" * rng.choice([1, 1000, 100_000])
    history.append((seed, framing, len(body)))
    headers = [("host", "chaos")]
    if framing in ("length", "abandon"):
        headers.append(("content-length", str(len(body))))
    elif framing == "chunked":
        headers.append(("transfer-encoding", "chunked"))
    method = "GET" if framing == "none" else "POST"
    out = conn.send(h11.Request(method=method, target=f"/chaos?{seed}", headers=headers))
    if framing == "abandon":
        sock.sendall(out + body[: len(body) // 2])
        return False
    if framing != "none":
        out += conn.send(h11.Data(data=body))
    sock.sendall(out + conn.send(h11.EndOfMessage()))
    return True


def _read_response(conn, sock, seed, history):
    """Reads one response: "done", "cut" (closed inside the response),
    "closed" (closed before any of it), or an error text."""
    got_any = False
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            if str(exc).startswith(CUT_SHORT):
                return "cut"
            if not got_any and "ConnectionClosed" in str(exc):
                return "closed"
            return f"seed {seed}: {exc!r}; on this connection: {history}"
        if event is h11.NEED_DATA:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                data = b""
            except socket.timeout:
                return f"seed {seed}: no response in 10 s; on this connection: {history}"
            got_any = got_any or bool(data)
            conn.receive_data(data)
        elif isinstance(event, h11.Response):
            history.append((event.status_code, event.headers))
        elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
            return "done"


def _client(port, tls, rng, tally, failures, deadline):
    retry = None
    while time.monotonic() < deadline and not failures:
        sock, conn = _connect(port, tls), h11.Connection(h11.CLIENT)
        history = []
        with sock:
            while time.monotonic() < deadline:
                seed = retry or rng.randrange(1 << 32)
                retry = None
                if not _send_request(conn, sock, rng, seed, history):
                    tally["abandoned"] += 1
                    break
                outcome = _read_response(conn, sock, seed, history)
                if outcome == "closed" and len(history) > 1:
                    # A reused connection closed before the response: the
                    # close that ends a response the app left unfinished
                    # after its head had gone out (a 304 with more_body
                    # pending, say), which a client cannot tell from a
                    # keep-alive timeout. As clients do, the request is
                    # made again on a new connection, where it must get
                    # its response.
                    tally["retried"] += 1
                    retry = seed
                    break
                if outcome not in ("done", "cut"):
                    failures.append(outcome if outcome != "closed" else f"seed {seed}: closed with no response")
                    return
                tally[outcome] += 1
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    break  # closed, or must close
                conn.start_next_cycle()
                tally["reused"] += 1


# close codes a client sends when the server's frames break the protocol
PROTOCOL_FAULTS = (1002, 1007)


def _ws_session(port, tls, rng, tally, failures):
    """One WebSocket session against the misusing app: random sends,
    receives and a close. The server may deny the handshake with an HTTP
    status, close at any point, or drop the connection; it may not send
    anything the websockets client finds malformed.

    The client is websockets' asyncio one, on a stock asyncio loop: its
    threaded sync client reads and writes one SSL object from two threads,
    and about one wss:// session in 100-500 then never sends its request
    (the same against uvicorn; a capture shows the request never leaves)."""
    loop = asyncio.SelectorEventLoop()
    try:
        loop.run_until_complete(_ws_steps(port, tls, rng, tally, failures))
    finally:
        loop.close()


async def _ws_steps(port, tls, rng, tally, failures):
    seed = rng.randrange(1 << 32)
    ws = None
    options = {"ssl": _client_tls()} if tls else {}
    try:
        async with ws_connect(f"{'wss' if tls else 'ws'}://127.0.0.1:{port}/ws?{seed}", open_timeout=10,
                              close_timeout=2, compression=rng.choice(["deflate", None]),
                              subprotocols=rng.choice([None, ["unasked"]]), proxy=None, **options) as ws:
            for _ in range(rng.randrange(1, 6)):
                step = rng.choice(["text", "bytes", "recv", "recv", "close"])
                if step == "text":
                    await ws.send("t" * rng.choice([1, 1000, 100_000]))
                elif step == "bytes":
                    await ws.send(b"b" * rng.choice([1, 1000, 100_000]))
                elif step == "recv":
                    try:
                        await asyncio.wait_for(ws.recv(), 0.1)
                    except asyncio.TimeoutError:
                        pass
                else:
                    await ws.close()
        tally["ws_opened"] += 1
    except websockets.exceptions.InvalidStatus:
        tally["ws_denied"] += 1
    except websockets.exceptions.NegotiationError:
        tally["ws_negotiation"] += 1  # the app accepted with a subprotocol the client did not offer
    except websockets.exceptions.ConnectionClosed:
        tally["ws_closed"] += 1
    except Exception as exc:
        failures.append(f"websocket seed {seed}: {exc!r}")
        return
    if ws is not None and ws.protocol.close_sent is not None and ws.protocol.close_sent.code in PROTOCOL_FAULTS:
        failures.append(f"websocket seed {seed}: the client closed with {ws.protocol.close_sent}")


def _ws_client(port, tls, rng, tally, failures, deadline):
    while time.monotonic() < deadline and not failures:
        _ws_session(port, tls, rng, tally, failures)


def _failing_on_error(client, port, tls, rng, tally, failures, deadline):
    """A client thread whose unexpected exception (a send refused by a
    reset, say) fails the test instead of ending the thread unseen."""
    try:
        client(port, tls, rng, tally, failures, deadline)
    except Exception:
        failures.append(traceback.format_exc())


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_an_app_misusing_receive_and_send_at_random_never_breaks_the_server(tmp_path, tls):
    seed = random.randrange(1 << 32)
    tally = {"done": 0, "cut": 0, "abandoned": 0, "reused": 0, "retried": 0, "ws_opened": 0, "ws_denied": 0,
             "ws_negotiation": 0, "ws_closed": 0}
    failures = []
    tls_options = ["--ssl-certfile", TEST_CERT, "--ssl-keyfile", TEST_CERT] if tls else []
    with serve("apps.misuse_app:app", *tls_options, tmp_path=str(tmp_path)) as srv:
        fds_before = _server_fds(srv.proc.pid)
        deadline = time.monotonic() + SECONDS
        clients = [threading.Thread(target=_failing_on_error, args=(client, srv.port, tls, random.Random(seed + i),
                                                                    tally, failures, deadline))
                   for i, client in enumerate([_client, _ws_client])]
        for client in clients:
            client.start()
        for client in clients:
            client.join()
        assert not failures, (seed, failures, tally)
        assert srv.proc.poll() is None, (seed, srv.log[-3000:])
        with _connect(srv.port, tls) as sock:
            sock.sendall(b"GET /ok HTTP/1.1\r\nhost: x\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 200 OK\r\n")
        deadline = time.monotonic() + 5
        while _server_fds(srv.proc.pid) > fds_before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _server_fds(srv.proc.pid) <= fds_before, (seed, os.listdir(f"/proc/{srv.proc.pid}/fd"))
        assert srv.stop() == 0
        log = srv.log
    alarms = [alarm for alarm in LOG_ALARMS if alarm in log]
    assert not alarms, (seed, alarms, log[-3000:])
    assert tally["done"] > 50 and tally["abandoned"] > 0 and tally["ws_opened"] + tally["ws_closed"] > 20, (seed, tally)
    print(seed, tally)

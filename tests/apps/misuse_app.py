"""An ASGI app that does random things with its receive() and send(),
right and wrong, chosen by the seed in the query string: responses started
twice, bodies after the end, concurrent receive() calls, sends from tasks
it does not await at once, calls cancelled halfway, bad messages, bad
headers, exceptions and cancellation at any point. Over WebSocket the same
with its messages: sends before the accept or after the close, close codes
and reasons that cannot be sent, denial responses. The path /ok answers
200 plainly. For tests/test_http_app_misuse.py."""

import asyncio
import random


async def _maybe(rng, awaitable):
    """Awaits; what it raises is swallowed or raised on, at random."""
    try:
        return await awaitable
    except Exception:
        if rng.random() < 0.5:
            raise


def _start(rng):
    headers = [(b"x-chaos", b"1")]
    for _ in range(rng.randrange(3)):
        headers.append(rng.choice([
            (b"content-length", str(rng.choice([0, 5, 1000])).encode()),
            (b"transfer-encoding", b"chunked"),
            (b"connection", b"close"),
            (b"bad name", b"x"),            # refused by send()
            (b"x-injected", b"a\r\nb: c"),  # refused by send()
            ("x-str", "not bytes"),          # refused by send()
        ]))
    return {"type": "http.response.start", "status": rng.choice([200, 200, 204, 304, 404, 500]), "headers": headers}


def _body(rng):
    return {"type": "http.response.body", "body": b"b" * rng.choice([0, 1, 1000, 100_000]),
            "more_body": rng.random() < 0.5}


def _bad_message(rng):
    return rng.choice([{"type": "nonsense"}, "not a dict", {"type": "http.response.body", "body": "str"},
                       {"type": "http.response.pathsend", "path": "/nonexistent/chaos"}, {}])


async def _shared_act(rng, action, receive):
    """The actions of both scopes; True when the app is to return."""
    # receive() is bounded: once the body is read it waits for the
    # disconnect, which the client would only make after the response
    if action == "receive":
        await _maybe(rng, asyncio.wait_for(receive(), 0.05))
    elif action == "two_receives":
        await asyncio.gather(_maybe(rng, asyncio.wait_for(receive(), 0.05)),
                             _maybe(rng, asyncio.wait_for(receive(), 0.05)), return_exceptions=rng.random() < 0.5)
    elif action == "sleep":
        await asyncio.sleep(rng.choice([0, 0.001, 0.005]))
    elif action == "raise":
        raise RuntimeError("chaos")
    elif action == "cancel":
        raise asyncio.CancelledError()
    return action == "return"


async def _act(rng, receive, send, tasks):
    action = rng.choice(["receive", "receive", "two_receives", "receive_cancelled", "start", "start", "body",
                         "body", "body_in_task", "sleep", "bad_message", "raise", "cancel", "return"])
    if action == "receive_cancelled":
        await _maybe(rng, asyncio.wait_for(receive(), rng.choice([0, 0.001])))
    elif action == "start":
        await _maybe(rng, send(_start(rng)))
    elif action == "body":
        await _maybe(rng, send(_body(rng)))
    elif action == "body_in_task":
        tasks.append(asyncio.ensure_future(send(_body(rng))))
    elif action == "bad_message":
        await _maybe(rng, send(_bad_message(rng)))
    else:
        return await _shared_act(rng, action, receive)
    return False


def _ws_message(rng):
    return rng.choice([
        {"type": "websocket.accept", "subprotocol": rng.choice([None, "unasked"]),
         "headers": rng.choice([[], [(b"x-chaos", b"1")], [(b"bad name", b"x")]])},
        {"type": "websocket.send", "text": "t" * rng.choice([0, 1, 1000, 100_000])},
        {"type": "websocket.send", "bytes": b"b" * rng.choice([0, 1, 1000, 100_000])},
        {"type": "websocket.send", "text": "both", "bytes": b"both"},  # refused by send()
        {"type": "websocket.send"},                                     # refused by send()
        {"type": "websocket.close", "code": rng.choice([1000, 1001, 3000, 4999]),
         "reason": rng.choice(["", "bye", "r" * 200])},                 # a reason over 123 bytes: refused
        {"type": "websocket.close", "code": rng.choice([999, 1005, 5000])},  # not sendable codes: refused
        {"type": "websocket.http.response.start", "status": rng.choice([403, 500]), "headers": []},
        {"type": "websocket.http.response.body", "body": b"denied", "more_body": rng.random() < 0.5},
        {"type": "nonsense"},
    ])


async def _ws_act(rng, receive, send, tasks):
    action = rng.choice(["receive", "receive", "two_receives", "send", "send", "send", "send_in_task", "sleep",
                         "raise", "cancel", "return"])
    if action == "send":
        await _maybe(rng, send(_ws_message(rng)))
    elif action == "send_in_task":
        tasks.append(asyncio.ensure_future(send(_ws_message(rng))))
    else:
        return await _shared_act(rng, action, receive)
    return False


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    if scope["path"] == "/ok":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})
        return
    rng = random.Random(int(scope["query_string"] or b"0"))
    act = _ws_act if scope["type"] == "websocket" else _act
    tasks = []
    if scope["type"] == "websocket" and rng.random() < 0.6:  # most sessions get past the handshake
        await send({"type": "websocket.accept"})
    try:
        for _ in range(rng.randrange(1, 12 if scope["type"] == "websocket" else 8)):
            if await act(rng, receive, send, tasks):
                return
    finally:
        # the app's own tasks end with it, and their errors are its own
        await asyncio.gather(*tasks, return_exceptions=True)

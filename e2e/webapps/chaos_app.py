"""A raw ASGI app for the random-client stress test (e2e/test_stress.py):
one route per way an app can behave, well or badly."""

import asyncio
import random


async def _lifespan(receive, send):
    while True:
        msg = await receive()
        await send({"type": msg["type"] + ".complete"})
        if msg["type"] == "lifespan.shutdown":
            return


async def _websocket(scope, receive, send):
    await receive()  # websocket.connect
    if scope["path"] != "/ws-echo" and random.random() < 0.2:  # /ws-echo always accepts
        await send({"type": "websocket.close", "code": 1008})
        return
    await send({"type": "websocket.accept"})
    while True:
        msg = await receive()
        if msg["type"] == "websocket.disconnect":
            return
        if msg.get("text") is not None:
            await send({"type": "websocket.send", "text": msg["text"]})
        else:
            await send({"type": "websocket.send", "bytes": msg["bytes"]})


async def _read_body(receive):
    body = b""
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return None
        body += msg.get("body", b"")
        if not msg.get("more_body"):
            return body


def _start(status=200, headers=()):
    return {"type": "http.response.start", "status": status, "headers": list(headers)}


def _body(data=b"", more=False):
    return {"type": "http.response.body", "body": data, "more_body": more}


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        return await _lifespan(receive, send)
    if scope["type"] == "websocket":
        return await _websocket(scope, receive, send)
    path = scope["path"]
    body = b"" if path == "/no-read" else await _read_body(receive)
    if body is None:
        return
    if path == "/health":
        await send(_start(200, [(b"content-type", b"text/plain")]))
        await send(_body(b"ok"))
    elif path == "/raise":
        raise RuntimeError("chaos: raised before the response")
    elif path == "/raise-mid":
        await send(_start())
        await send(_body(b"part", more=True))
        raise RuntimeError("chaos: raised in the middle of the body")
    elif path == "/nothing":
        return
    elif path == "/start-twice":
        await send(_start())
        await send(_start())
    elif path == "/stream":
        await send(_start())
        for _ in range(random.randint(1, 20)):
            await send(_body(b"x" * random.randint(0, 5000), more=True))
            if random.random() < 0.3:
                await asyncio.sleep(random.random() * 0.01)
        await send(_body(b"end"))
    elif path == "/bad-header":
        await send(_start(200, [(b"x-bad", b"a\r\nb")]))
        await send(_body())
    elif path == "/short":
        await send(_start(200, [(b"content-length", b"10")]))
        await send(_body(b"short"))
    else:  # /echo, /slow, /big, /no-read
        if path == "/slow":
            await asyncio.sleep(random.random() * 0.05)
        if path == "/big":
            body = b"y" * (1 << 20)
        await send(_start(200, [(b"content-length", str(len(body)).encode())]))
        await send(_body(body))

"""Raw ASGI apps for the benchmarks: hello, a 10 KB GET, a 10 KB echo (HTTP),
and a WebSocket echo (bench/ws_bench.py)."""

HELLO = b"Hello, world!"
TEN_KB = b"x" * 10240
HEADERS = [(b"content-type", b"text/plain")]


async def websocket_echo(receive, send):
    """Accepts, then sends every message back as it came, until the client leaves."""
    await receive()  # websocket.connect
    await send({"type": "websocket.accept"})
    while True:
        msg = await receive()
        if msg["type"] == "websocket.disconnect":
            return
        if msg.get("bytes") is not None:
            await send({"type": "websocket.send", "bytes": msg["bytes"]})
        else:
            await send({"type": "websocket.send", "text": msg["text"]})


async def app(scope, receive, send):
    if scope["type"] == "websocket":
        return await websocket_echo(receive, send)
    if scope["type"] != "http":
        return
    path = scope["path"]
    if path == "/echo":
        body = b""
        more = True
        while more:
            msg = await receive()
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
        payload = body
    elif path == "/10k":
        payload = TEN_KB
    else:
        payload = HELLO
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": payload})

"""Raw ASGI apps for the HTTP benchmark: hello, a 10 KB GET, a 10 KB echo."""

HELLO = b"Hello, world!"
TEN_KB = b"x" * 10240
HEADERS = [(b"content-type", b"text/plain")]


async def app(scope, receive, send):
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

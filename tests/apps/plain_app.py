"""An app without lifespan support: it refuses every non-HTTP scope."""


async def app(scope, receive, send):
    assert scope["type"] == "http", "only HTTP here"
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"plain"})

"""An ASGI app whose call returns an awaitable object that is not a
coroutine (the server must still run it as a Task and see it finish)."""

import asyncio


class _Run:
    def __init__(self, scope, receive, send):
        self.args = (scope, receive, send)

    def __await__(self):
        return self.run().__await__()

    async def run(self):
        scope, receive, send = self.args
        if scope["type"] != "http":
            return
        if scope["path"] == "/fail":
            raise KeyError("from a non-coroutine awaitable")
        task = asyncio.current_task()
        body = f"task={type(task).__name__}".encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})


class App:
    def __call__(self, scope, receive, send):
        return _Run(scope, receive, send)


app = App()

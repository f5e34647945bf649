"""A raw ASGI app with one route per wire behaviour the tests check."""

import asyncio
import json
import os
import sys
import time


async def read_body(receive):
    body = b""
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return None
        body += msg.get("body", b"")
        if not msg.get("more_body"):
            return body


async def respond(send, status=200, body=b"", headers=None):
    hdrs = [(b"content-type", b"text/plain")] + list(headers or [])
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": body})


def _jsonable(v):
    if isinstance(v, bytes):
        return v.decode("latin-1")
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    return v


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                scope["state"]["greeting"] = "hello from lifespan"
                if os.environ.get("WIRE_EAGER_TASKS"):  # 3.12+: apps start inside create_task()
                    asyncio.get_running_loop().set_task_factory(asyncio.eager_task_factory)
                if os.environ.get("WIRE_FAIL_STARTUP"):
                    await send({"type": "lifespan.startup.failed", "message": "startup refused by the test"})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                marker = os.environ.get("WIRE_SHUTDOWN_MARKER")
                if marker:
                    with open(marker, "w") as f:
                        f.write("shutdown ran")
                await send({"type": "lifespan.shutdown.complete"})
                return
    path = scope["path"]
    if path == "/":
        await respond(send, body=b"Hello, world!")
    elif path == "/echo":
        body = await read_body(receive)
        await respond(send, body=body or b"")
    elif path == "/echo-then-mark":  # echoes, then writes a file once its last send() returned
        body = await read_body(receive)
        await respond(send, body=body or b"")
        with open(scope["query_string"].decode(), "w") as f:
            f.write("send returned")
    elif path.startswith("/scope"):
        s = {k: v for k, v in scope.items() if k not in ("state",)}
        s["state"] = dict(scope["state"])
        # keys that are not the interned string: an app's literal finds them only by comparing characters
        slow = [k for d in (scope, scope["asgi"], scope["extensions"]) for k in d if sys.intern(k) is not k]
        await respond(send, body=json.dumps(_jsonable(s)).encode(),
                      headers=[(b"x-kind", b"scope"), (b"x-keys-not-interned", ",".join(slow).encode())])
    elif path == "/stream":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for part in (b"one,", b"two,", b"three"):
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    elif path == "/big":
        n = int(scope["query_string"] or b"1048576")
        await respond(send, body=b"x" * n)
    elif path == "/big-stream":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for _ in range(64):
            await send({"type": "http.response.body", "body": b"y" * 65536, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
    elif path == "/raise-before":
        raise ValueError("boom before the response")
    elif path == "/raise-after":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"100")]})
        await send({"type": "http.response.body", "body": b"partial", "more_body": True})
        raise ValueError("boom after the response started")
    elif path == "/no-response":
        return
    elif path == "/overlapping-sends":
        # two send() calls waiting to drain at once: both must return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await asyncio.gather(send({"type": "http.response.body", "body": b"a" * (1 << 20), "more_body": True}),
                             send({"type": "http.response.body", "body": b"b" * (1 << 20), "more_body": True}))
        await send({"type": "http.response.body", "body": b"end"})
    elif path in ("/conflicting-length", "/repeated-length"):
        second = b"7" if path == "/conflicting-length" else b"5"
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"5"), (b"content-length", second)]})
        await send({"type": "http.response.body", "body": b"hello"})
    elif path == "/cancelled-error":
        raise asyncio.CancelledError()
    elif path == "/cancel-own-task":
        asyncio.current_task().cancel()
        await asyncio.sleep(1)
    elif path == "/cancelled-after-start":
        await send({"type": "http.response.start", "status": 404, "headers": []})
        raise asyncio.CancelledError()
    elif path == "/incomplete":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"partial", "more_body": True})
    elif path == "/wrong-order":
        try:
            await send({"type": "http.response.body", "body": b"too early"})
        except RuntimeError as exc:
            await respond(send, status=409, body=str(exc).encode())
    elif path == "/twice":
        await respond(send, body=b"once")
        try:
            await send({"type": "http.response.body", "body": b"again"})
        except RuntimeError as exc:
            print("TWICE:", exc, flush=True)
    elif path == "/bad-header":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"x-evil", b"a\r\nset-cookie: x=1")]})
        await send({"type": "http.response.body", "body": b"should not be sent"})
    elif path == "/too-long":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"3")]})
        await send({"type": "http.response.body", "body": b"four"})
    elif path == "/status":
        code = int(scope["query_string"])
        await send({"type": "http.response.start", "status": code, "headers": []})
        await send({"type": "http.response.body", "body": b"" if code in (204, 304) else b"body"})
    elif path == "/block-pid":  # blocks the worker's loop, then says which worker it was
        time.sleep(float(scope["query_string"] or b"0.3"))
        await respond(send, body=str(os.getpid()).encode())
    elif path == "/slow":
        delay = float(scope["query_string"] or b"0.5")
        await asyncio.sleep(delay)
        await respond(send, body=b"slow done")
    elif path == "/slow-stream":  # a response begun, then a long wait
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"begun,", "more_body": True})
        await asyncio.sleep(float(scope["query_string"] or b"0.5"))
        await send({"type": "http.response.body", "body": b"done", "more_body": False})
    elif path == "/file":
        name = scope["query_string"].decode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(os.path.getsize(name)).encode())]})
        await send({"type": "http.response.pathsend", "path": name})
    elif path == "/no-read":
        await respond(send, body=b"not reading your body")
    elif path == "/no-read-then-receive":  # answers first, then asks for the body it skipped
        await respond(send, body=b"answered before reading")
        msg = await receive()
        with open(scope["query_string"].decode(), "w") as f:
            f.write(msg["type"])
    elif path == "/wait-disconnect":
        msg = await receive()
        while msg["type"] != "http.disconnect":
            msg = await receive()
        try:
            await respond(send, body=b"too late")
            outcome = "send accepted"
        except OSError as exc:  # ASGI 2.4: send() after a disconnect raises OSError
            outcome = type(exc).__name__
        with open(scope["query_string"].decode(), "w") as f:
            f.write("disconnected " + outcome)
    elif path == "/current-task":
        task = asyncio.current_task()
        await respond(send, body=f"{type(task).__name__} {task is not None and not task.done()}".encode())
    elif path == "/own-server":
        await respond(send, body=b"mine", headers=[(b"server", b"custom/1")])
    elif path == "/close":
        await respond(send, body=b"bye", headers=[(b"connection", b"close")])
    else:
        await respond(send, status=404, body=b"not found: " + scope["raw_path"])

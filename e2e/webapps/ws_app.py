"""Starlette WebSocket endpoints: echo, subprotocols, close codes, refusal,
and flow control both ways."""

import asyncio

from starlette.applications import Starlette
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect


LAST_DISCONNECT = {}


async def echo(ws: WebSocket):
    await ws.accept(subprotocol=ws.scope["subprotocols"][0] if ws.scope["subprotocols"] else None)
    try:
        while True:
            msg = await ws.receive()
            if msg["type"] == "websocket.disconnect":
                LAST_DISCONNECT.update(code=msg.get("code"), reason=msg.get("reason"))
                return
            if msg.get("text") is not None:
                if msg["text"] == "close-me":
                    await ws.close(code=4001, reason="asked to")
                    return
                await ws.send_text("echo:" + msg["text"])
            else:
                await ws.send_bytes(msg["bytes"][::-1])
    except WebSocketDisconnect:
        return


FLOOD = {"sent": 0, "state": "idle"}


async def flood(ws: WebSocket):
    """Sends messages (2000 of 64 KiB, or ?count=&size=) as fast as the
    server lets it, and says how far it got (/flood-count): a client that
    does not read must hold it back."""
    count = int(ws.query_params.get("count", 2000))
    size = int(ws.query_params.get("size", 65536))
    await ws.accept()
    FLOOD.update(sent=0, state="sending")
    try:
        for _ in range(count):
            await ws.send_bytes(b"f" * size)
            FLOOD["sent"] += 1
        FLOOD["state"] = "all sent"
    except WebSocketDisconnect:
        FLOOD["state"] = "disconnected"


async def flood_count(request):
    return JSONResponse(FLOOD)


HOLD = {"received": 0, "bytes": 0}
HOLD_RELEASE = asyncio.Event()


async def hold(ws: WebSocket):
    """Takes no message until /hold-release, then counts them all."""
    await ws.accept()
    HOLD.update(received=0, bytes=0)
    await HOLD_RELEASE.wait()
    try:
        while True:
            data = await ws.receive_bytes()
            HOLD["received"] += 1
            HOLD["bytes"] += len(data)
    except WebSocketDisconnect:
        pass


async def hold_release(request):
    HOLD_RELEASE.set()
    return JSONResponse(HOLD)


async def refuse(ws: WebSocket):
    await ws.close(code=1008)


async def silent(ws: WebSocket):
    return  # neither accepts nor closes


async def cancelled(ws: WebSocket):
    if ws.query_params.get("after") == "accept":
        await ws.accept()
    raise asyncio.CancelledError()  # of the app's own making


async def deny(ws: WebSocket):
    # the WebSocket Denial Response extension: an HTTP response of the app's
    await ws.send_denial_response(PlainTextResponse("no entry " * 3, status_code=401,
                                                    headers={"www-authenticate": "Bearer"}))


async def deny_injected(ws: WebSocket):
    await ws.send_denial_response(PlainTextResponse("x", headers={"x-evil": "a\r\nset-cookie: b"}))


async def deny_interim(ws: WebSocket):
    await ws.send_denial_response(PlainTextResponse("x", status_code=101))


async def info(ws: WebSocket):
    await ws.accept()
    await ws.send_json({"path": ws.scope["path"], "scheme": ws.scope["scheme"],
                        "query": ws.scope["query_string"].decode(), "type": ws.scope["type"]})
    await ws.close()


async def headers(ws: WebSocket):
    """Accepts (with the client's first subprotocol), sends the scope's
    headers, then echoes one message."""
    await ws.accept(subprotocol=ws.scope["subprotocols"][0] if ws.scope["subprotocols"] else None)
    await ws.send_json([[n.decode("latin-1"), v.decode("latin-1")] for n, v in ws.scope["headers"]])
    await ws.send_text(await ws.receive_text())
    await ws.close()


async def last_disconnect(request):
    return JSONResponse(LAST_DISCONNECT)


async def plain(request):
    return PlainTextResponse("http still works")


app = Starlette(routes=[
    WebSocketRoute("/ws", echo),
    WebSocketRoute("/refuse", refuse),
    WebSocketRoute("/silent", silent),
    WebSocketRoute("/cancelled", cancelled),
    WebSocketRoute("/deny", deny),
    WebSocketRoute("/deny-injected", deny_injected),
    WebSocketRoute("/deny-interim", deny_interim),
    WebSocketRoute("/flood", flood),
    Route("/flood-count", flood_count),
    WebSocketRoute("/hold", hold),
    Route("/hold-release", hold_release),
    WebSocketRoute("/info", info),
    WebSocketRoute("/headers", headers),
    Route("/last-disconnect", last_disconnect),
    Route("/", plain),
])

"""Starlette WebSocket endpoints: echo, subprotocols, close codes, refusal."""

from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect


async def echo(ws: WebSocket):
    await ws.accept(subprotocol=ws.scope["subprotocols"][0] if ws.scope["subprotocols"] else None)
    try:
        while True:
            msg = await ws.receive()
            if msg["type"] == "websocket.disconnect":
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


async def refuse(ws: WebSocket):
    await ws.close(code=1008)


async def info(ws: WebSocket):
    await ws.accept()
    await ws.send_json({"path": ws.scope["path"], "scheme": ws.scope["scheme"],
                        "query": ws.scope["query_string"].decode(), "type": ws.scope["type"]})
    await ws.close()


async def plain(request):
    return PlainTextResponse("http still works")


app = Starlette(routes=[
    WebSocketRoute("/ws", echo),
    WebSocketRoute("/refuse", refuse),
    WebSocketRoute("/info", info),
    Route("/", plain),
])

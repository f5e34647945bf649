"""A Starlette app: routing, JSON, form bodies, streaming, websockets-free."""

import contextlib

from starlette.applications import Starlette
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Mount, Route


async def home(request):
    return PlainTextResponse("starlette home")


async def user(request):
    return JSONResponse({"user": request.path_params["name"], "page": request.query_params.get("page")})


async def echo(request):
    body = await request.body()
    return PlainTextResponse(body, headers={"x-length": str(len(body))})


async def form(request):
    data = await request.form()
    return JSONResponse(dict(data))


async def stream(request):
    chunks = [chunk async for chunk in request.stream()]

    async def gen():
        for chunk in chunks:
            yield chunk.upper()

    return StreamingResponse(gen())


@contextlib.asynccontextmanager
async def lifespan(app):
    yield {"counter": 42}


app = Starlette(routes=[
    Route("/", home),
    Route("/users/{name}", user),
    Route("/echo", echo, methods=["POST"]),
    Route("/form", form, methods=["POST"]),
    Route("/upper", stream, methods=["POST"]),
    Route("/counter", lambda r: JSONResponse({"counter": r.state.counter})),
    Mount("/sub", routes=[Route("/leaf", lambda r: PlainTextResponse(r.url.path))]),
], lifespan=lifespan)

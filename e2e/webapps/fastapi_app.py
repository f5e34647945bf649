"""A FastAPI app exercising what real APIs use."""

import asyncio
import contextlib
import os
import tempfile

from fastapi import BackgroundTasks, FastAPI, Request
from fastapi.responses import FileResponse, StreamingResponse
from pydantic import BaseModel

EVENTS = []
FILE = None  # per worker process: set by lifespan (workers fork after the import)


@contextlib.asynccontextmanager
async def lifespan(app):
    global FILE
    FILE = os.path.join(tempfile.gettempdir(), f"uringserve-e2e-{os.getpid()}.bin")
    with open(FILE, "wb") as f:
        f.write(bytes(range(256)) * 4096)
    yield {"db": "connected", "started": True}
    os.unlink(FILE)
    marker = os.environ.get("E2E_SHUTDOWN_MARKER")
    if marker:
        with open(marker, "w") as f:
            f.write("lifespan shutdown")


app = FastAPI(lifespan=lifespan)


class Item(BaseModel):
    name: str
    price: float
    tags: list[str] = []


@app.get("/")
async def root():
    return {"message": "Hello World"}


@app.get("/items/{item_id}")
async def read_item(item_id: int, q: str | None = None, limit: int = 10):
    return {"item_id": item_id, "q": q, "limit": limit}


@app.post("/items")
async def create_item(item: Item):
    return {"created": item.model_dump(), "total": item.price * 2}


@app.get("/state")
async def state(request: Request):
    return {"db": request.state.db, "started": request.state.started}


@app.get("/stream")
async def stream():
    async def gen():
        for i in range(5):
            yield f"chunk {i}\n".encode()
            await asyncio.sleep(0.01)

    return StreamingResponse(gen(), media_type="text/plain")


def record(event):
    EVENTS.append(event)


@app.post("/background")
async def background(tasks: BackgroundTasks):
    tasks.add_task(record, "ran after the response")
    return {"scheduled": True}


@app.get("/events")
async def events():
    return {"events": EVENTS}


@app.get("/file")
async def file():
    return FileResponse(FILE, media_type="application/octet-stream")


@app.get("/slow")
async def slow(seconds: float = 1.0):
    await asyncio.sleep(seconds)
    return {"slept": seconds}


@app.get("/watch-disconnect")
async def watch_disconnect(request: Request):
    for _ in range(200):
        if await request.is_disconnected():
            EVENTS.append("client disconnected")
            return {"disconnected": True}
        await asyncio.sleep(0.02)
    return {"disconnected": False}


@app.get("/headers")
async def headers(request: Request):
    return {"client": request.client.host if request.client else None, "scheme": request.url.scheme,
            "user_agent": request.headers.get("user-agent"), "url": str(request.url)}


@app.get("/error")
async def error():
    raise RuntimeError("the handler failed")

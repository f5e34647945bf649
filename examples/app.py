"""The bundled example for `uringserve`: a small FastAPI app.

    uringserve app:app --app-dir examples        (scripts/run-example.sh)
    curl http://127.0.0.1:8000/  ·  curl 'http://127.0.0.1:8000/items/3?q=x'
    curl -X POST http://127.0.0.1:8000/items -H 'content-type: application/json' -d '{"name": "pen", "price": 2}'
"""

import contextlib

from fastapi import FastAPI
from pydantic import BaseModel


@contextlib.asynccontextmanager
async def lifespan(app):
    yield {"visits": {"count": 0}}


app = FastAPI(title="uringserve example", lifespan=lifespan)


class Item(BaseModel):
    name: str
    price: float


@app.get("/")
async def root():
    return {"hello": "from uringserve"}


@app.get("/items/{item_id}")
async def read_item(item_id: int, q: str | None = None):
    return {"item_id": item_id, "q": q}


@app.post("/items")
async def create_item(item: Item):
    return {"created": item.model_dump()}

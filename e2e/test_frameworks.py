"""Real frameworks served by `uringserve`, driven by httpx over real sockets."""

import asyncio
import os
import sys
import signal
import time

import httpx
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from http_support import serve  # noqa: E402

E2E = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def fastapi_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fastapi")
    with serve("webapps.fastapi_app:app", "--app-dir", E2E, tmp_path=str(tmp)) as srv:
        yield srv
        assert srv.stop() == 0, srv.log


def base(srv):
    return f"http://127.0.0.1:{srv.port}"


def test_fastapi_routing_params_and_json(fastapi_server):
    with httpx.Client(base_url=base(fastapi_server)) as c:
        assert c.get("/").json() == {"message": "Hello World"}
        assert c.get("/items/42", params={"q": "café", "limit": 3}).json() == {"item_id": 42, "q": "café",
                                                                               "limit": 3}
        r = c.post("/items", json={"name": "pen", "price": 1.5, "tags": ["a"]})
        assert r.status_code == 200
        assert r.json() == {"created": {"name": "pen", "price": 1.5, "tags": ["a"]}, "total": 3.0}
        assert c.get("/state").json() == {"db": "connected", "started": True}
        assert c.get("/nope").status_code == 404


def test_fastapi_validation_422(fastapi_server):
    with httpx.Client(base_url=base(fastapi_server)) as c:
        r = c.get("/items/not-a-number")
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["path", "item_id"]
        r = c.post("/items", json={"name": "pen"})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "price"]
        r = c.post("/items", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 422


def test_fastapi_streaming_and_file(fastapi_server):
    with httpx.Client(base_url=base(fastapi_server)) as c:
        with c.stream("GET", "/stream") as r:
            assert r.headers["transfer-encoding"] == "chunked"
            assert b"".join(r.iter_bytes()) == b"".join(f"chunk {i}\n".encode() for i in range(5))
        r = c.get("/file")
        assert r.status_code == 200 and r.content == bytes(range(256)) * 4096
        assert r.headers["content-length"] == str(256 * 4096)
        r = c.head("/file")
        assert r.status_code == 200 and r.content == b"" or r.status_code == 405


def test_fastapi_background_task(fastapi_server):
    with httpx.Client(base_url=base(fastapi_server)) as c:
        assert c.post("/background").json() == {"scheduled": True}
        deadline = time.monotonic() + 5
        while "ran after the response" not in c.get("/events").json()["events"]:
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_fastapi_is_disconnected(fastapi_server):
    async def go():
        async with httpx.AsyncClient(base_url=base(fastapi_server), timeout=0.3) as c:
            with pytest.raises(httpx.ReadTimeout):
                await c.get("/watch-disconnect")
    asyncio.run(go())
    with httpx.Client(base_url=base(fastapi_server)) as c:
        deadline = time.monotonic() + 5
        while "client disconnected" not in c.get("/events").json()["events"]:
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_fastapi_handler_error_is_500_and_logged(fastapi_server):
    with httpx.Client(base_url=base(fastapi_server)) as c:
        r = c.get("/error")
        assert r.status_code == 500
        assert c.get("/").status_code == 200
    time.sleep(0.1)
    assert "RuntimeError: the handler failed" in fastapi_server.log


def test_fastapi_concurrent_clients(fastapi_server):
    async def go():
        limits = httpx.Limits(max_connections=50)
        # httpx's pool hands connections to its 500 waiters slowly (4-5 s for
        # the lot on a busy 2-core machine, the server then idle): its
        # default 5 s pool timeout is a client limit, not what is tested
        timeout = httpx.Timeout(5.0, pool=60.0)
        async with httpx.AsyncClient(base_url=base(fastapi_server), limits=limits, timeout=timeout) as c:
            rs = await asyncio.gather(*[c.get(f"/items/{i}") for i in range(500)])
        assert [r.json()["item_id"] for r in rs] == list(range(500))
    asyncio.run(go())


def test_starlette(tmp_path):
    with serve("webapps.starlette_app:app", "--app-dir", E2E, tmp_path=str(tmp_path)) as srv:
        with httpx.Client(base_url=base(srv)) as c:
            assert c.get("/").text == "starlette home"
            assert c.get("/users/ana", params={"page": 2}).json() == {"user": "ana", "page": "2"}
            big = os.urandom(2 * 1024 * 1024)
            r = c.post("/echo", content=big)
            assert r.content == big and r.headers["x-length"] == str(len(big))
            assert c.post("/form", data={"a": "1", "b": "two"}).json() == {"a": "1", "b": "two"}

            def chunks():
                yield b"abc"
                yield b"def"
            assert c.post("/upper", content=chunks()).content == b"ABCDEF"
            assert c.get("/counter").json() == {"counter": 42}
            assert c.get("/sub/leaf").text == "/sub/leaf"
        assert srv.stop() == 0


def test_starlette_root_path(tmp_path):
    with serve("webapps.starlette_app:app", "--app-dir", E2E, "--root-path", "/prefix", tmp_path=str(tmp_path)) as srv:
        with httpx.Client(base_url=base(srv)) as c:
            assert c.get("/users/bo").json()["user"] == "bo"
            assert c.get("/sub/leaf").text == "/prefix/sub/leaf"
        assert srv.stop() == 0


def test_django(tmp_path):
    with serve("webapps.django_app:application", "--app-dir", E2E, tmp_path=str(tmp_path)) as srv:
        with httpx.Client(base_url=base(srv)) as c:
            assert c.get("/").text == "django async view"
            assert c.get("/n/21/", params={"q": "x"}).json() == {"number": 21, "double": 42, "q": "x"}
            r = c.post("/post/", json={"k": [1, 2]})
            assert r.json() == {"received": {"k": [1, 2]}, "path": "/post/"}
            assert c.get("/missing/").status_code == 404
        assert srv.stop() == 0


def test_quart(tmp_path):
    with serve("webapps.quart_app:app", "--app-dir", E2E, tmp_path=str(tmp_path)) as srv:
        with httpx.Client(base_url=base(srv)) as c:
            assert c.get("/").text == "quart index"
            assert c.post("/json", json={"x": 1}).json() == {"got": {"x": 1}, "method": "POST"}
            assert c.get("/stream").text == "part0;part1;part2;"
            assert c.get("/args", params=[("a", "1"), ("b", "2"), ("b", "3")]).json() == {"a": "1", "b": ["2", "3"]}
        assert srv.stop() == 0


def test_graceful_shutdown_with_request_in_flight(tmp_path):
    marker = tmp_path / "marker"
    with serve("webapps.fastapi_app:app", "--app-dir", E2E, tmp_path=str(tmp_path),
               env={"E2E_SHUTDOWN_MARKER": str(marker)}) as srv:
        async def go():
            async with httpx.AsyncClient(base_url=base(srv), timeout=10) as c:
                pending = asyncio.ensure_future(c.get("/slow", params={"seconds": 1}))
                await asyncio.sleep(0.3)
                srv.proc.send_signal(signal.SIGTERM)
                r = await pending
                assert r.status_code == 200 and r.json() == {"slept": 1.0}
        asyncio.run(go())
        assert srv.proc.wait(10) == 0
    assert marker.read_text() == "lifespan shutdown"
    assert "Waiting for connections to close" in srv.log


def test_bundled_example_app(tmp_path):
    """What scripts/run-example.sh starts."""
    examples = os.path.join(os.path.dirname(E2E), "examples")
    with serve("app:app", "--app-dir", examples, tmp_path=str(tmp_path)) as srv:
        with httpx.Client(base_url=base(srv)) as c:
            assert c.get("/").json() == {"hello": "from uringserve"}
            assert c.get("/items/3", params={"q": "x"}).json() == {"item_id": 3, "q": "x"}
            assert c.post("/items", json={"name": "pen", "price": 2}).json() == {
                "created": {"name": "pen", "price": 2.0}}
        assert srv.stop(signal.SIGINT) == 0

"""A real asyncio program on uringloop: an aiohttp server app and an aiohttp
client talking to each other (keep-alive, streaming bodies, websockets),
all on one uringloop loop, over plain TCP and over TLS."""

import asyncio
import os
import ssl
import sys

import aiohttp
import pytest
from aiohttp import web

import uringloop


def make_app():
    app = web.Application(client_max_size=16 * 1024 * 1024)

    async def hello(request):
        return web.json_response({"hello": request.query.get("name", "world")})

    async def echo(request):
        body = await request.read()
        return web.Response(body=body, content_type="application/octet-stream")

    async def stream(request):
        resp = web.StreamResponse()
        await resp.prepare(request)
        for i in range(100):
            await resp.write(b"chunk %03d\n" % i)
        await resp.write_eof()
        return resp

    async def ws(request):
        sock = web.WebSocketResponse()
        await sock.prepare(request)
        async for msg in sock:
            if msg.type == aiohttp.WSMsgType.TEXT:
                await sock.send_str(msg.data[::-1])
        return sock

    app.router.add_get("/hello", hello)
    app.router.add_post("/echo", echo)
    app.router.add_get("/stream", stream)
    async def transport(request):
        # over TLS on 3.11, the server side runs uringloop's C record path
        return web.json_response({"c_tls": isinstance(request.transport, uringloop._core.SSLAppTransportCore)})

    app.router.add_get("/ws", ws)
    app.router.add_get("/transport", transport)
    return app


CERT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "certs", "localhost.pem")


def tls_contexts():
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(CERT)
    return server, ssl.create_default_context(cafile=CERT)


async def exercise(tls):
    loop = asyncio.get_running_loop()
    assert isinstance(loop, uringloop.Loop)
    server_ctx, client_ctx = tls_contexts() if tls else (None, None)
    runner = web.AppRunner(make_app())
    await runner.setup()
    site = web.TCPSite(runner, "localhost" if tls else "127.0.0.1", 0, ssl_context=server_ctx)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    base = f"https://localhost:{port}" if tls else f"http://127.0.0.1:{port}"  # the certificate names localhost
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_ctx) if tls else None) as session:
            async with session.get(f"{base}/transport") as r:
                assert (await r.json())["c_tls"] == (tls and (3, 11) <= sys.version_info[:2] <= (3, 13))

            async def get_hello(i):
                async with session.get(f"{base}/hello", params={"name": str(i)}) as r:
                    assert r.status == 200
                    return (await r.json())["hello"]

            names = await asyncio.gather(*(get_hello(i) for i in range(200)))
            assert names == [str(i) for i in range(200)]

            payload = os.urandom(5 * 1024 * 1024)
            async with session.post(f"{base}/echo", data=payload) as r:
                assert await r.read() == payload

            async with session.get(f"{base}/stream") as r:
                lines = [line async for line in r.content]
                assert lines == [b"chunk %03d\n" % i for i in range(100)]

            async with session.ws_connect(f"{base}/ws") as sock:
                for word in ("uring", "loop"):
                    await sock.send_str(word)
                    assert (await sock.receive()).data == word[::-1]
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
def test_aiohttp_server_and_client_on_uringloop(tls):
    uringloop.run(asyncio.wait_for(exercise(tls), 60))

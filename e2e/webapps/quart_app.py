"""A Quart app: routes, JSON in and out, a streamed response."""

from quart import Quart, request

app = Quart(__name__)


@app.route("/")
async def index():
    return "quart index"


@app.route("/json", methods=["POST"])
async def echo_json():
    data = await request.get_json()
    return {"got": data, "method": request.method}


@app.route("/stream")
async def stream():
    async def gen():
        for i in range(3):
            yield f"part{i};".encode()

    return gen(), 200, {"content-type": "text/plain"}


@app.route("/args")
async def args():
    return {"a": request.args.get("a"), "b": request.args.getlist("b")}

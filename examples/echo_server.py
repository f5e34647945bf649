"""A TCP echo server on uringloop: every socket operation is an io_uring op.

    python examples/echo_server.py --port 8000
    printf 'hello\\n' | nc -q1 127.0.0.1 8000

Ctrl-C or SIGTERM stops accepting, lets open connections finish for up to
--grace seconds, then exits 0.
"""

import argparse
import asyncio
import signal
import socket

import uringloop


async def serve_client(loop, conn):
    with conn:
        while data := await loop.sock_recv(conn, 65536):
            await loop.sock_sendall(conn, data)


async def main(host, port, grace):
    loop = asyncio.get_running_loop()
    listener = socket.create_server((host, port), reuse_port=False, backlog=1024)
    listener.setblocking(False)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"uringloop echo server on {host}:{port} "
          f"(ring mode: {loop._uring_info()['mode']}); Ctrl-C to stop", flush=True)

    clients = set()

    async def accept_forever():
        while True:
            conn, _ = await loop.sock_accept(listener)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = asyncio.create_task(serve_client(loop, conn))
            clients.add(task)
            task.add_done_callback(clients.discard)

    acceptor = asyncio.create_task(accept_forever())
    await stop.wait()
    print("shutting down", flush=True)
    acceptor.cancel()
    listener.close()
    if clients:
        _, pending = await asyncio.wait(clients, timeout=grace)
        for task in pending:
            task.cancel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--grace", type=float, default=5.0)
    args = parser.parse_args()
    uringloop.run(main(args.host, args.port, args.grace))

"""The bundled example served as users run it: a separate process, many
concurrent clients over real sockets, stopped with SIGTERM and Ctrl-C."""

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "echo_server.py")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server():
    port = free_port()
    proc = subprocess.Popen([sys.executable, EXAMPLE, "--port", str(port), "--grace", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert "echo server" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
    yield proc, port
    if proc.poll() is None:
        proc.kill()
        proc.wait()


async def client(port, n_messages, size):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    payload = os.urandom(size)
    for _ in range(n_messages):
        writer.write(payload)
        assert await reader.readexactly(size) == payload
    writer.close()
    await writer.wait_closed()


def test_many_concurrent_clients_then_sigterm(server):
    proc, port = server

    async def main():
        await asyncio.gather(*(client(port, 20, 1 + i * 37) for i in range(200)))

    asyncio.run(asyncio.wait_for(main(), 60))
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert "shutting down" in out


def test_ctrl_c_with_a_client_connected(server):
    proc, port = server
    conn = socket.create_connection(("127.0.0.1", port))
    conn.sendall(b"ping")
    assert conn.recv(10) == b"ping"
    proc.send_signal(signal.SIGINT)
    t0 = time.monotonic()
    out, err = proc.communicate(timeout=10)
    # the open connection is given the grace period, then cancelled
    assert proc.returncode == 0, err
    assert time.monotonic() - t0 < 5
    conn.close()


def test_large_payloads(server):
    proc, port = server

    async def main():
        await asyncio.gather(*(client(port, 3, 512 * 1024) for _ in range(8)))

    asyncio.run(asyncio.wait_for(main(), 60))

"""Memory per idle connection, side by side in one run: the server's
resident memory (VmRSS of its whole process tree) with N open connections
that have each been used once, less its memory before they came.

- loops: bench/loop_bench.py's echo server (Protocol, or streams) on each
  event loop; every connection echoes one message, then sits idle;
- HTTP servers: bench/apps/raw.py's hello on each server (keep-alive
  timeout raised so nothing closes); every connection makes one request,
  then sits idle;
- WebSocket servers: bench/apps/raw.py's echo; every connection opens a
  WebSocket with a browser's handshake (its cookies and user agent too;
  with --ws-deflate also once more offering permessage-deflate, as browsers
  do) and echoes one 64-byte message, then sits idle.

Afterwards every connection is used once more, all at once, and each answer
is checked: a server that dropped or garbled any connection is reported.

    .venv/bin/python bench/idle_bench.py --ws-deflate          # 10,000 connections
    .venv/bin/python bench/idle_bench.py --conns 2000 --loops uvloop,uringloop --servers uringserve --ws-servers ""
"""

import argparse
import asyncio
import base64
import functools
import json
import os
import resource
import socket
import struct
import subprocess
import sys
import time
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import http_bench  # noqa: E402
import loop_bench  # noqa: E402
import ws_bench  # noqa: E402

REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
MESSAGE = b"m" * 1024
WS_MESSAGE = b"w" * 64
WS_KEY = base64.b64encode(b"idle-bench-key!!").decode()
# a browser's upgrade request (what Firefox sends, less the extension offer,
# which --ws-deflate adds)
WS_UPGRADE = (
    "GET /ws HTTP/1.1\r\nHost: bench.example\r\nConnection: keep-alive, Upgrade\r\nPragma: no-cache\r\n"
    "Cache-Control: no-cache\r\nUser-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 "
    "Firefox/128.0\r\nUpgrade: websocket\r\nOrigin: https://bench.example\r\nSec-WebSocket-Version: 13\r\n"
    "Accept-Encoding: gzip, deflate, br, zstd\r\nAccept-Language: en-GB,en;q=0.7,fr;q=0.3\r\n"
    "Cookie: session=3f1c2a9b7e4d4c0f8a6b5e2d1c0b9a87; theme=dark; consent=1\r\n"
    f"Sec-WebSocket-Key: {WS_KEY}\r\n{{extensions}}\r\n")
BATCH = 500  # connections used at once while they are opened


def tree_rss_kib(pid):
    total = 0
    for p in http_bench.tree_pids(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


async def echo_once(loop, sock):
    await loop.sock_sendall(sock, MESSAGE)
    got = b""
    while len(got) < len(MESSAGE):
        data = await loop.sock_recv(sock, len(MESSAGE) - len(got))
        if not data:
            return False
        got += data
    return got == MESSAGE


async def request_once(loop, sock):
    """One hello request; True when a whole 200 response came back."""
    await loop.sock_sendall(sock, REQUEST)
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = await loop.sock_recv(sock, 4096)
        if not data:
            return False
        buf += data
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    length = [int(v) for k, _, v in (ln.partition(b":") for ln in lines[1:]) if k.strip().lower() == b"content-length"]
    while (len(body) < length[0]) if length else not body.endswith(b"0\r\n\r\n"):
        data = await loop.sock_recv(sock, 4096)
        if not data:
            return False
        body += data
    return lines[0].startswith(b"HTTP/1.1 200")


async def recv_exactly(loop, sock, n):
    got = b""
    while len(got) < n:
        data = await loop.sock_recv(sock, n - len(got))
        if not data:
            raise ConnectionError("closed")
        got += data
    return got


async def ws_once(loop, sock, opened, deflate=False):
    """Opens the WebSocket on first use (`opened`: each open socket's
    inflater), offering permessage-deflate if `deflate`; echoes one binary
    message, sent uncompressed, whose echo may come back compressed."""
    if sock.fileno() not in opened:
        offer = "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n" if deflate else ""
        await loop.sock_sendall(sock, WS_UPGRADE.format(extensions=offer).encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += await recv_exactly(loop, sock, 1)
        if not head.startswith(b"HTTP/1.1 101"):
            return False
        opened[sock.fileno()] = zlib.decompressobj(-15)
    mask = b"\x01\x02\x03\x04"
    payload = bytes(b ^ mask[i % 4] for i, b in enumerate(WS_MESSAGE))
    await loop.sock_sendall(sock, struct.pack("!BB", 0x82, 0x80 | len(WS_MESSAGE)) + mask + payload)
    try:
        first, length = await recv_exactly(loop, sock, 2)
        if length & 0x7F == 126:
            length = struct.unpack("!H", await recv_exactly(loop, sock, 2))[0]
        data = await recv_exactly(loop, sock, length & 0x7F)
        if first & 0x40:  # RSV1: compressed with permessage-deflate
            data = opened[sock.fileno()].decompress(data + b"\x00\x00\xff\xff")
        return first & 0xBF == 0x82 and data == WS_MESSAGE
    except ConnectionError:
        return False


async def drive(port, pid, conns, use_once):
    """Opens `conns` connections, uses each once, measures, uses all again."""
    loop = asyncio.get_running_loop()
    before = tree_rss_kib(pid)
    socks, first_ok = [], 0
    try:
        for start in range(0, conns, BATCH):
            batch = []
            for _ in range(min(BATCH, conns - start)):
                s = socket.socket()
                s.setblocking(False)
                socks.append(s)
                batch.append(s)
                await asyncio.wait_for(loop.sock_connect(s, ("127.0.0.1", port)), 10)
            first_ok += sum(await asyncio.wait_for(asyncio.gather(*(use_once(loop, s) for s in batch)), 30))
        await asyncio.sleep(1.0)  # let the server settle (freed objects, trimmed buffers)
        idle = tree_rss_kib(pid)
        results = await asyncio.wait_for(
            asyncio.gather(*(use_once(loop, s) for s in socks), return_exceptions=True), 60)
        again_ok = sum(r is True for r in results)
        return {"conns": conns, "rss_before_kib": before, "rss_idle_kib": idle,
                "kib_per_conn": round((idle - before) / conns, 2),
                "answered_first": first_ok, "answered_again": again_ok}
    finally:
        for s in socks:
            s.close()


def measure_loop(name, kind, conns):
    with loop_bench.echo_server(name, kind) as (server, port):
        time.sleep(0.3)
        return asyncio.run(drive(port, server.pid, conns, echo_once))


def server_cmd(name, port, conns, websocket=False):
    cmd = ws_bench.server_cmd(name, port) if websocket else http_bench.server_cmd(name, "apps.raw:app", port)
    backlog = str(max(2048, conns))
    if name == "uringserve" or name.startswith("uvicorn"):
        cmd += ["--timeout-keep-alive", "600", "--backlog", backlog]
    elif name == "granian":
        cmd += ["--backlog", backlog, "--backpressure", backlog]
    return cmd


def measure_server(name, conns, websocket=False, deflate=False):
    port = http_bench.free_port()
    proc = subprocess.Popen(server_cmd(name, port, conns, websocket), cwd=HERE)
    try:
        http_bench.wait_port(port, proc)
        time.sleep(0.5)
        use_once = functools.partial(ws_once, opened={}, deflate=deflate) if websocket else request_once
        return asyncio.run(drive(port, proc.pid, conns, use_once))
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conns", type=int, default=10000)
    ap.add_argument("--loops", default="asyncio,uvloop,uringloop")
    ap.add_argument("--kinds", default="protocol,streams")
    ap.add_argument("--servers", default="uringserve,uvicorn-httptools,granian")
    ap.add_argument("--ws-servers",
                    default="uringserve,uvicorn-websockets-sansio,uvicorn-websockets,uvicorn-wsproto,granian")
    ap.add_argument("--ws-deflate", action="store_true",
                    help="WebSocket clients also offer permessage-deflate (as browsers do): extra rows")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "idle.json"))
    args = ap.parse_args()
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if args.conns + 100 > soft:
        sys.exit(f"--conns {args.conns} needs more open files than `ulimit -n` ({soft}) allows")
    rows = []
    for kind in filter(None, args.kinds.split(",")):
        for name in filter(None, args.loops.split(",")):
            rows.append({"what": f"{kind} echo", "on": name, **measure_loop(name, kind, args.conns)})
            print(rows[-1], flush=True)
    for name in filter(None, args.servers.split(",")):
        rows.append({"what": "HTTP keep-alive", "on": name, **measure_server(name, args.conns)})
        print(rows[-1], flush=True)
    for deflate in (False, True) if args.ws_deflate else (False,):
        for name in filter(None, args.ws_servers.split(",")):
            what = "WebSocket, deflate offered" if deflate else "WebSocket"
            rows.append({"what": what, "on": name, **measure_server(name, args.conns, True, deflate)})
            print(rows[-1], flush=True)
    print(f"\n{args.conns} idle connections, each used once (server RSS, whole process tree)\n")
    print("| connections | on | KiB per connection | RSS before → idle (MiB) | answered again |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['what']} | {r['on']} | {r['kib_per_conn']:.2f} | {r['rss_before_kib'] / 1024:.1f} → "
              f"{r['rss_idle_kib'] / 1024:.1f} | {r['answered_again']:,} of {r['conns']:,} |")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"when": time.strftime("%Y-%m-%d %H:%M:%S"), "python": sys.version.split()[0],
                   "kernel": os.uname().release, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()

"""TLS echo: the server's CPU per round trip over TLS, asyncio, uvloop and
uringloop side by side in one run.

The server (a Protocol or an asyncio streams echo with ``ssl=``) is pinned to
core 0; the client, pinned to core 1, is a uvloop program with N connections,
each writing a message and reading the echo back (closed loop). The client
saturates first on these machines, so the figure to compare is the server's
CPU time per round trip (utime+stime from /proc, counted after every
handshake and before the first close). Rounds interleave the loops; the run
with the median CPU per round trip is shown.

    .venv/bin/python bench/tls_bench.py                      # 1 KiB and 16 KiB x 10 connections
    .venv/bin/python bench/tls_bench.py --sizes 1,64 --conns 10,100 --rounds 5
    .venv/bin/python bench/tls_bench.py --fixed-malloc      # glibc thresholds set alike for every loop
"""

import argparse
import asyncio
import json
import os
import ssl
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CERT = os.path.join(ROOT, "tests", "certs", "localhost.pem")
LOOPS = ("asyncio", "uvloop", "uringloop")
SERVER_CORE, CLIENT_CORE = "0", "1"

sys.path.insert(0, HERE)
from loop_bench import cpu_times, free_port, median_run, new_loop, per_round_trip, pinned  # noqa: E402


# ---- the two halves, each run as a pinned child process ----

def serve(loop_name, kind, port):
    loop = new_loop(loop_name)
    asyncio.set_event_loop(loop)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(CERT)

    class Echo(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport = transport

        def data_received(self, data):
            self.transport.write(data)

    async def stream_echo(reader, writer):
        while data := await reader.read(65536):
            writer.write(data)
        writer.close()

    if kind == "protocol":
        loop.run_until_complete(loop.create_server(Echo, "127.0.0.1", port, ssl=ctx))
    else:
        loop.run_until_complete(asyncio.start_server(stream_echo, "127.0.0.1", port, ssl=ctx))
    print("ready", flush=True)
    loop.run_forever()


def client(port, conns, size, seconds):
    """Connects every client, says 'connected', runs, prints the round trips
    as JSON, then closes the connections when stdin gives a line."""
    import uvloop
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE

    async def main():
        pairs = await asyncio.gather(*(asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost")
                                       for _ in range(conns)))
        print("connected", flush=True)
        msg = b"x" * size
        stop = time.monotonic() + seconds
        counts = []

        async def run(reader, writer):
            n = 0
            while time.monotonic() < stop:
                writer.write(msg)
                await reader.readexactly(size)
                n += 1
            counts.append(n)

        t0 = time.monotonic()
        await asyncio.gather(*(run(r, w) for r, w in pairs))
        print(json.dumps({"round_trips": sum(counts), "seconds": time.monotonic() - t0}), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        for _, writer in pairs:
            writer.close()

    uvloop.run(main())


# ---- driver ----

# glibc thresholds fixed for every server (--fixed-malloc): with the
# defaults, a loop that allocates a 256 KiB buffer per read (uvloop's SSL
# protocol does) maps and unmaps it each time or not, depending on the
# process's history; uringloop raises the thresholds itself at import.
FIXED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(4 << 20), "MALLOC_TRIM_THRESHOLD_": str(8 << 20)}


def run_cell(loop_name, kind, conns, size, seconds, fixed_malloc=False):
    port = free_port()
    env = dict(os.environ, **FIXED_MALLOC) if fixed_malloc else None
    server = pinned(SERVER_CORE, [sys.executable, __file__, "--serve", loop_name, "--kind", kind, "--port", str(port)],
                    stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert server.stdout.readline().strip() == "ready"
        cli = pinned(CLIENT_CORE, [sys.executable, __file__, "--client", "--port", str(port), "--conns", str(conns),
                                   "--size", str(size), "--seconds", str(seconds)],
                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert cli.stdout.readline().strip() == "connected"
        before = cpu_times(server.pid)
        r = json.loads(cli.stdout.readline())
        after = cpu_times(server.pid)
        cli.communicate("\n", timeout=30)
    finally:
        server.kill()
        server.wait()
    return per_round_trip(r, before, after)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--serve", choices=LOOPS)
    p.add_argument("--client", action="store_true")
    p.add_argument("--kind", default="protocol")
    p.add_argument("--port", type=int)
    p.add_argument("--kinds", default="protocol,streams")
    p.add_argument("--sizes", default="1,16", help="message sizes in KiB")
    p.add_argument("--conns", default="10")
    p.add_argument("--size", type=int)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--loops", default=",".join(LOOPS))
    p.add_argument("--fixed-malloc", action="store_true", help="the same glibc malloc thresholds for every server")
    p.add_argument("--out", default=os.path.join(HERE, "results", "tls_echo.json"))
    a = p.parse_args()
    if a.serve:
        return serve(a.serve, a.kind, a.port)
    if a.client:
        return client(a.port, int(a.conns), a.size, a.seconds)
    loops = a.loops.split(",")
    results = []
    for kind in a.kinds.split(","):
        for kib in (int(x) for x in a.sizes.split(",")):
            for conns in (int(x) for x in a.conns.split(",")):
                runs = {name: [] for name in loops}
                for _ in range(a.rounds):
                    for name in loops:
                        runs[name].append(run_cell(name, kind, conns, kib * 1024, a.seconds, a.fixed_malloc))
                cell = {"kind": kind, "kib": kib, "conns": conns,
                        "loops": {name: median_run(r) for name, r in runs.items()}}
                results.append(cell)
                print(f"{kind:9} {kib:3} KiB x {conns:3}: " + "  ".join(
                    f"{name} {cell['loops'][name]['rt_per_s']:7.0f} rt/s {cell['loops'][name]['cpu_us_per_rt']:6.2f} us"
                    for name in loops), flush=True)
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(results, f, indent=1)
    head = " | ".join(f"{name} rt/s, CPU µs/rt" for name in loops)
    print(f"\n| server | msg | conns | {head} | uringloop/uvloop CPU |")
    print("|---|---|---|" + "---|" * len(loops) + "---|")
    for c in results:
        figs = " | ".join(f"{c['loops'][n]['rt_per_s']:.0f}, {c['loops'][n]['cpu_us_per_rt']:.2f}" for n in loops)
        ratio = ""
        if "uvloop" in loops and "uringloop" in loops:
            ratio = f"{c['loops']['uringloop']['cpu_us_per_rt'] / c['loops']['uvloop']['cpu_us_per_rt']:.2f}x"
        print(f"| {c['kind']} | {c['kib']} KiB | {c['conns']} | {figs} | {ratio} |")


if __name__ == "__main__":
    main()

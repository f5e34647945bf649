"""WebSocket echo benchmark: uringserve against uvicorn (its websockets,
websockets-sansio and wsproto implementations, on uvloop with httptools),
granian and hypercorn, one run, the same raw ASGI echo app
(bench/apps/raw.py).

Each server runs pinned to core 0, the C client (bench/echo_client.c in its
WebSocket mode: binary frames, no compression offered) pinned to core 1,
closed loop. Reported per cell: round trips/s, server CPU µs per round trip
(utime+stime of the server's process tree) and p99 µs. With --rounds N the
servers are interleaved N times and the run with the median CPU per round
trip is shown. With --deflate the client offers permessage-deflate and
sends JSON-like text uncompressed; servers that accept compress every echo.

    .venv/bin/python bench/ws_bench.py
    .venv/bin/python bench/ws_bench.py --deflate
    .venv/bin/python bench/ws_bench.py --servers uringserve,uvicorn-websockets-sansio --sizes 1024 --conns 10
"""

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)
import http_bench  # noqa: E402
import loop_bench  # noqa: E402

APP = "apps.raw:app"
SERVERS = ["uringserve", "uvicorn-websockets", "uvicorn-websockets-sansio", "uvicorn-wsproto", "granian",
           "hypercorn"]


def server_cmd(name, port):
    if name.startswith("uvicorn-"):
        return [http_bench.PY, "-m", "uvicorn", APP, "--port", str(port), "--loop", "uvloop", "--http", "httptools",
                "--ws", name.split("-", 1)[1], "--no-access-log", "--log-level", "warning", "--app-dir", BENCH]
    cmd = http_bench.server_cmd(name, APP, port)
    return [c for c in cmd if c != "--no-ws"]  # granian: WebSockets on


def run_cell(server, conns, size, seconds, client, deflate=False):
    port = http_bench.free_port()
    env = dict(os.environ, PYTHONPATH=BENCH)
    proc = subprocess.Popen(["taskset", "-c", "0", *server_cmd(server, port)], cwd=BENCH, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        http_bench.wait_port(port, proc)
        run_client(client, port, conns, size, 0.5, deflate)  # warm-up
        cpu0 = http_bench.tree_cpu(proc.pid)
        r = run_client(client, port, conns, size, seconds, deflate)
        cpu1 = http_bench.tree_cpu(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            for p in http_bench.tree_pids(proc.pid):
                try:
                    os.kill(p, signal.SIGKILL)
                except OSError:
                    pass
            proc.wait()
    r["rt_per_s"] = r["round_trips"] / r["seconds"]
    r["cpu_us_per_rt"] = (cpu1 - cpu0) / max(r["round_trips"], 1) * 1e6
    return r


def run_client(client, port, conns, size, seconds, deflate=False):
    out = subprocess.run(["taskset", "-c", loop_bench.CLIENT_CORE, client, "127.0.0.1", str(port), str(conns),
                          str(size), str(seconds), "/ws", *(["deflate"] if deflate else [])],
                         capture_output=True, text=True, timeout=seconds + 60)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip() or f"echo_client exited with {out.returncode}")
    return json.loads(out.stdout)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--servers", default=",".join(SERVERS))
    ap.add_argument("--sizes", default="1024,65536", help="message sizes in bytes")
    ap.add_argument("--conns", default="1,10,100")
    ap.add_argument("--seconds", type=float, default=3)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--deflate", action="store_true", help="offer permessage-deflate")
    ap.add_argument("--out", default=None, help="default: bench/results/ws.json (ws-deflate.json)")
    args = ap.parse_args()
    if args.out is None:
        args.out = os.path.join(BENCH, "results", "ws-deflate.json" if args.deflate else "ws.json")
    servers = args.servers.split(",")
    client = loop_bench.build_client()
    results = {}
    for size in map(int, args.sizes.split(",")):
        for conns in map(int, args.conns.split(",")):
            cell = f"{size}x{conns}"
            runs = {s: [] for s in servers}
            for _ in range(args.rounds):
                for server in servers:  # interleaved: drift hits every server alike
                    try:
                        runs[server].append(run_cell(server, conns, size, args.seconds, client, args.deflate))
                    except Exception as exc:  # a peer that fails is reported, not fatal
                        print(f"{cell:10s} {server:26s} FAILED: {exc}", flush=True)
            for server, rs in runs.items():
                if not rs:
                    continue
                median = statistics.median_low(r["cpu_us_per_rt"] for r in rs)
                r = next(r for r in rs if r["cpu_us_per_rt"] == median)
                r["all_cpu_us_per_rt"] = [x["cpu_us_per_rt"] for x in rs]
                results.setdefault(cell, {})[server] = r
                print(f"{cell:10s} {server:26s} {r['rt_per_s']:>9,.0f} rt/s  {r['cpu_us_per_rt']:7.2f} µs/rt  "
                      f"p99 {r['p99_us']} µs", flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "deflate": args.deflate,
                   "seconds": args.seconds,
                   "rounds": args.rounds, "results": results}, f, indent=1)
    print()
    print("| msg | conns | " + " | ".join(f"{s} rt/s, CPU µs/rt, p99 µs" for s in servers) + " |")
    print("|---|---|" + "---|" * len(servers))
    for cell, by_server in results.items():
        size, conns = cell.split("x")
        cells = []
        for s in servers:
            r = by_server.get(s)
            cells.append(f"{r['rt_per_s']:,.0f}, {r['cpu_us_per_rt']:.2f}, {r['p99_us']}" if r else "failed")
        print(f"| {int(size) // 1024 or size} {'KiB' if int(size) >= 1024 else 'B'} | {conns} | "
              + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

"""Multi-process servers on the raw ASGI hello, one run: uringserve
--workers 2, gunicorn with 2 UringWorkers, uvicorn --workers 2 (httptools,
uvloop; and on uringloop, as a drop-in), granian --workers 2 and gunicorn's own ASGI worker (-k asgi, 2
workers). Nothing is pinned (two workers on two cores share them with wrk);
reported: requests/s and server CPU µs per request (the whole process tree).

    .venv/bin/python bench/workers_bench.py
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from http_bench import BENCH, PY, TICK, free_port, tree_cpu, tree_pids, wait_port, wrk  # noqa: E402


def cpu_by_pid(root):
    out = {}
    for p in tree_pids(root):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            out[p] = (int(fields[11]) + int(fields[12])) / TICK
        except OSError:
            pass
    return out

BIN = os.path.dirname(PY)
APP = "apps.raw:app"


def cmd(name, port):
    if name == "uringserve --workers 2":
        return [PY, "-m", "uringserve", APP, "--port", str(port), "--workers", "2", "--no-access-log",
                "--log-level", "warning", "--app-dir", BENCH]
    if name == "gunicorn + UringWorker":
        return [PY, "-m", "gunicorn", "-k", "uringserve.workers.UringWorker", "-w", "2", "-b", f"127.0.0.1:{port}",
                "--log-level", "warning", APP]
    if name == "uvicorn --workers 2":
        return [PY, "-m", "uvicorn", APP, "--port", str(port), "--workers", "2", "--loop", "uvloop", "--http",
                "httptools", "--no-access-log", "--log-level", "warning", "--app-dir", BENCH]
    if name == "uvicorn --workers 2 (uringloop)":
        return [PY, "-m", "uvicorn", APP, "--port", str(port), "--workers", "2", "--loop", "uringloop:new_event_loop",
                "--http", "httptools", "--no-access-log", "--log-level", "warning", "--app-dir", BENCH]
    if name == "granian --workers 2":
        return [os.path.join(BIN, "granian"), "--interface", "asgi", "--host", "127.0.0.1", "--port", str(port),
                "--workers", "2", "--runtime-mode", "st", "--loop", "uvloop", "--no-ws", "--log-level", "warning",
                "--no-access-log", APP]
    if name == "gunicorn -k asgi":
        return [PY, "-m", "gunicorn", "-k", "asgi", "-w", "2", "-b", f"127.0.0.1:{port}", "--log-level", "warning",
                APP]
    raise ValueError(name)


SERVERS = ["uringserve --workers 2", "gunicorn + UringWorker", "uvicorn --workers 2",
           "uvicorn --workers 2 (uringloop)", "granian --workers 2", "gunicorn -k asgi"]


def run(name, duration, connections):
    port = free_port()
    paths = [BENCH] + [os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
    proc = subprocess.Popen(cmd(name, port), cwd=BENCH, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_port(port, proc)
        time.sleep(1.0)  # every worker up
        scenario = {"path": "/"}
        wrk(port, scenario, 1, connections, pin=False)
        cpu0, by0 = tree_cpu(proc.pid), cpu_by_pid(proc.pid)
        res = wrk(port, scenario, duration, connections, pin=False)
        cpu1, by1 = tree_cpu(proc.pid), cpu_by_pid(proc.pid)
        res["cpu_us_per_req"] = (cpu1 - cpu0) / max(res["requests"], 1) * 1e6
        # how evenly the load spread: the busiest process's share of the CPU
        used = {p: by1[p] - by0.get(p, 0.0) for p in by1}
        res["busiest_share"] = max(used.values()) / max(sum(used.values()), 1e-9)
        res["processes"] = len(tree_pids(proc.pid))
        return res
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--connections", type=int, default=128)
    ap.add_argument("--out", default=os.path.join(BENCH, "results", "workers.json"))
    ap.add_argument("--servers", default=",".join(SERVERS), help="comma-separated, from: " + ", ".join(SERVERS))
    args = ap.parse_args()
    results = {}
    for name in args.servers.split(","):
        try:
            results[name] = run(name, args.duration, args.connections)
        except Exception as exc:  # a peer that fails is reported, not fatal
            print(f"{name:32s} FAILED: {exc}", flush=True)
            continue
        r = results[name]
        print(f"{name:32s} {r['rps']:>10,.0f} req/s  {r['cpu_us_per_req']:6.2f} µs/req  p99 {r['p99_ms']:.2f} ms  "
              f"busiest process {r['busiest_share']:.0%} of the CPU", flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"date": time.strftime("%Y-%m-%d"), "results": results}, f, indent=1)
    print("\n| server | requests/s | CPU µs/req | p99 ms | busiest process's CPU share |\n|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['rps']:,.0f} | {r['cpu_us_per_req']:.2f} | {r['p99_ms']:.2f} | "
              f"{r['busiest_share']:.0%} |")


if __name__ == "__main__":
    main()

"""Soak: does a server's memory or fd count grow under sustained load?

Each server runs pinned to core 0 and wrk (core 1) drives it in segments of
a few seconds each, back to back; after every segment the server tree's
resident memory (VmRSS) and open fds are read from /proc. The first segment
is the warm-up (allocator pools, caches, the app's imports); the growth
from its end to the last segment's end, per 100,000 requests, is what a
leak would show as. `hello-close` opens a new connection for every request
(wrk's `Connection: close`), so whatever a connection costs and fails to
give back adds up there.

    .venv/bin/python bench/soak.py                            # ~4 minutes
    .venv/bin/python bench/soak.py --servers uringserve --scenarios hello-close --segments 12
    .venv/bin/python bench/soak.py --tls --scenarios hello,hello-close
"""

import argparse
import json
import os
import signal
import subprocess
import time

from http_bench import BENCH, SCENARIOS, free_port, server_cmd, tls_args, tree_pids, wait_port, wrk

SOAK_SCENARIOS = {
    "hello": SCENARIOS["hello"],
    "post-10k": SCENARIOS["post-10k"],
    "fastapi-json": SCENARIOS["fastapi-json"],
    "hello-close": dict(SCENARIOS["hello"], close=True),
}


def tree_rss_and_fds(pid):
    """Resident KiB and open fds, summed over the server's process tree."""
    rss = fds = 0
    for p in tree_pids(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        rss += int(line.split()[1])
            fds += len(os.listdir(f"/proc/{p}/fd"))
        except OSError:
            pass
    return rss, fds


def soak_one(server, name, args):
    scenario = SOAK_SCENARIOS[name]
    port = free_port()
    cmd = server_cmd(server, scenario["app"], port) + (tls_args(server) if args.tls else [])
    env = dict(os.environ, PYTHONPATH=BENCH)
    proc = subprocess.Popen(["taskset", "-c", "0", *cmd], cwd=BENCH, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    samples = []
    try:
        wait_port(port, proc)
        for _ in range(args.segments):
            res = wrk(port, scenario, args.seconds, args.connections, scheme="https" if args.tls else "http",
                      close=scenario.get("close", False))
            rss, fds = tree_rss_and_fds(proc.pid)
            samples.append({"requests": res["requests"], "rss_kib": rss, "fds": fds,
                            "non_2xx": res["non_2xx"], "socket_errors": res["socket_errors"]})
        time.sleep(2)  # connections still closing when wrk stopped are gone by now
        idle_rss, idle_fds = tree_rss_and_fds(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
    after_warmup = sum(s["requests"] for s in samples[1:])
    growth = samples[-1]["rss_kib"] - samples[0]["rss_kib"]
    return {"samples": samples, "requests_after_warmup": after_warmup,
            "rss_growth_kib_per_100k": growth / max(after_warmup, 1) * 1e5,
            "fds_first": samples[0]["fds"], "fds_last": samples[-1]["fds"], "fds_idle": idle_fds,
            "rss_idle_kib": idle_rss,
            "errors": sum(s["non_2xx"] for s in samples), "exit_code": proc.returncode}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--servers", default="uringserve,uvicorn-httptools,granian")
    ap.add_argument("--scenarios", default="hello,post-10k,fastapi-json,hello-close")
    ap.add_argument("--segments", type=int, default=6)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--tls", action="store_true")
    ap.add_argument("--json", default=os.path.join(BENCH, "results", "soak.json"))
    args = ap.parse_args()

    results = {}
    print("| scenario | server | requests | RSS after warm-up, at end (MiB) | growth KiB / 100k requests "
          "| fds after warm-up, at end, idle 2 s later | non-2xx |")
    print("|---|---|---|---|---|---|---|")
    for name in args.scenarios.split(","):
        for server in args.servers.split(","):
            r = soak_one(server, name, args)
            results[f"{name}/{server}"] = r
            first, last = r["samples"][0], r["samples"][-1]
            print(f"| {name} | {server} | {r['requests_after_warmup']:,} "
                  f"| {first['rss_kib'] / 1024:.1f}, {last['rss_kib'] / 1024:.1f} "
                  f"| {r['rss_growth_kib_per_100k']:.1f} | {r['fds_first']}, {r['fds_last']}, {r['fds_idle']} | {r['errors']} |",
                  flush=True)
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()

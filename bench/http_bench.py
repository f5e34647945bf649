"""HTTP benchmark: uringserve against granian, uvicorn (httptools and h11,
both on uvloop) and hypercorn, same apps, same settings, one run.

Each server runs pinned to core 0 (taskset), wrk to core 1. Reported per
scenario and server: requests/s, server CPU time per request (utime+stime of
the server's whole process tree from /proc, before and after the timed run,
divided by the requests wrk counted), p99 latency, and syscalls per request
(strace -c attached to every thread of the server during a separate run).

    .venv/bin/python bench/http_bench.py                 # all scenarios
    .venv/bin/python bench/http_bench.py --scenarios hello --servers uringserve,granian
    .venv/bin/python bench/http_bench.py --tls --scenarios hello,post-10k   # HTTPS: each server terminates TLS
"""

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
PY = sys.executable
TICK = os.sysconf("SC_CLK_TCK")
CERT = os.path.join(ROOT, "tests", "certs", "localhost.pem")  # certificate and key


def tls_args(name):
    """Each server's options to serve HTTPS with CERT."""
    return {
        "uringserve": ["--ssl-certfile", CERT],
        "uvicorn-httptools": ["--ssl-certfile", CERT],
        "uvicorn-h11": ["--ssl-certfile", CERT],
        "granian": ["--ssl-certificate", CERT, "--ssl-keyfile", CERT],
        "hypercorn": ["--certfile", CERT, "--keyfile", CERT],
    }[name]


def server_cmd(name, app, port):
    if name == "uringserve":
        return [PY, "-m", "uringserve", app, "--port", str(port), "--no-access-log", "--log-level", "warning",
                "--app-dir", BENCH]
    if name == "granian":
        return [os.path.join(os.path.dirname(PY), "granian"), "--interface", "asgi", "--host", "127.0.0.1",
                "--port", str(port), "--workers", "1", "--runtime-mode", "st", "--loop", "uvloop", "--no-ws",
                "--log-level", "warning", "--no-access-log", app]
    if name in ("uvicorn-httptools", "uvicorn-h11"):
        return [PY, "-m", "uvicorn", app, "--port", str(port), "--loop", "uvloop", "--http",
                name.split("-")[1], "--no-access-log", "--log-level", "warning", "--app-dir", BENCH]
    if name == "c-responder":  # the floor: no Python, answers every request with hello (hello scenario only)
        exe = os.path.join(ROOT, "build", "c_responder")
        src = os.path.join(BENCH, "c_responder.c")
        if not os.path.exists(exe) or os.path.getmtime(exe) < os.path.getmtime(src):
            os.makedirs(os.path.dirname(exe), exist_ok=True)
            subprocess.run(["cc", "-O2", "-o", exe, src, "-luring"], check=True)
        return [exe, str(port)]
    if name == "hypercorn":
        return [PY, "-m", "hypercorn", app, "--bind", f"127.0.0.1:{port}", "--worker-class", "uvloop",
                "--log-level", "warning"]
    raise ValueError(name)


SERVERS = ["uringserve", "granian", "uvicorn-httptools", "uvicorn-h11", "hypercorn"]

SCENARIOS = {
    "hello": {"app": "apps.raw:app", "path": "/"},
    "fastapi-json": {"app": "apps.fastapi_json:app", "path": "/json"},
    "get-10k": {"app": "apps.raw:app", "path": "/10k"},
    "post-10k": {"app": "apps.raw:app", "path": "/echo", "lua": "post10k.lua"},
    "pipelined-16": {"app": "apps.raw:app", "path": "/", "lua": "pipeline.lua"},
}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_pids(pid):
    """pid and all its descendants (granian and hypercorn fork workers)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                children.setdefault(int(fields[1]), []).append(int(entry))
            except OSError:
                pass
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def tree_cpu(pid):
    total = 0
    for p in tree_pids(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime + stime
        except OSError:
            pass
    return total / TICK


def wait_port(port, proc, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("server did not start")


def parse_duration(text):
    m = re.match(r"([\d.]+)(us|ms|s)", text)
    value, unit = float(m.group(1)), m.group(2)
    return value * {"us": 1e-6, "ms": 1e-3, "s": 1.0}[unit]


def wrk(port, scenario, duration, connections, pin=True, scheme="http", close=False):
    cmd = (["taskset", "-c", "1"] if pin else []) + ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency"]
    if close:  # a new connection for every request
        cmd += ["-H", "Connection: close"]
    if scenario.get("lua"):
        cmd += ["-s", os.path.join(BENCH, scenario["lua"])]
    cmd.append(f"{scheme}://127.0.0.1:{port}{scenario['path']}")
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p99 = parse_duration(re.search(r"99%\s+([\d.]+\w+)", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    return {"requests": requests, "rps": rps, "p99_ms": p99 * 1e3,
            "non_2xx": int(errors.group(1)) if errors else 0,
            "socket_errors": socket_errors.group(1) if socket_errors else ""}


def count_syscalls(pid, port, scenario, connections, seconds=2, scheme="http"):
    tids = []
    for p in tree_pids(pid):
        try:
            tids += [int(t) for t in os.listdir(f"/proc/{p}/task")]
        except OSError:
            pass
    cmd = ["strace", "-c", "-f", "-q"]
    for t in tids:
        cmd += ["-p", str(t)]
    st = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    result = wrk(port, scenario, seconds, connections, scheme=scheme)
    st.send_signal(signal.SIGINT)
    err = st.communicate(timeout=30)[1]
    total = 0
    for line in err.splitlines():
        fields = line.split()
        if fields and fields[-1] == "total" and len(fields) >= 5:
            total = int(fields[3])  # % time, seconds, usecs/call, calls[, errors], total
    return total / max(result["requests"], 1)


def run_one(server, scenario_name, args):
    scenario = SCENARIOS[scenario_name]
    port = free_port()
    paths = [BENCH] + [os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
    cmd = server_cmd(server, scenario["app"], port) + (tls_args(server) if args.tls else [])
    scheme = "https" if args.tls else "http"
    proc = subprocess.Popen(["taskset", "-c", "0", *cmd], cwd=BENCH,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_port(port, proc)
        wrk(port, scenario, 1, args.connections, scheme=scheme)  # warm-up
        cpu0 = tree_cpu(proc.pid)
        res = wrk(port, scenario, args.duration, args.connections, scheme=scheme)
        cpu1 = tree_cpu(proc.pid)
        res["cpu_us_per_req"] = (cpu1 - cpu0) / max(res["requests"], 1) * 1e6
        if args.syscalls:
            res["syscalls_per_req"] = count_syscalls(proc.pid, port, scenario, args.connections, scheme=scheme)
        return res
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            for p in tree_pids(proc.pid):
                try:
                    os.kill(p, signal.SIGKILL)
                except OSError:
                    pass
            proc.wait()


def table(results, servers, scenarios):
    lines = ["| scenario | server | requests/s | CPU µs/req | p99 ms | syscalls/req | vs uvicorn-httptools rps |",
             "|---|---|---|---|---|---|---|"]
    for sc in scenarios:
        base = results.get(sc, {}).get("uvicorn-httptools", {}).get("rps")
        for sv in servers:
            r = results.get(sc, {}).get(sv)
            if not r:
                continue
            ratio = f"{r['rps'] / base:.2f}x" if base else "-"
            sysc = f"{r['syscalls_per_req']:.3f}" if "syscalls_per_req" in r else "-"
            errs = f" ({r['non_2xx']} non-2xx)" if r.get("non_2xx") else ""
            lines.append(f"| {sc} | {sv} | {r['rps']:,.0f}{errs} | {r['cpu_us_per_req']:.2f} | {r['p99_ms']:.2f} | "
                         f"{sysc} | {ratio} |")
    return "\n".join(lines)


def chart(results, servers, scenarios, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    width = 0.8 / len(servers)
    for ax, key, title in ((axes[0], "rps", "requests/s (higher is better)"),
                           (axes[1], "cpu_us_per_req", "server CPU µs per request (lower is better)")):
        for i, sv in enumerate(servers):
            vals = [results.get(sc, {}).get(sv, {}).get(key, 0) for sc in scenarios]
            ax.bar([x + i * width for x in range(len(scenarios))], vals, width, label=sv)
        ax.set_xticks([x + width * (len(servers) - 1) / 2 for x in range(len(scenarios))])
        ax.set_xticklabels(scenarios, rotation=15)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("uringserve vs peers: server on core 0, wrk -t1 -c64 on core 1")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--servers", default=",".join(SERVERS))
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=1, help="best of N runs per cell")
    ap.add_argument("--no-syscalls", dest="syscalls", action="store_false")
    ap.add_argument("--tls", action="store_true", help="HTTPS: every server terminates TLS itself")
    ap.add_argument("--out", default=None, help="default: bench/results/http.json (http-tls.json)")
    ap.add_argument("--chart", default=None, help="default: bench/http.png (none with --tls)")
    args = ap.parse_args()
    if args.out is None:
        args.out = os.path.join(BENCH, "results", "http-tls.json" if args.tls else "http.json")
    if args.chart is None and not args.tls:
        args.chart = os.path.join(BENCH, "http.png")
    servers = args.servers.split(",")
    scenarios = args.scenarios.split(",")
    results = {}
    for sc in scenarios:
        for rnd in range(args.rounds):
            for sv in servers:  # interleaved: drift hits every server alike
                try:
                    r = run_one(sv, sc, args)
                except Exception as exc:  # a peer that fails is reported, not fatal
                    print(f"{sc:14s} {sv:18s} FAILED: {exc}", flush=True)
                    continue
                best = results.setdefault(sc, {}).get(sv)
                if not best or r["rps"] > best["rps"]:
                    results[sc][sv] = r
                print(f"{sc:14s} {sv:18s} {r['rps']:>10,.0f} req/s  {r['cpu_us_per_req']:6.2f} µs/req  "
                      f"p99 {r['p99_ms']:.2f} ms  syscalls/req {r.get('syscalls_per_req', float('nan')):.3f}",
                      flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"date": time.strftime("%Y-%m-%d"), "tls": args.tls, "duration": args.duration,
                   "connections": args.connections,
                   "results": results}, f, indent=1)
    print()
    print(table(results, servers, scenarios))
    if args.chart:
        chart(results, servers, scenarios, args.chart)


if __name__ == "__main__":
    main()

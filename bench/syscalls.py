"""Syscalls per round trip of the echo servers of loop_bench.py, counted by
strace -c -f over a fixed load, for each loop side by side.

    python bench/syscalls.py [--kind protocol] [--conns 10] [--size 1024]
    python bench/syscalls.py --matrix [--loops uvloop,uringloop]   # every echo-matrix cell
"""

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import loop_bench  # noqa: E402


def count(loop_name, kind, conns, size, seconds, client):
    with tempfile.NamedTemporaryFile(suffix=".strace", delete=False) as f:
        out_path = f.name
    with loop_bench.echo_server(loop_name, kind) as (server, port):
        # attach for the load only: setup and teardown are not counted
        tracer = subprocess.Popen(["strace", "-c", "-f", "-p", str(server.pid), "-o", out_path],
                                  stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        rts = loop_bench.run_client(client, port, conns, size, seconds)["round_trips"]
        tracer.send_signal(signal.SIGINT)  # strace detaches and writes its summary
        tracer.wait(30)
    table = open(out_path).read()
    os.unlink(out_path)
    calls = {}
    for line in table.splitlines():
        m = re.match(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)(?:\s+\d+)?\s+(\w+)$", line)
        if m and m.group(2) != "total":
            calls[m.group(2)] = int(m.group(1))
    return rts, sum(calls.values()), calls


def matrix(loops, seconds, client):
    print("| server | msg | conns | " + " | ".join(f"{n} syscalls/rt" for n in loops) + " |")
    print("|---|---|---|" + "---|" * len(loops))
    for kind in ("protocol", "streams", "sockets"):
        for size in (1024, 10240, 102400):
            for conns in (1, 10, 100):
                cells = []
                for name in loops:
                    rts, total, _ = count(name, kind, conns, size, seconds, client)
                    cells.append(f"{total / rts:.2f}")
                print(f"| {kind} | {size // 1024} KiB | {conns} | " + " | ".join(cells) + " |", flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--kind", default="protocol", choices=("sockets", "streams", "protocol"))
    p.add_argument("--conns", type=int, default=10)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--seconds", type=float, default=3)
    p.add_argument("--loops", default="asyncio,uvloop,rloop,uringloop")
    p.add_argument("--matrix", action="store_true",
                   help="syscalls per round trip in every cell of the echo matrix (kinds x 1/10/100 KiB x 1/10/100 conns)")
    args = p.parse_args()
    client = loop_bench.build_client()
    if args.matrix:
        return matrix(args.loops.split(","), args.seconds, client)
    print(f"| loop | round trips | syscalls | syscalls per round trip | top calls |  ({args.kind}, "
          f"{args.conns} conns, {args.size} B)")
    print("|---|---|---|---|---|")
    for name in args.loops.split(","):
        rts, total, calls = count(name, args.kind, args.conns, args.size, args.seconds, client)
        top = ", ".join(f"{k} {v / rts:.2f}" for k, v in sorted(calls.items(), key=lambda kv: -kv[1])[:4])
        print(f"| {name} | {rts} | {total} | {total / rts:.2f} | {top} |", flush=True)


if __name__ == "__main__":
    main()

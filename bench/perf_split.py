"""Where an echo server's CPU goes, for each loop side by side.

perf samples the server's core (core 0, where loop_bench.py pins it) during a
fixed load from the C client, and the server's samples are split three ways:

- user space: the interpreter, the loop's own code, libc;
- the loop layer of the kernel: what an event loop chooses to call, that is
  syscall entry and exit, file lookup, epoll, read()/write()/send()/recv()
  down to the socket, or io_uring's submission, task work and completions;
- the rest of the kernel: TCP/IP on both ends of the loopback (the server's
  sends run the client's receive path in softirq on the server's core), skb
  memory, the copies, scheduling and wake-ups. Every loop pays it alike for
  the same bytes on the same number of segments.

"floor" is uringloop's rest-of-kernel over uvloop's total: the CPU ratio a loop
would reach with no user-space code and no syscall or io_uring cost at all.
"Python" is the part of user space spent in the interpreter and asyncio's C
accelerator (libpython, _asyncio): the app's Python code and asyncio's own
(streams, Futures, Tasks), which a loop written in C runs as the stock loop
does; "floor + Python" adds uringloop's to the floor.

    python bench/perf_split.py --kinds protocol --sizes 1 --conns 10
    python bench/perf_split.py --matrix --out bench/results/perf_split.json
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import loop_bench  # noqa: E402

FREQ = 4999  # samples per second of CPU time
LOOP_LAYER = re.compile(
    r"^(io_|__io_|tctx_|__do_sys_io_uring|ep_|__ep_|do_epoll|__x64_sys_|__do_sys_|do_syscall_64|entry_SYSCALL"
    r"|syscall_exit|syscall_return|exit_to_user_mode|ksys_|vfs_read|vfs_write|rw_verify_area"
    r"|security_file_permission|fdget|__fdget|fget|__fget|fput|sock_read_iter|sock_write_iter|sock_poll|tcp_poll"
    r"|__sys_sendto|__sys_recvfrom|_*sys_sendmsg|_*sys_recvmsg|sockfd_lookup_light|_*import_iovec"
    r"|copy_msghdr_from_user|task_work_run)")


PYTHON_DSO = re.compile(r"libpython|^python3|_asyncio\.")


def samples_by_symbol(data_path, pid):
    """{(dso, symbol): samples} of one process in a perf.data file."""
    out = subprocess.run(["perf", "report", "-q", "-i", data_path, "--pid", str(pid), "--sort", "dso,sym",
                          "-F", "sample,dso,sym", "-t", "|"], capture_output=True, text=True, check=True).stdout
    found = {}
    for line in out.splitlines():
        parts = [p.strip() for p in line.split("|")]
        if len(parts) >= 3 and parts[0].isdigit():
            key = (parts[1], re.sub(r"^\[[k.]\] ", "", parts[2]))
            found[key] = found.get(key, 0) + int(parts[0])
    return found


def split(found):
    """(user, loop layer, rest of kernel) samples."""
    user = layer = rest = 0
    for (dso, sym), n in found.items():
        if dso != "[kernel.kallsyms]":
            user += n
        elif LOOP_LAYER.match(sym):
            layer += n
        else:
            rest += n
    return user, layer, rest


def profile(loop_name, kind, conns, size, seconds, client):
    """perf on the server's core for `seconds` of load; CPU µs per round trip
    in each part, and the symbols behind them."""
    with tempfile.NamedTemporaryFile(suffix=".perf.data", delete=False) as f:
        data_path = f.name
    try:
        with loop_bench.echo_server(loop_name, kind) as (server, port):
            loop_bench.run_client(client, port, conns, size, 1)  # warm-up
            load = subprocess.Popen(["taskset", "-c", loop_bench.CLIENT_CORE, client, "127.0.0.1", str(port),
                                     str(conns), str(size), str(seconds + 1)], stdout=subprocess.PIPE, text=True)
            time.sleep(0.5)
            subprocess.run(["perf", "record", "-q", "-o", data_path, "-C", loop_bench.SERVER_CORE, "-e", "cycles",
                            "-F", str(FREQ), "--", "sleep", str(seconds)], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            result = json.loads(load.communicate(timeout=60)[0])
            found = samples_by_symbol(data_path, server.pid)
    finally:
        os.unlink(data_path)
    rts = result["round_trips"] / result["seconds"] * seconds  # round trips inside the perf window
    us = 1e6 / FREQ / rts
    user, layer, rest = split(found)
    python = sum(n for (dso, sym), n in found.items() if PYTHON_DSO.search(dso))
    kernel = sorted((n, sym) for (dso, sym), n in found.items() if dso == "[kernel.kallsyms]")[::-1]
    top_layer = [(n, sym) for n, sym in kernel if LOOP_LAYER.match(sym)][:8]
    top_rest = [(n, sym) for n, sym in kernel if not LOOP_LAYER.match(sym)][:12]
    return {"rt_per_s": result["round_trips"] / result["seconds"], "user_us": user * us,
            "python_us": python * us, "layer_us": layer * us,
            "rest_us": rest * us, "total_us": (user + layer + rest) * us,
            "top_layer": [[sym, round(n * us, 3)] for n, sym in top_layer],
            "top_rest": [[sym, round(n * us, 3)] for n, sym in top_rest]}


def median_run(runs):
    """The run with the median total CPU per round trip."""
    return sorted(runs, key=lambda r: r["total_us"])[len(runs) // 2]


def print_row(kind, size_kib, conns, name, r, base=None):
    line = (f"| {kind} | {size_kib} KiB | {conns} | {name} | {r['total_us']:.2f} | {r['user_us']:.2f}"
            f" | {r['python_us']:.2f} | {r['layer_us']:.2f} | {r['rest_us']:.2f} |")
    if base is not None:
        line += (f" {r['total_us'] / base['total_us']:.2f}x | {r['rest_us'] / base['total_us']:.2f}x"
                 f" | {(r['rest_us'] + r['python_us']) / base['total_us']:.2f}x |")
    print(line, flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--loops", default="uvloop,uringloop")
    p.add_argument("--kinds", default="protocol")
    p.add_argument("--sizes", default="1", help="message sizes in KiB")
    p.add_argument("--conns", default="10")
    p.add_argument("--matrix", action="store_true", help="every cell of the echo matrix")
    p.add_argument("--seconds", type=float, default=4)
    p.add_argument("--rounds", type=int, default=1,
                   help="runs per loop and cell, the loops interleaved; the run with the median CPU is shown")
    p.add_argument("--out", help="write every run as JSON here")
    args = p.parse_args()
    if args.matrix:
        args.kinds, args.sizes, args.conns = "protocol,streams,sockets", "1,10,100", "1,10,100"
    loops = args.loops.split(",")
    client = loop_bench.build_client()
    results = []
    compare = "uvloop" in loops and "uringloop" in loops
    print(f"| server | msg | conns | loop | CPU µs/rt | user | of which Python | loop layer | rest of kernel |"
          f"{' uringloop/uvloop | floor | floor + Python |' if compare else ''}")
    for kind in args.kinds.split(","):
        for size_kib in map(int, args.sizes.split(",")):
            for conns in map(int, args.conns.split(",")):
                runs = {name: [] for name in loops}
                for _ in range(args.rounds):
                    for name in loops:
                        runs[name].append(profile(name, kind, conns, size_kib * 1024, args.seconds, client))
                shown = {name: median_run(runs[name]) for name in loops}
                for name in loops:
                    base = shown["uvloop"] if compare and name == "uringloop" else None
                    print_row(kind, size_kib, conns, name, shown[name], base)
                results.append({"kind": kind, "size": size_kib * 1024, "conns": conns, "runs": runs})
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "freq": FREQ,
                       "seconds": args.seconds, "rounds": args.rounds, "cells": results}, f, indent=1)


if __name__ == "__main__":
    main()

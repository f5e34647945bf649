"""Event-loop micro-benchmarks, run side by side on asyncio, uvloop, rloop and
uringloop in one run:

- call_soon: schedule and run callbacks (batches of 1000 per iteration);
- timers: call_later(10, cb) then cancel(), with 1000 other timers pending;
- sock echo: a sock_accept/sock_recv/sock_sendall echo server pinned to one
  core, driven by bench/echo_client.c pinned to the other; reports round
  trips/s and the server's CPU time per round trip (utime+stime from
  /proc/PID/stat), since the load generator may saturate first.
- readers (--readers, on its own): add_reader() ping-pong over a socketpair
  inside one loop, with the readers registered once, and with a reader
  added and removed around every wait (as database drivers do).

    python bench/loop_bench.py                 # everything, prints a table
    python bench/loop_bench.py --quick         # shorter runs
    python bench/loop_bench.py --readers       # add_reader only
"""

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
LOOPS = ("asyncio", "uvloop", "rloop", "uringloop")
SERVER_CORE, CLIENT_CORE = "0", "1"


def new_loop(name):
    if name == "asyncio":
        import asyncio
        return asyncio.SelectorEventLoop()
    if name == "uvloop":
        import uvloop
        return uvloop.new_event_loop()
    if name == "rloop":
        import rloop
        return rloop.new_event_loop()
    import uringloop
    return uringloop.new_event_loop()


# ---- workers: run inside a pinned child process ----

def work_call_soon(loop, n):
    batch = 1000
    left = [n // batch]

    def noop(x):
        pass

    def schedule():
        call_soon = loop.call_soon
        for i in range(batch):
            call_soon(noop, i)
        left[0] -= 1
        call_soon(schedule if left[0] else loop.stop)

    loop.call_soon(schedule)
    t0 = time.perf_counter()
    loop.run_forever()
    return (n // batch) * batch / (time.perf_counter() - t0)


def work_timers(loop, n):
    def noop():
        pass

    background = [loop.call_later(3600 + i, noop) for i in range(1000)]

    def work():
        call_later = loop.call_later
        for _ in range(n):
            call_later(10.0, noop).cancel()
        loop.stop()

    loop.call_soon(work)
    t0 = time.perf_counter()
    loop.run_forever()
    rate = n / (time.perf_counter() - t0)
    for h in background:
        h.cancel()
    return rate


def work_readers(loop, n, per_wait):
    """n round trips between two readers of a socketpair; the loop's CPU
    time per round trip (both ends run in this process)."""
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)

    async def wait_readable(sock):
        fut = loop.create_future()
        loop.add_reader(sock.fileno(), fut.set_result, None)  # rloop takes ints only
        try:
            await fut
        finally:
            loop.remove_reader(sock.fileno())

    async def per_wait_side(sock, first):
        for i in range(n):
            if first:
                sock.send(b"x")
            await wait_readable(sock)
            sock.recv(16)
            if not first:
                sock.send(b"y")

    async def persistent():
        done = loop.create_future()
        count = [0]

        def on_a():
            a.recv(16)
            count[0] += 1
            if count[0] == n:
                done.set_result(None)
            else:
                a.send(b"x")

        def on_b():
            b.recv(16)
            b.send(b"y")

        loop.add_reader(a.fileno(), on_a)
        loop.add_reader(b.fileno(), on_b)
        a.send(b"x")
        await done
        loop.remove_reader(a.fileno())
        loop.remove_reader(b.fileno())

    async def main():
        if per_wait:
            await asyncio.gather(per_wait_side(a, True), per_wait_side(b, False))
        else:
            await persistent()

    import asyncio
    t0, c0 = time.perf_counter(), time.process_time()
    loop.run_until_complete(main())
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    a.close()
    b.close()
    return {"rate": n / wall, "cpu_us_per_rt": cpu / n * 1e6}


def work_echo_server(loop, port, kind):
    """An echo server written three ways: with sock_* calls, with streams,
    and with a Protocol (the vmbench variants)."""
    import asyncio

    async def sock_client(conn):
        with conn:
            while data := await loop.sock_recv(conn, 65536):
                await loop.sock_sendall(conn, data)

    async def stream_client(reader, writer):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    class EchoProtocol(asyncio.Protocol):
        def connection_made(self, transport):
            transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.transport = transport

        def data_received(self, data):
            self.transport.write(data)

    class EchoDatagrams(asyncio.DatagramProtocol):
        def connection_made(self, transport):
            self.transport = transport

        def datagram_received(self, data, addr):
            self.transport.sendto(data, addr)

    async def main():
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        if kind == "protocol":
            server = await loop.create_server(EchoProtocol, "127.0.0.1", port, backlog=1024)
        elif kind == "datagram":
            server, _ = await loop.create_datagram_endpoint(EchoDatagrams, local_addr=("127.0.0.1", port))
        elif kind == "streams":
            server = await asyncio.start_server(stream_client, "127.0.0.1", port, backlog=1024)
        else:
            server = None
            listener = socket.create_server(("127.0.0.1", port), backlog=1024)
            listener.setblocking(False)
            tasks = set()

            async def acceptor():
                while True:
                    conn, _ = await loop.sock_accept(listener)
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    t = loop.create_task(sock_client(conn))
                    tasks.add(t)
                    t.add_done_callback(tasks.discard)

            acc = loop.create_task(acceptor())
        print("ready", flush=True)
        await stop.wait()
        if server is not None:
            server.close()
        else:
            acc.cancel()
            for t in list(tasks):
                t.cancel()
            listener.close()

    loop.run_until_complete(main())


def worker(args):
    loop = new_loop(args.loop)
    try:
        if args.worker == "call_soon":
            print(json.dumps({"rate": work_call_soon(loop, args.n)}))
        elif args.worker == "timers":
            print(json.dumps({"rate": work_timers(loop, args.n)}))
        elif args.worker in ("readers", "readers_per_wait"):
            print(json.dumps(work_readers(loop, args.n, args.worker == "readers_per_wait")))
        elif args.worker == "echo_server":
            work_echo_server(loop, args.port, args.kind)
    finally:
        loop.close()


# ---- driver ----

def pinned(core, cmd, **kw):
    return subprocess.Popen(["taskset", "-c", core, *cmd], **kw)


def run_micro(kind, loops, n, repeats):
    """Best rate of each loop; loops interleave within every repeat (ABCD
    ABCD ...) so that the machine's drift over time hits all of them alike."""
    rates = {name: [] for name in loops}
    for _ in range(repeats):
        for name in loops:
            out = subprocess.run(["taskset", "-c", SERVER_CORE, sys.executable, __file__, "--worker", kind,
                                  "--loop", name, "--n", str(n)],
                                 capture_output=True, text=True, check=True)
            rates[name].append(json.loads(out.stdout)["rate"])
    return {name: max(r) for name, r in rates.items()}


def run_readers(loops, n, repeats, out):
    """Both add_reader patterns, loops interleaved; the run with the least
    CPU per round trip of each is kept."""
    results = {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "python": sys.version.split()[0],
               "kernel": os.uname().release, "n": n, "runs": {}}
    for kind in ("readers", "readers_per_wait"):
        runs = {name: [] for name in loops}
        for _ in range(repeats):
            for name in loops:
                res = subprocess.run(["taskset", "-c", SERVER_CORE, sys.executable, __file__, "--worker", kind,
                                      "--loop", name, "--n", str(n)], capture_output=True, text=True, check=True)
                runs[name].append(json.loads(res.stdout))
        results["runs"][kind] = runs
        label = "registered once" if kind == "readers" else "added and removed per wait"
        for name in loops:
            best = min(runs[name], key=lambda r: r["cpu_us_per_rt"])
            print(f"{name:10s} add_reader, {label:27s} {best['rate']:9.0f} rt/s  "
                  f"{best['cpu_us_per_rt']:6.2f} us CPU/rt", flush=True)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=2)


def cpu_times(pid):
    """(user, system) CPU seconds of a process."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_client():
    exe = os.path.join(ROOT, "build", "echo_client")
    src = os.path.join(HERE, "echo_client.c")
    if not os.path.exists(exe) or os.path.getmtime(exe) < os.path.getmtime(src):
        os.makedirs(os.path.dirname(exe), exist_ok=True)
        subprocess.run(["cc", "-O2", "-o", exe, src], check=True)
    return exe


@contextlib.contextmanager
def echo_server(loop_name, kind="sockets"):
    """An echo server pinned to SERVER_CORE, ready to serve; yields (process, port)."""
    port = free_port()
    server = pinned(SERVER_CORE, [sys.executable, __file__, "--worker", "echo_server", "--loop", loop_name,
                                  "--port", str(port), "--kind", kind], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "ready"
        yield server, port
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()


def run_client(client_exe, port, conns, size, seconds, kind="sockets"):
    """bench/echo_client.c pinned to CLIENT_CORE; its JSON result."""
    out = subprocess.run(["taskset", "-c", CLIENT_CORE, client_exe, "127.0.0.1", str(port), str(conns), str(size),
                          str(seconds)] + (["udp"] if kind == "datagram" else []),
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def per_round_trip(r, before, after):
    """Adds round trips/s and the server's CPU µs per round trip (all, and
    user-space only) to a client result, from two cpu_times() readings."""
    (user0, sys0), (user1, sys1) = before, after
    r["rt_per_s"] = r["round_trips"] / r["seconds"]
    r["cpu_us_per_rt"] = (user1 - user0 + sys1 - sys0) / r["round_trips"] * 1e6
    r["user_us_per_rt"] = (user1 - user0) / r["round_trips"] * 1e6
    return r


def run_echo(loop_name, conns, size, seconds, client_exe, kind="sockets"):
    with echo_server(loop_name, kind) as (server, port):
        before = cpu_times(server.pid)
        r = run_client(client_exe, port, conns, size, seconds, kind)
        after = cpu_times(server.pid)
    return per_round_trip(r, before, after)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--worker")
    p.add_argument("--loop")
    p.add_argument("--n", type=int, default=0)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--kinds", default="protocol,streams,sockets",
                   help="matrix rows to run (comma-separated); also datagram: a UDP echo, DatagramProtocol")
    p.add_argument("--sizes", default="1,10,100", help="matrix message sizes in KiB")
    p.add_argument("--conns", default="1,10,100", help="matrix connection counts")
    p.add_argument("--kind", default="sockets", choices=("sockets", "streams", "protocol", "datagram"))
    p.add_argument("--rounds", type=int, default=1,
                   help="matrix: runs of each cell per loop, interleaved; the median (by CPU per round trip) is kept")
    p.add_argument("--matrix", action="store_true",
                   help="the echo matrix: {protocol, streams, sockets} x {1, 10, 100} KiB x {1, 10, 100} connections")
    p.add_argument("--readers", action="store_true", help="the add_reader benchmarks only")
    p.add_argument("--loops", default=",".join(LOOPS))
    p.add_argument("--out", default=os.path.join(HERE, "results", "loop.json"))
    args = p.parse_args()
    if args.worker:
        return worker(args)

    loops = args.loops.split(",")
    if args.readers:
        return run_readers(loops, 20_000 if args.quick else 50_000, 3 if args.quick else 5,
                           args.out.replace("loop.json", "readers.json"))
    if args.matrix:
        return run_matrix(loops, 2 if args.quick else 3, args.out.replace("loop.json", "echo_matrix.json"),
                          args.kinds.split(","), [int(x) for x in args.sizes.split(",")],
                          [int(x) for x in args.conns.split(",")], args.rounds)
    repeats = 2 if args.quick else 5
    seconds = 2 if args.quick else 5
    results = {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "python": sys.version.split()[0],
               "kernel": os.uname().release, "call_soon": {}, "timers": {}, "echo": {}}
    results["call_soon"] = run_micro("call_soon", loops, 1_000_000, repeats)
    results["timers"] = run_micro("timers", loops, 200_000, repeats)
    for name in loops:
        print(f"{name:10s} call_soon {results['call_soon'][name] / 1e6:6.2f} M/s   "
              f"timer schedule+cancel {results['timers'][name] / 1e6:6.2f} M/s", flush=True)
    client = build_client()
    for conns, size in ((1, 1024), (10, 1024), (100, 1024)):
        key = f"{conns}x{size}"
        results["echo"][key] = {}
        runs = {name: [] for name in loops}
        for _ in range(1 if args.quick else 2):
            for name in loops:  # interleaved, as above
                runs[name].append(run_echo(name, conns, size, seconds, client))
        for name in loops:
            best = min(runs[name], key=lambda r: r["cpu_us_per_rt"])
            results["echo"][key][name] = best
            print(f"{name:10s} echo {key:9s} {best['rt_per_s']:9.0f} rt/s  "
                  f"{best['cpu_us_per_rt']:6.2f} us CPU/rt  p99 {best['p99_us']} us", flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print_table(results, loops)


def median_run(runs):
    """The run with the median CPU per round trip (the lower middle one for
    an even count), with every round's figure kept beside it."""
    ordered = sorted(runs, key=lambda r: r["cpu_us_per_rt"])
    chosen = dict(ordered[(len(ordered) - 1) // 2])
    chosen["rounds_cpu_us_per_rt"] = [round(r["cpu_us_per_rt"], 2) for r in runs]
    return chosen


def run_matrix(loops, seconds, out, kinds=("protocol", "streams", "sockets"), sizes_kib=(1, 10, 100),
               conn_counts=(1, 10, 100), rounds=1):
    client = build_client()
    results = {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "seconds": seconds, "rounds": rounds, "cells": []}
    for kind in kinds:
        for size in (k * 1024 for k in sizes_kib):
            for conns in conn_counts:
                cell = {"kind": kind, "size": size, "conns": conns}
                runs = {name: [] for name in loops}
                for _ in range(rounds):  # interleaved, so that drift hits every loop alike
                    for name in loops:
                        runs[name].append(run_echo(name, conns, size, seconds, client, kind))
                for name in loops:
                    cell[name] = median_run(runs[name])
                results["cells"].append(cell)
                line = "  ".join(f"{n} {cell[n]['rt_per_s']:8.0f} rt/s {cell[n]['cpu_us_per_rt']:7.2f} us p99 "
                                 f"{cell[n]['p99_us']}" for n in loops)
                print(f"{kind:8s} {size // 1024:3d} KiB x {conns:3d}: {line}", flush=True)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=2)
    both = "uvloop" in loops and "uringloop" in loops
    print("\n| server | msg | conns | " + " | ".join(f"{n} rt/s, CPU µs/rt, p99 µs" for n in loops)
          + (" | uringloop/uvloop CPU | same, user-space CPU only |" if both else " |"))
    print("|---|---|---|" + "---|" * (len(loops) + 2 * both))
    for c in results["cells"]:
        cells = [f"{c[n]['rt_per_s']:.0f}, {c[n]['cpu_us_per_rt']:.2f}, {c[n]['p99_us']}" for n in loops]
        if both:
            cells.append(f"{c['uringloop']['cpu_us_per_rt'] / c['uvloop']['cpu_us_per_rt']:.2f}x")
            cells.append(f"{c['uringloop']['user_us_per_rt'] / max(c['uvloop']['user_us_per_rt'], 1e-9):.2f}x")
        print(f"| {c['kind']} | {c['size'] // 1024} KiB | {c['conns']} | " + " | ".join(cells) + " |")


def print_table(results, loops):
    print("\n| loop | call_soon (M/s) | timer schedule+cancel (M/s) |"
          + "".join(f" echo {k}: rt/s, CPU µs/rt, p99 µs |" for k in results["echo"]))
    print("|---|---|---|" + "---|" * len(results["echo"]))
    for name in loops:
        cells = [f"{results['call_soon'][name] / 1e6:.2f}", f"{results['timers'][name] / 1e6:.2f}"]
        for k in results["echo"]:
            r = results["echo"][k][name]
            cells.append(f"{r['rt_per_s']:.0f}, {r['cpu_us_per_rt']:.2f}, {r['p99_us']}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    base = "uvloop"
    if base in loops and "uringloop" in loops:
        u = results
        print(f"\nuringloop / uvloop: call_soon {u['call_soon']['uringloop'] / u['call_soon'][base]:.2f}x, "
              f"timers {u['timers']['uringloop'] / u['timers'][base]:.2f}x, echo CPU/rt "
              + ", ".join(f"{k} {u['echo'][k]['uringloop']['cpu_us_per_rt'] / u['echo'][k][base]['cpu_us_per_rt']:.2f}x"
                          for k in u["echo"]))


if __name__ == "__main__":
    main()

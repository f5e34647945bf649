"""What is specific to uringloop's io_uring engine: the syscalls it makes,
running where io_uring is refused, fork, threads, and teardown with
operations in flight."""

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import threading

import pytest

import uringloop

HERE = os.path.dirname(os.path.abspath(__file__))


def python(code, *, prefix=(), env=None, timeout=60):
    return subprocess.run([*prefix, sys.executable, "-c", textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def no_uring(tmp_path_factory):
    """tests/c/no_uring.c: runs a command with io_uring refused by seccomp."""
    exe = tmp_path_factory.mktemp("bin") / "no_uring"
    subprocess.run(["cc", "-O2", "-o", str(exe), os.path.join(HERE, "c", "no_uring.c")], check=True)
    return str(exe)


def test_ring_setup_and_mode():
    loop = uringloop.new_event_loop()
    try:
        info = loop._uring_info()
        assert info["ring_fd"] >= 0
        assert info["mode"] == "single_issuer+defer_taskrun"  # this kernel accepts it
        assert info["cq_entries"] >= 4096
        assert uringloop._probe() == 0
    finally:
        loop.close()


@pytest.mark.parametrize("errno_value,name", [(1, "EPERM"), (38, "ENOSYS")])
def test_refused_io_uring_gives_one_clear_error(no_uring, errno_value, name):
    env = dict(os.environ, NO_URING_ERRNO=str(errno_value))
    out = python("""
        import asyncio, uringloop
        async def main():
            await asyncio.sleep(0)
        try:
            uringloop.run(main())
        except uringloop.IOUringUnavailableError as exc:
            print("errno", exc.errno)
            print(exc)
    """, prefix=[no_uring], env=env)
    assert out.returncode == 0, out.stderr
    assert f"errno {errno_value}" in out.stdout
    assert "io_uring is not available" in out.stdout and name in out.stdout
    assert out.stderr == ""  # no half-built loop complaining in __del__

    # uncaught, it is one exception and a non-zero exit, never a crash or hang
    out = python("import uringloop; uringloop.new_event_loop()", prefix=[no_uring], env=env)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1].startswith("uringloop.IOUringUnavailableError")


def test_policy_under_seccomp_fails_cleanly(no_uring):
    out = python("""
        import asyncio, uringloop
        asyncio.set_event_loop_policy(uringloop.EventLoopPolicy())
        asyncio.run(asyncio.sleep(0))
    """, prefix=[no_uring])
    assert out.returncode == 1
    assert "seccomp" in out.stderr and "io_uring_disabled" in out.stderr


# Transports only: sock_sendall() offers its data with send() first, as
# asyncio does; a transport's writes and every read go through the ring.
ECHO = """
    import asyncio, socket, uringloop
    class Echo(asyncio.Protocol):
        def connection_made(self, t): self.t = t
        def data_received(self, data): self.t.write(data)
    class Pinger(asyncio.Protocol):
        def __init__(self, done): self.n, self.done = 0, done
        def connection_made(self, t): self.t = t; t.write(b"ping")
        def data_received(self, data):
            assert data == b"ping"
            self.n += 1
            if self.n == 200: self.done.set_result(None)
            else: self.t.write(b"ping")
    async def main():
        loop = asyncio.get_running_loop()
        a, b = socket.socketpair()
        await loop.connect_accepted_socket(Echo, b)
        done = loop.create_future()
        await loop.create_connection(lambda: Pinger(done), sock=a)
        await done
    uringloop.run(main())
"""


def test_strace_shows_io_uring_enter_and_no_epoll(tmp_path):
    assert shutil.which("strace"), "strace is installed by scripts/setup.sh"
    summary = tmp_path / "strace.txt"
    out = subprocess.run(["strace", "-f", "-c", "-o", str(summary), sys.executable, "-c",
                          textwrap.dedent(ECHO)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    text = summary.read_text()
    calls = {line.split()[-1]: line for line in text.splitlines() if line.strip()}
    assert "io_uring_enter" in calls
    assert "epoll_wait" not in calls and "epoll_pwait" not in calls
    assert "select" not in calls and "poll" not in calls
    # the I/O itself is done by io_uring: no recvfrom/sendto syscalls
    assert "recvfrom" not in calls and "sendto" not in calls


def test_forked_child_gets_a_fresh_ring():
    out = python("""
        import asyncio, os, socket, uringloop
        loop = uringloop.new_event_loop()
        a, b = socket.socketpair(); a.setblocking(False); b.setblocking(False)
        pending = asyncio.ensure_future(loop.sock_recv(a, 10), loop=loop)
        loop.run_until_complete(asyncio.sleep(0.01))  # recv now in the parent's ring
        pid = os.fork()
        if pid == 0:
            async def child():
                c, d = socket.socketpair(); c.setblocking(False); d.setblocking(False)
                await loop.sock_sendall(d, b"child")
                return await loop.sock_recv(c, 10)
            ok = loop.run_until_complete(child()) == b"child"
            os._exit(0 if ok else 3)
        _, status = os.waitpid(pid, 0)
        b.send(b"parent")
        print(os.waitstatus_to_exitcode(status), loop.run_until_complete(pending))
    """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0", "b'parent'"]


def test_forked_child_watches_readers_without_touching_the_parents():
    # The epoll set behind add_reader is shared with a forked child: the
    # child must get a set of its own, so that its removals and its close
    # leave the parent's readers alone.
    out = python("""
        import asyncio, os, socket, uringloop
        loop = uringloop.new_event_loop()
        a, b = socket.socketpair()
        got = loop.create_future()
        loop.add_reader(a, lambda: got.done() or got.set_result(a.recv(10)))
        loop.run_until_complete(asyncio.sleep(0.01))
        pid = os.fork()
        if pid == 0:
            loop.remove_reader(a)
            c, d = socket.socketpair()
            seen = loop.create_future()
            loop.add_reader(c, lambda: seen.done() or seen.set_result(c.recv(10)))
            d.send(b"child")
            ok = loop.run_until_complete(asyncio.wait_for(seen, 5)) == b"child"
            loop.close()
            os._exit(0 if ok else 3)
        _, status = os.waitpid(pid, 0)
        b.send(b"parent")
        print(os.waitstatus_to_exitcode(status), loop.run_until_complete(asyncio.wait_for(got, 5)))
    """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0", "b'parent'"]


def test_loop_created_in_one_thread_runs_in_another():
    loop = uringloop.new_event_loop()
    results = []

    def runner(tag):
        async def main():
            await asyncio.sleep(0.01)
            # the ring is enabled on (owned by) the thread running the loop
            return loop._uring_info()["owner_tid"] == threading.get_native_id()
        results.append((tag, loop.run_until_complete(main())))

    for tag in ("first", "second"):  # the second thread needs a new ring
        t = threading.Thread(target=runner, args=(tag,))
        t.start()
        t.join()
    loop.run_until_complete(asyncio.sleep(0))  # and back to the main thread
    assert loop._uring_info()["owner_tid"] == threading.get_native_id()
    loop.close()
    assert results == [("first", True), ("second", True)]


def test_reader_survives_moving_to_another_thread():
    loop = uringloop.new_event_loop()
    a, b = socket.socketpair()
    fired = []
    loop.add_reader(a, lambda: (fired.append(a.recv(10)), loop.stop()))
    loop.run_until_complete(asyncio.sleep(0.01))  # poll armed on this thread's ring

    def runner():
        loop.call_later(5, loop.stop)
        b.send(b"x")
        loop.run_forever()

    t = threading.Thread(target=runner)
    t.start()
    t.join()
    loop.remove_reader(a)
    loop.close()
    a.close()
    b.close()
    assert fired == [b"x"]


def test_moving_threads_with_sockops_in_flight_is_refused():
    loop = uringloop.new_event_loop()
    a, b = socket.socketpair()
    a.setblocking(False)
    fut = asyncio.ensure_future(loop.sock_recv(a, 10), loop=loop)
    loop.run_until_complete(asyncio.sleep(0.01))
    errors = []

    def runner():
        try:
            loop.run_until_complete(asyncio.sleep(0))
        except RuntimeError as exc:
            errors.append(str(exc))

    t = threading.Thread(target=runner)
    t.start()
    t.join()
    assert errors and "in flight" in errors[0]
    b.send(b"y")
    assert loop.run_until_complete(fut) == b"y"
    loop.close()
    a.close()
    b.close()


def test_close_with_operations_in_flight(no_fd_leak):
    loop = uringloop.new_event_loop()
    a, b = socket.socketpair()
    a.setblocking(False)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)
    recv = asyncio.ensure_future(loop.sock_recv(a, 10), loop=loop)
    accept = asyncio.ensure_future(loop.sock_accept(listener), loop=loop)
    loop.add_reader(b, print)
    loop.run_until_complete(asyncio.sleep(0.01))
    assert loop._uring_info()["inflight"] >= 3
    loop.remove_reader(b)
    loop.close()
    assert not recv.done() and not accept.done()
    # the kernel let go of the sockets: closing one reaches the peer as EOF
    a.close()
    b.settimeout(5)
    assert b.recv(10) == b""
    b.close()
    listener.close()


def test_many_timers_and_cancellations_keep_order():
    loop = uringloop.new_event_loop()
    fired = []
    t0 = loop.time()
    handles = [loop.call_at(t0 + 0.001 * (i % 17), fired.append, i) for i in range(2000)]
    for h in handles[::3]:
        h.cancel()
    loop.call_later(0.05, loop.stop)
    loop.run_forever()
    # by deadline; equal deadlines in the order they were scheduled
    expected = sorted((i for i in range(2000) if i % 3), key=lambda i: (i % 17, i))
    assert fired == expected
    assert loop._uring_info()["timers"] == 0
    loop.close()


def test_quick_start_verbatim():
    out = python("""
        import asyncio, uringloop
        asyncio.set_event_loop_policy(uringloop.EventLoopPolicy())
        async def main():
            await asyncio.sleep(1); print("Hello from uringloop!")
        asyncio.run(main())
    """)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "Hello from uringloop!\n"


def test_install_and_run_helpers():
    out = python("""
        import asyncio, uringloop
        async def which():
            return type(asyncio.get_running_loop()).__name__
        print(uringloop.run(which()))
        uringloop.install()
        print(asyncio.run(which()))
        print(type(asyncio.new_event_loop()).__name__)
    """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["Loop", "Loop", "Loop"]


def test_uringserve_where_io_uring_is_refused(no_uring):
    """Docker's default seccomp profile: one clear line, exit 1, no traceback."""
    from http_support import ROOT, free_port, server_env

    env = server_env({"NO_URING_ERRNO": "1"})
    r = subprocess.run([no_uring, sys.executable, "-m", "uringserve", "apps.wire_app:app", "--port",
                        str(free_port())], capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert r.returncode == 1, r.stderr
    assert "io_uring is not available" in r.stderr and "seccomp" in r.stderr
    assert "Traceback" not in r.stderr


def test_address_the_ring_cannot_take_falls_back():
    """A non-numeric address is refused by the C operation with the internal
    AddressFallback; the public sock_* call then takes asyncio's path."""
    from uringloop import _core, _loop as uloop

    async def main():
        loop = asyncio.get_running_loop()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx, \
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
            rx.bind(("127.0.0.1", 0))
            tx.setblocking(False)
            with pytest.raises(_core.AddressFallback):
                await loop._sock_op(uloop._SENDTO, tx, b"x", ("localhost", rx.getsockname()[1]))
            # the public call still delivers
            assert await loop.sock_sendto(tx, b"hello", ("127.0.0.1", rx.getsockname()[1])) == 5
            assert rx.recv(16) == b"hello"

    uringloop.run(main())

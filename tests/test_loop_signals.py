"""Signal handlers and Ctrl-C, on uringloop and on stock asyncio."""

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest



def test_signal_handler_runs_with_args(loop):
    got = []
    loop.add_signal_handler(signal.SIGUSR1, lambda *a: (got.append(a), loop.stop()), "x", 1)
    loop.call_soon(os.kill, os.getpid(), signal.SIGUSR1)
    loop.call_later(5, loop.stop)
    loop.run_forever()
    assert got == [("x", 1)]
    assert loop.remove_signal_handler(signal.SIGUSR1) is True
    assert loop.remove_signal_handler(signal.SIGUSR1) is False
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL


def test_signal_from_another_thread_wakes_sleeping_loop(loop):
    got = []
    loop.add_signal_handler(signal.SIGUSR2, lambda: (got.append(1), loop.stop()))

    def later():
        time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGUSR2)

    threading.Thread(target=later).start()
    loop.call_later(5, loop.stop)
    t0 = time.monotonic()
    loop.run_forever()
    assert got == [1] and time.monotonic() - t0 < 2
    loop.remove_signal_handler(signal.SIGUSR2)


def test_signal_handler_errors(loop):
    with pytest.raises(TypeError):
        loop.add_signal_handler("SIGUSR1", print)
    with pytest.raises(ValueError):
        loop.add_signal_handler(10_000, print)

    async def coro():
        pass

    with pytest.raises(TypeError):
        loop.add_signal_handler(signal.SIGUSR1, coro)
    with pytest.raises(RuntimeError):
        loop.add_signal_handler(signal.SIGKILL, print)


def test_close_removes_signal_handlers(loop):
    loop.add_signal_handler(signal.SIGUSR1, print)
    loop.close()
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL


@pytest.mark.parametrize("kind", ["uringloop", "asyncio"])
def test_ctrl_c_interrupts_a_loop_blocked_in_the_kernel(kind):
    code = textwrap.dedent(f"""
        import asyncio, sys, uringloop
        loop = uringloop.new_event_loop() if {kind!r} == "uringloop" else asyncio.new_event_loop()
        print("ready", flush=True)
        try:
            loop.run_forever()  # nothing scheduled: blocked in the kernel
        except KeyboardInterrupt:
            print("interrupted", flush=True)
            sys.exit(0)
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        time.sleep(0.2)
        p.send_signal(signal.SIGINT)
        out, _ = p.communicate(timeout=10)
    finally:
        p.kill()
    assert "interrupted" in out and p.returncode == 0


@pytest.mark.parametrize("kind", ["uringloop", "asyncio"])
def test_ctrl_c_cancels_asyncio_run_main(kind):
    code = textwrap.dedent(f"""
        import asyncio, uringloop
        if {kind!r} == "uringloop":
            asyncio.set_event_loop_policy(uringloop.EventLoopPolicy())
        async def main():
            print("ready", flush=True)
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                print("cancelled", flush=True)
                raise
        asyncio.run(main())
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        time.sleep(0.2)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=10)
    finally:
        p.kill()
    assert "cancelled" in out and "KeyboardInterrupt" in err

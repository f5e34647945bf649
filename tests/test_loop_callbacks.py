"""Callbacks, timers, run/stop/close, threads, debug mode and the exception
handler API: the same assertions on uringloop and on stock asyncio."""

import asyncio
import contextvars
import fractions
import gc
import logging
import math
import os
import subprocess
import sys
import threading
import time
import weakref

import pytest

from conftest import make_loop, run


def test_call_soon_runs_in_fifo_order_with_args(loop):
    seen = []
    for i in range(100):
        loop.call_soon(seen.append, i)
    loop.call_soon(loop.stop)
    loop.run_forever()
    assert seen == list(range(100))


def test_callbacks_scheduled_by_callbacks_run_next_iteration(loop):
    seen = []

    def first():
        seen.append("first")
        loop.call_soon(seen.append, "third")

    loop.call_soon(first)
    loop.call_soon(seen.append, "second")
    loop.call_soon(loop.stop)
    loop.run_forever()
    # stop() lets the current iteration finish; "third" was queued during it
    assert seen == ["first", "second"]
    loop.call_soon(loop.stop)
    loop.run_forever()
    assert seen == ["first", "second", "third"]


def test_handle_cancel_prevents_run(loop):
    seen = []
    h = loop.call_soon(seen.append, 1)
    assert not h.cancelled()
    h.cancel()
    assert h.cancelled()
    h.cancel()  # idempotent
    loop.call_soon(loop.stop)
    loop.run_forever()
    assert seen == []


def test_callbacks_run_in_their_context(loop):
    var = contextvars.ContextVar("var", default="unset")
    seen = []
    ctx = contextvars.copy_context()
    ctx.run(var.set, "from-ctx")
    loop.call_soon(lambda: seen.append(var.get()), context=ctx)
    var.set("current")
    loop.call_soon(lambda: seen.append(var.get()))
    loop.call_later(0.001, lambda: seen.append(var.get()), context=ctx)
    loop.call_later(0.01, loop.stop)
    loop.run_forever()
    assert seen == ["from-ctx", "current", "from-ctx"]


def test_unknown_keyword_is_rejected(loop):
    with pytest.raises(TypeError):
        loop.call_soon(print, bogus=1)
    with pytest.raises(TypeError):
        loop.call_later(1, print, bogus=1)


def test_call_later_orders_by_deadline(loop):
    seen = []
    t0 = loop.time()
    loop.call_later(0.03, seen.append, 3)
    loop.call_later(0.01, seen.append, 1)
    loop.call_at(t0 + 0.02, seen.append, 2)
    loop.call_later(0.04, loop.stop)
    loop.run_forever()
    assert seen == [1, 2, 3]
    assert loop.time() - t0 >= 0.04


def test_timer_handle_api(loop):
    t0 = loop.time()
    h = loop.call_at(t0 + 10, print)
    assert isinstance(h, asyncio.TimerHandle) or type(h).__name__ == "TimerHandle"
    assert h.when() == t0 + 10
    assert "TimerHandle" in repr(h) and "when=" in repr(h)
    h2 = loop.call_later(5, print)
    assert h2 < h and h > h2
    h.cancel()
    assert h.cancelled()
    assert "cancelled" in repr(h)
    h2.cancel()


def test_call_at_keeps_an_int_when(loop):
    # asyncio's TimerHandle keeps what call_at() got; aiohttp rounds its
    # timeouts up to whole seconds and checks that they stay ints.
    when = math.ceil(loop.time()) + 10
    h = loop.call_at(when, print)
    assert type(h.when()) is int and h.when() == when
    assert type(h._when) is int
    h2 = loop.call_at(when + 0.5, print)
    h3 = loop.call_later(1, print)
    assert type(h2.when()) is float and type(h3.when()) is float
    for handle in (h, h2, h3):
        handle.cancel()


def test_timer_cancel_prevents_run(loop):
    seen = []
    handles = [loop.call_later(0.001 * i, seen.append, i) for i in range(50)]
    for h in handles[::2]:
        h.cancel()
    loop.call_later(0.1, loop.stop)
    loop.run_forever()
    assert seen == list(range(1, 50, 2))


def test_a_nan_deadline_runs_and_holds_no_other_timer_back(loop):
    # asyncio takes call_later(nan) and runs it once it reaches the top of
    # its heap; uringloop's heap left it at the top, never due, and no timer
    # ran again (the loop hung)
    seen = []
    h = loop.call_later(float("nan"), seen.append, "nan")
    loop.call_at(float("nan"), seen.append, "nan at")
    assert math.isnan(h.when())
    loop.run_until_complete(asyncio.sleep(0.01))  # a timer behind them
    assert sorted(seen) == ["nan", "nan at"]


def test_none_delay_and_when_are_rejected(loop):
    with pytest.raises(TypeError):
        loop.call_later(None, print)
    with pytest.raises(TypeError):
        loop.call_at(None, print)


def test_call_later_adds_the_delay_to_the_time_as_asyncio_does(loop):
    # asyncio schedules at self.time() + delay: a delay of another type gets
    # that addition's TypeError, or its sum
    with pytest.raises(TypeError, match=r"^unsupported operand type\(s\) for \+: 'float' and 'str'$"):
        loop.call_later("1", print)
    handle = loop.call_later(fractions.Fraction(1, 2), print)
    assert type(handle.when()) is float and 0.4 < handle.when() - loop.time() <= 0.5
    handle.cancel()


def test_sleep_duration(loop):
    async def main():
        t0 = time.monotonic()
        await asyncio.sleep(0.05)
        return time.monotonic() - t0

    dt = run(loop, main())
    assert 0.045 <= dt < 1.0


def test_time_is_monotonic_clock(loop):
    assert abs(loop.time() - time.monotonic()) < 0.01


def test_timers_follow_a_time_patched_on_the_loop(loop):
    # asyncio's scheduler asks self.time() when it computes deadlines and
    # what is due, so a test clock set on the loop object moves its timers
    # (aiohttp's and others' test suites patch it this way)
    fake = [1000.0]
    seen = []
    loop.time = lambda: fake[0]
    try:
        handle = loop.call_later(3600, seen.append, "late")
        assert handle.when() == 4600.0
        loop.call_at(1000.5, seen.append, "at")
        loop.call_soon(loop.stop)
        loop.run_forever()
        assert seen == []  # the real clock would not matter; the fake one has not moved
        fake[0] = 4600.5
        started = time.monotonic()
        loop.call_soon(loop.stop)
        loop.run_forever()
        loop.call_soon(loop.stop)
        loop.run_forever()
        assert seen == ["at", "late"]
        assert time.monotonic() - started < 1
    finally:
        del loop.time
    assert abs(loop.time() - time.monotonic()) < 1
    assert "time" not in vars(loop)


def test_timers_follow_a_subclass_time(loop_kind):
    base = type(make_loop(loop_kind))

    class FakeClockLoop(base):
        now = 50.0

        def time(self):
            return self.now

    loop = FakeClockLoop()
    try:
        seen = []

        async def main():
            loop.call_later(100, seen.append, 1)
            await asyncio.sleep(0)
            loop.now = 151.0
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            return seen

        started = time.monotonic()
        assert loop.run_until_complete(main()) == [1]
        assert time.monotonic() - started < 1
    finally:
        loop.close()


def test_time_patched_with_mock_is_restored(loop):
    from unittest import mock

    with mock.patch.object(loop, "time", return_value=5.0):
        assert loop.time() == 5.0
        assert loop.call_later(1, lambda: None).when() == 6.0
    assert abs(loop.time() - time.monotonic()) < 1
    assert "time" not in vars(loop)


def test_callback_exception_goes_to_handler(loop):
    contexts = []
    loop.set_exception_handler(lambda lp, ctx: contexts.append(ctx))
    assert loop.get_exception_handler() is not None

    def boom():
        raise ValueError("boom")

    h = loop.call_soon(boom)
    loop.call_soon(loop.stop)
    loop.run_forever()
    assert len(contexts) == 1
    ctx = contexts[0]
    assert isinstance(ctx["exception"], ValueError)
    assert ctx["message"].startswith("Exception in callback ")
    assert "boom" in ctx["message"]
    assert ctx["handle"] is h
    loop.set_exception_handler(None)
    assert loop.get_exception_handler() is None


def test_default_exception_handler_logs(loop, caplog):
    loop.call_soon(lambda: 1 / 0)
    loop.call_soon(loop.stop)
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        loop.run_forever()
    assert any("ZeroDivisionError" in r.getMessage() or r.exc_info for r in caplog.records)


@pytest.mark.parametrize("exc", [KeyboardInterrupt, SystemExit])
def test_base_exceptions_propagate(loop, exc):
    def raiser():
        raise exc()

    seen = []
    loop.call_soon(raiser)
    loop.call_soon(seen.append, "after")
    with pytest.raises(exc):
        loop.run_forever()
    assert not loop.is_running()
    # the rest of the batch is still queued
    loop.call_soon(loop.stop)
    loop.run_forever()
    assert seen == ["after"]


def test_run_until_complete_and_state(loop):
    async def main():
        assert loop.is_running()
        assert asyncio.get_running_loop() is loop
        await asyncio.sleep(0)
        return 42

    assert not loop.is_running()
    assert run(loop, main()) == 42
    assert not loop.is_running() and not loop.is_closed()
    loop.close()
    assert loop.is_closed()
    loop.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        loop.call_soon(print)
    with pytest.raises(RuntimeError, match="closed"):
        loop.call_later(1, print)
    with pytest.raises(RuntimeError):
        loop.run_forever()


def test_close_releases_pending_timers_and_callbacks(loop):
    class Token:
        pass

    timer_arg, soon_arg = Token(), Token()
    refs = [weakref.ref(timer_arg), weakref.ref(soon_arg)]
    loop.call_later(3600, id, timer_arg)
    loop.call_soon(id, soon_arg)
    del timer_arg, soon_arg
    loop.close()
    assert [r() for r in refs] == [None, None]


def test_close_lets_gc_collect_a_sleeping_task_in_a_cycle(loop):
    # tornado's test_gc_infinite_coro: a task suspended in asyncio.sleep()
    # whose loop is closed goes at the next collection, and its finally runs
    seen = []

    async def forever():
        try:
            while True:
                await asyncio.sleep(1e-3)
                seen.append("woke")
        finally:
            seen.append("finally")

    async def main():
        task = asyncio.ensure_future(forever())
        task.refcycle = task
        await asyncio.sleep(0.05)
        return weakref.ref(task)

    task_ref = run(loop, main())
    loop.close()
    gc.collect()
    assert task_ref() is None
    assert "woke" in seen and seen[-1] == "finally"


def test_close_running_loop_raises(loop):
    async def main():
        with pytest.raises(RuntimeError):
            loop.close()

    run(loop, main())


def test_run_while_running_raises(loop):
    async def main():
        coro = asyncio.sleep(0)
        with pytest.raises(RuntimeError):
            loop.run_until_complete(coro)
        coro.close()

    run(loop, main())


def test_call_soon_threadsafe_wakes_sleeping_loop(loop):
    fut = loop.create_future()

    def worker():
        time.sleep(0.05)
        loop.call_soon_threadsafe(fut.set_result, "woken")

    threading.Thread(target=worker).start()
    t0 = time.monotonic()
    # nothing else is scheduled: the loop sleeps in the kernel until woken
    assert loop.run_until_complete(fut) == "woken"
    assert time.monotonic() - t0 < 2


def test_call_soon_threadsafe_from_many_threads(loop):
    n_threads, per_thread = 8, 500
    counter = []
    done = loop.create_future()

    def add():
        counter.append(1)
        if len(counter) == n_threads * per_thread and not done.done():
            done.set_result(None)

    def worker():
        for _ in range(per_thread):
            loop.call_soon_threadsafe(add)

    threads = [threading.Thread(target=worker) for _ in range(n_threads)]
    for t in threads:
        t.start()
    run(loop, done)
    for t in threads:
        t.join()
    assert len(counter) == n_threads * per_thread


def test_futures_tasks_and_task_factory(loop):
    created = []

    def factory(lp, coro, **kwargs):
        task = asyncio.Task(coro, loop=lp, **kwargs)
        created.append(task)
        return task

    loop.set_task_factory(factory)
    assert loop.get_task_factory() is factory

    async def child():
        return "child"

    async def main():
        fut = loop.create_future()
        loop.call_soon(fut.set_result, 1)
        t = loop.create_task(child())
        return await fut, await t

    assert run(loop, main()) == (1, "child")
    assert len(created) >= 2
    loop.set_task_factory(None)


def test_create_future_and_get_debug(loop):
    fut = loop.create_future()
    assert isinstance(fut, asyncio.Future) and type(fut) is asyncio.Future
    assert fut.get_loop() is loop and not fut.done()
    assert loop.get_debug() is False and fut._source_traceback is None
    loop.set_debug(True)
    assert loop.get_debug() is True
    # in debug mode a future records where it was created
    assert loop.create_future()._source_traceback
    loop.set_debug(False)
    assert loop.get_debug() is False
    fut.cancel()


def test_run_in_executor_and_default_executor(loop):
    import concurrent.futures

    async def main():
        r1 = await loop.run_in_executor(None, sum, [1, 2, 3])
        ex = concurrent.futures.ThreadPoolExecutor(2)
        loop.set_default_executor(ex)
        r2 = await loop.run_in_executor(None, threading.get_ident)
        await loop.shutdown_default_executor()
        return r1, r2

    r1, r2 = run(loop, main())
    assert r1 == 6 and r2 != threading.get_ident()


def test_getaddrinfo_getnameinfo(loop):
    async def main():
        infos = await loop.getaddrinfo("127.0.0.1", 80, type=1)
        name = await loop.getnameinfo(("127.0.0.1", 80))
        return infos, name

    infos, name = run(loop, main())
    assert infos[0][4] == ("127.0.0.1", 80)
    assert isinstance(name[0], str)


def test_shutdown_asyncgens(loop):
    finalized = []

    async def agen():
        try:
            yield 1
            yield 2
        finally:
            finalized.append(True)

    async def main():
        g = agen()
        await g.__anext__()
        return g

    g = run(loop, main())
    run(loop, loop.shutdown_asyncgens())
    assert finalized == [True]
    del g


def test_debug_mode_checks_and_slow_callbacks(loop, caplog):
    loop.set_debug(True)
    assert loop.get_debug()
    loop.slow_callback_duration = 0.01

    with pytest.raises(TypeError):
        loop.call_soon(42)  # not callable: checked in debug mode

    async def main():
        errors = []

        def other_thread():
            try:
                loop.call_soon(print)
            except RuntimeError as exc:
                errors.append(exc)

        t = threading.Thread(target=other_thread)
        t.start()
        t.join()
        assert errors and "thread" in str(errors[0])
        h = loop.call_soon(lambda: None)
        assert h._source_traceback  # debug mode records where it was created
        loop.call_soon(time.sleep, 0.05)
        await asyncio.sleep(0.1)

    with caplog.at_level(logging.WARNING, logger="asyncio"):
        run(loop, main())
    assert any("took" in r.getMessage() and "seconds" in r.getMessage() for r in caplog.records)
    loop.set_debug(False)


@pytest.mark.parametrize("kind", ["uringloop", "asyncio"])
def test_pythonasynciodebug_env_enables_debug(kind):
    code = (
        "import asyncio, uringloop\n"
        f"lp = uringloop.new_event_loop() if {kind!r} == 'uringloop' else asyncio.new_event_loop()\n"
        "print(lp.get_debug()); lp.close()\n"
    )
    env = dict(os.environ, PYTHONASYNCIODEBUG="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "True", out.stderr

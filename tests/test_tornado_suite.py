"""tornado's own test suite on uringloop.

tornado 6 runs on asyncio's loop, and uses it differently from the other
suites here: its IOStream watches file descriptors itself with
add_reader()/add_writer() rather than using transports, so its HTTP server
and client, TCP server and client, WebSockets and subprocess pipes all run
on the loop's fd watching; its IOLoop schedules with call_at() and
call_soon_threadsafe(), and its tests check what a closed loop lets the
garbage collector take. tornado's runner treats warnings as errors and fails
a run that logs anything the tests did not expect. The tests come with the
installed tornado package (tornado/test). tornado_uringloop_runner.py runs
them in a child with uringloop's policy installed, so every IOLoop's asyncio
loop is a uringloop loop, counted. A test that fails twice on uringloop and
passes on asyncio's loop fails ours. An earlier run by hand found the timers
that close() left referenced (tornado's test_gc_infinite_coro).
"""

import re
import sys

import pytest

from suite_support import HERE, loops_made, run_child, suite_env

RUNNER = HERE / "tornado_uringloop_runner.py"


def _run(tmp_path, name, loop_name, tests=()):
    """Runs the runner; returns (ids of tests that failed, tests run, loops made, exit status, output)."""
    loops = tmp_path / f"{name}.loops"
    loops.mkdir()
    output, status = run_child([sys.executable, str(RUNNER), loop_name, *tests], tmp_path, suite_env(loops),
                               tmp_path / f"{name}.log", timeout=900)
    failures = set()
    # "FAIL: test_x (tornado.test.m.Class.test_x)" from 3.11, "(tornado.test.m.Class)" before
    for method, where in re.findall(r"^(?:FAIL|ERROR): (\w+) \(([\w.]+)\)", output, re.M):
        failures.add(where if where.endswith(f".{method}") else f"{where}.{method}")
    ran = re.search(r"^Ran (\d+) tests?", output, re.M)
    return failures, int(ran.group(1)) if ran else 0, loops_made(loops), status, output


@pytest.mark.timeout(1800)
def test_tornado_suite_fails_nothing_on_uringloop_that_passes_on_asyncio(tmp_path):
    failures, ran, made, status, out = _run(tmp_path, "uring", "uringloop")

    assert made > 500, f"only {made} uringloop loops were made:\n{out[-3000:]}"
    assert ran > 1000, out[-3000:]
    # a failed run without a failed test: something logged that should not have
    assert status == 0 or failures, out[-6000:]
    if not failures:
        return
    again, _, _, _, out2 = _run(tmp_path, "uring2", "uringloop", sorted(failures))
    base, _, _, _, _ = _run(tmp_path, "base", "asyncio", sorted(failures))
    only_uring = again - base
    assert not only_uring, f"fail on uringloop, pass on asyncio: {sorted(only_uring)}\n{out2[-6000:]}"

"""Running a third-party project's own test suite on uringloop.

The suite runs in a child pytest, from the unpacked sdist that
scripts/setup.sh puts in build/thirdparty, with a plugin of ours (``-p``)
that makes its loops uringloop loops and counts them: each process of the
run writes its count to a file in $URING_SUITE_LOOPS, and the counts are
summed, which is how the outer test knows the suite really ran on uringloop.
"""

import os
import pathlib
import signal
import subprocess
import sys
import xml.etree.ElementTree as ET

import uringloop

ROOT = pathlib.Path(__file__).resolve().parent.parent
HERE = pathlib.Path(__file__).resolve().parent
THIRDPARTY = ROOT / "build" / "thirdparty"


_loops_made = 0


def new_counted_loop():
    """What a plugin hands the suite for a new loop: a uringloop loop, counted."""
    global _loops_made
    loop = uringloop.new_event_loop()
    assert type(loop) is uringloop.Loop, loop
    _loops_made += 1
    return loop


class CountingPolicy(uringloop.EventLoopPolicy):
    """uringloop's policy, its loops counted: for suites that take their loops from the policy."""

    def new_event_loop(self):
        return new_counted_loop()


def record_loops_made():
    """Called by a plugin when its process ends."""
    folder = os.environ.get("URING_SUITE_LOOPS")
    if folder:
        pathlib.Path(folder, str(os.getpid())).write_text(str(_loops_made))


def _default_sighup():
    """SIGHUP as the suites expect it (uvloop's test_send_signal kills a child
    with it), even under nohup, whose ignored SIGHUP every child inherits."""
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


def _kill_group(proc):
    """The suite runs in a session of its own: whatever its tests left
    behind (a child that outlived a timed-out test) goes with it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def suite_env(loops):
    """The environment of a suite's child: our plugins importable, and the
    folder where each of its processes writes how many loops it made."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), env.get("PYTHONPATH")) if p)
    env["URING_SUITE_LOOPS"] = str(loops)
    return env


def loops_made(loops):
    return sum(int(f.read_text()) for f in loops.iterdir())


def run_child(cmd, cwd, env, log, timeout):
    """Runs a suite's child process with its output in the file `log`;
    returns (output, exit status). The child has a session of its own, and
    whatever it leaves behind is killed with it."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=_default_sighup)
        try:
            proc.wait(timeout=timeout)
        finally:
            _kill_group(proc)
    return log.read_text(errors="replace"), proc.returncode


def run_suite(suite, tmp_path, name, args, plugin=None, timeout=900, pytest_asyncio=False):
    """Runs pytest in `suite`; returns ({test id: outcome}, loops made, output).
    A test id is "classname::name" as the junit report gives it. pytest-asyncio
    (installed for redis-py's suite) is kept out of the suites that do not
    use it, so that it cannot change how their tests run."""
    report = tmp_path / f"{name}.xml"
    loops = tmp_path / f"{name}.loops"
    loops.mkdir()
    env = suite_env(loops)
    cmd = [sys.executable, "-m", "pytest", *(["-p", plugin] if plugin else []), "-p", "no:cacheprovider", "-q",
           *([] if pytest_asyncio else ["-p", "no:asyncio"]),
           "--junitxml", str(report), "-o", "junit_family=xunit1", *args]
    output, _ = run_child(cmd, suite, env, tmp_path / f"{name}.log", timeout)
    assert report.exists(), output[-3000:]
    outcomes = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        kinds = {child.tag for child in case}
        outcomes[f"{case.get('classname')}::{case.get('name')}"] = (
            "failed" if kinds & {"failure", "error"} else "skipped" if "skipped" in kinds else "passed")
    return outcomes, loops_made(loops), output


def failed(outcomes):
    return {t for t, o in outcomes.items() if o == "failed"}


def node_id(suite, test_id):
    """The pytest node id of a junit test id ("tests.test_x.TestClass::test_y[p]")."""
    classname, name = test_id.rsplit("::", 1)
    parts = classname.split(".")
    for i in range(len(parts), 0, -1):
        path = suite / pathlib.Path(*parts[:i]).with_suffix(".py")
        if path.exists():
            return "::".join([str(path.relative_to(suite)), *parts[i:], name])
    raise LookupError(f"no file in {suite} for {test_id}")


def assert_no_failure_only_on_uringloop(suite, tmp_path, uring, uring_args, asyncio_args, plugin,
                                        on_asyncio=lambda test: test, base_plugin=None, **run_kwargs):
    """The tests that failed in the run `uring` are run again on uringloop and
    on asyncio's loop; a test that fails on uringloop twice and passes on
    asyncio fails the caller. `uring_args(ids)` and `asyncio_args(ids)` give
    each rerun's pytest arguments for the node ids; `on_asyncio(test)` names a
    test as it appears in the asyncio run (for suites with a loop parameter);
    `base_plugin` is loaded into the asyncio run (none by default)."""
    suspects = sorted(failed(uring))
    if not suspects:
        return
    ids = [node_id(suite, t) for t in suspects]
    uring2, _, out2 = run_suite(suite, tmp_path, "uring2", uring_args(ids), plugin=plugin, **run_kwargs)
    base, _, _ = run_suite(suite, tmp_path, "base", asyncio_args([on_asyncio(i) for i in ids]), plugin=base_plugin,
                           **run_kwargs)
    only_uring = {t for t in failed(uring2) if on_asyncio(t) not in failed(base)}
    assert not only_uring, f"fail on uringloop, pass on asyncio: {sorted(only_uring)}\n{out2[-6000:]}"

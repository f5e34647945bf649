"""uvicorn's own test suite, with its servers on uringloop.

uvicorn on uringloop (`--loop uringloop:new_event_loop`, or any program that
installs uringloop's policy and serves with uvicorn) is how many users will
meet the loop first. uvicorn's tests start real servers (HTTP/1.1 with
httptools and h11, WebSockets with websockets and wsproto, TLS, lifespan,
flow control, keep-alive and shutdown timeouts) inside the test's loop, so
with uringloop's policy installed (policy_uringloop_plugin.py) they
exercise our transports, servers and timers under uvicorn's protocols. The
sdist of the installed uvicorn version is fetched by scripts/setup.sh into
build/thirdparty. The test fails if a test fails on uringloop, twice, and
passes on asyncio's loop, so failures that come from the machine do not count.
"""

import importlib.metadata

import pytest

from suite_support import THIRDPARTY, assert_no_failure_only_on_uringloop, run_suite

UVICORN_VERSION = importlib.metadata.version("uvicorn")
SUITE = THIRDPARTY / f"uvicorn-{UVICORN_VERSION}"
PLUGIN = "policy_uringloop_plugin"
# uvicorn's addopts ask for 8 xdist workers (its filterwarnings stay);
# its tests mostly wait on timers and sockets, so 4 workers on 2 cores
OPTIONS = ["-o", "addopts=", "-n", "4"]
# asserts that the default policy's loop is asyncio's: the plugin replaces it on purpose
NOT_APPLICABLE = ["tests/test_compat.py::test_asyncio_run__default_loop_factory"]


@pytest.mark.timeout(1800)
def test_uvicorn_suite_fails_nothing_on_uringloop_that_passes_on_asyncio(tmp_path):
    assert (SUITE / "tests").is_dir(), f"{SUITE} is missing: scripts/setup.sh downloads uvicorn's sdist there"
    deselect = [arg for test in NOT_APPLICABLE for arg in ("--deselect", test)]
    uring, made, out = run_suite(SUITE, tmp_path, "uring",
                                 [*OPTIONS, "tests", "--ignore=tests/benchmarks", *deselect], plugin=PLUGIN)

    assert made > 500, f"only {made} uringloop loops were made:\n{out[-3000:]}"
    passed = [t for t, o in uring.items() if o == "passed"]
    assert len(passed) > 1000, out[-3000:]

    rerun = lambda ids: [*OPTIONS, *ids]  # noqa: E731
    assert_no_failure_only_on_uringloop(SUITE, tmp_path, uring, rerun, rerun, PLUGIN)

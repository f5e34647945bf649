"""redis-py's own asyncio tests, against a real redis-server, on uringloop.

redis-py's asyncio client is asyncio streams under a connection pool: every
command is a write and a read with timeouts around them, pub/sub readers,
pipelines, blocking commands, locks, MONITOR, and cancellation of commands
in flight (test_cwe_404 cancels them at every point through a proxy). The
sdist of the installed redis version is fetched by scripts/setup.sh into
build/thirdparty, and Debian's redis-server is started here on a free port.
policy_uringloop_plugin.py installs uringloop's policy, so every loop that
pytest-asyncio makes for these tests is a uringloop loop. The modules below
are the ones that need a plain redis-server (the others need Redis Stack
modules, a cluster or sentinels). The test fails if a test fails on
uringloop, twice, and passes on asyncio's loop, so what Debian's redis 7.0
lacks for a newer client (commands, RESP3 details) does not count.
"""

import importlib.metadata
import shutil
import socket
import subprocess
import time

import pytest

from suite_support import THIRDPARTY, assert_no_failure_only_on_uringloop, run_suite

REDIS_VERSION = importlib.metadata.version("redis")
SUITE = THIRDPARTY / f"redis-{REDIS_VERSION}"
PLUGIN = "policy_uringloop_plugin"
MODULES = ["connection", "connection_pool", "connect", "pubsub", "pipeline", "lock", "cwe_404", "commands",
           "monitor", "encoding", "scripting"]


@pytest.fixture
def redis_url(tmp_path):
    server = shutil.which("redis-server")
    assert server, "redis-server is missing: scripts/setup.sh installs Debian's redis-server"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.timeout(1800)
def test_redis_suite_fails_nothing_on_uringloop_that_passes_on_asyncio(tmp_path, redis_url):
    assert (SUITE / "tests").is_dir(), f"{SUITE} is missing: scripts/setup.sh downloads redis-py's sdist there"
    options = ["-o", "addopts=", "--timeout", "60", f"--redis-url={redis_url}"]
    modules = [f"tests/test_asyncio/test_{m}.py" for m in MODULES]
    uring, made, out = run_suite(SUITE, tmp_path, "uring", [*options, *modules], plugin=PLUGIN, pytest_asyncio=True)

    assert made > 800, f"only {made} uringloop loops were made:\n{out[-3000:]}"
    passed = [t for t, o in uring.items() if o == "passed"]
    assert len(passed) > 900, out[-3000:]

    rerun = lambda ids: [*options, *ids]  # noqa: E731
    assert_no_failure_only_on_uringloop(SUITE, tmp_path, uring, rerun, rerun, PLUGIN, pytest_asyncio=True)

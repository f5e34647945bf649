"""anyio's own test suite, run on uringloop and on asyncio, compared.

anyio's tests exercise a loop the way a library does: sockets closed under a
waiting reader, TLS handshakes that fail, UDP and Unix datagrams, threads,
subprocesses, signals, cancellation everywhere. The sdist of the installed
anyio version is fetched by scripts/setup.sh into build/thirdparty. Each
async test runs there on "asyncio" and on "asyncio+uvloop", which
anyio_uringloop_plugin.py turns into uringloop. The test fails if any test
fails on uringloop that passes on asyncio (checked twice, so that a test
that is merely flaky on this machine is not counted), so failures that come
from the machine (no IPv6 route, no IPv6 localhost) do not count, and
everything uringloop gets wrong does.
"""

import importlib.metadata
import re
import socket

import pytest

from suite_support import THIRDPARTY, failed, node_id, run_suite

ANYIO_VERSION = importlib.metadata.version("anyio")
SUITE = THIRDPARTY / f"anyio-{ANYIO_VERSION}"
PLUGIN = "anyio_uringloop_plugin"


def _has_ipv6_localhost():
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def _run(tmp_path, name, args):
    """Runs anyio's tests; the asyncio+uvloop parameter is named asyncio in
    the ids returned, so that both runs can be compared."""
    outcomes, made, out = run_suite(SUITE, tmp_path, name, args, plugin=PLUGIN)
    return {t.replace("asyncio+uvloop", "asyncio"): o for t, o in outcomes.items()}, made, out


@pytest.mark.timeout(1800)
def test_anyio_suite_fails_nothing_on_uringloop_that_passes_on_asyncio(tmp_path):
    assert (SUITE / "tests").is_dir(), f"{SUITE} is missing: scripts/setup.sh downloads anyio's sdist there"
    machine = "" if _has_ipv6_localhost() else " and not ipv6 and not dualstack"
    uring, made, out = _run(tmp_path, "uring", ["tests", "-k", "uvloop" + machine])
    base, _, _ = _run(tmp_path, "base", ["tests", "-k", "asyncio and not uvloop" + machine])

    assert made > 500, f"only {made} uringloop loops were made:\n{out[-3000:]}"
    passed = [t for t, o in uring.items() if o == "passed"]
    assert len(passed) > 900, out[-3000:]

    only_uring = failed(uring) - failed(base)
    if only_uring:  # once more, both loops, just those tests
        ids = sorted(only_uring)
        uring2, _, out2 = _run(tmp_path, "uring2", ids_for(ids, "asyncio+uvloop"))
        base2, _, _ = _run(tmp_path, "base2", ids_for(ids, "asyncio"))
        only_uring = failed(uring2) - failed(base2)
        assert not only_uring, f"fail on uringloop, pass on asyncio: {sorted(only_uring)}\n{out2[-6000:]}"


def ids_for(ids, backend):
    """Node ids of anyio's tests, with their backend parameter set to `backend`."""
    nodes = []
    for test_id in ids:
        head, _, params = node_id(SUITE, test_id).partition("[")
        params = re.sub(r"(?<![^-])asyncio(?![^-\]])", backend, params) if params else ""
        nodes.append(f"{head}[{params}" if params else head)
    return nodes

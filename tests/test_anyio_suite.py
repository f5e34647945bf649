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
import os
import pathlib
import re
import socket
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
HERE = pathlib.Path(__file__).resolve().parent
ANYIO_VERSION = importlib.metadata.version("anyio")
SUITE = ROOT / "build" / "thirdparty" / f"anyio-{ANYIO_VERSION}"


def _has_ipv6_localhost():
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def _run(tmp_path, name, args):
    """Runs anyio's tests; returns ({test id: outcome}, loops made)."""
    report = tmp_path / f"{name}.xml"
    loops = tmp_path / f"{name}.loops"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), env.get("PYTHONPATH")) if p)
    env["URING_ANYIO_LOOPS"] = str(loops)
    cmd = [sys.executable, "-m", "pytest", "-p", "anyio_uringloop_plugin", "-p", "no:cacheprovider", "-q",
           "--junitxml", str(report), "-o", "junit_family=xunit1", *args]
    proc = subprocess.run(cmd, cwd=SUITE, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=900)
    assert report.exists(), proc.stdout[-3000:]
    outcomes = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        test_id = f"{case.get('classname')}::{case.get('name')}".replace("asyncio+uvloop", "asyncio")
        kinds = {child.tag for child in case}
        outcomes[test_id] = ("failed" if kinds & {"failure", "error"} else
                             "skipped" if "skipped" in kinds else "passed")
    made = int(loops.read_text()) if loops.exists() else 0
    return outcomes, made, proc.stdout


def _failed(outcomes):
    return {t for t, o in outcomes.items() if o == "failed"}


@pytest.mark.timeout(1800)
def test_anyio_suite_fails_nothing_on_uringloop_that_passes_on_asyncio(tmp_path):
    assert (SUITE / "tests").is_dir(), f"{SUITE} is missing: scripts/setup.sh downloads anyio's sdist there"
    machine = "" if _has_ipv6_localhost() else " and not ipv6 and not dualstack"
    uring, made, out = _run(tmp_path, "uring", ["tests", "-k", "uvloop" + machine])
    base, _, _ = _run(tmp_path, "base", ["tests", "-k", "asyncio and not uvloop" + machine])

    assert made > 500, f"only {made} uringloop loops were made:\n{out[-3000:]}"
    passed = [t for t, o in uring.items() if o == "passed"]
    assert len(passed) > 900, out[-3000:]

    only_uring = _failed(uring) - _failed(base)
    if only_uring:  # once more, both loops, just those tests
        ids = sorted(only_uring)
        uring2, _, out2 = _run(tmp_path, "uring2", [*ids_for(ids, "asyncio+uvloop")])
        base2, _, _ = _run(tmp_path, "base2", [*ids_for(ids, "asyncio")])
        only_uring = _failed(uring2) - _failed(base2)
        assert not only_uring, f"fail on uringloop, pass on asyncio: {sorted(only_uring)}\n{out2[-6000:]}"


def ids_for(ids, backend):
    """Node ids of anyio's tests (as the junit report names them) for one backend."""
    nodes = []
    for test_id in ids:
        classname, name = test_id.rsplit("::", 1)
        parts = classname.split(".")
        # classname is "tests.test_x" or "tests.test_x.TestClass" (or tests.streams.test_y...)
        for i in range(len(parts), 0, -1):
            path = SUITE / pathlib.Path(*parts[:i]).with_suffix(".py")
            if path.exists():
                node = "::".join([str(path.relative_to(SUITE)), *parts[i:], name])
                head, _, params = node.partition("[")
                params = re.sub(r"(?<![^-])asyncio(?![^-\]])", backend, params) if params else ""
                nodes.append(f"{head}[{params}" if params else head)
                break
    return nodes

"""aiohttp's own test suite, its client and server tests on uringloop.

aiohttp's functional tests start real servers and clients in the test's
loop: HTTP/1.1 both ways, keep-alive and its timers, chunked and compressed
bodies, sendfile, WebSockets, proxies, TLS, Unix sockets, graceful shutdown
of runners and sites, and connections lost in every state. The sdist of the
installed aiohttp version is fetched by scripts/setup.sh into
build/thirdparty; aiohttp_uringloop_plugin.py runs its "uvloop" loop
parameter on uringloop. The modules below are the ones that use a loop's
networking (the others test parsers, multidicts and helpers). The test fails
if a test fails on uringloop, twice, and passes on asyncio's loop ("pyloop"),
so failures that come from the machine (running as root, which can read a
file with mode 000) do not count.
"""

import importlib.metadata

import pytest

from suite_support import THIRDPARTY, assert_no_failure_only_on_uringloop, run_suite

AIOHTTP_VERSION = importlib.metadata.version("aiohttp")
SUITE = THIRDPARTY / f"aiohttp-{AIOHTTP_VERSION}"
PLUGIN = "aiohttp_uringloop_plugin"
MODULES = ["client_functional", "client_middleware", "client_session", "client_ws_functional", "connector",
           "proxy_functional", "run_app", "test_utils", "web_functional", "web_middleware", "web_runner",
           "web_sendfile_functional", "web_server", "web_urldispatcher", "web_websocket_functional"]
# aiohttp's addopts ask for coverage and all cores; its markers and filterwarnings stay
OPTIONS = ["-o", "addopts=", "-m", "not dev_mode and not autobahn and not internal", "-n", "2", "--timeout", "120"]


def _args(loop, tests):
    return [*OPTIONS, f"--aiohttp-loop={loop}", *tests]


def _on_asyncio(test):
    """The same test with asyncio's loop parameter."""
    return test.replace("[uvloop", "[pyloop")


@pytest.mark.timeout(1800)
def test_aiohttp_suite_fails_nothing_on_uringloop_that_passes_on_asyncio(tmp_path):
    assert (SUITE / "tests").is_dir(), f"{SUITE} is missing: scripts/setup.sh downloads aiohttp's sdist there"
    modules = [f"tests/test_{m}.py" for m in MODULES]
    uring, made, out = run_suite(SUITE, tmp_path, "uring", _args("uvloop", modules), plugin=PLUGIN)

    assert made > 1000, f"only {made} uringloop loops were made:\n{out[-3000:]}"
    on_uring = [t for t, o in uring.items() if o == "passed" and "[uvloop" in t]
    assert len(on_uring) > 900, out[-3000:]

    assert_no_failure_only_on_uringloop(SUITE, tmp_path, uring, lambda ids: _args("uvloop", ids),
                                        lambda ids: _args("pyloop", ids), PLUGIN, on_asyncio=_on_asyncio)

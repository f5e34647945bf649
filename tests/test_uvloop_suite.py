"""uvloop's own test suite, its asyncio half, on uringloop.

uvloop tests every loop method twice, on uvloop and on asyncio's loop, and
the asyncio half states asyncio's behaviour in detail: TCP, Unix and UDP
transports and servers, sock_* calls, pipes, subprocesses and their stdio,
signals, DNS, executors, contexts, and SSL against pyOpenSSL peers. The
sdist of the installed uvloop is fetched by scripts/setup.sh into
build/thirdparty (without its source package, which, uncompiled, would
shadow the installed one); uvloop_uringloop_plugin.py runs
that half on uringloop. A second run takes the SSL classes again under
another implementation name, so that the tests uvloop keeps for its own SSL
protocol (which asyncio has used since 3.11) run too. The test fails if a
test fails on uringloop, twice, and passes on asyncio's loop.
"""

import importlib.metadata

import pytest

from suite_support import THIRDPARTY, assert_no_failure_only_on_uringloop, run_suite

UVLOOP_VERSION = importlib.metadata.version("uvloop")
SUITE = THIRDPARTY / f"uvloop-{UVLOOP_VERSION}"
PLUGIN = "uvloop_uringloop_plugin"
# uvloop's own addopts (no capture: its subprocess tests redirect fds 1 and 2) and two workers
OPTIONS = ["-n", "2", "--timeout", "120"]
ASYNCIO_HALF = "_AIO_ or BaseAIO or AIOExecutors or AIOSockets"
SSL_CLASSES = "Test_AIO_TCPSSL or Test_AIO_UnixSSL"
# Under the other name these fail on asyncio's own loop as well (uringloop runs asyncio's SSL protocol,
# ARCHITECTURE.md): uvloop's protocol has moved on since asyncio took it in 3.11, or the test reaches into
# uvloop. Left out of the second run, as some only wait out timeouts (up to two minutes) on both loops.
SSL_AS_UVLOOP_ONLY = {
    # asyncio reports APPLICATION_DATA_AFTER_CLOSE_NOTIFY; uvloop discards the data (the test skips on asyncio)
    "test_bpo_39951_discard_trailing_data",
    # data that came with the handshake's last flight reaches data_received() before start_tls() has
    # returned the TLS transport, so the test's echo goes out in plaintext (the client: WRONG_VERSION_NUMBER)
    "test_first_data_after_wakeup",
    # reaches uvloop's SSL protocol through the extra 'uvloop.sslproto', which only uvloop has (None)
    "test_flush_before_shutdown",
    # a buffered protocol by duck typing (get_buffer() on a BaseProtocol): asyncio's SSL protocol tells them
    # apart with isinstance(), so it calls data_received(), which that protocol lacks
    "test_start_tls_client_buf_proto_1",
    # the test needs eof_received() after close_notify, which asyncio's SSL protocol does not call
    "test_shutdown_timeout_handler_not_set",
    # waits 10 s for eof_received() after close() with reading paused; asyncio's SSL protocol does not deliver it
    "test_shutdown_while_pause_reading",
}


def _runner(selection, implementation, leave_out=()):
    """A run's pytest arguments for a loop ("uringloop" or "asyncio") and test ids."""
    deselect = [arg for test in sorted(leave_out)
                for arg in ("--deselect", f"tests/test_tcp.py::Test_AIO_TCPSSL::{test}")]

    def args(loop, tests):
        return [*OPTIONS, "-k", selection, f"--aio-loop={loop}", f"--aio-implementation={implementation}", *deselect,
                *tests]
    return args


def _check(tmp_path, name, args, min_loops, min_passed):
    assert (SUITE / "tests").is_dir(), f"{SUITE} is missing: scripts/setup.sh downloads uvloop's sdist there"
    uring, made, out = run_suite(SUITE, tmp_path, name, args("uringloop", ["tests"]), plugin=PLUGIN)
    assert made > min_loops, f"only {made} uringloop loops were made:\n{out[-3000:]}"
    passed = [t for t, o in uring.items() if o == "passed"]
    assert len(passed) > min_passed, out[-3000:]
    assert_no_failure_only_on_uringloop(SUITE, tmp_path, uring, lambda ids: args("uringloop", ids),
                                        lambda ids: args("asyncio", ids), PLUGIN, base_plugin=PLUGIN)


@pytest.mark.timeout(1200)
def test_uvloop_suite_asyncio_half_fails_nothing_on_uringloop_that_passes_on_asyncio(tmp_path):
    _check(tmp_path, "aio", _runner(ASYNCIO_HALF, "asyncio"), min_loops=190, min_passed=190)


@pytest.mark.timeout(1200)
def test_uvloop_ssl_tests_kept_from_asyncio_pass_on_uringloop(tmp_path):
    _check(tmp_path, "ssl", _runner(SSL_CLASSES, "uringloop", SSL_AS_UVLOOP_ONLY), min_loops=20, min_passed=20)

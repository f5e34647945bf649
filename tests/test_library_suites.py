"""Four network libraries' own test suites on uringloop: aiosmtplib, asyncssh, aioquic and pyzmq.

Each library tests its asyncio side against a peer of its own over real
sockets, so its suite checks the loop from a side the other harnesses do not:

- aiosmtplib (client) against aiosmtpd (server): asyncio streams and
  protocols, TLS from the start and upgraded with ``start_tls``, connect and
  read timeouts, servers that drop the connection mid-reply, Unix sockets.
- asyncssh, client and server both in the test process: TCP and Unix port
  forwarding (listeners opened and closed while connections run through them),
  subprocesses wired to SSH channels through pipes and sockets, stream
  flow control on channels.
- aioquic: QUIC over UDP datagram endpoints, client and server, on IPv4
  and IPv6: packet loss and its retransmission timers, stateless retry,
  version negotiation, garbage datagrams, connect timeouts.
- pyzmq: zmq.asyncio sockets and tornado's ZMQStream. libzmq gives each
  socket one edge-triggered file descriptor that only says "look at the
  socket's events"; pyzmq watches it with add_reader(), and its tests race
  sends, receives, polls, cancellations and closes against those wake-ups.

The sdists of the installed versions are fetched by scripts/setup.sh into
build/thirdparty. policy_uringloop_plugin.py installs uringloop's policy, so
every loop these suites make (pytest-asyncio's, ``asyncio.new_event_loop``'s,
``asyncio.run``'s) is a uringloop loop, counted. A suite fails ours when one
of its tests fails on uringloop twice and passes on asyncio's loop, so what
fails for reasons of the machine or of Python 3.11 on both loops (files mode
000 that root can read anyway; aiosmtplib's address-injection tests, which
need a newer email.utils) does not count.
"""

import importlib.metadata

import pytest

from suite_support import THIRDPARTY, assert_no_failure_only_on_uringloop, run_suite

PLUGIN = "policy_uringloop_plugin"

# project: (pytest options for every run, the tests to run, uses pytest-asyncio, fewest loops, fewest tests passed)
SUITES = {
    # the whole suite (about 410 tests, 5 s): most of it talks to aiosmtpd
    "aiosmtplib": (["-n", "2"], ["tests"], True, 250, 350),
    # the modules that move bytes through the loop (about 400 tests, 40 s; a
    # loop per test class); the others test key formats, ciphers and config
    "asyncssh": (["-n", "2", "--timeout", "60"],
                 [f"tests/test_{m}.py" for m in ("forward", "process", "stream", "channel", "subprocess")],
                 False, 20, 350),
    # the asyncio client and server over UDP (about 30 tests, 20 s; a test
    # whose datagrams go astray waits for its timeout). aioquic has no pytest
    # configuration: its setup.cfg is named so that pytest does not take ours,
    # from the folders above
    "aioquic": (["-n", "2", "--timeout", "30", "-c", "setup.cfg"], ["tests/test_asyncio.py"], False, 25, 28),
    # zmq.asyncio, its futures, and tornado's ZMQStream on asyncio (about 60
    # tests, 8 s); the rest of pyzmq's tests do not use a loop
    "pyzmq": (["--timeout", "60"], [f"tests/test_{m}.py" for m in ("asyncio", "future", "zmqstream", "ioloop")],
              True, 40, 50),
}


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("project", sorted(SUITES))
def test_suite_fails_nothing_on_uringloop_that_passes_on_asyncio(tmp_path, project):
    config, tests, pytest_asyncio, fewest_loops, fewest_passed = SUITES[project]
    suite = THIRDPARTY / f"{project}-{importlib.metadata.version(project)}"
    assert (suite / "tests").is_dir(), f"{suite} is missing: scripts/setup.sh downloads {project}'s sdist there"
    options = ["--timeout", "120", *config]  # a later --timeout wins
    uring, made, out = run_suite(suite, tmp_path, "uring", [*options, *tests], plugin=PLUGIN,
                                 pytest_asyncio=pytest_asyncio)

    assert made >= fewest_loops, f"only {made} uringloop loops were made:\n{out[-3000:]}"
    passed = [t for t, o in uring.items() if o == "passed"]
    assert len(passed) >= fewest_passed, out[-3000:]

    rerun = lambda ids: [*options, *ids]  # noqa: E731
    assert_no_failure_only_on_uringloop(suite, tmp_path, uring, rerun, rerun, PLUGIN, pytest_asyncio=pytest_asyncio)

"""Loaded into aiohttp's own test run by test_aiohttp_suite.py (``-p``).

aiohttp's pytest plugin gives every test that takes its ``loop`` fixture one
parameter per loop factory: "pyloop" (asyncio's) and, when ``import uvloop``
works, "uvloop". This plugin puts a stand-in module under that name whose
``new_event_loop`` makes uringloop loops, so the "uvloop" parameter runs on
uringloop, and installs uringloop's policy for the tests that make their own
loop (``web.run_app``). It counts the loops it made for the outer test
(suite_support.py).

aiohttp's tests also run under blockbuster, which fails a test on a blocking
call made below aiohttp's code. blockbuster lets asyncio's own
``create_unix_server`` and ``_stop_serving`` stat and unlink the socket file
(it names ``asyncio/unix_events.py``); uringloop makes the same calls, for
the same reasons, from ``uringloop/_net.py``, and the plugin grants them the
same allowance. A user of blockbuster on uringloop needs the same line.
"""

import asyncio
import sys
import types

import uringloop
from suite_support import CountingPolicy, new_counted_loop, record_loops_made

_standin = types.ModuleType("uvloop")
_standin.new_event_loop = new_counted_loop
_standin.Loop = uringloop.Loop
sys.modules["uvloop"] = _standin


_standin.EventLoopPolicy = CountingPolicy

# where uringloop/_net.py stats and unlinks a Unix server's socket file
_UNIX_SOCKET_FILE_FUNCTIONS = {"create_unix_server", "_remember_unix_socket_file", "_unlink_unix_socket_file"}


def _allow_uringloop_like_asyncio():
    try:
        from blockbuster import blockbuster as bb
    except ImportError:
        return
    original_init = bb.BlockBuster.__init__

    def __init__(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        for name in ("os.stat", "os.unlink"):
            self.functions[name].can_block_in("uringloop/_net.py", _UNIX_SOCKET_FILE_FUNCTIONS)

    bb.BlockBuster.__init__ = __init__


def pytest_configure(config):
    asyncio.set_event_loop_policy(CountingPolicy())
    _allow_uringloop_like_asyncio()


def pytest_unconfigure(config):
    record_loops_made()

"""Loaded into anyio's own test run by test_anyio_suite.py (``-p``).

anyio's conftest runs every async test on asyncio and on "asyncio+uvloop",
taking the loop factory from ``import uvloop``. This plugin puts a stand-in
module under that name whose ``new_event_loop`` makes uringloop loops, so
the second parameter runs on uringloop. It counts the loops it made for the
outer test (suite_support.py).
"""

import sys
import types

import uringloop
from suite_support import new_counted_loop, record_loops_made

_standin = types.ModuleType("uvloop")
_standin.new_event_loop = new_counted_loop
_standin.loop = types.SimpleNamespace(Loop=uringloop.Loop)
sys.modules["uvloop"] = _standin


def pytest_unconfigure(config):
    record_loops_made()

"""Loaded into uvloop's own test run (``-p``) by test_uvloop_suite.py.

uvloop's tests are written once as mixins and run twice: on uvloop
(``UVTestCase``) and on asyncio's loop (``AIOTestCase``, whose tests expect
asyncio's behaviour). This plugin makes ``AIOTestCase``'s loops and policy
uringloop's, counted for the outer test (suite_support.py), unless
``--aio-loop=asyncio`` asks for the stock loop (the comparison run).
``--aio-implementation`` renames the implementation the tests see: uvloop
skips its SSL tests when it is "asyncio", from before asyncio took over
uvloop's SSL protocol (3.11), and uringloop runs that protocol.
"""

import uvloop._testbase as tb

from suite_support import CountingPolicy, new_counted_loop, record_loops_made


def pytest_addoption(parser):
    parser.addoption("--aio-loop", choices=("uringloop", "asyncio"), default="uringloop")
    parser.addoption("--aio-implementation", default="asyncio")


def pytest_configure(config):
    tb.AIOTestCase.implementation = config.getoption("--aio-implementation")
    if config.getoption("--aio-loop") == "uringloop":
        tb.AIOTestCase.new_loop = lambda self: new_counted_loop()
        tb.AIOTestCase.new_policy = lambda self: CountingPolicy()


def pytest_unconfigure(config):
    record_loops_made()

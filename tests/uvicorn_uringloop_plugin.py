"""Loaded into uvicorn's own test run by test_uvicorn_suite.py (``-p``).

uvicorn's tests run their servers in the test's own loop (anyio's pytest
plugin, asyncio backend) or in ``asyncio.run``: both take the loop from the
policy, and this plugin installs uringloop's, so every loop they make is a
uringloop loop, counted for the outer test (suite_support.py). Tests that
ask for ``loop="asyncio"`` by name still get asyncio's selector loop.
"""

import asyncio

from suite_support import CountingPolicy, record_loops_made


def pytest_configure(config):
    asyncio.set_event_loop_policy(CountingPolicy())


def pytest_unconfigure(config):
    record_loops_made()

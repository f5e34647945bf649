"""Loaded into uvicorn's, redis-py's, aiosmtplib's, asyncssh's, aioquic's and
pyzmq's own test runs (``-p``) by test_uvicorn_suite.py, test_redis_suite.py
and test_library_suites.py.

Those suites take their loops from the policy: uvicorn's tests run their
servers in the test's own loop (anyio's pytest plugin, asyncio backend) or in
``asyncio.run``, and redis-py's async tests run in pytest-asyncio's loops.
This plugin installs uringloop's policy, so every loop they make is a
uringloop loop, counted for the outer test (suite_support.py). Tests that
ask for ``loop="asyncio"`` by name still get asyncio's selector loop.
"""

import asyncio

from suite_support import CountingPolicy, record_loops_made


def pytest_configure(config):
    asyncio.set_event_loop_policy(CountingPolicy())


def pytest_unconfigure(config):
    record_loops_made()

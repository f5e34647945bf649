"""Runs tornado's own test suite on uringloop or on asyncio's loop.

    python tornado_uringloop_runner.py uringloop|asyncio [test names...]

Started by test_tornado_suite.py. tornado's tests ship inside the tornado
package, and its runner (tornado.test.runtests) runs them with unittest.
tornado's IOLoop makes its asyncio loops with asyncio.new_event_loop(), so
uringloop's policy, installed here, makes them uringloop loops, counted.
Without test names, the whole suite runs.
"""

import asyncio
import atexit
import sys

from suite_support import CountingPolicy, record_loops_made


def main():
    loop_name, tests = sys.argv[1], sys.argv[2:]
    if loop_name == "uringloop":
        asyncio.set_event_loop_policy(CountingPolicy())
        atexit.register(record_loops_made)
    from tornado.test import runtests

    sys.argv[1:] = tests or ["tornado.test.runtests.all"]
    runtests.main()  # exits


if __name__ == "__main__":
    main()

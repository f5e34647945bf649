"""Runs CPython's own loop-generic asyncio tests against uringloop.

The mixins of ``test.test_asyncio`` take the loop from ``create_event_loop``;
each class below returns a ``uringloop.Loop`` and checks, in setUp, that the
loop under test really is one (so nothing silently falls back to asyncio's).
"""

import asyncio
import unittest

import uringloop
from test.test_asyncio import test_events, test_sock_lowlevel
from test.test_asyncio import utils as test_utils

# Every test of the mixins is collected; none is excluded.
EVENTS_EXCLUDED = set()
SOCK_EXCLUDED = set()


def _uring_loop_case(mixin, excluded):
    class Case(mixin, test_utils.TestCase):
        def create_event_loop(self):
            loop = uringloop.new_event_loop()
            assert type(loop) is uringloop.Loop, loop
            # test_timeout_rounding formats loop._selector into its failure
            # message; an io_uring loop has no selector.
            loop._selector = None
            return loop

        def setUp(self):
            super().setUp()
            assert isinstance(self.loop, uringloop.Loop), self.loop
    for name in excluded:
        setattr(Case, name, None)  # unittest collects only callables
    return Case


class UringEventLoopTests(_uring_loop_case(test_events.EventLoopTestsMixin, EVENTS_EXCLUDED),
                          test_events.SubprocessTestsMixin):
    pass


class UringSockTests(_uring_loop_case(test_sock_lowlevel.BaseSockTestsMixin, SOCK_EXCLUDED)):
    pass


if __name__ == "__main__":
    unittest.main()

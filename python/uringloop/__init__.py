"""uringloop: an asyncio event loop on io_uring.

    import asyncio, uringloop
    asyncio.set_event_loop_policy(uringloop.EventLoopPolicy())
    asyncio.run(main())

or ``uringloop.run(main())``, ``uringloop.install()``, ``uringloop.new_event_loop()``.
"""

import asyncio as _asyncio
import sys as _sys

from ._core import IOUringUnavailableError, probe as _probe
from ._loop import Loop

__version__ = "0.1.0"
__all__ = ("Loop", "EventLoopPolicy", "new_event_loop", "install", "run",
           "IOUringUnavailableError")


def new_event_loop():
    """Return a new uringloop.Loop."""
    return Loop()


class EventLoopPolicy(_asyncio.DefaultEventLoopPolicy):
    """asyncio's default policy, creating uringloop loops."""

    def _loop_factory(self):
        return Loop()

    def __repr__(self):
        return f"<uringloop.EventLoopPolicy at {id(self):#x}>"


def install():
    """Make uringloop the loop of asyncio.run() and asyncio.new_event_loop()."""
    _asyncio.set_event_loop_policy(EventLoopPolicy())


def run(main, *, debug=None):
    """Run the coroutine ``main`` on a new uringloop loop, like asyncio.run()."""
    try:
        loop = new_event_loop()
    except BaseException:
        # io_uring refused: say that one thing, not also "never awaited"
        if _asyncio.iscoroutine(main):
            main.close()
        raise
    if _sys.version_info >= (3, 11):
        with _asyncio.Runner(debug=debug, loop_factory=lambda: loop) as runner:
            return runner.run(main)
    loop.close()
    old = _asyncio.get_event_loop_policy()
    _asyncio.set_event_loop_policy(EventLoopPolicy())
    try:
        return _asyncio.run(main, debug=bool(debug))
    finally:
        _asyncio.set_event_loop_policy(old)

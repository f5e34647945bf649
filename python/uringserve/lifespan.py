"""The ASGI lifespan protocol: startup and shutdown events with state."""

import asyncio
import logging

logger = logging.getLogger("uringserve.error")


class Lifespan:
    def __init__(self, app, mode="auto"):
        self.app = app
        self.mode = mode
        self.state = {}
        self.queue = asyncio.Queue()
        self.startup_event = asyncio.Event()
        self.shutdown_event = asyncio.Event()
        self.startup_failed = False
        self.shutdown_failed = False
        self.error_occurred = False
        self.should_exit = False
        self.unsupported = False
        self.task = None

    async def startup(self):
        if self.mode == "off":
            return
        logger.info("Waiting for application startup.")
        self.task = asyncio.get_running_loop().create_task(self.main())
        await self.queue.put({"type": "lifespan.startup"})
        await self.startup_event.wait()
        if self.startup_failed or (self.error_occurred and self.mode == "on"):
            logger.error("Application startup failed. Exiting.")
            self.should_exit = True
        else:  # also when the app has no lifespan: log watchers wait for this line, as with uvicorn
            logger.info("Application startup complete.")

    async def shutdown(self):
        if self.mode == "off" or self.error_occurred or self.task is None:
            return
        logger.info("Waiting for application shutdown.")
        await self.queue.put({"type": "lifespan.shutdown"})
        await self.shutdown_event.wait()
        if self.shutdown_failed or (self.error_occurred and self.mode == "on"):
            logger.error("Application shutdown failed. Exiting.")
            self.should_exit = True
        else:
            logger.info("Application shutdown complete.")

    async def main(self):
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": self.state}
        try:
            await self.app(scope, self.receive, self.send)
        except BaseException as exc:
            self.error_occurred = True
            if self.startup_failed or self.shutdown_failed:
                return
            if self.mode == "auto":
                self.unsupported = True
                logger.info("ASGI 'lifespan' protocol appears unsupported.")
            else:
                logger.error("Exception in 'lifespan' protocol\n", exc_info=exc)
        finally:
            self.startup_event.set()
            self.shutdown_event.set()

    async def send(self, message):
        kind = message["type"]
        if kind == "lifespan.startup.complete":
            self._expect(not self.startup_event.is_set(), kind)
            self.startup_event.set()
        elif kind == "lifespan.startup.failed":
            self._expect(not self.startup_event.is_set(), kind)
            self.startup_event.set()
            self.startup_failed = True
            if message.get("message"):
                logger.error(message["message"])
        elif kind == "lifespan.shutdown.complete":
            self._expect(self.startup_event.is_set() and not self.shutdown_event.is_set(), kind)
            self.shutdown_event.set()
        elif kind == "lifespan.shutdown.failed":
            self._expect(self.startup_event.is_set() and not self.shutdown_event.is_set(), kind)
            self.shutdown_event.set()
            self.shutdown_failed = True
            if message.get("message"):
                logger.error(message["message"])
        else:
            raise RuntimeError(f"Unexpected ASGI lifespan message {kind!r}")

    @staticmethod
    def _expect(ok, kind):
        if not ok:
            raise RuntimeError(f"ASGI lifespan message {kind!r} sent out of order")

    async def receive(self):
        return await self.queue.get()

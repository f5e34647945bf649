"""Server: binds, runs lifespan, serves with the C core, shuts down
gracefully. ``run(app, **options)`` is the one-call entry point."""

import asyncio
import contextvars
import gc
import logging
import os
import random
import signal
import socket
import sys
import time

import uringloop
from uringloop._core import HttpServer

from .config import AppLoadError, Config
from .lifespan import Lifespan
from .proxy import ProxyHeaders

logger = logging.getLogger("uringserve.error")
access_logger = logging.getLogger("uringserve.access")

STARTUP_FAILURE = 3
HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _access_hook():
    log = access_logger.info

    def access(scope, status):
        client = scope.get("client")
        addr = f"{client[0]}:{client[1]}" if client else ""
        path = scope["raw_path"].decode("latin-1")
        qs = scope["query_string"]
        if qs:
            path = f"{path}?{qs.decode('ascii', 'replace')}"
        log('%s - "%s %s HTTP/%s" %d', addr, scope["method"], path, scope["http_version"], status)

    return access


def _log_error(message, exc):
    if exc is not None:
        logger.error(message.rstrip("\n"), exc_info=(type(exc), exc, exc.__traceback__))
    else:
        logger.error(message)


class Server:
    def __init__(self, config):
        self.config = config
        self.should_exit = False
        self.force_exit = False
        self.started = False
        self.core = None
        self.sockets = []
        self.exit_code = 0
        self.lifespan = None
        self.inherited_sockets = False
        self.websockets = None
        self.tls_servers = []  # with --ssl-*: the asyncio servers in front of the C server
        # hooks for process managers (the supervisor, the gunicorn worker)
        self.access_hook = None  # callable(scope, status) replacing the access log
        self.on_started = None  # called once serving
        self.on_tick = None  # called about once a second (heartbeats)
        self.extra_signals = {}  # signal -> callable, installed on the loop

    # -- entry points --

    def run(self, sockets=None):
        try:
            loop = uringloop.new_event_loop()
        except uringloop.IOUringUnavailableError as exc:
            logger.error("%s", exc)
            self.exit_code = 1
            return self.exit_code
        try:
            asyncio.set_event_loop(loop)
            loop.run_until_complete(self.serve(sockets))
        except KeyboardInterrupt:
            pass
        finally:
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                asyncio.set_event_loop(None)
                loop.close()
        return self.exit_code

    async def serve(self, sockets=None):
        config = self.config
        try:
            app = config.loaded_app or config.load()
        except AppLoadError as exc:
            logger.error("Error loading ASGI app. %s", exc)
            self.exit_code = 1
            return
        except Exception:
            logger.exception("Error loading ASGI app.")
            self.exit_code = 1
            return
        loop = asyncio.get_running_loop()
        self._install_signal_handlers(loop)
        logger.info("Started server process [%d]", os.getpid())
        self.lifespan = Lifespan(app, config.lifespan)
        await self.lifespan.startup()
        if self.lifespan.should_exit:
            self.exit_code = STARTUP_FAILURE
            return
        try:
            started = await self.startup(app, sockets)
        except Exception as exc:
            logger.error("Could not start the server: %s", exc)
            started = False
        if not started:
            await self.lifespan.shutdown()
            self.exit_code = 1
            return
        await self.main_loop()
        await self.shutdown()

    # -- phases --

    async def startup(self, app, sockets=None):
        config = self.config
        loop = asyncio.get_running_loop()
        self.inherited_sockets = bool(sockets)
        try:
            self.sockets = config.bind_sockets(sockets)
        except OSError as exc:
            where = config.uds or (config.host, config.port)
            logger.error("[Errno %s] error while attempting to bind on address %r: %s",
                         exc.errno, where, (exc.strerror or str(exc)).lower())
            return False
        proxy = None
        if config.proxy_headers:
            proxy = ProxyHeaders(config.forwarded_allow_ips).apply
        if self.access_hook is not None:
            access = self.access_hook
        else:
            access = _access_hook() if config.access_log and access_logger.isEnabledFor(logging.INFO) else None
        self.websockets = self._websocket_handler(loop, app, access)
        self.core = HttpServer(
            loop, app, _log_error,
            log_warning=logger.warning,
            websocket=self.websockets,
            access_log=access,
            proxy=proxy,
            root_path=config.root_path,
            headers=config.encoded_headers(),
            date_header=config.date_header,
            keepalive_timeout=config.timeout_keep_alive,
            header_timeout=config.timeout_request_header,
            limit_concurrency=config.limit_concurrency or 0,
            limits={
                "max_request_line": config.limit_request_line,
                "max_headers": config.limit_request_fields,
                "max_field_size": config.limit_request_field_size,
                **({"max_head_size": config.h11_max_incomplete_event_size}
                   if config.h11_max_incomplete_event_size else {}),
            },
            scheme="https" if config.is_ssl else "http",
        )
        self.core.state = self.lifespan.state
        # Each request's Task starts from a copy of the context the first
        # listen() ran in: the caller's, or with --reset-contextvars an empty
        # one, so that nothing set before serving (the lifespan's) is seen.
        context = contextvars.Context() if config.reset_contextvars else contextvars.copy_context()
        if config.is_ssl:
            await self._serve_tls(loop, context)
        for sock in [] if config.is_ssl else self.sockets:
            # Sockets handed in (--workers, gunicorn) are shared with sibling
            # processes: accept through a poll so that each connection wakes
            # every worker and the least busy takes it (see ARCHITECTURE.md).
            context.run(self.core.listen, sock, shared=self.inherited_sockets)
        # What exists now (the app, its modules, the framework) lives as long
        # as the server: keep it out of the cyclic GC's traversals, which
        # otherwise grow with the app's size on every collection.
        gc.freeze()
        self._log_started(sockets is not None)
        self.started = True
        if self.on_started is not None:
            self.on_started()
        return True

    async def _serve_tls(self, loop, context):
        """TLS listeners: asyncio servers whose decrypted connections the C
        server adopts (tls.py)."""
        from .tls import TLSBridge, create_ssl_context

        config = self.config
        _raise_open_file_limit()  # three descriptors a TLS connection (tls.py)
        ctx = create_ssl_context(config.ssl_certfile, config.ssl_keyfile, config.ssl_keyfile_password,
                                 config.ssl_version, config.ssl_cert_reqs, config.ssl_ca_certs, config.ssl_ciphers)
        core = self.core
        for sock in self.sockets:
            # started inside (a copy of) `context`, so that the tasks of the
            # requests start from it as they do from listen()'s; through
            # context.run(), as create_task(context=) is 3.11+
            server = await context.run(
                loop.create_task,
                loop.create_server(lambda: TLSBridge(core), sock=sock, ssl=ctx, backlog=config.backlog))
            self.tls_servers.append(server)

    def _websocket_handler(self, loop, app, access):
        """The handler of WebSocket upgrades, or None: with --ws none (or
        without the websockets package under --ws auto) upgrade requests
        reach the app as plain HTTP, as under uvicorn."""
        config = self.config
        if config.ws == "none":
            return None
        try:
            from .websocket import WebSocketHandler, WebSocketSettings
        except ImportError:
            if config.ws != "auto":
                raise RuntimeError(f"--ws {config.ws} needs the 'websockets' package, which is not installed") from None
            logger.warning("WebSockets are off: the 'websockets' package is not installed.")
            return None
        if config.ws == "wsproto":
            logger.info("--ws wsproto: uringserve's WebSockets use the websockets package's protocol.")
        settings = WebSocketSettings(
            max_size=config.ws_max_size,
            max_queue=config.ws_max_queue,
            ping_interval=config.ws_ping_interval,
            ping_timeout=config.ws_ping_timeout,
            per_message_deflate=config.ws_per_message_deflate,
        )
        return WebSocketHandler(loop, app, access, settings)

    def _log_started(self, inherited):
        config = self.config
        sock = self.sockets[0]
        if sock.family == socket.AF_UNIX:
            logger.info("Uringserve running on unix socket %s (Press CTRL+C to quit)", sock.getsockname())
            return
        host, port = sock.getsockname()[:2]
        if config.fd is not None or inherited:
            logger.info("Uringserve running on socket %s (Press CTRL+C to quit)", (host, port))
            return
        shown = f"[{host}]" if ":" in host else host
        scheme = "https" if config.is_ssl else "http"
        logger.info("Uringserve running on %s://%s:%d (Press CTRL+C to quit)", scheme, shown, port)

    async def main_loop(self):
        max_requests = self.config.limit_max_requests
        if max_requests is not None and self.config.limit_max_requests_jitter > 0:
            max_requests += random.randint(0, self.config.limit_max_requests_jitter)
        ticks = 0
        while not self.should_exit:
            await asyncio.sleep(0.1)
            ticks += 1
            if ticks % 10 == 0:
                self.core.tick()
                if self.on_tick is not None:
                    self.on_tick()
            if max_requests is not None and self.core.stats["requests"] >= max_requests:
                logger.warning("Maximum request limit of %d exceeded. Terminating process.", max_requests)
                self.should_exit = True

    async def shutdown(self):
        logger.info("Shutting down")
        core = self.core
        core.stop_accepting()
        for server in self.tls_servers:
            server.close()
        for sock in self.sockets:
            if self.config.uds and sock.family == socket.AF_UNIX and not self.inherited_sockets:
                try:
                    os.unlink(self.config.uds)
                except OSError:
                    pass
            sock.close()
        core.drain()
        # as uvicorn's: the idle connections the drain closed get up to 0.1 s
        # to go before "Waiting for connections to close" counts them
        settle = time.monotonic() + 0.1
        while core.stats["connections"] and time.monotonic() < settle and not self.force_exit:
            await asyncio.sleep(0.01)
        timeout = self.config.timeout_graceful_shutdown
        if self.websockets is not None and self.websockets.sessions:
            await self.websockets.shutdown(5.0 if timeout is None else float(timeout))
        deadline = None if timeout is None else time.monotonic() + float(timeout)
        if core.stats["connections"] and not self.force_exit:
            logger.info("Waiting for connections to close. (CTRL+C to force quit)")
        last_tick = 0.0
        while core.stats["connections"] and not self.force_exit:
            if deadline is not None and time.monotonic() >= deadline:
                break
            if time.monotonic() - last_tick >= 1.0:
                last_tick = time.monotonic()
                core.tick()
                if self.on_tick is not None:
                    self.on_tick()  # still alive: a supervisor's heartbeat must not lapse while draining
            await asyncio.sleep(0.05)
        if core.stats["tasks"] or core.stats["connections"]:
            # as uvicorn's: each cancelled app's CancelledError is logged as
            # its exception, and a request whose response had not started
            # gets a 500; its connection closes after it
            msg = None if self.force_exit else "Task cancelled, timeout graceful shutdown exceeded"
            n = core.cancel_all(msg)
            if n:
                why = "forced to quit" if self.force_exit else "timeout graceful shutdown exceeded"
                logger.error("Cancel %s running task(s), %s", n, why)
            end = time.monotonic() + 1.0  # for the 500s to go out and their clients to close
            while (core.stats["tasks"] or core.stats["connections"]) and time.monotonic() < end:
                await asyncio.sleep(0.01)
        if self.lifespan is not None and not self.force_exit:  # a forced quit skips it, as uvicorn's does
            await self.lifespan.shutdown()
        logger.info("Finished server process [%d]", os.getpid())

    # -- signals --

    def _install_signal_handlers(self, loop):
        import threading

        if threading.current_thread() is not threading.main_thread():
            return
        handlers = {sig: (lambda sig=sig: self.handle_exit(sig)) for sig in HANDLED_SIGNALS}
        handlers.update(self.extra_signals)
        for sig, fn in handlers.items():
            try:
                loop.add_signal_handler(sig, fn)
            except (NotImplementedError, RuntimeError):
                pass

    def handle_exit(self, sig=None):
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        else:
            self.should_exit = True


def _raise_open_file_limit():
    """The soft limit on open files up to the hard one, as Go's runtime
    does: a TLS connection holds three descriptors (its socket and the two
    ends of its socketpair), and the usual soft limit of 1024 would stop a
    server at about 340 clients."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


def run(app, **kwargs):
    """Serve ``app`` (an ASGI app or "module:attribute") until stopped.
    Returns the process exit code (0, or 1/3 on failure) and exits with it
    when ``exit=True`` (the CLI)."""
    exit_after = kwargs.pop("exit", False)
    config = Config(app, **kwargs)
    if config.reload or (config.workers and config.workers > 1):
        from .supervisor import Supervisor

        try:
            code = Supervisor(config).run()
        except KeyboardInterrupt:
            # Ctrl-C before the supervisor handles signals itself (the app
            # check, the reloader's first scan): a quiet stop, as with one process
            code = 0
    else:
        code = Server(config).run()
    if exit_after:
        sys.exit(code)
    return code

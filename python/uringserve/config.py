"""Config: every server setting, with uvicorn's names and defaults, and
loading the application."""

import importlib
import inspect
import logging
import os
import socket
import ssl
import sys

from . import __version__
from .logging import configure as configure_logging

logger = logging.getLogger("uringserve.error")

LIFESPAN_MODES = ("auto", "on", "off")
INTERFACES = ("auto", "asgi3", "asgi2")
# uvicorn's --ws choices. Every one but "none" is served by the sans-I/O
# protocol of the websockets package (uvicorn's "wsproto" included: what the
# app sees is the same ASGI messages).
WS_MODES = ("auto", "none", "websockets", "websockets-sansio", "wsproto")


class AppLoadError(Exception):
    """The application could not be imported; the message says why."""


def import_from_string(target):
    if not isinstance(target, str):
        return target
    module_name, _, attrs = target.partition(":")
    if not module_name or not attrs:
        raise AppLoadError(f'Import string "{target}" must be in format "<module>:<attribute>".')
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        raise AppLoadError(f'Could not import module "{module_name}".') from None
    obj = module
    try:
        for attr in attrs.split("."):
            obj = getattr(obj, attr)
    except AttributeError:
        raise AppLoadError(f'Attribute "{attrs}" not found in module "{module_name}".') from None
    return obj


class Config:
    def __init__(
        self,
        app,
        host="127.0.0.1",
        port=8000,
        uds=None,
        fd=None,
        backlog=2048,
        factory=False,
        app_dir="",
        root_path="",
        proxy_headers=True,
        forwarded_allow_ips=None,
        headers=None,
        server_header=True,
        date_header=True,
        timeout_keep_alive=5,
        timeout_graceful_shutdown=None,
        timeout_request_header=30,
        timeout_worker_healthcheck=5,
        limit_concurrency=None,
        limit_max_requests=None,
        limit_request_line=8190,
        limit_request_fields=100,
        limit_request_field_size=8190,
        h11_max_incomplete_event_size=None,
        lifespan="auto",
        ws="auto",
        ws_max_size=16 * 1024 * 1024,
        ws_max_queue=32,
        ws_ping_interval=20.0,
        ws_ping_timeout=20.0,
        ws_per_message_deflate=True,
        log_level=None,
        log_config=None,
        access_log=True,
        use_colors=None,
        env_file=None,
        interface="auto",
        limit_max_requests_jitter=0,
        reset_contextvars=False,
        ssl_keyfile=None,
        ssl_certfile=None,
        ssl_keyfile_password=None,
        ssl_version=None,
        ssl_cert_reqs=None,
        ssl_ca_certs=None,
        ssl_ciphers="TLSv1",
        workers=None,
        reload=False,
        reload_dirs=None,
        reload_includes=None,
        reload_excludes=None,
        reload_delay=0.25,
        reuse_port=False,
        uds_mode=0o666,
        configure_logging=True,
    ):
        if env_file is not None:
            load_env_file(env_file)  # first: the defaults below read the environment
        if interface == "wsgi":
            raise ValueError("WSGI applications are not served: wrap the app in a2wsgi's WSGIMiddleware")
        if interface not in INTERFACES:
            raise ValueError(f"interface must be one of {', '.join(INTERFACES)}")
        if lifespan not in LIFESPAN_MODES:
            raise ValueError(f"lifespan must be one of {', '.join(LIFESPAN_MODES)}")
        if ws not in WS_MODES:
            raise ValueError(f"ws must be one of {', '.join(WS_MODES)}")
        if int(ws_max_size) <= 0 or int(ws_max_queue) <= 0:
            raise ValueError("ws_max_size and ws_max_queue must be positive")
        self.app = app
        self.host = host
        self.port = int(port)
        self.uds = uds
        self.fd = fd
        self.backlog = int(backlog)
        self.factory = factory
        self.app_dir = app_dir
        self.root_path = root_path or ""
        self.proxy_headers = proxy_headers
        if forwarded_allow_ips is None:
            forwarded_allow_ips = os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1,::1")
        self.forwarded_allow_ips = forwarded_allow_ips
        self.headers = list(headers or [])
        self.server_header = server_header
        self.date_header = date_header
        self.timeout_keep_alive = float(timeout_keep_alive)
        self.timeout_graceful_shutdown = timeout_graceful_shutdown
        self.timeout_request_header = float(timeout_request_header)
        self.timeout_worker_healthcheck = float(timeout_worker_healthcheck)
        self.limit_concurrency = limit_concurrency
        self.limit_max_requests = limit_max_requests
        self.limit_max_requests_jitter = int(limit_max_requests_jitter or 0)
        self.reset_contextvars = bool(reset_contextvars)
        self.ssl_keyfile = ssl_keyfile
        self.ssl_certfile = ssl_certfile
        self.ssl_keyfile_password = ssl_keyfile_password
        self.ssl_version = ssl.PROTOCOL_TLS_SERVER if ssl_version is None else int(ssl_version)
        self.ssl_cert_reqs = ssl.CERT_NONE if ssl_cert_reqs is None else int(ssl_cert_reqs)
        self.ssl_ca_certs = ssl_ca_certs
        self.ssl_ciphers = ssl_ciphers
        if ssl_keyfile and not ssl_certfile:
            raise ValueError("--ssl-keyfile needs --ssl-certfile")
        self.interface = interface
        self.use_colors = use_colors
        self.env_file = env_file
        self.limit_request_line = limit_request_line
        self.limit_request_fields = limit_request_fields
        self.limit_request_field_size = limit_request_field_size
        # uvicorn's h11 buffer limit; here: the largest request head (431 above)
        self.h11_max_incomplete_event_size = h11_max_incomplete_event_size
        self.lifespan = lifespan
        self.ws = ws
        self.ws_max_size = int(ws_max_size)
        self.ws_max_queue = int(ws_max_queue)
        # None or 0 turns keepalive pings (or their deadline) off
        self.ws_ping_interval = float(ws_ping_interval) if ws_ping_interval else None
        self.ws_ping_timeout = float(ws_ping_timeout) if ws_ping_timeout else None
        self.ws_per_message_deflate = bool(ws_per_message_deflate)
        self.log_level = log_level
        self.log_config = log_config
        self.access_log = access_log
        if workers is None:
            workers = int(os.environ.get("WEB_CONCURRENCY", "1"))
        self.workers = workers
        self.reload = bool(reload)
        self.reload_dirs = _str_list(reload_dirs)
        self.reload_includes = _str_list(reload_includes)
        self.reload_excludes = _str_list(reload_excludes)
        self.reload_delay = float(reload_delay)
        if self.reload and not isinstance(app, str):
            raise ValueError("--reload needs the application as an import string (module:attribute)")
        self.reuse_port = reuse_port
        self.uds_mode = uds_mode
        self.loaded_app = None
        if configure_logging:
            configure_logging_once(self)
        if env_file is not None:
            logger.info("Loading environment from '%s'", env_file)

    @property
    def is_ssl(self):
        return bool(self.ssl_certfile)

    def encoded_headers(self):
        """Extra response headers as (bytes, bytes): server first, then --header."""
        out = []
        names = {name.lower() for name, _ in self.headers}
        if self.server_header and "server" not in names:
            out.append((b"server", b"uringserve"))
        for name, value in self.headers:
            out.append((name.lower().encode("latin-1"), value.encode("latin-1")))
        return out

    def load(self):
        """Import the application (module:attribute, or a callable)."""
        if self.app_dir is not None:
            sys.path.insert(0, os.path.abspath(self.app_dir or "."))
        app = import_from_string(self.app)
        if self.factory:
            if not callable(app):
                raise AppLoadError("The --factory target is not callable.")
            app = app()
        elif isinstance(self.app, str) and inspect.isfunction(app) and not inspect.iscoroutinefunction(app):
            params = inspect.signature(app).parameters
            if len(params) == 0:
                logger.warning("The application looks like a factory; use --factory to call it.")
        if not callable(app):
            raise AppLoadError(f"The application {self.app!r} is not callable.")
        if self.interface == "asgi2" or (self.interface == "auto" and len(_asgi_params(app)) == 1):
            app = _ASGI2(app)
        self.loaded_app = app
        return app

    def bind_sockets(self, inherited=None):
        """The listening sockets: inherited, --fd, --uds, or --host/--port."""
        if inherited:
            return list(inherited)
        if self.fd is not None:
            sock = socket.socket(fileno=int(self.fd))
            return [sock]
        if self.uds:
            path = self.uds
            if os.path.exists(path) and not os.path.isdir(path):
                import stat

                if stat.S_ISSOCK(os.stat(path).st_mode):
                    os.unlink(path)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.bind(path)
                os.chmod(path, self.uds_mode)
                sock.listen(self.backlog)
            except OSError:
                sock.close()
                raise
            return [sock]
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self.reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind((self.host, self.port))
            sock.listen(self.backlog)
        except OSError:
            sock.close()
            raise
        return [sock]


def _str_list(value):
    """A list from one string (as uvicorn's API also takes), a list, or None."""
    return [value] if isinstance(value, str) else list(value or [])


def load_env_file(path):
    """KEY=VALUE lines into os.environ (variables already set win), with
    python-dotenv, as uvicorn's --env-file."""
    try:
        from dotenv import load_dotenv
    except ImportError:
        raise RuntimeError("--env-file needs python-dotenv: pip install python-dotenv") from None
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--env-file: no such file: {path}")
    load_dotenv(dotenv_path=path)


def _asgi_params(app):
    target = app if inspect.isfunction(app) or inspect.ismethod(app) else getattr(app, "__call__", app)
    try:
        return [p for p in inspect.signature(target).parameters.values()
                if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        return [1, 2, 3]


class _ASGI2:
    """An ASGI 2 application (scope) -> coroutine(receive, send)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        await self.app(scope)(receive, send)


_logging_done = False


def configure_logging_once(config):
    global _logging_done
    if not _logging_done or config.log_config is not None:
        configure_logging(config.log_config, config.log_level, config.access_log, config.use_colors)
        _logging_done = True
    elif config.log_level is not None:
        configure_logging(None, config.log_level, config.access_log, config.use_colors)


def version_line():
    import platform

    return (f"Running uringserve {__version__} with {platform.python_implementation()} "
            f"{platform.python_version()} on {platform.system()}")

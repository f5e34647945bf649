"""``gunicorn -k uringserve.workers.UringWorker app:app``: uringserve as a
gunicorn worker class.

gunicorn binds the sockets, forks, and supervises; each worker serves on the
sockets it was handed with its own uringloop loop. gunicorn's settings are
mapped onto the server's (keepalive, max_requests with jitter,
graceful_timeout, forwarded_allow_ips, limit_request_*), the worker
heartbeats once a second so the arbiter's ``timeout`` never kills a healthy
busy worker, TERM stops gracefully, QUIT and INT stop at once, USR1 reopens
the log files, and logs go through gunicorn's loggers (the access log in
gunicorn's ``access_log_format``).
"""

import datetime
import logging
import signal
import sys
import types

from gunicorn.workers.base import Worker

from .config import Config
from .server import Server


def _gunicorn_access(worker):
    log = worker.log
    zero = datetime.timedelta(0)

    def access(scope, status):
        if not log.access_log_enabled:
            return
        client = scope.get("client")
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
        hmap = {k.upper().replace("-", "_"): v for k, v in headers}
        qs = scope["query_string"].decode("latin-1")
        raw = scope["raw_path"].decode("latin-1") + (f"?{qs}" if qs else "")
        environ = {
            "REMOTE_ADDR": client[0] if client else "-",
            "REQUEST_METHOD": scope["method"],
            "RAW_URI": raw,
            "PATH_INFO": scope["path"],
            "QUERY_STRING": qs,
            "SERVER_PROTOCOL": f"HTTP/{scope['http_version']}",
            "HTTP_REFERER": hmap.get("REFERER", "-"),
            "HTTP_USER_AGENT": hmap.get("USER_AGENT", "-"),
        }
        resp = types.SimpleNamespace(status=str(status), headers=[], sent=None)
        req = types.SimpleNamespace(headers=headers)
        log.access(resp, req, environ, zero)

    return access


class UringWorker(Worker):
    """A gunicorn worker running uringserve on uringloop. As with uvicorn's
    worker, a subclass can set more Config arguments in CONFIG_KWARGS
    (``{"ws_per_message_deflate": False}``), which override what is taken
    from gunicorn's settings."""

    CONFIG_KWARGS = {}

    def init_process(self):
        # the loop (and its io_uring ring) is made after the fork, in run()
        super().init_process()

    def init_signals(self):
        # signals are handled by the loop once it runs (see run()); until
        # then, the defaults
        for sig in self.SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGUSR1, self.handle_usr1)
        signal.siginterrupt(signal.SIGUSR1, False)

    def _config(self):
        error_logger = logging.getLogger("uringserve.error")
        error_logger.handlers = self.log.error_log.handlers
        error_logger.setLevel(self.log.error_log.level)
        error_logger.propagate = False
        return Config(self.wsgi, **{**self._gunicorn_settings(), **self.CONFIG_KWARGS})

    def _gunicorn_settings(self):
        cfg = self.cfg
        tls = {}
        if cfg.is_ssl:  # gunicorn's --certfile, --keyfile, ...: TLS in the worker, as uvicorn's does
            tls = dict(ssl_certfile=cfg.certfile, ssl_keyfile=cfg.keyfile, ssl_version=cfg.ssl_version,
                       ssl_cert_reqs=cfg.cert_reqs, ssl_ca_certs=cfg.ca_certs, ssl_ciphers=cfg.ciphers)
        max_requests = self.max_requests if self.max_requests and self.max_requests < sys.maxsize else None
        fwd = cfg.forwarded_allow_ips
        if isinstance(fwd, (list, tuple)):
            fwd = ",".join(fwd)
        return dict(
            timeout_keep_alive=cfg.keepalive,
            timeout_graceful_shutdown=cfg.graceful_timeout,
            limit_max_requests=max_requests,
            forwarded_allow_ips=fwd,
            limit_request_line=cfg.limit_request_line or 1 << 20,
            limit_request_fields=cfg.limit_request_fields or 32768,
            limit_request_field_size=cfg.limit_request_field_size or 1 << 20,
            backlog=cfg.backlog,
            access_log=False,
            lifespan="auto",
            configure_logging=False,
            **tls,
        )

    def run(self):
        config = self._config()
        server = Server(config)
        server.access_hook = _gunicorn_access(self)
        server.on_tick = self.notify
        server.on_started = self.notify

        def quit_now():
            server.should_exit = True
            server.force_exit = True

        server.extra_signals = {
            signal.SIGQUIT: quit_now,
            signal.SIGINT: quit_now,
            signal.SIGUSR1: self.log.reopen_files,
            signal.SIGABRT: quit_now,
        }
        code = server.run(sockets=[s.sock for s in self.sockets])
        sys.exit(code)

"""The ``uringserve`` command: uvicorn's option names, each also settable
from a ``URINGSERVE_<OPTION>`` environment variable (``--timeout-keep-alive``
is ``URINGSERVE_TIMEOUT_KEEP_ALIVE``)."""

import argparse
import os
import sys


class _EnvDefaults(argparse.ArgumentParser):
    """Defaults come from URINGSERVE_* variables when they are set."""

    def add(self, *flags, **kw):
        dest = kw.get("dest") or flags[0].lstrip("-").replace("-", "_")
        env = "URINGSERVE_" + dest.upper()
        if env in os.environ:
            raw = os.environ[env]
            if kw.get("action") == "append":
                conv = kw.get("type", str)
                try:
                    kw["default"] = [conv(v) for v in raw.split("\n") if v.strip()]
                except (TypeError, ValueError, argparse.ArgumentTypeError):
                    self.error(f"invalid value {raw!r} in {env}")
            elif kw.get("action") == argparse.BooleanOptionalAction:
                kw["default"] = raw.strip().lower() in ("1", "true", "yes", "on")
            else:
                conv = kw.get("type", str)
                try:
                    kw["default"] = conv(raw)
                except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
                    reason = f": {exc}" if isinstance(exc, argparse.ArgumentTypeError) else ""
                    self.error(f"invalid value {raw!r} in {env}{reason}")
        kw.setdefault("help", "")
        kw["help"] += f" [env: {env}]"
        return self.add_argument(*flags, **kw)


def _header(value):
    name, sep, val = value.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"header {value!r} must be NAME:VALUE")
    return name.strip(), val.strip()


def _positive_int(value):
    n = int(value)
    if n <= 0:
        raise argparse.ArgumentTypeError("must be a positive integer")
    return n


def _port(value):
    n = int(value)
    if not 0 <= n <= 65535:
        raise argparse.ArgumentTypeError("must be 0-65535")
    return n


def _bool(value):
    """uvicorn's boolean option values (click's): true/false, 1/0, yes/no, on/off."""
    v = value.strip().lower()
    if v in ("1", "true", "t", "yes", "y", "on"):
        return True
    if v in ("0", "false", "f", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{value!r} is not a boolean")


def _fd(value):
    n = int(value)
    if n < 0:
        raise argparse.ArgumentTypeError("must be a file descriptor number")
    return n


def build_parser():
    p = _EnvDefaults(prog="uringserve", description="An ASGI server on io_uring (uvicorn-compatible options).")
    p.add_argument("app", nargs="?", default=os.environ.get("URINGSERVE_APP"),
                   help="the application, as module:attribute [env: URINGSERVE_APP]")
    p.add("--host", default="127.0.0.1", help="bind to this address (IPv4 or IPv6).")
    p.add("--port", type=_port, default=8000, help="bind to this port.")
    p.add("--uds", default=None, help="bind to this Unix domain socket.")
    p.add("--uds-mode", type=lambda v: int(v, 8), default=0o666, help="permission bits of the --uds socket (octal).")
    p.add("--fd", type=_fd, default=None, help="serve on this already-bound socket (systemd socket activation).")
    p.add("--backlog", type=_positive_int, default=2048, help="listen backlog.")
    p.add("--workers", type=_positive_int, default=None, help="worker processes (default $WEB_CONCURRENCY or 1).")
    p.add("--reload", action=argparse.BooleanOptionalAction, default=False,
          help="restart the workers when a source file changes (development).")
    p.add("--reload-dir", dest="reload_dirs", action="append", default=[],
          help="a directory to watch with --reload (repeatable; default: the current directory).")
    p.add("--reload-include", dest="reload_includes", action="append", default=[],
          help="a glob of files to watch with --reload (repeatable; default: *.py).")
    p.add("--reload-exclude", dest="reload_excludes", action="append", default=[],
          help="a glob of files or directories not to watch (repeatable; hidden ones never are).")
    p.add("--reload-delay", type=float, default=0.25, help="seconds between two scans of the watched files.")
    p.add("--reuse-port", action=argparse.BooleanOptionalAction, default=False,
          help="give each worker its own SO_REUSEPORT socket.")
    p.add("--env-file", default=None, help="load environment variables from this .env file (python-dotenv).")
    p.add("--interface", choices=("auto", "asgi3", "asgi2", "wsgi"), default="auto",
          help="the application's interface (auto: by its signature); WSGI is not served.")
    p.add("--loop", default="auto", help="accepted for uvicorn compatibility: uringserve always runs on uringloop.")
    p.add("--http", default="auto",
          help="accepted for uvicorn compatibility: uringserve's HTTP/1.1 parser is llhttp, in C.")
    p.add("--reset-contextvars", action=argparse.BooleanOptionalAction, default=False,
          help="run each HTTP request from an empty contextvars.Context (hides what the lifespan set).")
    p.add_argument("--http2", action="store_true", help=argparse.SUPPRESS)
    p.add("--factory", action=argparse.BooleanOptionalAction, default=False,
          help="the app is a factory: call it to get the application.")
    p.add("--app-dir", default="", help="look for the app in this directory (default: current directory).")
    p.add("--root-path", default="", help="ASGI root_path of an app mounted below a path.")
    p.add("--proxy-headers", action=argparse.BooleanOptionalAction, default=True,
          help="use X-Forwarded-For and X-Forwarded-Proto from trusted proxies.")
    p.add("--forwarded-allow-ips", default=None,
          help="comma-separated IPs, CIDRs, 'unix:' or '*' trusted for proxy headers "
               "(default $FORWARDED_ALLOW_IPS or 127.0.0.1,::1).")
    p.add("--header", dest="headers", action="append", type=_header, default=[],
          help="an extra response header NAME:VALUE (repeatable).")
    p.add("--server-header", action=argparse.BooleanOptionalAction, default=True, help="send 'server: uringserve'.")
    p.add("--date-header", action=argparse.BooleanOptionalAction, default=True, help="send a Date header.")
    p.add("--timeout-keep-alive", type=float, default=5,
          help="close idle keep-alive connections after this many s (0: no keep-alive).")
    p.add("--timeout-graceful-shutdown", type=float, default=None,
          help="on shutdown, wait this long for requests in flight, then cancel them.")
    p.add("--timeout-request-header", type=float, default=30,
          help="close a connection whose request headers take longer than this (slowloris; 0: no limit).")
    p.add("--timeout-worker-healthcheck", type=float, default=5,
          help="with --workers or --reload: kill and replace a worker silent for this many seconds.")
    p.add("--limit-concurrency", type=_positive_int, default=None,
          help="answer 503 above this many connections or running requests.")
    p.add("--limit-max-requests", type=_positive_int, default=None, help="exit after serving this many requests.")
    p.add("--limit-max-requests-jitter", type=int, default=0,
          help="add a random 0..N to --limit-max-requests for each worker, so they do not restart together.")
    p.add("--limit-request-line", type=_positive_int, default=8190, help="longest request target (414 above).")
    p.add("--limit-request-fields", type=_positive_int, default=100, help="most request header fields (431 above).")
    p.add("--limit-request-field-size", type=_positive_int, default=8190,
          help="longest request header field (431 above).")
    p.add("--ws", choices=("auto", "none", "websockets", "websockets-sansio", "wsproto"), default="auto",
          help="WebSocket support: 'none' serves upgrade requests as plain HTTP; every other choice uses "
               "the websockets package's protocol.")
    p.add("--ws-max-size", type=_positive_int, default=16777216,
          help="largest WebSocket message in bytes, after decompression (close 1009 above).")
    p.add("--ws-max-queue", type=_positive_int, default=32,
          help="received WebSocket messages the app has not taken before the socket is no longer read.")
    p.add("--ws-ping-interval", type=float, default=20.0,
          help="send a WebSocket ping after this many seconds (0: never).")
    p.add("--ws-ping-timeout", type=float, default=20.0,
          help="close a WebSocket (1011) whose pong takes longer than this many seconds (0: wait for ever).")
    p.add("--ws-per-message-deflate", type=_bool, nargs="?", const=True, default=True, metavar="BOOL",
          help="offer permessage-deflate compression to WebSocket clients.")
    p.add("--h11-max-incomplete-event-size", type=_positive_int, default=None,
          help="largest request head (request line and headers) in bytes, 431 above (default 65536).")
    p.add("--lifespan", choices=("auto", "on", "off"), default="auto", help="ASGI lifespan protocol.")
    p.add("--log-level", choices=("critical", "error", "warning", "info", "debug", "trace"), default=None,
          help="log level.")
    p.add("--log-config", default=None, help="logging configuration file (.json, .yaml or .ini).")
    p.add("--access-log", action=argparse.BooleanOptionalAction, default=True, help="log every request.")
    p.add("--use-colors", action=argparse.BooleanOptionalAction, default=None,
          help="color the default log format (default: when stderr is a terminal).")
    p.add("--ssl-certfile", default=None, help="serve HTTPS with this certificate (chain) file.")
    p.add("--ssl-keyfile", default=None, help="its private key (default: in the certificate file).")
    p.add("--ssl-keyfile-password", default=None, help="the private key's password.")
    p.add("--ssl-version", type=int, default=None, help="an ssl.PROTOCOL_* number (default: PROTOCOL_TLS_SERVER).")
    p.add("--ssl-cert-reqs", type=int, default=None,
          help="client certificates: 0 none (default), 1 optional, 2 required (ssl.CERT_*).")
    p.add("--ssl-ca-certs", default=None, help="CA certificates that client certificates are checked against.")
    p.add("--ssl-ciphers", default="TLSv1", help="OpenSSL cipher list (default: TLSv1, as uvicorn's).")
    p.add_argument("--version", action="store_true", help="print the version and exit.")
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from .config import version_line

        print(version_line())
        return 0
    if not args.app:
        parser.error("the application is missing: uringserve module:attribute")
    if args.log_config is not None and not os.path.exists(args.log_config):
        parser.error(f"--log-config: no such file: {args.log_config}")
    if args.env_file is not None:
        if not os.path.isfile(args.env_file):
            parser.error(f"--env-file: no such file: {args.env_file}")
        try:
            import dotenv  # noqa: F401
        except ImportError:
            parser.error("--env-file needs python-dotenv: pip install python-dotenv")
    if args.ssl_keyfile and not args.ssl_certfile:
        parser.error("--ssl-keyfile needs --ssl-certfile")
    for name in ("ssl_certfile", "ssl_keyfile", "ssl_ca_certs"):
        path = getattr(args, name)
        if path is not None and not os.path.isfile(path):
            parser.error(f"--{name.replace('_', '-')}: no such file: {path}")
    if args.http2:
        parser.error("--http2: uringserve serves HTTP/1.1 only; let a proxy in front speak HTTP/2 to clients")
    if args.interface == "wsgi":
        parser.error("--interface wsgi: WSGI applications are not served; wrap the app in a2wsgi's WSGIMiddleware")
    from .server import run

    opts = vars(args).copy()
    app = opts.pop("app")
    opts.pop("version")
    opts.pop("http2")
    for name, ours in (("loop", "uringloop"), ("http", "llhttp")):
        value = opts.pop(name)
        if value not in ("auto", ours):
            print(f"WARNING:  --{name} {value} is ignored: uringserve runs on {ours}.", file=sys.stderr)
    return run(app, **opts)


if __name__ == "__main__":
    sys.exit(main())

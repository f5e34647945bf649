"""Logging set-up and formatters, shaped like uvicorn's.

Loggers: ``uringserve.error`` (server messages and application errors) and
``uringserve.access`` (one line per request), both under ``uringserve``.
"""

import http
import logging
import logging.config
import sys

TRACE_LOG_LEVEL = 5

LOG_LEVELS = {
    "critical": logging.CRITICAL,
    "error": logging.ERROR,
    "warning": logging.WARNING,
    "info": logging.INFO,
    "debug": logging.DEBUG,
    "trace": TRACE_LOG_LEVEL,
}


LEVEL_COLORS = {TRACE_LOG_LEVEL: "34", logging.DEBUG: "36", logging.INFO: "32", logging.WARNING: "33",
                logging.ERROR: "31", logging.CRITICAL: "91"}
STATUS_COLORS = {1: "97", 2: "32", 3: "33", 4: "31", 5: "91"}


def _color(text, code):
    return f"\x1b[{code}m{text}\x1b[0m"


class DefaultFormatter(logging.Formatter):
    """``INFO:     message``: the level name padded as uvicorn pads it, in
    uvicorn's colors when use_colors is true (by default: when stderr is a
    terminal)."""

    def __init__(self, fmt=None, datefmt=None, style="%", use_colors=None):
        super().__init__(fmt, datefmt, style)
        self.use_colors = sys.stderr.isatty() if use_colors is None else bool(use_colors)

    def formatMessage(self, record):
        name = record.levelname
        pad = " " * (8 - len(name))  # the padding stays outside the color
        if self.use_colors and record.levelno in LEVEL_COLORS:
            name = _color(name, LEVEL_COLORS[record.levelno])
        record.__dict__["levelprefix"] = name + ":" + pad
        return super().formatMessage(record)


class AccessFormatter(DefaultFormatter):
    """``INFO:     127.0.0.1:5000 - "GET / HTTP/1.1" 200 OK``.

    The record's args are (client_addr, method, full_path, http_version,
    status_code), as uvicorn's access records, so uvicorn log configs work.
    """

    def formatMessage(self, record):
        if isinstance(record.args, tuple) and len(record.args) == 5:
            client_addr, method, full_path, http_version, status_code = record.args
            try:
                phrase = http.HTTPStatus(status_code).phrase
            except ValueError:
                phrase = ""
            request_line = f"{method} {full_path} HTTP/{http_version}"
            status = f"{status_code} {phrase}".rstrip()
            if self.use_colors:
                request_line = _color(request_line, "1")
                status = _color(status, STATUS_COLORS.get(int(status_code) // 100, "0"))
            record.__dict__.update(client_addr=client_addr, request_line=request_line, status_code=status)
        return super().formatMessage(record)


LOGGING_CONFIG = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "default": {"()": "uringserve.logging.DefaultFormatter", "fmt": "%(levelprefix)s %(message)s"},
        "access": {
            "()": "uringserve.logging.AccessFormatter",
            "fmt": '%(levelprefix)s %(client_addr)s - "%(request_line)s" %(status_code)s',
        },
    },
    "handlers": {
        "default": {"formatter": "default", "class": "logging.StreamHandler", "stream": "ext://sys.stderr"},
        "access": {"formatter": "access", "class": "logging.StreamHandler", "stream": "ext://sys.stdout"},
    },
    "loggers": {
        "uringserve": {"handlers": ["default"], "level": "INFO", "propagate": False},
        "uringserve.error": {"level": "INFO"},
        "uringserve.access": {"handlers": ["access"], "level": "INFO", "propagate": False},
    },
}


def configure(log_config=None, log_level=None, access_log=True, use_colors=None):
    """Apply the default config, or a dict / .json / .yaml / .ini file."""
    logging.addLevelName(TRACE_LOG_LEVEL, "TRACE")
    if log_config is None:
        config = LOGGING_CONFIG
        if use_colors is not None:
            config = {**config, "formatters": {name: {**f, "use_colors": use_colors}
                                               for name, f in config["formatters"].items()}}
        logging.config.dictConfig(config)
    elif isinstance(log_config, dict):
        logging.config.dictConfig(log_config)
    elif str(log_config).endswith(".json"):
        import json

        with open(log_config) as f:
            logging.config.dictConfig(json.load(f))
    elif str(log_config).endswith((".yaml", ".yml")):
        import yaml  # optional: only for YAML log configs

        with open(log_config) as f:
            logging.config.dictConfig(yaml.safe_load(f))
    else:
        logging.config.fileConfig(log_config, disable_existing_loggers=False)
    if log_level is not None:
        level = LOG_LEVELS[log_level] if isinstance(log_level, str) else log_level
        for name in ("uringserve", "uringserve.error", "uringserve.access"):
            logging.getLogger(name).setLevel(level)
    if not access_log:
        logging.getLogger("uringserve.access").handlers = []
        logging.getLogger("uringserve.access").propagate = False


def stderr(line):
    print(line, file=sys.stderr, flush=True)

"""A gunicorn worker class set up the way uvicorn's documents it: a
UringWorker subclass whose CONFIG_KWARGS pick the WebSocket options."""

from uringserve.workers import UringWorker


class QuietWorker(UringWorker):
    CONFIG_KWARGS = {"ws_per_message_deflate": False, "ws_ping_interval": 0.2, "ws_ping_timeout": 5}

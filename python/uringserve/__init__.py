"""uringserve: an ASGI 3 HTTP/1.1 server in C on the uringloop io_uring engine."""

__version__ = "0.1.0"

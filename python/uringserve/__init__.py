"""uringserve: an ASGI 3 HTTP/1.1 server in C on the uringloop io_uring engine.

    uringserve main:app                # like uvicorn main:app
    uringserve.run(app, port=8000)     # or Config + Server for embedding
"""

__version__ = "0.1.0"

from .config import Config  # noqa: E402
from .server import Server, run  # noqa: E402

__all__ = ("Config", "Server", "run", "__version__")

"""The ``uringserve`` command."""

import argparse
import sys

from . import __version__


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="uringserve", description="ASGI server on io_uring (uvicorn-compatible options).")
    parser.add_argument("app", nargs="?", help="the application, as module:attribute")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    args = parser.parse_args(argv)
    if args.version:
        import platform
        print(f"Running uringserve {__version__} with "
              f"{platform.python_implementation()} {platform.python_version()} on {platform.system()}")
        return 0
    print("uringserve: the HTTP server is not built yet (it arrives with the ASGI server "
          "issue); today this package provides the uringloop event loop: "
          "python -m uringloop.examples or see README.md", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

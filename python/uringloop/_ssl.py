"""TLS for uringloop: asyncio's SSLProtocol, with C versions of the methods
every record goes through.

The state machine (handshake, shutdown, timeouts, flow-control transitions,
errors) is asyncio's own ``sslproto.SSLProtocol``. ``_core.SSLProtocolCore``
and ``_core.SSLAppTransportCore`` (server/us_ssl.c) come first in the MRO
and replace ``get_buffer``, ``buffer_updated``, ``_do_read``, ``_do_write``,
``_process_outgoing``, ``_write_appdata`` and the app transport's ``write``
with C translations of the same code, reading and writing the same instance
fields. They are translations of Python 3.11's sslproto, whose translated
methods are the same, line for line, in 3.12 and 3.13 (3.13 changed only
methods that stay in Python: ``_abort``, ``_do_read__buffered``, handshake
and shutdown). 3.10 (the sslproto before 3.11's rewrite) and versions not
checked yet use asyncio's class unchanged.
"""

import ssl
import sys

from asyncio import sslproto

from . import _core

FAST_PATH = (3, 11) <= sys.version_info[:2] <= (3, 13)

if FAST_PATH:
    class _SSLAppTransport(_core.SSLAppTransportCore, sslproto._SSLProtocolTransport):
        pass

    class SSLProtocol(_core.SSLProtocolCore, sslproto.SSLProtocol):
        def _get_app_transport(self):
            # asyncio's, with the transport class above
            if self._app_transport is None:
                if self._app_transport_created:
                    raise RuntimeError("Creating _SSLProtocolTransport twice")
                self._app_transport = _SSLAppTransport(self._loop, self)
                self._app_transport_created = True
            return self._app_transport

    _core._ssl_setup(sslproto.SSLProtocolState, sslproto.SSLAgainErrors, ssl.SSLObject,
                     sslproto.SSLProtocol._write_appdata)
else:
    SSLProtocol = sslproto.SSLProtocol

"""--proxy-headers: X-Forwarded-For and X-Forwarded-Proto from trusted peers.

The C server calls ``ProxyHeaders.apply(scope)`` only for requests that
carry an ``x-forwarded-*`` header, so a server that is not behind a proxy
pays nothing.
"""

import ipaddress


class TrustedHosts:
    """``*``, IP addresses, CIDR networks, and ``unix:`` for Unix-socket peers."""

    def __init__(self, spec):
        if isinstance(spec, str):
            spec = [s.strip() for s in spec.split(",")]
        self.always = "*" in spec
        self.unix = "unix:" in spec
        self.addresses = set()
        self.networks = []
        self.literals = set()
        for item in spec:
            if not item or item in ("*", "unix:"):
                continue
            try:
                if "/" in item:
                    self.networks.append(ipaddress.ip_network(item, strict=False))
                else:
                    self.addresses.add(ipaddress.ip_address(item))
            except ValueError:
                self.literals.add(item)

    def __contains__(self, host):
        if self.always:
            return True
        if host is None:
            return self.unix
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return host in self.literals
        return ip in self.addresses or any(ip in net for net in self.networks)

    def client_from(self, forwarded_for):
        """The first address from the right that is not a trusted proxy."""
        hosts = [h.strip() for h in forwarded_for.split(",") if h.strip()]
        for host in reversed(hosts):
            if host not in self:
                return host
        return hosts[0] if hosts else None


class ProxyHeaders:
    def __init__(self, trusted):
        self.trusted = trusted if isinstance(trusted, TrustedHosts) else TrustedHosts(trusted)

    def apply(self, scope):
        client = scope.get("client")
        if (client[0] if client else None) not in self.trusted:
            return
        proto = forwarded_for = None
        for name, value in scope["headers"]:
            if name == b"x-forwarded-proto":
                proto = value.decode("latin-1").split(",")[-1].strip().lower()
            elif name == b"x-forwarded-for":
                forwarded_for = value.decode("latin-1")
        if proto in ("http", "https"):
            scope["scheme"] = proto
        elif proto in ("ws", "wss"):
            # as uvicorn takes them; this scope is HTTP's, and a WebSocket
            # session makes its ws/wss from it
            scope["scheme"] = "https" if proto == "wss" else "http"
        if forwarded_for:
            host = self.trusted.client_from(forwarded_for)
            if host:
                scope["client"] = (host, 0)

"""Pure ASGI guards that run before routing, so they cover every path (/health, /metrics, 404s included).

HostGuard defeats DNS rebinding: a page on evil.com whose name is re-pointed at 127.0.0.1 makes the
visitor's browser talk to this server as a same-origin peer, but the browser still sends
`Host: evil.com`. A server bound to loopback therefore answers only loopback host names (and the
ones the operator lists with --allowed-hosts).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from starlette.types import ASGIApp, Receive, Scope, Send

from server import protocol as P

# Names a browser only ever sends for this machine: no remote page can make them resolve elsewhere.
LOOPBACK_HOSTS = ("localhost", "127.0.0.0/8", "::1")
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def error_body(message: str, type: str, code: str | None) -> bytes:
    """OpenAI's {"error": {...}} shape, for responses sent outside FastAPI's exception handlers."""
    return P.ErrorResponse(error=P.ErrorInfo(message=message, type=type, code=code)).model_dump_json().encode()


async def send_error(send: Send, status: int, message: str, type: str, code: str | None,
                     headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    body = error_body(message, type, code)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


def is_loopback_bind(host: str) -> bool:
    """Whether the listen address is reachable from this machine only."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_allowlist(bind_host: str, allowed_hosts: Sequence[str]) -> list[str] | None:
    """Host patterns the server answers for, or None for any.

    Bound to loopback: loopback names plus `allowed_hosts`. Bound elsewhere: `allowed_hosts` (plus
    loopback names, which no remote page can use) if given; any host otherwise, as the operator chose to
    expose the server.
    """
    if "*" in allowed_hosts or (not allowed_hosts and not is_loopback_bind(bind_host)):
        return None
    return [*LOOPBACK_HOSTS, *allowed_hosts]


def _host_name(header: str) -> str:
    """The name part of a Host header: port dropped, IPv6 brackets removed, lower case, no final dot."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].partition("]")[0]
    name, _, _ = header.partition(":")
    return name[:-1] if name.endswith(".") else name


class HostGuard:
    """Answer 400 to requests whose Host header matches none of `patterns`.

    A pattern is a host name, `*.domain` (any subdomain), an IP address or an IP network
    (`127.0.0.0/8`). A request without Host (HTTP/1.0) passes: browsers always send one.
    """

    def __init__(self, app: ASGIApp, patterns: Sequence[str]) -> None:
        self.app = app
        self.names: set[str] = set()
        self.suffixes: list[str] = []
        self.networks: list[Network] = []
        for p in patterns:
            p = p.strip().lower()
            if p.startswith("*."):
                self.suffixes.append(p[1:])
                continue
            try:
                self.networks.append(ipaddress.ip_network(p.strip("[]"), strict=False))
            except ValueError:
                self.names.add(p[:-1] if p.endswith(".") else p)

    def allowed(self, host: str) -> bool:
        name = _host_name(host)
        if name in self.names or any(name.endswith(s) for s in self.suffixes):
            return True
        try:
            ip = ipaddress.ip_address(name)
        except ValueError:
            return False
        return any(ip in net for net in self.networks)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        host = next((v for k, v in scope["headers"] if k == b"host"), None)
        if host is None or self.allowed(host.decode("latin-1")):
            await self.app(scope, receive, send)
            return
        shown = _host_name(host.decode("latin-1"))
        shown = shown if len(shown) <= 100 and shown.isprintable() else "this host"
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        await send_error(send, 400, f"requests for host {shown!r} are not served: if this server should answer "
                                    f"to that name, start it with --allowed-hosts {shown}",
                         "invalid_request_error", "host_not_allowed")

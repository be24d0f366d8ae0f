"""uvicorn pieces that bound what one client (or many) can hold, and a shutdown that ends requests cleanly.

- HardenedH11Protocol: a connection that has not sent complete request headers within `header_timeout`
  is closed (uvicorn's h11 protocol waits forever for the rest of a slow header, so a few idle sockets
  could pin connection slots); past `Config.limit_concurrency` connections or requests, the answer is an
  OpenAI-shaped 503 instead of uvicorn's plain-text one.
- DrainingServer: after `grace` seconds of graceful shutdown, it calls `expire` (the engine's shutdown,
  which fails every open stream with EngineDeadError) before uvicorn's own timeout cancels handler
  tasks: each in-flight request then ends with its own 503 or SSE error event and `data: [DONE]`, not
  a cancelled task, a plain-text 500 and a logged traceback.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
from collections.abc import Callable
from typing import Any

import h11
import uvicorn
from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from server.middleware import send_error

logger = logging.getLogger("depthserve.server")

HEADER_TIMEOUT_S = 30.0
DRAIN_MARGIN_S = 3.0  # after `expire`, time for handlers to write their error before uvicorn cancels them
RETRY_AFTER_S = 1


async def _too_many_connections(scope: Scope, receive: Receive, send: Send) -> None:
    await send_error(send, 503, "the server has too many open connections or requests; retry later",
                     "service_unavailable_error", "too_many_connections",
                     [(b"connection", b"close"), (b"retry-after", str(RETRY_AFTER_S).encode())])


class HardenedH11Protocol(H11Protocol):
    """H11Protocol with a request-header deadline and a JSON 503 beyond the concurrency limit."""

    def __init__(self, *args: Any, header_timeout: float = HEADER_TIMEOUT_S, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout
        self.header_timer: asyncio.TimerHandle | None = None
        # the base class's check answers text/plain: ours (same place, same counts) answers JSON
        self.max_concurrency, self.limit_concurrency = self.limit_concurrency, None

    def _arm_header_timer(self) -> None:
        self._disarm_header_timer()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self.header_timer = self.loop.call_later(self.header_timeout, self._header_timed_out)

    def _disarm_header_timer(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def _header_timed_out(self) -> None:
        self.header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            logger.debug("closing a connection that sent no complete request headers within %g s",
                         self.header_timeout)
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # a complete request head arrived
            self._disarm_header_timer()

    def handle_events(self) -> None:
        limit = self.max_concurrency
        over = limit is not None and (len(self.connections) > limit or len(self.tasks) >= limit)
        if over:
            logger.warning("over the limit of %d connections or requests: answering 503", limit)
        self.app = _too_many_connections if over else self.config.loaded_app
        super().handle_events()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_header_timer()  # the next request on this keep-alive connection gets the same deadline


def protocol(header_timeout: float = HEADER_TIMEOUT_S) -> Callable[..., asyncio.Protocol]:
    """A value for uvicorn.Config(http=...): it instantiates whatever it is given per connection."""
    if not header_timeout > 0:
        raise ValueError(f"header timeout must be > 0 seconds, got {header_timeout}")
    return functools.partial(HardenedH11Protocol, header_timeout=header_timeout)


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose graceful shutdown calls `expire` after `grace` s, then gives handlers
    DRAIN_MARGIN_S to answer before uvicorn cancels them (its Config's timeout_graceful_shutdown is
    set to grace + margin)."""

    def __init__(self, config: uvicorn.Config, grace: float, expire: Callable[[], None]) -> None:
        config.timeout_graceful_shutdown = grace + DRAIN_MARGIN_S  # type: ignore[assignment]
        super().__init__(config)
        self.grace = grace
        self.expire = expire

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        async def expire_later() -> None:
            await asyncio.sleep(self.grace)
            if self.server_state.tasks:
                logger.warning("%d request(s) still running %g s after the shutdown signal: ending them",
                               len(self.server_state.tasks), self.grace)
            await asyncio.to_thread(self.expire)

        timer = asyncio.ensure_future(expire_later())
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()

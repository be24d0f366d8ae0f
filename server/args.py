"""ServerArgs: the HTTP server's own options (not the engine's: those are engine.arg_utils.EngineArgs),
with one default and help string each, and their validation in one place."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from engine.arg_utils import CliArgs, option
from engine.config import parse_bytes

__all__ = ["LOG_LEVELS", "ServerArgs"]

LOG_LEVELS = ["critical", "error", "warning", "info", "debug"]
UVICORN_LOG_LEVELS = [*LOG_LEVELS, "trace"]


@dataclass
class ServerArgs(CliArgs):
    GROUP = "server"

    served_model_name: list[str] | None = option(
        None, "name(s) clients pass as `model` (None: the --model value); with several --model, one name per "
              "model in the same order (None: each folder's name)", nargs="+", metavar="NAME")
    host: str = option("127.0.0.1", "address to listen on")
    port: int = option(8000, "port to listen on", type=int)
    # read from the environment after parsing, so `--help` never prints a key
    api_key: str | None = option(None, "require 'Authorization: Bearer KEY' on /v1/*, /tokenize, /detokenize "
                                       "(None: $DEPTHSERVE_API_KEY; unset or empty: no auth)")
    max_queued_requests: int = option(1024, "requests waiting for the engine before new ones get 429 "
                                            "(0: unbounded)", type=int)
    max_body_size: str | int = option("8MiB", "largest request body accepted (413 beyond)")
    metrics_require_auth: bool = option(False, "also protect /metrics with the API key")
    request_timeout: float | None = option(
        None, "abort a request (504, or an error event when streaming) not finished this long after it "
              "arrived, freeing its KV blocks (None: no limit)", type=float, metavar="SECONDS")
    allowed_origins: list[str] = dataclasses.field(default_factory=list, metadata={
        "help": "browser origins allowed by CORS, e.g. https://app.example.com, or '*' (empty: CORS off)",
        "cli": {"nargs": "+", "metavar": "ORIGIN"}})
    allowed_hosts: list[str] = dataclasses.field(default_factory=list, metadata={
        "help": "Host header values served besides loopback names (localhost, 127.x, [::1]): names, *.domain, "
                "IPs or networks, or '*' for any. Bound to a loopback address, other hosts get 400 (DNS "
                "rebinding); bound elsewhere with none given, any host is served",
        "cli": {"nargs": "+", "metavar": "HOST"}})
    max_connections: int = option(1024, "open connections (or running requests) beyond which requests get 503",
                                  type=int)
    header_timeout: float = option(30.0, "close a connection that has not sent complete request headers "
                                         "within this", type=float, metavar="SECONDS")
    shutdown_timeout: float = option(10.0, "seconds to let in-flight requests finish on SIGTERM; those still "
                                           "running then end with a 503 (or a stream error event)", type=float)
    log_level: str = option("info", "log level of the server and engine", choices=LOG_LEVELS)
    uvicorn_log_level: str | None = option(
        None, "log level of uvicorn's own loggers (None: --log-level)", choices=UVICORN_LOG_LEVELS)
    disable_uvicorn_access_log: bool = option(False, "do not log one line per HTTP request")
    disable_log_stats: bool = option(False, "do not log the periodic throughput / queue / cache line")
    log_stats_interval: float = option(5.0, "seconds between two stats lines while the server is busy",
                                       type=float, metavar="SECONDS")
    enable_docs: bool = option(False, "serve the interactive API docs (Swagger UI) at /docs; the OpenAPI "
                                      "document it reads stays behind --api-key")
    enable_auto_tool_choice: bool = option(
        False, "let chat requests with tools use tool_choice 'auto' (the default with tools): the model's tool "
               "calls are parsed out of its text by --tool-call-parser")
    tool_call_parser: str | None = option(None, "the model's tool-call format for tool_choice 'auto'",
                                          choices=["hermes"], metavar="NAME")

    def __post_init__(self) -> None:
        if self.api_key is None:
            self.api_key = os.environ.get("DEPTHSERVE_API_KEY")

    @property
    def max_body_bytes(self) -> int:
        return parse_bytes(self.max_body_size)

    def validate(self) -> ServerArgs:
        """Raise ValueError naming the flag of the first bad option; return self."""
        try:
            body = self.max_body_bytes
        except ValueError as e:
            raise ValueError(f"--max-body-size: {e}") from None
        if body <= 0:
            raise ValueError(f"--max-body-size must be > 0 bytes, got {self.max_body_size!r}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be in 0..65535, got {self.port}")
        if self.max_queued_requests < 0:
            raise ValueError(f"--max-queued-requests must be >= 0, got {self.max_queued_requests}")
        if self.max_connections < 1:
            raise ValueError(f"--max-connections must be >= 1, got {self.max_connections}")
        if not self.header_timeout > 0:
            raise ValueError(f"--header-timeout must be > 0 seconds, got {self.header_timeout}")
        if not self.shutdown_timeout >= 0:
            raise ValueError(f"--shutdown-timeout must be >= 0 seconds, got {self.shutdown_timeout}")
        if self.request_timeout is not None and not self.request_timeout > 0:
            raise ValueError(f"--request-timeout must be > 0 seconds, got {self.request_timeout}")
        if not self.log_stats_interval > 0:
            raise ValueError(f"--log-stats-interval must be > 0 seconds, got {self.log_stats_interval}")
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ValueError("--enable-auto-tool-choice needs --tool-call-parser NAME (hermes)")
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"--log-level must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")
        return self

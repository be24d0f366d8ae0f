"""`depthserve` command line: `serve` (the default), `train`; `bench` will join them.

    depthserve                                   # serve the built-in AttnRes model on 127.0.0.1:8000
    depthserve serve --model ./my-model --port 9000 --api-key secret
    depthserve train --help                      # forwarded to models.train

User mistakes (a missing model, a budget too small for one request, a port in use) end with one line on
stderr and exit status 2; SIGTERM/SIGINT drain in-flight requests, stop the engine and exit 0.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence

EXIT_USAGE = 2
# Commands whose whole argument list (--help included) goes to another module's main(argv) -> int,
# imported only when used so `serve` does not pay for them.
FORWARDED = {
    "train": ("models.train", "train the built-in models (options: depthserve train --help)"),
    "inspect": ("engine.depth_inspect", "heatmaps of an AttnRes model's depth weights on prompts"),
    "bench": ("loadtest.bench", "benchmarks: latency (AttnRes vs standard), throughput (vs transformers), serving"),
}


class UserError(Exception):
    """A problem the user can fix from the command line: reported in one line, exit status 2."""


def _serve_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    from models.loader import DEFAULT_MODEL

    p = sub.add_parser(
        "serve", help="run the OpenAI-compatible HTTP server (the default command)",
        description="Serve a model over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, "
                    "/v1/models, /tokenize, /detokenize) with Prometheus metrics at /metrics and /health.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    m = p.add_argument_group("model")
    m.add_argument("--model", default=DEFAULT_MODEL,
                   help="a Hugging Face style checkpoint folder or the name of a built-in model")
    m.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help="name(s) clients pass as `model` (default: the --model value)")
    m.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weight/activation dtype")
    m.add_argument("--max-model-len", type=int, default=None,
                   help="prompt + output tokens per request (default: the model's max_position_embeddings)")
    m.add_argument("--seed", type=int, default=0, help="seed for sampling requests that set none")
    e = p.add_argument_group("engine")
    e.add_argument("--max-num-seqs", type=int, default=64, help="requests in the running batch at once")
    e.add_argument("--max-num-batched-tokens", type=int, default=2048,
                   help="tokens per step (decode tokens and prefill chunks share it)")
    e.add_argument("--kv-cache-memory", default="1GiB", help="bytes for the paged KV cache, e.g. 512MiB")
    e.add_argument("--depth-cache-memory", default="256MiB", help="bytes for the AttnRes depth pool")
    e.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block")
    e.add_argument("--tensor-parallel-size", type=int, default=1, help="tensor-parallel ranks")
    e.add_argument("--num-threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on")
    s.add_argument("--port", type=int, default=8000, help="port to listen on")
    s.add_argument("--api-key", default=os.environ.get("DEPTHSERVE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/*, /tokenize, /detokenize "
                        "(default: $DEPTHSERVE_API_KEY; unset: no auth)")
    s.add_argument("--max-queued-requests", type=int, default=1024,
                   help="requests waiting for the engine before new ones get 429 (0: unbounded)")
    s.add_argument("--max-body-size", default="8MiB", help="largest request body accepted (413 beyond)")
    s.add_argument("--metrics-require-auth", action="store_true", help="also protect /metrics with the API key")
    s.add_argument("--request-timeout", type=float, default=None, metavar="SECONDS",
                   help="abort a request (504, or an error event when streaming) not finished this long after "
                        "it arrived, freeing its KV blocks (default: no limit)")
    s.add_argument("--allowed-origins", nargs="+", default=[], metavar="ORIGIN",
                   help="browser origins allowed by CORS, e.g. https://app.example.com, or '*' (default: none, "
                        "CORS off)")
    s.add_argument("--allowed-hosts", nargs="+", default=[], metavar="HOST",
                   help="Host header values served besides loopback names (localhost, 127.x, [::1]): names, "
                        "*.domain, IPs or networks, or '*' for any. Bound to a loopback address, other hosts "
                        "get 400 (DNS rebinding); bound elsewhere with none given, any host is served")
    s.add_argument("--max-connections", type=int, default=1024,
                   help="open connections (or running requests) beyond which requests get 503")
    s.add_argument("--header-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="close a connection that has not sent complete request headers within this")
    s.add_argument("--depth-metrics", action="store_true",
                   help="export per-site AttnRes depth-weight means and entropies (costs a little per step)")
    s.add_argument("--shutdown-timeout", type=float, default=10.0,
                   help="seconds to let in-flight requests finish on SIGTERM; those still running then end "
                        "with a 503 (or a stream error event)")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="log level of the server and engine")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="depthserve", description="Serve, train and benchmark Attention Residual (AttnRes) language models.",
        epilog="With no command, `serve` runs. `depthserve COMMAND --help` shows a command's options.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _serve_parser(sub)
    for name, (_, help_text) in FORWARDED.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in FORWARDED:
        module = importlib.import_module(FORWARDED[args[0]][0])
        return int(module.main(args[1:]) or 0)
    if not args or (args[0].startswith("-") and args[0] not in ("-h", "--help")):
        args = ["serve", *args]
    ns = build_parser().parse_args(args)
    try:
        return serve(ns)
    except UserError as e:
        print(f"depthserve: error: {e}", file=sys.stderr)
        return EXIT_USAGE


def _listen_socket(host: str, port: int) -> socket.socket:
    """Bind before loading the model, so a busy port fails fast and in one line."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, _, _, _, addr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def serve(ns: argparse.Namespace) -> int:
    import uvicorn

    from engine.async_engine import AsyncLLMEngine
    from engine.config import (
        CacheConfig,
        EngineConfig,
        ParallelConfig,
        SchedulerConfig,
        parse_bytes,
        parse_dtype,
    )
    from engine.llm_engine import LLMEngine
    from server.app import build_app
    from server.http import DrainingServer, protocol
    from server.middleware import host_allowlist

    logging.basicConfig(level=ns.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = EngineConfig(
            model=ns.model, dtype=parse_dtype(ns.dtype), seed=ns.seed, num_threads=ns.num_threads,
            depth_stats=ns.depth_metrics,
            cache=CacheConfig(kv_cache_memory=parse_bytes(ns.kv_cache_memory),
                              depth_cache_memory=parse_bytes(ns.depth_cache_memory), block_size=ns.block_size),
            scheduler=SchedulerConfig(max_num_seqs=ns.max_num_seqs, max_num_batched_tokens=ns.max_num_batched_tokens,
                                      max_model_len=ns.max_model_len),
            parallel=ParallelConfig(tensor_parallel_size=ns.tensor_parallel_size))
        max_body = parse_bytes(ns.max_body_size)
        if ns.max_queued_requests < 0:
            raise ValueError(f"--max-queued-requests must be >= 0, got {ns.max_queued_requests}")
        if ns.num_threads is not None and ns.num_threads < 1:
            raise ValueError(f"--num-threads must be >= 1, got {ns.num_threads}")
        if ns.max_connections < 1:
            raise ValueError(f"--max-connections must be >= 1, got {ns.max_connections}")
        if not ns.header_timeout > 0:
            raise ValueError(f"--header-timeout must be > 0 seconds, got {ns.header_timeout}")
        if not ns.shutdown_timeout >= 0:
            raise ValueError(f"--shutdown-timeout must be >= 0 seconds, got {ns.shutdown_timeout}")
        if ns.request_timeout is not None and not ns.request_timeout > 0:
            raise ValueError(f"--request-timeout must be > 0 seconds, got {ns.request_timeout}")
    except ValueError as e:
        raise UserError(str(e)) from None
    sock = _listen_socket(ns.host, ns.port)
    engine: LLMEngine | None = None
    try:
        try:
            engine = LLMEngine(cfg)
        except (ValueError, OSError) as e:  # missing model, bad checkpoint, budget too small
            raise UserError(str(e)) from None
        names = ns.served_model_name or [ns.model]
        async_engine = AsyncLLMEngine(engine, max_queued_requests=ns.max_queued_requests)
        app = build_app(async_engine, names, api_key=ns.api_key or None, max_body_bytes=max_body,
                        metrics_require_auth=ns.metrics_require_auth, request_timeout=ns.request_timeout,
                        allowed_origins=ns.allowed_origins,
                        allowed_hosts=host_allowlist(ns.host, ns.allowed_hosts))
        config = uvicorn.Config(app, log_level=ns.log_level, server_header=False, limit_concurrency=ns.max_connections,
                                http=protocol(ns.header_timeout))
        # past --shutdown-timeout, the engine stops and fails what is still running, so each request
        # ends with its own 503 / stream error event
        server = DrainingServer(config, grace=ns.shutdown_timeout, expire=async_engine.shutdown)
        logging.getLogger("depthserve").info("serving %s as %s on http://%s:%d", ns.model, ", ".join(names),
                                             ns.host, ns.port)
        # uvicorn re-raises the signal that stopped it once it is done; with these no-op handlers in
        # place (it restores them) that re-raise is harmless and a SIGTERM'd server exits 0.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: None)
        server.run(sockets=[sock])
    finally:
        sock.close()
        if engine is not None:
            engine.shutdown()  # idempotent; the lifespan already did it unless start-up failed
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())

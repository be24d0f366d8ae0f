"""`depthserve` command line: `serve` (the default), `train`, `inspect`, `bench`, `soak`.

    depthserve                                   # serve the built-in AttnRes model on 127.0.0.1:8000
    depthserve serve ./my-model --port 9000 --api-key secret
    depthserve serve --model ./a --model ./b     # several models, one engine each (server/multi_model.py)
    depthserve train --help                      # forwarded to models.train

User mistakes (a missing model, a budget too small for one request, a port in use) end with one line on
stderr and exit status 2; SIGTERM/SIGINT drain in-flight requests, stop the engine and exit 0.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import logging
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
    "eval": ("engine.perplexity", "quality: perplexity and bits per byte of models on a text file"),
    "soak": ("loadtest.soak", "a bounded soak of a running server, with an overload phase and a pass/fail summary"),
}


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"  # one format: engine, server and uvicorn


class UserError(Exception):
    """A problem the user can fix from the command line: reported in one line, exit status 2."""


def _add_serve_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from engine.arg_utils import EngineArgs
    from server.args import ServerArgs
    from server.multi_model import allow_several_models

    p.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                   help="the model to serve, as vLLM takes it (same as --model; several models: --model A --model B)")
    EngineArgs.add_cli_args(p)
    ServerArgs.add_cli_args(p)
    allow_several_models(p)
    return p


SERVE_HELP = "run the OpenAI-compatible HTTP server (the default command)"
SERVE_DESCRIPTION = ("Serve a model over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions,\n"
                     "/v1/models, /tokenize, /detokenize), with Prometheus metrics at /metrics, and /health, /ping,\n"
                     "/version.\n\n  depthserve serve                       # the built-in shakespeare-attnres\n"
                     "  depthserve serve ./my-model --port 9000 --api-key secret\n"
                     "  depthserve serve --model ./a --model ./b   # two models, one engine each")


def serve_parser() -> argparse.ArgumentParser:
    """`depthserve serve` on its own, so that its mistakes print its usage, not the top-level one."""
    from engine.arg_utils import FriendlyParser

    return _add_serve_args(FriendlyParser(prog="depthserve serve", usage="%(prog)s [MODEL] [options]",
                                          description=SERVE_DESCRIPTION))


def build_parser() -> argparse.ArgumentParser:
    from engine.arg_utils import DefaultsFormatter, FriendlyParser

    parser = FriendlyParser(
        prog="depthserve", description="Serve, train and benchmark Attention Residual (AttnRes) language models.",
        epilog="With no command, `serve` runs. `depthserve COMMAND --help` shows a command's options.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=FriendlyParser)
    _add_serve_args(sub.add_parser("serve", help=SERVE_HELP, description=SERVE_DESCRIPTION,
                                   formatter_class=DefaultsFormatter))
    for name, (_, help_text) in FORWARDED.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def apply_model_tag(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> argparse.Namespace:
    """`serve MODEL` sets --model; both at once must agree. Several models are given as --model A --model B
    (`ns.models`, server/multi_model.py); MODEL with several --model is a usage error."""
    from models.loader import DEFAULT_MODEL

    tag = getattr(ns, "model_tag", None)
    if tag is not None:
        several = getattr(ns, "models", None) or []
        if len(several) > 1:
            parser.error(f"MODEL ({tag!r}) and several --model: give every model with --model (--model A --model B)")
        if ns.model not in (DEFAULT_MODEL, tag):
            parser.error(f"the model is given twice ({tag!r} and --model {ns.model!r}): give it once")
        ns.model = tag
        ns.models = None  # one model: the tag
    return ns


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in FORWARDED:
        logging.basicConfig(level=logging.WARNING, format=LOG_FORMAT)  # the engine's warnings, in the one format
        module = importlib.import_module(FORWARDED[args[0]][0])
        return int(module.main(args[1:]) or 0)
    if not args or (args[0].startswith("-") and args[0] not in ("-h", "--help")):
        args = ["serve", *args]
    if args[0] not in ("serve", "-h", "--help") and not difflib.get_close_matches(args[0], ["serve", *FORWARDED]):
        print(f"usage: depthserve [-h] COMMAND ...\ndepthserve: error: unknown command {args[0]!r}; to serve a "
              f"model: depthserve serve {args[0]}", file=sys.stderr)
        return EXIT_USAGE
    if args[0] == "serve":
        parser = serve_parser()
        ns = apply_model_tag(parser.parse_args(args[1:]), parser)
    else:
        ns = build_parser().parse_args(args)  # --help, or an unknown command (with the closest one)
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

    from engine.arg_utils import EngineArgs
    from engine.async_engine import AsyncLLMEngine
    from engine.llm_engine import LLMEngine
    from server.app import build_app
    from server.args import ServerArgs
    from server.http import DrainingServer, protocol
    from server.middleware import host_allowlist
    from server.multi_model import describe, plan_models, startup_error

    logging.basicConfig(level=ns.log_level.upper(), format=LOG_FORMAT)
    models = getattr(ns, "models", None) or [ns.model]
    try:
        srv = ServerArgs.from_cli_args(ns).validate()
        if len(models) == 1:
            cfg = EngineArgs.from_cli_args(ns).create_engine_config()
        else:  # one engine per model, the budgets split between them (server/multi_model.py)
            plans = plan_models(EngineArgs.from_cli_args(ns), models, srv.served_model_name)
            cfg = plans[0].config
            logging.getLogger("depthserve").info("%d models: %s", len(plans), describe(plans))
    except ValueError as e:
        raise UserError(str(e)) from None
    sock = _listen_socket(srv.host, srv.port)
    engines: list[LLMEngine] = []
    try:
        try:
            if len(models) == 1:
                engines.append(LLMEngine(cfg))
            else:
                for p in plans:
                    try:
                        engines.append(LLMEngine(p.config))
                    except (ValueError, OSError) as e:
                        raise startup_error(p, len(plans), e) from None
        except (ValueError, OSError) as e:  # missing model, bad checkpoint, budget too small
            raise UserError(str(e)) from None
        names = srv.served_model_name or [cfg.model]
        async_engines = [AsyncLLMEngine(e, max_queued_requests=srv.max_queued_requests) for e in engines]
        served: AsyncLLMEngine | dict[str, AsyncLLMEngine] = async_engines[0]
        if len(models) > 1:
            names = [p.name for p in plans]
            served = dict(zip(names, async_engines, strict=True))
        app = build_app(served, names, api_key=srv.api_key or None, max_body_bytes=srv.max_body_bytes,
                        metrics_require_auth=srv.metrics_require_auth, request_timeout=srv.request_timeout,
                        allowed_origins=srv.allowed_origins,
                        allowed_hosts=host_allowlist(srv.host, srv.allowed_hosts),
                        log_stats_interval=None if srv.disable_log_stats else srv.log_stats_interval,
                        enable_docs=srv.enable_docs,
                        tool_call_parser=srv.tool_call_parser if srv.enable_auto_tool_choice else None)
        # log_config=None: uvicorn's loggers propagate to the root handler above, so its lines (access log
        # included) have the same format as the engine's
        config = uvicorn.Config(app, log_config=None, log_level=srv.uvicorn_log_level or srv.log_level,
                                access_log=not srv.disable_uvicorn_access_log, server_header=False,
                                limit_concurrency=srv.max_connections, http=protocol(srv.header_timeout))
        # past --shutdown-timeout, the engine stops and fails what is still running, so each request
        # ends with its own 503 / stream error event
        def expire() -> None:
            for e in async_engines:
                e.shutdown()

        server = DrainingServer(config, grace=srv.shutdown_timeout, expire=expire)
        log = logging.getLogger("depthserve")
        if srv.api_key:
            log.info("API key auth: on (Bearer) for /v1/*, /tokenize, /detokenize, /openapi.json%s",
                     ", /metrics" if srv.metrics_require_auth else "")
        else:
            log.info("API key auth: off (set --api-key or DEPTHSERVE_API_KEY to require one)")
        log.info("serving %s as %s on http://%s:%d (max_queued_requests %s%s)",
                 ", ".join(str(e.config.model) for e in engines), ", ".join(names), srv.host, srv.port,
                 srv.max_queued_requests or "unbounded", " per model" if len(engines) > 1 else "")
        # uvicorn re-raises the signal that stopped it once it is done; with these no-op handlers in
        # place (it restores them) that re-raise is harmless and a SIGTERM'd server exits 0.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: None)
        server.run(sockets=[sock])
    finally:
        sock.close()
        for e in engines:
            e.shutdown()  # idempotent; the lifespan already did it unless start-up failed
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())

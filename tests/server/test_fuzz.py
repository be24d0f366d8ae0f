"""Schemathesis fuzzing of a real server against its own OpenAPI document (/openapi.json).

Every operation gets a bounded number of generated requests (schema-valid and, through hypothesis,
edge values: huge integers, odd unicode, empty lists, long strings): no 5xx, and every response's
status code, content type and body match what the document declares. The server runs with a small
context (--max-model-len 64) and a request timeout so one generated request cannot take long.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.server.conftest import API_KEY, MODEL_NAME, ServerProcess

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is not installed (pip install schemathesis)")
from hypothesis import HealthCheck, Phase, settings  # noqa: E402  (after the importorskip)
from schemathesis.checks import (  # noqa: E402
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

AUTH = {"Authorization": f"Bearer {API_KEY}"}
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
EXAMPLES = 20  # per operation; 5 operations


@pytest.fixture(scope="module")
def fuzz_server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with ServerProcess(tiny_model, "--api-key", API_KEY, "--served-model-name", MODEL_NAME, "--max-model-len", "64",
                       "--max-num-seqs", "16", "--request-timeout", "20", "--max-body-size", "256KiB",
                       log_dir=tmp_path_factory.mktemp("fuzz-logs")) as srv:
        yield srv


@pytest.fixture(scope="module")
def api_schema(fuzz_server: ServerProcess):  # type: ignore[no-untyped-def]
    return schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json", headers=AUTH)


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.include(path_regex=r"^/(v1/|tokenize|detokenize)").parametrize()
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
def test_openapi_fuzz(case, fuzz_server: ServerProcess) -> None:  # type: ignore[no-untyped-def]
    case.call_and_validate(headers=AUTH, checks=CHECKS, timeout=30)


def test_schema_requires_auth_and_documents_bodies(fuzz_server: ServerProcess) -> None:
    import httpx

    assert httpx.get(fuzz_server.url + "/openapi.json").status_code == 401
    doc = httpx.get(fuzz_server.url + "/openapi.json", headers=AUTH).json()
    for path in ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"):
        op = doc["paths"][path]["post"]
        assert "requestBody" in op and op["security"] == [{"bearer": []}], path
    assert {"/v1/models", "/health", "/metrics"} <= set(doc["paths"])

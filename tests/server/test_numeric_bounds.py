"""Extreme numbers in any field of either endpoint get a 200 or a clean 4xx, and the engine keeps serving.

The audit's repro (`top_k: 99999999999999999999` overflowed a tensor on the engine thread and stopped
the server for good) generalised: hypothesis throws edge values at every numeric field, alone and
combined, and /health must still be 200 afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.server.conftest import API_KEY, MODEL_NAME, ServerProcess

BIG_INTS = [0, 1, 2, 3, -1, -2, 20, 21, 399, 400, 2**31 - 1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64,
            10**20, -(10**20), -(2**63), -(2**63) - 1, 99999999999999999999]
FLOATS = [0.0, -0.0, 1e-300, -1e-300, 5e-324, 1e-6, 1e-5, 0.5, 1.0, 2.0, 2.0000001, -2.0, 100.0, 101.0, 1e300,
          -1e300, 1.7976931348623157e308]
EDGE_TOKENS = [[1, 5, 6], [0], [399], [400], [-1], [2**63], [10**20]]
ints = st.sampled_from(BIG_INTS)  # hypothesis's own integers rarely leave the small range: edges on purpose
floats = st.sampled_from(FLOATS)
small_ints = st.sampled_from([1, 2, 3])  # generation lengths that stay quick when valid
token_lists = st.lists(ints, min_size=1, max_size=3)
logit_bias = st.dictionaries(ints.map(str), floats, min_size=1, max_size=2)

COMMON: dict[str, Any] = {
    "n": st.sampled_from([0, 1, 2, -1, 2**31, 10**20]), "temperature": floats, "top_p": floats, "top_k": ints,
    "min_p": floats, "seed": ints, "presence_penalty": floats, "frequency_penalty": floats,
    "repetition_penalty": floats, "min_tokens": ints, "stop_token_ids": token_lists, "logit_bias": logit_bias,
    "max_tokens": small_ints | ints, "prompt": st.sampled_from(EDGE_TOKENS),
}


@st.composite
def some_fields(draw: st.DrawFn, required: dict[str, Any], optional: dict[str, Any]) -> dict[str, Any]:
    """The required fields and one to three optional ones: few enough that the extreme one often reaches the
    engine instead of another field's 400 answering first."""
    names = draw(st.lists(st.sampled_from(sorted(optional)), min_size=1, max_size=3, unique=True))
    return {**{k: draw(v) for k, v in required.items()}, **{k: draw(optional[k]) for k in names}}


COMPLETION = some_fields({"prompt": st.sampled_from(["To be, or not", [1, 5, 6]])},
                         {**COMMON, "logprobs": ints, "best_of": ints, "echo": st.booleans()})
CHAT = some_fields({"messages": st.just([{"role": "user", "content": "Speak"}])},
                   {**{k: v for k, v in COMMON.items() if k != "prompt"}, "max_completion_tokens": small_ints | ints, "logprobs": st.booleans(),
                    "top_logprobs": ints})


@pytest.fixture(scope="module")
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60.0) as c:
        yield c


def _clean(r: httpx.Response, http: httpx.Client) -> None:
    assert http.get("/health").status_code == 200, "the engine stopped"
    assert r.status_code == 200 or 400 <= r.status_code < 500, (r.status_code, r.text)
    assert "Traceback" not in r.text
    if r.status_code != 200:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], err
        if r.status_code == 400:
            assert err["param"], err  # a 400 names the field it is about


def _body(fields: dict[str, Any]) -> dict[str, Any]:
    """A request around the fields, short when valid (max_tokens 3 unless the fields set it)."""
    body = {"model": MODEL_NAME, "max_tokens": 3, **fields}
    if isinstance(body.get("min_tokens"), int) and 3 < body["min_tokens"] < 2**31:
        body["min_tokens"] = 3
    return body


# (field, values) swept one at a time on an otherwise valid request: every numeric field meets every edge
SWEEP: list[tuple[str, list[Any]]] = [
    *((name, BIG_INTS) for name in ("n", "top_k", "seed", "min_tokens", "max_tokens", "logprobs", "best_of")),
    *((name, FLOATS) for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                                  "repetition_penalty")),
    ("stop_token_ids", [[v] for v in BIG_INTS]),
    ("logit_bias", [{str(v): 1.0} for v in BIG_INTS] + [{"5": v} for v in FLOATS]),
    ("prompt", EDGE_TOKENS),
]


@pytest.mark.parametrize(("route", "base"), [
    ("/v1/completions", {"prompt": "To be"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Speak"}]}),
])
def test_every_numeric_field_meets_every_edge(http: httpx.Client, route: str, base: dict[str, Any]) -> None:
    chat = "messages" in base
    for name, values in SWEEP:
        if chat and name in ("prompt", "best_of", "logprobs"):
            continue
        for value in values:
            if chat and name == "n" and isinstance(value, int) and value > 2**20:
                continue  # chat n is checked the same way; keep the sweep short
            _clean(http.post(route, json=_body({**base, name: value})), http)
    if chat:
        for value in BIG_INTS:
            for extra in ({"top_logprobs": value, "logprobs": True}, {"max_completion_tokens": value}):
                _clean(http.post(route, json=_body({**base, **extra})), http)


FUZZ = settings(max_examples=40, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@FUZZ
@given(fields=COMPLETION)
def test_completions_numbers(http: httpx.Client, fields: dict[str, Any]) -> None:
    _clean(http.post("/v1/completions", json=_body(fields)), http)


@FUZZ
@given(fields=CHAT)
def test_chat_numbers(http: httpx.Client, fields: dict[str, Any]) -> None:
    _clean(http.post("/v1/chat/completions", json=_body(fields)), http)


def test_the_audit_repro_and_health_afterwards(http: httpx.Client, server: ServerProcess) -> None:
    r = http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "x", "max_tokens": 1,
                                           "top_k": 99999999999999999999})
    assert r.status_code == 200, r.text
    r = http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "x", "max_tokens": 3, "temperature": 1e-300,
                                           "logprobs": 1})
    assert r.status_code == 200 and all(v == v for v in r.json()["choices"][0]["logprobs"]["token_logprobs"])
    assert httpx.get(server.url + "/health").status_code == 200
    ok = http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "To be", "max_tokens": 2})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1

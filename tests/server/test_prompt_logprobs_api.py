"""Prompt logprobs over HTTP: OpenAI's legacy echo + logprobs (what lm-evaluation-harness's loglikelihood sends),
echo with max_tokens 0, vLLM's prompt_logprobs field; equal to the reference forward."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest
import torch
from safetensors.torch import load_file

from models.config import ModelConfig
from models.reference import ReferenceLlama
from tests.server.conftest import API_KEY, MODEL_NAME, ServerProcess, sse_events

PROMPT = [1, 5, 6, 7, 8, 9, 10, 11]
ECHO = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 1, "temperature": 0, "logprobs": 1, "echo": True,
        "seed": 1234}  # lm-eval's local-completions loglikelihood body


@pytest.fixture(scope="module")
def want(tiny_model: Path) -> torch.Tensor:
    """[T, V] reference log-probabilities of the token after each prompt position."""
    cfg = ModelConfig.from_json_file(tiny_model / "config.json")
    ref = ReferenceLlama(cfg)
    ref.load_state_dict(load_file(tiny_model / "model.safetensors"))
    with torch.no_grad():
        return torch.log_softmax(ref.eval()(torch.tensor([PROMPT]))[0].float(), dim=-1)


def _post(server: ServerProcess, auth: dict, path: str, body: dict) -> dict:
    r = httpx.post(server.url + path, json=body, headers=auth, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def _expected(want: torch.Tensor) -> list[float | None]:
    return [None, *(float(want[p - 1, PROMPT[p]]) for p in range(1, len(PROMPT)))]


def _check_echo(lp: dict, want: torch.Tensor, generated: int) -> None:
    n = len(PROMPT) + generated
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == n
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][:len(PROMPT)] == pytest.approx(_expected(want), abs=1e-4)
    assert all(1 <= len(top) <= 2 for top in lp["top_logprobs"][1:])
    assert lp["text_offset"] == sorted(lp["text_offset"])


def test_echo_logprobs_equal_reference(server: ServerProcess, auth: dict, want: torch.Tensor) -> None:
    out = _post(server, auth, "/v1/completions", ECHO)
    choice = out["choices"][0]
    _check_echo(choice["logprobs"], want, 1)
    # lm-eval's parse: the continuation's logprobs are entries [ctxlen:-1], its greediness their top tokens
    ctx = 3
    cont = choice["logprobs"]["token_logprobs"][ctx:-1]
    assert sum(cont) == pytest.approx(sum(_expected(want)[ctx:]), abs=1e-3)
    assert out["usage"]["completion_tokens"] == 1 and out["usage"]["prompt_tokens"] == len(PROMPT)


def test_batched_token_id_prompts(server: ServerProcess, auth: dict, want: torch.Tensor) -> None:
    """lm-eval batches contexts as a list of token-id lists: each choice scores its own prompt."""
    short = PROMPT[:4]
    out = _post(server, auth, "/v1/completions", {**ECHO, "prompt": [PROMPT, short]})
    first, second = sorted(out["choices"], key=lambda c: c["index"])
    _check_echo(first["logprobs"], want, 1)
    assert second["logprobs"]["token_logprobs"][:4] == pytest.approx(_expected(want)[:4], abs=1e-4)
    assert len(second["logprobs"]["tokens"]) == 5


def test_echo_with_max_tokens_zero_scores_without_generating(server: ServerProcess, auth: dict,
                                                             want: torch.Tensor) -> None:
    text = _post(server, auth, "/detokenize", {"tokens": PROMPT})["prompt"]
    out = _post(server, auth, "/v1/completions", {**ECHO, "max_tokens": 0})
    choice = out["choices"][0]
    _check_echo(choice["logprobs"], want, 0)
    assert choice["text"] == text and choice["finish_reason"] == "length"
    assert out["usage"]["completion_tokens"] == 0
    # the same through the official client, with a text prompt
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=30.0)
    scored = client.completions.create(model=MODEL_NAME, prompt="To be, or not to be", max_tokens=0, echo=True,
                                       logprobs=0)
    lp = scored.choices[0].logprobs
    assert scored.choices[0].text == "To be, or not to be"
    assert lp is not None and lp.token_logprobs is not None and lp.token_logprobs[0] is None
    assert all(v is not None and v <= 0 for v in lp.token_logprobs[1:])


def test_streaming_puts_the_prompt_in_the_first_chunk(server: ServerProcess, auth: dict, want: torch.Tensor) -> None:
    whole = _post(server, auth, "/v1/completions", {**ECHO, "max_tokens": 3, "n": 2, "ignore_eos": True})
    with httpx.stream("POST", server.url + "/v1/completions", headers=auth, timeout=60,
                      json={**ECHO, "max_tokens": 3, "n": 2, "ignore_eos": True, "stream": True}) as r:
        events = [e for e in sse_events(r.iter_lines()) if e != "[DONE]"]
    for c in whole["choices"]:
        _check_echo(c["logprobs"], want, 3)
        chunks = [e["choices"][0] for e in events if e["choices"][0]["index"] == c["index"]]
        assert chunks[0]["logprobs"]["token_logprobs"][0] is None  # the prompt leads
        assert "".join(ch["text"] for ch in chunks) == c["text"]
        merged: dict[str, list] = {k: [] for k in c["logprobs"]}
        for ch in chunks:
            for k in merged:
                merged[k] += (ch["logprobs"] or {}).get(k, [])
        assert merged == c["logprobs"]


def test_vllm_prompt_logprobs_field(server: ServerProcess, auth: dict, want: torch.Tensor) -> None:
    out = _post(server, auth, "/v1/completions", {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 1,
                                                  "prompt_logprobs": 2})
    plp = out["choices"][0]["prompt_logprobs"]
    assert len(plp) == len(PROMPT) and plp[0] is None
    for p in range(1, len(PROMPT)):
        entry = plp[p][str(PROMPT[p])]
        row = want[p - 1]
        assert entry["logprob"] == pytest.approx(float(row[PROMPT[p]]), abs=1e-4)
        assert entry["rank"] == int((row > row[PROMPT[p]]).sum()) + 1
        assert 1 <= len(plp[p]) <= 3
    chat = _post(server, auth, "/v1/chat/completions", {"model": MODEL_NAME, "max_tokens": 1, "prompt_logprobs": 0,
                                                         "messages": [{"role": "user", "content": "To be"}]})
    assert chat["prompt_logprobs"][0] is None and len(chat["prompt_logprobs"]) == chat["usage"]["prompt_tokens"]

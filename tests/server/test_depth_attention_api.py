"""`depth_attention` over HTTP: the weights the model used, equal to the naive reference, in every shape."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file

from models.config import ModelConfig
from models.reference import ReferenceLlama
from tests.server.conftest import MODEL_NAME, ServerProcess, metric, scrape, sse_events
from tests.tiny import reference_greedy

PROMPT = [1, 5, 6, 7, 8]
BODY = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 4, "temperature": 0, "ignore_eos": True,
        "depth_attention": True}


@pytest.fixture(scope="module")
def reference(tiny_model: Path) -> ReferenceLlama:
    cfg = ModelConfig.from_json_file(tiny_model / "config.json")
    ref = ReferenceLlama(cfg)
    ref.load_state_dict(load_file(tiny_model / "model.safetensors"))
    return ref.eval()


def _ref_weights(ref: ReferenceLlama, ids: list[int]) -> list:
    rec: list[torch.Tensor] = []
    with torch.no_grad():
        ref(torch.tensor([ids]), rec)
    return [[site[0, p].tolist() for site in rec] for p in range(len(ids))]


def _post(server, auth, path: str, body: dict) -> httpx.Response:  # type: ignore[no-untyped-def]
    return httpx.post(server.url + path, json=body, headers=auth, timeout=60)


def test_completion_weights_match_reference(server, auth, reference) -> None:  # type: ignore[no-untyped-def]
    r = _post(server, auth, "/v1/completions", BODY)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    depth = choice["depth_attention"]
    assert len(depth) == r.json()["usage"]["completion_tokens"] == 4
    cfg = reference.cfg
    assert all(len(entry) == 2 * cfg.num_hidden_layers + 1 for entry in depth)
    assert depth[0][0] == [1.0]  # layer 0 attention reads the embedding alone
    gen = httpx.post(server.url + "/v1/completions", headers=auth, timeout=60,
                     json={**BODY, "depth_attention": False, "logprobs": 0}).json()
    assert "depth_attention" not in gen["choices"][0] or gen["choices"][0]["depth_attention"] is None
    tokens = reference_greedy(reference, PROMPT, 4)  # the server is greedy fp32: the same tokens
    want = _ref_weights(reference, PROMPT + tokens)
    for j, entry in enumerate(depth):
        for site, ref_site in zip(entry, want[len(PROMPT) - 1 + j], strict=True):
            assert sum(site) == pytest.approx(1.0, abs=1e-3)
            assert site == pytest.approx(ref_site, abs=2e-4)


def test_streaming_agrees_and_echo_adds_prompt_passes(server, auth) -> None:  # type: ignore[no-untyped-def]
    full = _post(server, auth, "/v1/completions", BODY).json()["choices"][0]["depth_attention"]
    streamed = []
    with httpx.stream("POST", server.url + "/v1/completions", json={**BODY, "stream": True}, headers=auth,
                      timeout=60) as r:
        for event in sse_events(r.iter_lines()):
            if event != "[DONE]":
                streamed += event["choices"][0].get("depth_attention") or []  # type: ignore[index]
    assert streamed == full
    echo = _post(server, auth, "/v1/completions", {**BODY, "echo": True}).json()["choices"][0]["depth_attention"]
    assert len(echo) == len(PROMPT) + len(full) - 1 and echo[len(PROMPT) - 1:] == full


def test_chat_carries_weights(server, auth) -> None:  # type: ignore[no-untyped-def]
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "To be"}], "max_tokens": 3,
            "temperature": 0, "depth_attention": True, "ignore_eos": True}
    r = _post(server, auth, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"][0]["depth_attention"]) == 3


def test_standard_model_gets_400(tmp_path, tokenizer_dir) -> None:  # type: ignore[no-untyped-def]
    from tests.tiny import tiny_config, write_tiny

    folder, _ = write_tiny(tmp_path / "std", tiny_config("none", layers=1), tokenizer_from=tokenizer_dir)
    with ServerProcess(folder, "--depth-metrics", log_dir=tmp_path) as srv:
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "x", "depth_attention": True}, timeout=30)
        assert r.status_code == 400 and "AttnRes" in r.json()["error"]["message"]
        assert metric(scrape(srv.url), "depthserve:depth_attention_tokens_total") == 0  # no series for a standard model
    assert srv.proc.returncode == 0


def test_depth_metrics_flag(tiny_model, tmp_path) -> None:  # type: ignore[no-untyped-def]
    with ServerProcess(tiny_model, "--depth-metrics", log_dir=tmp_path) as srv:
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 3, "ignore_eos": True},
                       timeout=30)
        assert r.status_code == 200
        samples = scrape(srv.url)
        assert metric(samples, "depthserve:depth_attention_tokens_total") == 3
        assert metric(samples, "depthserve:depth_attention_weight", site="L0.attn", source="emb") == pytest.approx(1.0)
        total = metric(samples, "depthserve:depth_attention_weight", site="L0.mlp")
        assert total == pytest.approx(1.0, abs=1e-3)  # one site's mean weights sum to one
        assert metric(samples, "depthserve:depth_attention_entropy", site="L0.attn") == pytest.approx(0.0, abs=1e-6)
    assert srv.proc.returncode == 0

"""The server through the official `openai` client: completions and chat, streaming and not."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.server.conftest import API_KEY, MODEL_NAME, ServerProcess


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=30.0)


GREEDY = {"temperature": 0.0, "extra_body": {"ignore_eos": True}}


def test_models(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL_NAME]
    assert models[0].object == "model"


def test_completion_and_its_stream_agree(client: openai.OpenAI) -> None:
    full = client.completions.create(model=MODEL_NAME, prompt="To be, or not", max_tokens=6, **GREEDY)
    choice = full.choices[0]
    assert choice.finish_reason == "length" and choice.text
    assert full.usage is not None and full.usage.completion_tokens == 6 and full.usage.prompt_tokens > 0
    assert full.usage.total_tokens == full.usage.prompt_tokens + 6

    chunks = list(client.completions.create(model=MODEL_NAME, prompt="To be, or not", max_tokens=6, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 6


def test_completion_batch_of_prompts_token_ids_and_n(client: openai.OpenAI, server: ServerProcess) -> None:
    ids = httpx.post(server.url + "/tokenize", json={"prompt": "All the world"},
                     headers={"Authorization": f"Bearer {API_KEY}"}).json()["tokens"]
    out = client.completions.create(model=MODEL_NAME, prompt=[ids, ids], max_tokens=3, n=2, seed=7,
                                    temperature=1.0)
    assert sorted(c.index for c in out.choices) == [0, 1, 2, 3]
    assert out.usage is not None and out.usage.prompt_tokens == 2 * len(ids) and out.usage.completion_tokens == 12
    same = client.completions.create(model=MODEL_NAME, prompt=["All the world", "All the world"], max_tokens=3,
                                     n=2, seed=7, temperature=1.0)
    assert [c.text for c in same.choices] == [c.text for c in out.choices]  # seeded: reproducible


def test_completion_logprobs_and_echo(client: openai.OpenAI) -> None:
    out = client.completions.create(model=MODEL_NAME, prompt="Friends, Romans", max_tokens=4, logprobs=2,
                                    **GREEDY)
    lp = out.choices[0].logprobs
    assert lp is not None and len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert all(v <= 0 for v in lp.token_logprobs)
    assert all(1 <= len(top) <= 3 for top in lp.top_logprobs)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    echo = client.completions.create(model=MODEL_NAME, prompt="Friends, Romans", max_tokens=4, echo=True, **GREEDY)
    assert echo.choices[0].text == "Friends, Romans" + out.choices[0].text


def test_stop_string(client: openai.OpenAI) -> None:
    base = client.completions.create(model=MODEL_NAME, prompt="Now is the", max_tokens=8, **GREEDY).choices[0].text
    stop = base.strip()[:1]
    assert stop
    out = client.completions.create(model=MODEL_NAME, prompt="Now is the", max_tokens=8, stop=[stop], **GREEDY)
    assert out.choices[0].finish_reason == "stop" and stop not in out.choices[0].text


def test_chat_and_its_stream_agree(client: openai.OpenAI) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who art thou?"}]
    full = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=5, **GREEDY)
    msg = full.choices[0].message
    assert msg.role == "assistant" and full.choices[0].finish_reason == "length"
    assert full.usage is not None and full.usage.completion_tokens == 5

    chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=5, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    with_choices = [c for c in chunks if c.choices]
    assert with_choices[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in with_choices) == msg.content
    assert with_choices[-1].choices[0].finish_reason == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5


def test_chat_logprobs_n_and_content_parts(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": [{"type": "text", "text": "Speak"}]}], max_tokens=3,
        n=2, logprobs=True, top_logprobs=2, seed=1)
    assert [c.index for c in out.choices] == [0, 1]
    for c in out.choices:
        assert c.logprobs is not None and c.logprobs.content is not None and len(c.logprobs.content) == 3
        assert all(len(e.top_logprobs) == 2 and e.logprob <= 0 for e in c.logprobs.content)


def test_tokenize_detokenize_round_trip(server: ServerProcess) -> None:
    h = {"Authorization": f"Bearer {API_KEY}"}
    tok = httpx.post(server.url + "/tokenize", json={"prompt": "lend me your ears"}, headers=h).json()
    assert tok["count"] == len(tok["tokens"]) and tok["max_model_len"] == 256
    text = httpx.post(server.url + "/detokenize", json={"tokens": tok["tokens"]}, headers=h).json()["prompt"]
    assert text == "lend me your ears"
    chat = httpx.post(server.url + "/tokenize", json={"messages": [{"role": "user", "content": "hi"}]},
                      headers=h).json()
    assert chat["count"] > 2

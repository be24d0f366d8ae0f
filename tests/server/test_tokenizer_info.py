"""What lm-evaluation-harness's remote tokenizer asks for: /tokenizer_info, and /tokenize of special-token text."""

from __future__ import annotations

import httpx

from models.tokenizer import DEFAULT_CHAT_TEMPLATE
from tests.server.conftest import ServerProcess


def test_tokenizer_info_and_special_ids(server: ServerProcess, auth: dict) -> None:
    info = httpx.get(server.url + "/tokenizer_info", headers=auth, timeout=30).json()
    assert info["bos_token"] == "<s>" and info["eos_token"] == "</s>" and info["pad_token"] is None
    assert info["chat_template"] == DEFAULT_CHAT_TEMPLATE  # the tiny checkpoint has none: the one applied
    assert info["model_max_length"] == 256 and info["vocab_size"] == 400 and info["add_bos_token"] is True

    def tokenize(text: str) -> list[int]:
        r = httpx.post(server.url + "/tokenize", headers=auth, timeout=30,
                       json={"prompt": text, "add_special_tokens": False})
        assert r.status_code == 200, r.text
        return r.json()["tokens"]

    assert tokenize(info["bos_token"]) == [1] and tokenize(info["eos_token"]) == [2]
    assert tokenize("<s>To be") == [1, *tokenize("To be")]
    assert httpx.get(server.url + "/tokenizer_info", timeout=30).status_code == 401  # behind the API key
    assert httpx.get(server.url + "/tokenizer_info", params={"model": "nope"}, headers=auth,
                     timeout=30).status_code == 404

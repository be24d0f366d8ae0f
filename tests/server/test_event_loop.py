"""Nothing heavy runs on the event loop: tokenization, chat templating and detokenizing happen on worker
threads, an over-long prompt is refused before it is tokenized, and a chat template is compiled once."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import httpx
import pytest

from models.tokenizer import Tokenizer
from tests.server.test_async_engine import make_engine


def test_tokenizing_runs_off_the_loop_and_templates_compile_once(tiny_model: Path, one_thread: None,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.async_engine import AsyncLLMEngine
    from server.app import build_app

    encode_threads: list[str] = []
    encode = Tokenizer.encode

    def spy(self: Tokenizer, text: str, add_special_tokens: bool = True) -> list[int]:
        encode_threads.append(threading.current_thread().name)
        return encode(self, text, add_special_tokens)

    monkeypatch.setattr(Tokenizer, "encode", spy)
    compiled: list[int] = []
    compile_template = Tokenizer._compiled_template

    def counting(self: Tokenizer):  # type: ignore[no-untyped-def]
        if getattr(self, "_template", None) is None:
            compiled.append(1)
        return compile_template(self)

    monkeypatch.setattr(Tokenizer, "_compiled_template", counting)

    async def run() -> None:
        eng = AsyncLLMEngine(make_engine(tiny_model))
        app = build_app(eng, ["tiny"])
        eng.start()
        loop_thread = threading.current_thread().name
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
                chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
                for _ in range(3):
                    assert (await c.post("/v1/chat/completions", json=chat)).status_code == 200
                r = await c.post("/v1/completions", json={"model": "tiny", "prompt": "To be", "max_tokens": 2})
                assert r.status_code == 200
                assert (await c.post("/tokenize", json={"model": "tiny", "prompt": "To be"})).status_code == 200
                # far more characters than 256 tokens can hold: refused without tokenizing it
                before = len(encode_threads)
                r = await c.post("/v1/completions", json={"model": "tiny", "prompt": "x" * 50_000, "max_tokens": 2})
                assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
                assert "characters" in r.json()["error"]["message"] and len(encode_threads) == before
        finally:
            eng.shutdown()
        assert encode_threads and loop_thread not in encode_threads

    asyncio.run(run())
    assert len(compiled) == 1

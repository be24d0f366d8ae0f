"""Locust users for a depthserve (or any OpenAI-compatible) server: streamed completions and chat.

    locust -f loadtest/locustfile.py --headless -u 8 -r 4 -t 30s --host http://127.0.0.1:8000 --csv bench_out/locust

Each request is reported as `POST /v1/completions` or `POST /v1/chat/completions` with its full time
(to `[DONE]`); the time to the first SSE chunk carrying text is reported as its own entry of request
type `TTFT`, and (latency - TTFT) / (output tokens - 1) as `TPOT`. A request fails on a non-200 status,
an error event in the stream, a stream without `[DONE]`, or (with ignore_eos) an output token count
different from max_tokens. Settings come from the environment:

    DEPTHSERVE_MODEL        model name to send (default: none, the server's first)
    DEPTHSERVE_API_KEY      bearer token (default: none)
    DEPTHSERVE_MAX_TOKENS   max_tokens per request (default 32)
    DEPTHSERVE_PROMPT_WORDS words per random prompt (default 24)
    DEPTHSERVE_STREAM       1 to stream (default), 0 for plain JSON responses (no TTFT/TPOT entries)
    DEPTHSERVE_IGNORE_EOS   1 (default): generate exactly max_tokens
    DEPTHSERVE_TEMPERATURE  sampling temperature (default 0)
    DEPTHSERVE_CHAT_WEIGHT, DEPTHSERVE_COMPLETIONS_WEIGHT   task weights (default 1 and 1)
    DEPTHSERVE_WAIT         max seconds a user waits between requests (default 0)

Run locust in its own process: it monkey-patches the standard library through gevent.
"""

from __future__ import annotations

import json
import os
import random
import time
from typing import Any

from locust import HttpUser, between, task
from requests import RequestException

TEXT = (
    "to be or not to be that is the question whether tis nobler in the mind to suffer the slings and arrows "
    "of outrageous fortune or to take arms against a sea of troubles all the world's a stage and all the men "
    "and women merely players now is the winter of our discontent made glorious summer by this sun of york"
)
WORDS = TEXT.split()


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


MODEL = os.environ.get("DEPTHSERVE_MODEL") or None
API_KEY = os.environ.get("DEPTHSERVE_API_KEY") or None
MAX_TOKENS = _env_int("DEPTHSERVE_MAX_TOKENS", 32)
PROMPT_WORDS = _env_int("DEPTHSERVE_PROMPT_WORDS", 24)
STREAM = os.environ.get("DEPTHSERVE_STREAM", "1") != "0"
IGNORE_EOS = os.environ.get("DEPTHSERVE_IGNORE_EOS", "1") != "0"
TEMPERATURE = float(os.environ.get("DEPTHSERVE_TEMPERATURE", "0"))
WAIT = float(os.environ.get("DEPTHSERVE_WAIT", "0"))


def _text(event: dict[str, Any]) -> str:
    return "".join((c.get("text") or (c.get("delta") or {}).get("content") or "")
                   for c in event.get("choices") or [])


class DepthserveUser(HttpUser):
    """One client sending completions and chat requests back to back (or DEPTHSERVE_WAIT apart)."""

    wait_time = between(0, WAIT)

    def on_start(self) -> None:
        if API_KEY:
            self.client.headers["Authorization"] = f"Bearer {API_KEY}"

    def _prompt(self) -> str:
        return " ".join(random.choice(WORDS) for _ in range(PROMPT_WORDS))

    def _body(self, **fields: Any) -> dict[str, Any]:
        body: dict[str, Any] = {"max_tokens": MAX_TOKENS, "ignore_eos": IGNORE_EOS, "temperature": TEMPERATURE,
                                "stream": STREAM, **fields}
        if MODEL:
            body["model"] = MODEL
        if STREAM:
            body["stream_options"] = {"include_usage": True}
        return body

    def _fire(self, kind: str, name: str, ms: float) -> None:
        self.environment.events.request.fire(request_type=kind, name=name, response_time=ms, response_length=0,
                                             exception=None, context={})

    def _generate(self, path: str, body: dict[str, Any]) -> None:
        """POST and, when streaming, read the SSE stream, reporting the whole time, TTFT and TPOT."""
        start = time.perf_counter()
        with self.client.post(path, json=body, stream=STREAM, catch_response=True, name=path) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
                return
            if not STREAM:
                tokens = (resp.json().get("usage") or {}).get("completion_tokens")
                if IGNORE_EOS and tokens != MAX_TOKENS:
                    resp.failure(f"{tokens} output tokens, expected {MAX_TOKENS}")
                return
            ttft, usage, done, size = None, None, False, 0
            try:
                for raw in resp.iter_lines(chunk_size=None):
                    size += len(raw)
                    line = raw.decode(errors="replace")
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        done = True
                        break
                    event = json.loads(data)
                    if "error" in event:
                        resp.failure(f"stream error: {event['error'].get('message')}")
                        return
                    usage = event.get("usage") or usage
                    if ttft is None and _text(event):
                        ttft = (time.perf_counter() - start) * 1000.0
            except (ValueError, RequestException) as e:
                resp.failure(f"{type(e).__name__}: {e}")
                return
            finally:
                latency = (time.perf_counter() - start) * 1000.0
                # report the whole stream, not just the time to the headers
                resp.request_meta["response_time"] = latency  # type: ignore[index]
                resp.request_meta["response_length"] = size  # type: ignore[index]
            tokens = (usage or {}).get("completion_tokens")
            if not done:
                resp.failure("stream ended without [DONE]")
                return
            if IGNORE_EOS and tokens != MAX_TOKENS:
                resp.failure(f"{tokens} output tokens, expected {MAX_TOKENS}")
                return
            ttft = latency if ttft is None else ttft
            self._fire("TTFT", path, ttft)
            if tokens and tokens > 1:
                self._fire("TPOT", path, (latency - ttft) / (tokens - 1))

    @task(_env_int("DEPTHSERVE_COMPLETIONS_WEIGHT", 1))
    def completions(self) -> None:
        self._generate("/v1/completions", self._body(prompt=self._prompt()))

    @task(_env_int("DEPTHSERVE_CHAT_WEIGHT", 1))
    def chat(self) -> None:
        messages = [{"role": "user", "content": self._prompt()}]
        self._generate("/v1/chat/completions", self._body(messages=messages))

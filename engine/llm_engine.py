"""LLMEngine: step() = schedule -> run -> sample -> update; LLM: the offline generate() API."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from engine.config import CacheConfig, EngineConfig, ParallelConfig, SchedulerConfig, parse_bytes, parse_dtype
from engine.depth_stats import DepthStats, DepthStatsSnapshot
from engine.model_runner import ModelRunner, kv_bytes_per_block
from engine.outputs import CompletionOutput, Logprob, RequestOutput
from engine.parallel import TPGroup, WorkerDiedError, WorkerSpec
from engine.request import Request
from engine.sampler import Sampler
from engine.sampling_params import SamplingParams, seed_for_sample
from engine.scheduler import Scheduler
from kvcache.depth_cache import DepthCache, max_tokens_for_budget
from kvcache.kv_manager import KVCacheManager
from models.attn_res import depth_pool_spec
from models.config import ModelConfig
from models.loader import load_config, load_model, load_tokenizer, resolve_model
from models.parallel_plan import shard_sizes
from models.tokenizer import IncrementalDetokenizer, Tokenizer

logger = logging.getLogger("depthserve.engine")

PromptType = str | list[int] | dict[str, Any]


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.model_dir = resolve_model(config.model)
        self.model_config: ModelConfig = load_config(self.model_dir)
        self.tokenizer: Tokenizer | None = load_tokenizer(self.model_dir)
        if self.tokenizer is not None:
            _ = self.tokenizer.max_token_chars  # computed once here, not by the first request
        mcfg = self.model_config
        self.max_model_len = config.scheduler.max_model_len or mcfg.max_position_embeddings
        if self.max_model_len > mcfg.max_position_embeddings:
            raise ValueError(f"max_model_len={self.max_model_len} exceeds the model's max_position_embeddings="
                             f"{mcfg.max_position_embeddings}")
        tp = config.parallel.tensor_parallel_size
        shard_sizes(mcfg, tp)  # ValueError unless the model splits evenly over tp ranks
        self.kv, self.depth, self.max_step_tokens = self._size_caches(tp)
        self.tp_group: TPGroup | None = None
        if tp > 1:
            spec = WorkerSpec(self.model_dir, config.dtype, self.kv.num_blocks, self.kv.block_size,
                              self.max_step_tokens, config.num_threads, self.max_model_len)
            self.tp_group = TPGroup(tp, spec)
        try:
            # The rotary table covers the positions served, not max_position_embeddings (which a
            # checkpoint may set to billions).
            self.model = load_model(self.model_dir, config.dtype, self.tp_group.comm if self.tp_group else None,
                                    cfg=mcfg, max_model_len=self.max_model_len)
            if self.tp_group is not None:
                self.tp_group.ready()
        except BaseException:
            self.shutdown()
            raise
        self.scheduler = Scheduler(config.scheduler, self.kv, self.max_step_tokens)
        self.runner = ModelRunner(self.model, self.kv, self.depth, self.tp_group)
        self.depth_stats: DepthStats | None = None
        if config.depth_stats and mcfg.is_attn_res:
            self.depth_stats = DepthStats()
            self.runner.record_all = True
        self.sampler = Sampler(config.seed)
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0
        self.last_step_tokens = 0
        self.fatal_error: str | None = None  # set when the engine cannot continue (a TP worker died)

    # ---- start-up sizing ---------------------------------------------------------------------
    def _size_caches(self, tp: int) -> tuple[KVCacheManager, DepthCache | None, int]:
        cc, sc = self.config.cache, self.config.scheduler
        per_block = kv_bytes_per_block(self.model_config, self.config.dtype, cc.block_size, tp)
        num_blocks = cc.num_kv_blocks or cc.kv_cache_memory // per_block
        blocks_per_seq = -(-self.max_model_len // cc.block_size)
        if num_blocks < blocks_per_seq:
            need = blocks_per_seq * per_block
            raise ValueError(
                f"KV cache budget holds {num_blocks} blocks of {cc.block_size} tokens, but one request of "
                f"max_model_len={self.max_model_len} needs {blocks_per_seq}: raise --kv-cache-memory to at least "
                f"{need / 2**20:.1f} MiB or lower --max-model-len")
        step_tokens = sc.max_num_batched_tokens
        depth = None
        spec = depth_pool_spec(self.model_config, self.config.dtype)
        if spec is not None:
            fit = max_tokens_for_budget(spec, cc.depth_cache_memory)
            if fit < 1:
                raise ValueError(
                    f"depth cache budget {cc.depth_cache_memory} B holds no token ({spec.bytes_per_token} B per "
                    f"token): raise --depth-cache-memory")
            if fit < step_tokens:
                logger.info("depth cache budget caps the step at %d tokens (max_num_batched_tokens=%d)",
                            fit, step_tokens)
            step_tokens = min(step_tokens, fit)
            depth = DepthCache(spec, step_tokens)
        return KVCacheManager(num_blocks, cc.block_size, cc.enable_prefix_caching), depth, step_tokens

    # ---- requests ------------------------------------------------------------------------------
    def make_request(self, prompt: PromptType, params: SamplingParams, request_id: str | None = None) -> Request:
        """Validate and tokenize a prompt without touching engine state (safe from any thread)."""
        if not isinstance(params, SamplingParams):
            raise TypeError("params must be a SamplingParams")
        params.validate()
        text: str | None = None
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass prompt_token_ids")
            text = prompt
            # Every token covers at most max_token_chars characters (x2 for normalisers that drop
            # characters): a longer text cannot fit, so refuse it before spending a core on encoding it.
            limit = 2 * self.max_model_len * self.tokenizer.max_token_chars
            if len(prompt) > limit:
                raise ValueError(f"prompt has {len(prompt)} characters, more than can fit the context length of "
                                 f"{self.max_model_len} tokens (at most {limit} characters): shorten the prompt")
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                ids = prompt["prompt_token_ids"]
            elif "prompt" in prompt:
                return self.make_request(prompt["prompt"], params, request_id)
            else:
                raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        else:
            ids = prompt
        if not isinstance(ids, list | tuple) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise ValueError("prompt_token_ids must be a list of integers")
        ids = list(ids)
        if not ids:
            raise ValueError("prompt is empty: give at least one token")
        vocab = self.model_config.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"prompt_token_ids contains {bad}, outside the vocabulary [0, {vocab})")
        for name, toks in (("stop_token_ids", params.stop_token_ids), ("logit_bias", params.logit_bias)):
            bad = next((t for t in toks if t >= vocab), None)
            if bad is not None:
                raise ValueError(f"{name} names token {bad}, outside the vocabulary [0, {vocab})")
        if params.max_tokens is not None and len(ids) + params.max_tokens > self.max_model_len:
            raise ValueError(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the model's context "
                f"length of {self.max_model_len} tokens: shorten the prompt or lower max_tokens")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt ({len(ids)} tokens) leaves no room to generate within the context length "
                             f"of {self.max_model_len} tokens")
        if (params.depth_attention or params.prompt_depth_attention) and not self.model_config.is_attn_res:
            raise ValueError("depth_attention needs an AttnRes model; this model has a standard residual stream")
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        req = Request(rid, ids, params, prompt=text, max_model_len=self.max_model_len,
                      eos_token_ids=() if params.ignore_eos else self.model_config.eos_token_ids)
        if self.tokenizer is not None:
            req.detokenizer = IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens)
        return req

    def add_request(self, prompt: PromptType, params: SamplingParams, request_id: str | None = None) -> str:
        return self.add_built_request(self.make_request(prompt, params, request_id))

    def add_built_request(self, req: Request) -> str:
        if req.request_id in self.requests:
            raise ValueError(f"request id {req.request_id!r} is already in use")
        self.requests[req.request_id] = req
        self.scheduler.add_request(req)
        return req.request_id

    def abort_request(self, request_id: str) -> RequestOutput | None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        self.scheduler.finish(req)
        req.finish_reason = "abort"
        return self._output(req, [])

    def fail_all(self, message: str) -> list[RequestOutput]:
        """End every request in the engine with an error output (after an error no request owns)."""
        return [self._fail(req, message) for req in list(self.requests.values())]

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def shutdown(self) -> None:
        """Stop tensor-parallel workers (no-op at TP=1); safe to call twice."""
        if self.tp_group is not None:
            self.tp_group.shutdown()

    # ---- the step ------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One engine step. Nothing a single request carries can raise out of here: a request whose
        row cannot be built, sampled or updated fails alone; a failed forward fails its step's requests."""
        if self.fatal_error is not None:
            raise WorkerDiedError(self.fatal_error)
        sched = self.scheduler.schedule()
        if not sched.scheduled:
            if self.scheduler.has_unfinished() and not sched.preempted:
                raise RuntimeError("scheduler made no progress with requests pending (KV cache too small?)")
            return []
        step = ModelRunner.order(sched.scheduled)
        self.last_step_tokens = sched.num_tokens
        now = time.monotonic()
        for req, _ in step.scheduled:
            if req.metrics.first_scheduled_time is None:  # count each prompt once (as vLLM), cached or not
                req.metrics.first_scheduled_time = now
                self.num_prompt_tokens += req.num_prompt_tokens
        try:
            ran = self.runner.execute(step)
        except Exception as e:  # fail the requests of this step only; the engine keeps serving
            if self.tp_group is not None:  # ranks are out of step after a failed collective: fatal
                self.fatal_error = self.tp_group.dead or f"tensor-parallel step failed: {e}"
                raise WorkerDiedError(self.fatal_error) from e
            logger.exception("model step failed")
            return [self._fail(req, "model step failed") for req, _ in step.scheduled]
        outputs = [self._fail(f.request, "the request could not be prepared", f.error) for f in ran.failed]
        step = ran.step
        for req, n in step.scheduled:
            req.num_computed_tokens += n
            self.kv.cache_computed(req.request_id, req.token_ids, req.num_computed_tokens)
        sampled_pos = {r.request_id: r.num_tokens - 1 for r in step.sample}
        for req, pos, entry in ran.depth_records:
            if req.params.depth_attention or req.params.prompt_depth_attention:
                req.depth_entries[pos] = entry
            if self.depth_stats is not None and sampled_pos.get(req.request_id) == pos:
                self.depth_stats.add(entry)
        if not step.sample:
            return outputs
        assert ran.logits is not None
        now = time.monotonic()
        for req, result in zip(step.sample, self._sample(ran.logits, step.sample), strict=True):
            if isinstance(result, BaseException):
                outputs.append(self._fail(req, "sampling failed", result))
                continue
            try:
                outputs.append(self._append_token(req, *result, now))
            except Exception as e:  # noqa: BLE001 - e.g. a detokenizer error: this request only
                outputs.append(self._fail(req, "processing the output failed", e))
        return outputs

    def _sample(self, logits: torch.Tensor, reqs: list[Request]) -> list[tuple[int, Logprob | None] | BaseException]:
        """Sample the batch; if that fails, each row alone, so one request's row fails only itself."""
        try:
            out = self.sampler(logits, reqs)
            return list(zip(out.token_ids, out.logprobs, strict=True))
        except Exception:  # noqa: BLE001
            logger.exception("batched sampling failed; sampling row by row")
        results: list[tuple[int, Logprob | None] | BaseException] = []
        for i, req in enumerate(reqs):
            try:
                one = self.sampler(logits[i:i + 1], [req])
                results.append((one.token_ids[0], one.logprobs[0]))
            except Exception as e:  # noqa: BLE001
                results.append(e)
        return results

    def _append_token(self, req: Request, tok: int, logprob: Logprob | None, now: float) -> RequestOutput:
        req.token_ids.append(tok)
        self.num_generation_tokens += 1
        if req.logprobs is not None and logprob is not None:
            req.logprobs.append(logprob)
        if req.metrics.first_token_time is None:
            req.metrics.first_token_time = now
        req.metrics.last_token_time = now
        self._check_stop(req, tok)
        if req.finish_reason is not None:
            self.scheduler.finish(req)
            self.requests.pop(req.request_id, None)
            req.metrics.finished_time = now
        return self._output(req, [tok])

    def _check_stop(self, req: Request, tok: int) -> None:
        """Detokenize the new token and apply stop conditions (vLLM's order: min_tokens, EOS, stop token
        ids, stop strings, length). Stop strings are matched in text released by the detokenizer, the
        end-of-request flush included, so held-back text cannot slip past a stop."""
        p = req.params
        active = req.num_output_tokens >= p.min_tokens  # below min_tokens nothing stops a request
        new_text = ""
        if active and tok in req.eos_token_ids:
            req.finish_reason = "stop"
        elif active and tok in p.stop_token_ids:
            req.finish_reason, req.stop_reason = "stop", tok
        elif req.detokenizer is not None:
            new_text = req.detokenizer.add([tok])
        if req.finish_reason is None and (
                (p.max_tokens is not None and req.num_output_tokens >= p.max_tokens)
                or req.num_tokens >= req.max_model_len):
            req.finish_reason = "length"
        if req.finish_reason is not None and req.detokenizer is not None:
            new_text += req.detokenizer.flush()
        if not new_text:
            return
        prev_len = len(req.output_text)
        req.output_text += new_text
        if not (p.stop and active):
            return
        text = req.output_text
        # earliest stop string that ends inside the new text (it may start in older text)
        hits = [(at, s) for s in p.stop if (at := text.find(s, max(0, prev_len - len(s) + 1))) >= 0]
        if hits:
            at, s = min(hits)
            req.output_text = text[:at + len(s) if p.include_stop_str_in_output else at]
            req.finish_reason, req.stop_reason = "stop", s

    def _fail(self, req: Request, message: str, error: BaseException | None = None) -> RequestOutput:
        """End one request with an error output (the client sees `message`; the log gets the details)."""
        if error is not None:
            logger.error("request %s failed: %s", req.request_id, message, exc_info=error)
        self.scheduler.finish(req)
        self.requests.pop(req.request_id, None)
        req.finish_reason = "error"
        out = self._output(req, [])
        out.error = message
        return out

    def _output(self, req: Request, new_ids: list[int]) -> RequestOutput:
        comp = CompletionOutput(
            index=0, text=req.output_text, token_ids=req.output_token_ids, finish_reason=req.finish_reason,
            stop_reason=req.stop_reason, logprobs=list(req.logprobs) if req.logprobs is not None else None,
            new_text=self._release_text(req), new_token_ids=new_ids)
        out = RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, [comp],
                            finished=req.finish_reason is not None, metrics=req.metrics)
        p = req.params
        if p.depth_attention:  # the token at position q came from the forward pass at q - 1
            first = req.num_prompt_tokens - 1
            comp.depth_attention = [req.depth_entries[first + j] for j in range(req.num_output_tokens)]
            comp.new_depth_attention = comp.depth_attention[len(comp.depth_attention) - len(new_ids):]
        if p.prompt_depth_attention:
            out.prompt_depth_attention = [req.depth_entries[q] for q in range(req.num_prompt_tokens)
                                          if q in req.depth_entries]
        return out

    @staticmethod
    def _release_text(req: Request) -> str:
        """Text not yet streamed. While a request runs, the last len(longest stop) - 1 characters are
        held back (vLLM's stop buffer): they may be the start of a stop string that later tokens
        complete, and streamed text must never be taken back."""
        hold = 0
        if req.finish_reason is None and req.params.stop and not req.params.include_stop_str_in_output:
            hold = max(len(s) for s in req.params.stop) - 1
        end = max(req.num_sent_chars, len(req.output_text) - hold)
        delta = req.output_text[req.num_sent_chars:end]
        req.num_sent_chars = end
        return delta

    # ---- introspection for tests and metrics ------------------------------------------------------
    def kv_blocks_held_by_requests(self) -> int:
        return self.kv.num_request_blocks()

    def depth_rows_in_use(self) -> int:
        return self.depth.rows_in_use if self.depth is not None else 0

    def stats(self) -> EngineStats:
        """A snapshot for metrics; cheap, read on the engine thread."""
        running = len(self.scheduler.running)
        depth_cap = self.depth.capacity if self.depth is not None else 0
        return EngineStats(
            num_running=running, num_waiting=len(self.scheduler.waiting), kv_cache_usage=self.kv.usage(),
            kv_blocks_total=self.kv.num_blocks, kv_blocks_held=self.kv.num_request_blocks(),
            depth_cache_usage=(self.last_step_tokens / depth_cap if depth_cap and running else 0.0),
            depth_cache_bytes=self.depth.bytes if self.depth is not None else 0,
            depth_rows_in_use=self.depth_rows_in_use(),
            prompt_tokens=self.num_prompt_tokens, generation_tokens=self.num_generation_tokens,
            num_preemptions=self.scheduler.num_preemptions, prefix_cache_queries=self.kv.stats.queries,
            prefix_cache_hits=self.kv.stats.hits,
            depth=self.depth_stats.snapshot() if self.depth_stats is not None else None)


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float  # fraction of KV blocks held by requests
    kv_blocks_total: int
    kv_blocks_held: int
    depth_cache_usage: float  # fraction of the depth pool the last step used (0 when idle)
    depth_cache_bytes: int
    depth_rows_in_use: int  # outside a step this must be 0
    prompt_tokens: int  # counters, monotonic
    generation_tokens: int
    num_preemptions: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    depth: DepthStatsSnapshot | None = None  # depth-weight aggregates, when depth_stats is on


class LLM:
    """Offline batch generation, in the style of vLLM's `LLM`."""

    def __init__(self, model: str, dtype: str | torch.dtype = "float32", tensor_parallel_size: int = 1,
                 max_model_len: int | None = None, max_num_seqs: int = 64, max_num_batched_tokens: int = 2048,
                 block_size: int = 16, kv_cache_memory: str | int = "1GiB", depth_cache_memory: str | int = "256MiB",
                 enable_prefix_caching: bool = True, num_kv_blocks: int | None = None,
                 long_prefill_token_threshold: int = 0, seed: int = 0, num_threads: int | None = None) -> None:
        cfg = EngineConfig(
            model=model, dtype=parse_dtype(dtype), seed=seed, num_threads=num_threads,
            cache=CacheConfig(block_size=block_size, kv_cache_memory=parse_bytes(kv_cache_memory),
                              depth_cache_memory=parse_bytes(depth_cache_memory),
                              enable_prefix_caching=enable_prefix_caching, num_kv_blocks=num_kv_blocks),
            scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                      max_model_len=max_model_len,
                                      long_prefill_token_threshold=long_prefill_token_threshold),
            parallel=ParallelConfig(tensor_parallel_size=tensor_parallel_size))
        self.engine = LLMEngine(cfg)

    def shutdown(self) -> None:
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        """Run prompts to completion; one RequestOutput per prompt, in order (n samples each)."""
        if isinstance(prompts, str | dict) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)  # type: ignore[arg-type]
        plist = list(params) if isinstance(params, list | tuple) else [params or SamplingParams()] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"got {len(plist)} SamplingParams for {len(prompts)} prompts")
        eng = self.engine
        ids: list[list[str]] = []
        for i, (prompt, p) in enumerate(zip(prompts, plist, strict=True)):
            row = []
            for j in range(p.n):
                sub = p if p.n == 1 else replace(p, n=1, seed=seed_for_sample(p.seed, j))
                row.append(eng.add_request(prompt, sub, request_id=f"gen-{id(self)}-{i}-{j}"))
            ids.append(row)
        final: dict[str, RequestOutput] = {}
        while eng.has_unfinished_requests():
            for out in eng.step():
                if out.finished:
                    final[out.request_id] = out
        results = []
        for row in ids:
            first = final[row[0]]
            comps = []
            for j, rid in enumerate(row):
                c = final[rid].outputs[0]
                c.index = j
                comps.append(c)
            error = next((final[r].error for r in row if final[r].error), None)
            results.append(replace(first, outputs=comps, finished=True, error=error))
        return results

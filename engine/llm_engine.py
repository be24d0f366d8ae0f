"""LLMEngine: step() = schedule -> run -> sample -> update; LLM: the offline generate() API."""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from engine.arg_utils import EngineArgs
from engine.config import DEFAULT_KV_CACHE_MEMORY, EngineConfig, resolve_dtype
from engine.cuda_graphs import capture_sizes, graphs_off_reason
from engine.depth_stats import DepthStats, DepthStatsSnapshot
from engine.errors import InvalidParameterError
from engine.memory import MemoryProfile, kv_blocks_for, no_room_message, profile_step
from engine.model_runner import ModelRunner, kv_bytes_per_block
from engine.output_processor import OutputProcessor
from engine.outputs import RequestOutput, RequestOutputKind
from engine.parallel import TPGroup, WorkerDiedError, WorkerSpec
from engine.request import Request
from engine.sampling_params import SamplingParams, seed_for_sample
from engine.scheduler import EngineCoreOutput, RunnerOutput, Scheduler
from engine.structured import GrammarCompiler, StructuredOutputsParams
from kernels import hugepages
from kernels.ops import select_backend
from kvcache.depth_cache import DepthCache, max_tokens_for_budget
from kvcache.kv_manager import KVCacheManager
from models.attn_res import depth_pool_spec
from models.config import ModelConfig
from models.loader import checkpoint_dtype, load_config, load_model, load_tokenizer, resolve_model
from models.parallel_plan import shard_sizes
from models.quantization import int8_copy_bytes, weight_bytes
from models.tokenizer import Tokenizer

logger = logging.getLogger("depthserve.engine")

PromptType = str | list[int] | dict[str, Any]


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.num_threads = torch.get_num_threads()  # the step's threads (_step_threads may use one for small steps)
        self.small_step_rows = config.small_step_rows or 0  # the HTTP server sets its default (None) to 2
        self.model_dir = resolve_model(config.model)
        self.model_config: ModelConfig = load_config(self.model_dir)
        if config.speculative is not None:
            config.speculative.check_model(self.model_config)  # before anything is allocated or loaded
        dtype, why = resolve_dtype(config.dtype, checkpoint_dtype(self.model_dir), config.device)
        self.config = config = replace(config, dtype=dtype)
        self.dtype_reason = why
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
        self.depth, self.max_step_tokens = self._size_depth()
        per_block = kv_bytes_per_block(mcfg, config.dtype, config.cache.block_size, tp)
        num_blocks = self._budget_kv_blocks(per_block)  # None on CUDA: profiled once the weights are loaded
        if num_blocks is not None:
            self._check_kv_blocks(num_blocks, per_block)  # before loading anything
        # one warning if the backend asked for is unusable; triton needs to know where the tensors live
        self.kernels = select_backend(config.kernels, (config.dtype,), config.device)
        logger.info("%s", self.kernels.describe())
        self.tp_group: TPGroup | None = None
        if tp > 1:
            spec = WorkerSpec(self.model_dir, config.dtype, num_blocks, config.cache.block_size,
                              self.max_step_tokens, config.num_threads, self.max_model_len, self.kernels,
                              device=config.device, gpu_memory_utilization=config.cache.gpu_memory_utilization,
                              max_num_seqs=config.scheduler.max_num_seqs, quantization=config.quantization,
                              int8_activations=config.quant_activations == "int8")
            self.tp_group = TPGroup(tp, spec)
        try:
            # The rotary table covers the positions served, not max_position_embeddings (which a
            # checkpoint may set to billions).
            self.model = load_model(self.model_dir, config.dtype, self.tp_group.comm if self.tp_group else None,
                                    cfg=mcfg, max_model_len=self.max_model_len, device=config.device,
                                    quantization=config.quantization)
            # weights packed once, after the loaders ran
            self.model.prepare_for_inference(self.kernels, config.quant_activations == "int8")
            profile = None
            if num_blocks is None:
                profile, num_blocks = self._profile_kv_blocks(per_block)
            if self.tp_group is not None:
                self.tp_group.ready()
            self._check_kv_blocks(num_blocks, per_block, profile)
        except BaseException:
            self.shutdown()
            raise
        self.kv = KVCacheManager(num_blocks, config.cache.block_size, config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.kv, self.max_step_tokens, config.speculative)
        self.runner = ModelRunner(self.model, self.kv, self.depth, self.tp_group,
                                  max_num_seqs=config.scheduler.max_num_seqs, max_model_len=self.max_model_len,
                                  max_step_tokens=self.max_step_tokens, seed=config.seed, device=config.device)
        if config.speculative is not None and config.speculative.method == "depth":
            self.runner.draft_layers = config.speculative.draft_layers(mcfg)
        self._setup_cuda_graphs(tp)
        if self.runner.device.type == "cpu":  # weights in huge pages: fewer TLB misses per streamed weight
            hugepages.back_model(self.model, [t for kv in self.runner.kv_caches for t in kv]
                                 + (self.depth.tensors() if self.depth is not None else []))
        self._log_startup(num_blocks, per_block)
        self.processor = OutputProcessor(self.tokenizer)
        self.depth_stats: DepthStats | None = None
        if config.depth_stats and mcfg.is_attn_res:
            self.depth_stats = DepthStats()
            self.runner.record_all = True
            self.scheduler.record_depth = True  # the runner records one row a request: speculation stays off
        self._ids = itertools.count()
        self._grammars: GrammarCompiler | None = None  # built on the first structured request
        self._grammars_lock = threading.Lock()
        self.last_step_tokens = 0
        self.fatal_error: str | None = None  # set when the engine cannot continue (a TP worker died)

    def _log_startup(self, num_blocks: int, per_block: int) -> None:
        """What an operator checks first (vLLM prints the same facts): precision, context, KV capacity in
        tokens and requests, the depth pool, threads and ranks."""
        cfg, bs = self.config, self.config.cache.block_size
        dtype = str(cfg.dtype).removeprefix("torch.")
        logger.info("model %s: %s, dtype %s (%s), max_model_len %d", cfg.model,
                    "Block AttnRes" if self.model_config.attn_res_mode == "block" else
                    "Full AttnRes" if self.model_config.is_attn_res else "standard residual",
                    dtype, self.dtype_reason, self.max_model_len)
        logger.info("weights: %.1f MiB per rank; quantized: %s (--quantization %s)",
                    weight_bytes(self.model) / 2**20, self.model.quant_plan.summary(), cfg.quantization)
        if extra := int8_copy_bytes(self.model):
            logger.info("int8 activations: %.1f MiB per rank more for the weights repacked for VNNI "
                        "(--quant-activations int8)", extra / 2**20)
        elif cfg.quant_activations == "int8" and self.model.quant_plan.formats:
            logger.warning("--quant-activations int8 has no effect here: the int8 kernel needs a CPU with AVX-512 "
                           "VNNI and the native ops (the quantized linears stay weight-only)")
        per_request = -(-self.max_model_len // bs)
        logger.info("KV cache size: %d tokens (%d blocks of %d, %.1f MiB per rank); maximum concurrency for %d "
                    "tokens per request: %.2fx", num_blocks * bs, num_blocks, bs, num_blocks * per_block / 2**20,
                    self.max_model_len, num_blocks / per_request)
        if self.depth is not None:
            logger.info("depth pool: %.1f MiB for %d tokens per step (--depth-cache-memory)",
                        self.depth.bytes / 2**20, self.depth.capacity)
        else:
            logger.info("depth pool: none (standard residual model)")
        logger.info("engine ready: device %s, kernels %s, threads %d, tensor_parallel_size %d, step budget %d "
                    "tokens, max_num_seqs %d, prefix caching %s, cudagraph: %s", cfg.device, self.kernels.name,
                    torch.get_num_threads(), cfg.parallel.tensor_parallel_size, self.max_step_tokens,
                    cfg.scheduler.max_num_seqs, "on" if cfg.cache.enable_prefix_caching else "off",
                    self.runner.cudagraph_status)

    # ---- start-up sizing ---------------------------------------------------------------------
    def _size_depth(self) -> tuple[DepthCache | None, int]:
        """The depth pool (AttnRes models) from its byte budget, and the step's token budget it allows."""
        cc, sc = self.config.cache, self.config.scheduler
        step_tokens = sc.max_num_batched_tokens
        spec = depth_pool_spec(self.model_config, self.config.dtype)
        if spec is None:
            return None, step_tokens
        fit = max_tokens_for_budget(spec, cc.depth_cache_memory)
        if fit < 1:
            raise ValueError(
                f"depth cache budget {cc.depth_cache_memory} B holds no token ({spec.bytes_per_token} B per "
                f"token): raise --depth-cache-memory")
        if fit < step_tokens:
            logger.info("depth cache budget caps the step at %d tokens (max_num_batched_tokens=%d)",
                        fit, step_tokens)
        step_tokens = min(step_tokens, fit)
        return DepthCache(spec, step_tokens, device=self.config.device), step_tokens

    def _budget_kv_blocks(self, per_block: int) -> int | None:
        """KV blocks from --num-kv-blocks or --kv-cache-memory; None on CUDA without either (profiled)."""
        cc = self.config.cache
        if cc.num_kv_blocks:
            return cc.num_kv_blocks
        if cc.kv_cache_memory is not None:
            return cc.kv_cache_memory // per_block
        if torch.device(self.config.device).type == "cuda":
            return None  # --gpu-memory-utilization decides, after a profile step
        return DEFAULT_KV_CACHE_MEMORY // per_block

    def _profile_kv_blocks(self, per_block: int) -> tuple[MemoryProfile, int]:
        """CUDA: KV blocks that --gpu-memory-utilization leaves after a profiled peak step (the minimum over
        tensor-parallel ranks, which profile together); checked by _check_kv_blocks."""
        cc = self.config.cache
        prof = profile_step(self.model, self.depth, self.max_step_tokens, self.config.scheduler.max_num_seqs,
                            cc.block_size)
        num_blocks = kv_blocks_for(prof, cc.gpu_memory_utilization, per_block)
        if self.tp_group is not None:
            num_blocks = self.tp_group.min_over_ranks(num_blocks)
        logger.info("--gpu-memory-utilization %.2f: %d KV blocks (%.2f GiB)", cc.gpu_memory_utilization,
                    num_blocks, max(num_blocks, 0) * per_block / 2**30)
        return prof, num_blocks

    def _check_kv_blocks(self, num_blocks: int, per_block: int, profile: MemoryProfile | None = None) -> None:
        """ValueError unless one request of max_model_len fits (worded for the budget or the profile)."""
        cc = self.config.cache
        blocks_per_seq = -(-self.max_model_len // cc.block_size)
        if num_blocks >= blocks_per_seq:
            return
        if profile is not None:
            u = cc.gpu_memory_utilization
            if num_blocks < 1:
                raise ValueError(no_room_message(profile, u, per_block, self.max_step_tokens))
            raise ValueError(
                f"--gpu-memory-utilization {u} leaves room for {num_blocks} KV blocks of {cc.block_size} tokens, "
                f"but one request of max_model_len={self.max_model_len} needs {blocks_per_seq}: increase "
                "--gpu-memory-utilization, reduce --max-num-batched-tokens or lower --max-model-len")
        need = blocks_per_seq * per_block
        raise ValueError(
            f"KV cache budget holds {num_blocks} blocks of {cc.block_size} tokens, but one request of "
            f"max_model_len={self.max_model_len} needs {blocks_per_seq}: raise --kv-cache-memory to at least "
            f"{need / 2**20:.1f} MiB or lower --max-model-len")

    def _setup_cuda_graphs(self, tp: int) -> None:
        """Capture decode graphs when the device, the options and the kernel set allow; else say why not."""
        cfg = self.config
        reason = graphs_off_reason(cfg.device, cfg.enforce_eager, tp, self.model.k, self.kernels.name)
        if reason is not None:
            self.runner.cudagraph_status = f"off ({reason})"
            return
        self.runner.capture_cuda_graphs(capture_sizes(cfg.scheduler.max_num_seqs, self.max_step_tokens,
                                                      cfg.max_cuda_graph_batch_size))

    # ---- requests ------------------------------------------------------------------------------
    def make_request(self, prompt: PromptType, params: SamplingParams, request_id: str | None = None) -> Request:
        """Validate and tokenize a prompt without touching engine state (safe from any thread)."""
        if not isinstance(params, SamplingParams):
            raise TypeError("params must be a SamplingParams")
        params.validate()
        text: str | None = None
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidParameterError("this model has no tokenizer: pass prompt_token_ids", "prompt")
            text = prompt
            # Every token covers at most max_token_chars characters (x2 for normalisers that drop
            # characters): a longer text cannot fit, so refuse it before spending a core on encoding it.
            limit = 2 * self.max_model_len * self.tokenizer.max_token_chars
            if len(prompt) > limit:
                raise InvalidParameterError(
                    f"prompt has {len(prompt)} characters, more than can fit the context length of "
                    f"{self.max_model_len} tokens (at most {limit} characters): shorten the prompt", "prompt")
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                ids = prompt["prompt_token_ids"]
            elif "prompt" in prompt:
                return self.make_request(prompt["prompt"], params, request_id)
            else:
                raise InvalidParameterError("a prompt dict needs 'prompt' or 'prompt_token_ids'", "prompt")
        else:
            ids = prompt
        if not isinstance(ids, list | tuple) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise InvalidParameterError("prompt_token_ids must be a list of integers", "prompt")
        ids = list(ids)
        if not ids:
            raise InvalidParameterError("prompt is empty: give at least one token", "prompt")
        vocab = self.model_config.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidParameterError(f"prompt_token_ids contains {bad}, outside the vocabulary [0, {vocab})",
                                        "prompt")
        for name, toks in (("stop_token_ids", params.stop_token_ids), ("logit_bias", params.logit_bias)):
            bad = next((t for t in toks if t >= vocab), None)
            if bad is not None:
                raise InvalidParameterError(f"{name} names token {bad}, outside the vocabulary [0, {vocab})",
                                            name)
        if params.max_tokens is not None and len(ids) + params.max_tokens > self.max_model_len:
            raise InvalidParameterError(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the model's context "
                f"length of {self.max_model_len} tokens: shorten the prompt or lower max_tokens", "prompt")
        if len(ids) >= self.max_model_len:
            raise InvalidParameterError(f"prompt ({len(ids)} tokens) leaves no room to generate within the context "
                                        f"length of {self.max_model_len} tokens", "prompt")
        if (params.depth_attention or params.prompt_depth_attention) and not self.model_config.is_attn_res:
            raise InvalidParameterError(
                "depth_attention needs an AttnRes model; this model has a standard residual stream", "depth_attention")
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        req = Request(rid, ids, params, prompt=text, max_model_len=self.max_model_len,
                      eos_token_ids=() if params.ignore_eos else self.model_config.eos_token_ids,
                      device=self.config.device)
        if params.structured_outputs is not None:
            req.grammar = self.compile_grammar(params.structured_outputs)
        return req

    def compile_grammar(self, spec: StructuredOutputsParams) -> Any:
        """A fresh matcher for a structured-output spec (compiled once per spec, then copied); safe from any
        thread. InvalidParameterError naming the spec's kind when it is invalid, too large or too slow."""
        if self.tokenizer is None:
            raise InvalidParameterError("structured outputs need the model's tokenizer; this model has none",
                                        "structured_outputs")
        with self._grammars_lock:
            if self._grammars is None:
                self._grammars = GrammarCompiler(self.tokenizer, self.model_config.eos_token_ids,
                                                 self.model_config.vocab_size)
                self.runner.sampler.grammar_vocab_size = self._grammars.ll_tok.vocab_size
        return self._grammars.matcher(spec)

    def add_request(self, prompt: PromptType, params: SamplingParams, request_id: str | None = None) -> str:
        return self.add_built_request(self.make_request(prompt, params, request_id))

    def add_built_request(self, req: Request) -> str:
        """Queue a request made by make_request; n > 1 becomes n engine requests under its id."""
        if req.request_id in self.processor.parents:
            raise ValueError(f"request id {req.request_id!r} is already in use")
        p = req.params
        samples = [req] if p.n == 1 else [
            Request(f"{req.request_id}/{j}", req.prompt_token_ids, replace(p, n=1, seed=seed_for_sample(p.seed, j)),
                    prompt=req.prompt, max_model_len=req.max_model_len, eos_token_ids=req.eos_token_ids,
                    arrival_time=req.metrics.arrival_time, parent_id=req.request_id, index=j,
                    device=self.config.device)
            for j in range(p.n)]
        if req.grammar is not None and p.n > 1:  # each sample follows the grammar on its own
            for sample in samples:
                sample.grammar = req.grammar.deep_copy()
        self.processor.add(samples)
        for sample in samples:
            self.scheduler.add_request(sample)
        return req.request_id

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Abort a request (all its samples); its last output, or None if it is unknown or finished."""
        return self._end(self.processor.children(request_id), "abort", None)

    def fail_all(self, message: str) -> list[RequestOutput]:
        """End every request in the engine with an error output (after an error no request owns)."""
        return [out for rid in list(self.processor.parents)
                if (out := self._end(self.processor.children(rid), "error", message)) is not None]

    def _end(self, reqs: list[Request], reason: str, error: str | None) -> RequestOutput | None:
        for req in reqs:
            self.scheduler.finish(req, reason)
        outs, _ = self.processor.process([EngineCoreOutput(req, error=error) for req in reqs])
        return outs[-1] if outs else None

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def request_ids(self) -> list[str]:
        """Ids of the requests in the engine (as added; not their per-sample ids)."""
        return list(self.processor.parents)

    def shutdown(self) -> None:
        """Stop tensor-parallel workers (no-op at TP=1); safe to call twice."""
        if self.tp_group is not None:
            self.tp_group.shutdown()

    # ---- the step: schedule -> execute -> update -> outputs ----------------------------------------
    def step(self) -> list[RequestOutput]:
        """One engine step. Nothing a single request carries can raise out of here: a request whose
        row cannot be built or sampled fails alone; a failed forward fails its step's requests."""
        if self.fatal_error is not None:
            raise WorkerDiedError(self.fatal_error)
        sched = self.scheduler.schedule()
        if not sched.scheduled:
            if self.scheduler.has_unfinished() and not sched.preempted:
                raise RuntimeError("scheduler made no progress with requests pending (KV cache too small?)")
            return []
        self.last_step_tokens = sched.num_tokens
        threads = self._step_threads(sched.num_tokens, len(sched.scheduled))
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
        try:
            ran = self.runner.execute(sched)
        except Exception as e:  # fail the requests of this step only; the engine keeps serving
            if self.tp_group is not None:  # ranks are out of step after a failed collective: fatal
                self.fatal_error = self.tp_group.dead or f"tensor-parallel step failed: {e}"
                raise WorkerDiedError(self.fatal_error) from e
            logger.exception("model step failed")
            failed = [(s.request, "model step failed", e) for s in sched.scheduled]
            ran = RunnerOutput([], [], [], [], {}, failed)
        for req, message, error in ran.failed:
            if error is not None and message != "model step failed":
                logger.error("request %s failed: %s", req.request_id, message, exc_info=error)
        core = self.scheduler.update_from_output(sched, ran)
        if self.depth_stats is not None:
            for entry in ran.depth:
                if entry is not None:
                    self.depth_stats.add(entry)
        outputs, stopped = self.processor.process(core)
        for req, stop in stopped:
            self.scheduler.finish(req, "stop", stop)
        return outputs

    def _step_threads(self, num_tokens: int, num_requests: int) -> int:
        """Threads for a step: one for a pure-decode CPU step of at most `small_step_rows` rows, else the engine's.
        Such a step streams the weights at about the bandwidth one core reaches, and under the HTTP server the
        event loop and the clients' streams need the other core: with both busy-waiting OpenMP threads a
        1-stream token took 8.7 ms against 5.2 on one (SmolLM2 Q8_0, 2 cores; loadtest/RESULTS.md)."""
        rows = self.small_step_rows
        if (rows and num_tokens <= rows and num_tokens == num_requests and self.tp_group is None
                and self.runner.device.type == "cpu"):
            return 1
        return self.num_threads

    # ---- introspection for tests and metrics ------------------------------------------------------
    def kv_blocks_held_by_requests(self) -> int:
        return self.kv.num_request_blocks()

    def depth_rows_in_use(self) -> int:
        return self.depth.rows_in_use if self.depth is not None else 0

    def stats(self) -> EngineStats:
        """A snapshot for metrics; cheap, read on the engine thread."""
        running, st = len(self.scheduler.running), self.scheduler.stats
        depth_cap = self.depth.capacity if self.depth is not None else 0
        return EngineStats(
            num_running=running, num_waiting=len(self.scheduler.waiting), kv_cache_usage=self.kv.usage(),
            kv_blocks_total=self.kv.num_blocks, kv_blocks_held=self.kv.num_request_blocks(),
            depth_cache_usage=(self.last_step_tokens / depth_cap if depth_cap and running else 0.0),
            depth_cache_bytes=self.depth.bytes if self.depth is not None else 0,
            depth_rows_in_use=self.depth_rows_in_use(),
            prompt_tokens=st.prompt_tokens, generation_tokens=st.generation_tokens,
            num_preemptions=st.num_preemptions, prefix_cache_queries=st.prefix_cache_queries,
            prefix_cache_hits=st.prefix_cache_hits, spec_decode_num_drafts=st.spec_num_drafts,
            spec_decode_num_draft_tokens=st.spec_num_draft_tokens,
            spec_decode_num_accepted_tokens=st.spec_num_accepted_tokens,
            spec_decode_num_accepted_tokens_per_pos=tuple(st.spec_accepted_per_pos),
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
    # speculative decoding counters (0 without --speculative-config): verified steps, drafted and accepted
    # tokens, and accepted tokens by draft position
    spec_decode_num_drafts: int = 0
    spec_decode_num_draft_tokens: int = 0
    spec_decode_num_accepted_tokens: int = 0
    spec_decode_num_accepted_tokens_per_pos: tuple[int, ...] = ()


class LLM:
    """Offline batch generation, in the style of vLLM's `LLM`."""

    def __init__(self, model: str, **kwargs: Any) -> None:
        """`model` and any EngineArgs field as a keyword (dtype, max_model_len, max_num_seqs, kv_cache_memory,
        enable_prefix_caching, tensor_parallel_size, depth_stats, ...; see engine.arg_utils.EngineArgs).
        Unknown keywords raise TypeError; bad values raise ValueError naming the field."""
        cfg = EngineArgs.from_kwargs(model, "LLM", **kwargs).create_engine_config()
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
        ids = [eng.add_request(prompt, replace(p, output_kind=RequestOutputKind.FINAL_ONLY),
                               request_id=f"gen-{id(self)}-{i}")
               for i, (prompt, p) in enumerate(zip(prompts, plist, strict=True))]
        final: dict[str, RequestOutput] = {}
        while eng.has_unfinished_requests():
            for out in eng.step():
                final[out.request_id] = out
        return [final[rid] for rid in ids]

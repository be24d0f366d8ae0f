"""CUDA graphs for decode and --gpu-memory-utilization: the parts that run without a GPU.

The padded decode step a graph replays (static buffers, pad rows on the scratch KV block, outputs dropped)
runs eagerly here through ModelRunner.use_padded_decode and must give exactly the unpadded greedy tokens;
capture and replay themselves run in `python -m loadtest.device_check` on a GPU.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch

import engine.llm_engine
import kernels.ops
from engine import LLM, SamplingParams
from engine.arg_utils import EngineArgs
from engine.config import DEFAULT_KV_CACHE_MEMORY
from engine.cuda_graphs import capture_sizes, graphs_off_reason, padded_size
from engine.memory import MemoryProfile, kv_blocks_for, no_room_message
from engine.model_runner import kv_bytes_per_block
from engine.parallel import pack_tensors, unpack_tensors
from kernels.ops import REFERENCE_OPS, KernelSet
from kvcache.block_pool import BlockPool
from models.context import AttentionMetadata, ForwardBatch, PrefillSpan
from server.cli import build_parser
from tests.tiny import (
    MAX_TOKENS,
    PROMPTS,
    STATIC_TABLE_OPS,
    expected_greedy,
    reference_greedy,
    tiny_config,
    write_tiny,
)

GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
GiB = 2**30


# ---- sizes, reasons, flags -------------------------------------------------------------------------------------
def test_capture_sizes() -> None:
    assert capture_sizes(64, 2048) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert capture_sizes(1024, 8192)[-3:] == [240, 248, 256]  # default cap: min(max_num_seqs, 256)
    assert capture_sizes(12, 2048) == [1, 2, 4, 8, 12]  # the cap itself is captured
    assert capture_sizes(64, 5) == [1, 2, 4, 5]  # never more rows than the step (and depth pool) holds
    assert capture_sizes(512, 2048, limit=20) == [1, 2, 4, 8, 16, 20]
    assert capture_sizes(512, 2048, limit=1) == [1]
    sizes = capture_sizes(64, 2048)
    assert [padded_size(sizes, b) for b in (1, 3, 5, 8, 9, 64)] == [1, 4, 8, 8, 16, 64]
    assert padded_size(sizes, 65) is None  # larger decode batches run eagerly


def test_graphs_off_reasons() -> None:
    safe = KernelSet(graph_safe_decode=True)
    assert graphs_off_reason("cpu", False, 1, safe, "x") == "device is cpu"
    assert graphs_off_reason("cuda", True, 1, safe, "x") == "--enforce-eager"
    assert "tensor-parallel" in graphs_off_reason("cuda", False, 2, safe, "x")
    reason = graphs_off_reason("cuda", False, 1, REFERENCE_OPS, "reference")
    assert "no capture-safe decode attention" in reason and "--kernels triton" in reason
    assert graphs_off_reason("cuda", False, 1, safe, "triton") is None
    assert REFERENCE_OPS.graph_safe_decode is False
    assert safe.native_ops() == []  # the flag is not an op


def test_flags_parse_and_reach_the_config() -> None:
    ns = build_parser().parse_args(["serve", "--enforce-eager", "--gpu-memory-utilization", "0.8",
                                    "--max-cuda-graph-batch-size", "48"])
    cfg = EngineArgs.from_cli_args(ns).create_engine_config()
    assert cfg.enforce_eager is True and cfg.max_cuda_graph_batch_size == 48
    assert cfg.cache.gpu_memory_utilization == 0.8
    default = EngineArgs().create_engine_config()
    assert default.enforce_eager is False and default.max_cuda_graph_batch_size is None
    assert default.cache.gpu_memory_utilization == 0.9 and default.cache.kv_cache_memory is None


def test_help_says_utilization_is_ignored_on_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--gpu-memory-utilization" in out and "ignored on cpu" in out
    assert "--enforce-eager" in out and "--max-cuda-graph-batch-size" in out


@pytest.mark.parametrize("value", [0, 0.0, -0.1, 1.5, "high", True, None])
def test_gpu_memory_utilization_validated(value: object) -> None:
    with pytest.raises(ValueError, match=re.escape("(--gpu-memory-utilization)")):
        EngineArgs(gpu_memory_utilization=value).create_engine_config()  # type: ignore[arg-type]


def test_max_cuda_graph_batch_size_validated() -> None:
    with pytest.raises(ValueError, match=re.escape("max_cuda_graph_batch_size must be >= 1, got 0")):
        EngineArgs(max_cuda_graph_batch_size=0).create_engine_config()
    assert EngineArgs(gpu_memory_utilization=1).create_engine_config().cache.gpu_memory_utilization == 1.0


# ---- the engine on the CPU ------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=[("none", 0, 4), ("block", 3, 5), ("full", 0, 4)],
                ids=lambda c: f"{c[0]}{c[1] or ''}-L{c[2]}")
def model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    mode, bs, layers = request.param
    folder, _ = write_tiny(tmp_path_factory.mktemp("m"), tiny_config(mode, bs, layers=layers))
    return folder, [list(t) for t in expected_greedy(mode, bs, layers)]


def test_cpu_is_eager_and_ignores_gpu_memory_utilization(model, caplog: pytest.LogCaptureFixture) -> None:
    folder, expected = model
    with caplog.at_level(logging.INFO, logger="depthserve.engine"):
        llm = LLM(str(folder), max_model_len=64, gpu_memory_utilization=0.01, enforce_eager=False)
    eng = llm.engine
    per_block = kv_bytes_per_block(eng.model_config, eng.config.dtype, eng.config.cache.block_size)
    assert eng.kv.num_blocks == DEFAULT_KV_CACHE_MEMORY // per_block  # the byte budget, not 1% of anything
    assert eng.runner.captured_sizes == [] and eng.runner.pad_sizes == []
    assert eng.runner.cudagraph_status == "off (device is cpu)"
    ready = [r.getMessage() for r in caplog.records if "engine ready" in r.getMessage()]
    assert len(ready) == 1 and "cudagraph: off (device is cpu)" in ready[0]
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == expected


class PaddedSteps:
    """Wraps the runner's padded batch builder: checks every padded step's pad rows and KV writes."""

    def __init__(self, runner) -> None:
        self.runner = runner
        self.steps: list[tuple[int, int]] = []  # (real rows, padded rows)
        self.blocks_seen: set[int] = set()
        self.gathers: set[str | None] = set()
        self.table_widths: set[int] = set()
        build, sample = runner._padded_batch, runner._sample
        self._pending: tuple | None = None
        bs = runner.kv.block_size
        scratch = range(runner.scratch_block * bs, (runner.scratch_block + 1) * bs)

        def padded_batch(rows, p):
            batch = build(rows, p)
            b = len(rows.reqs)
            slots = batch.attn.slot_mapping.tolist()
            assert len(slots) == p and batch.attn.num_decode == p
            assert all(s in scratch for s in slots[b:]), "a pad row writes outside the scratch block"
            assert not any(s in scratch for s in slots[:b]), "a real row writes into the scratch block"
            assert batch.attn.decode_context_lens[b:].tolist() == [1] * (p - b)
            assert (batch.attn.decode_block_table[b:] == runner.scratch_block).all()
            real = {runner.kv.block_ids(r.request_id)[pos // bs] * bs + pos % bs
                    for r, pos in zip(rows.reqs, batch.positions[:b].tolist(), strict=True)}
            assert set(slots[:b]) == real  # real rows write exactly their own next slot
            self._pending = (real, [(k.clone(), v.clone()) for k, v in runner.kv_caches])
            self.gathers.add(None if batch.attn.decode_gather is None else "gather")
            self.table_widths.add(batch.attn.decode_block_table.shape[1])
            self.steps.append((b, p))
            return batch

        def sample_(rows, logits, weights):
            if self._pending is not None:  # after a padded forward: only real slots and the scratch block changed
                real, before = self._pending
                self._pending = None
                for (k0, v0), (k1, v1) in zip(before, runner.kv_caches, strict=True):
                    changed = ((k0 != k1).flatten(1).any(1) | (v0 != v1).flatten(1).any(1)).nonzero().flatten()
                    assert set(changed.tolist()) <= real | set(scratch), "a pad row wrote a real KV slot"
                assert logits.shape[0] == sum(rows.sample)  # pad rows' logits dropped
            return sample(rows, logits, weights)

        runner._padded_batch = padded_batch
        runner._sample = sample_
        sync = runner.inputs.sync_blocks

        def sync_blocks(req_id, block_ids):
            self.blocks_seen.update(block_ids)
            return sync(req_id, block_ids)

        runner.inputs.sync_blocks = sync_blocks


def _padded_run(folder: Path, sizes: list[int] | None, **kw: object) -> tuple[list[list[int]], LLM, PaddedSteps]:
    kw.setdefault("num_kv_blocks", 64)  # small caches: the spy compares them before and after each padded step
    llm = LLM(str(folder), max_model_len=64, **kw)
    runner = llm.engine.runner
    runner.use_padded_decode(sizes if sizes is not None else capture_sizes(runner.max_num_seqs,
                                                                          runner.max_step_tokens))
    spy = PaddedSteps(runner)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY)
    return [o.outputs[0].token_ids for o in outs], llm, spy


@pytest.mark.parametrize(("sizes", "kw"), [
    (None, {}),  # the default size list (the four prompts decode together: no pad rows)
    ([8], {}),  # every decode step padded to 8 rows
    ([3], {"max_num_batched_tokens": 3, "block_size": 2, "enable_prefix_caching": False}),  # 1-token chunks
    ([2, 4], {"block_size": 4, "num_kv_blocks": 16, "max_num_batched_tokens": 16}),  # preemption
], ids=["default-sizes", "pad-to-8", "one-token-chunks", "preemption"])
def test_padded_decode_equals_reference_greedy(model, sizes, kw) -> None:
    folder, expected = model
    got, llm, spy = _padded_run(folder, sizes, **kw)
    assert got == expected
    eng = llm.engine
    assert spy.steps, "no decode step was padded"
    if sizes is not None:
        assert any(p > b for b, p in spy.steps), f"no step had pad rows: {spy.steps}"
    assert eng.runner.scratch_block not in spy.blocks_seen  # never a request's block
    assert max(spy.blocks_seen) < eng.kv.num_blocks
    assert eng.kv_blocks_held_by_requests() == 0 and eng.depth_rows_in_use() == 0
    if "num_kv_blocks" in kw:
        assert eng.scheduler.stats.num_preemptions > 0


@pytest.mark.parametrize("kw", [{}, {"block_size": 4, "num_kv_blocks": 16, "max_num_batched_tokens": 16}],
                         ids=["batched", "preemption"])
def test_padded_decode_with_a_graph_safe_kernel(model, kw, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a graph replays, eagerly: a capture-safe decode attention reads the full-width static block table
    and the lengths in place (no gather built), and the tokens are still the reference's."""
    monkeypatch.setattr(kernels.ops, "kernel_set", lambda backend, device="cpu": STATIC_TABLE_OPS)
    folder, expected = model
    got, llm, spy = _padded_run(folder, [8], **kw)
    runner = llm.engine.runner
    assert runner.model.k.graph_safe_decode and got == expected
    assert any(p > b for b, p in spy.steps) and runner.padded_steps == len(spy.steps)
    assert spy.gathers == {None}  # nothing data-dependent reaches the padded step
    assert spy.table_widths == {runner.inputs.block_table.shape[1]}  # the full, fixed width


def test_depth_recording_steps_stay_unpadded(tmp_path: Path) -> None:
    folder, ref = write_tiny(tmp_path / "m", tiny_config("block", 2, layers=3))
    llm = LLM(str(folder), max_model_len=64)
    llm.engine.runner.use_padded_decode([8])
    spy = PaddedSteps(llm.engine.runner)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, depth_attention=True)
    out = llm.generate({"prompt_token_ids": PROMPTS[0]}, params)[0].outputs[0]
    assert out.token_ids == reference_greedy(ref, PROMPTS[0], 4) and not spy.steps
    assert out.depth_attention is not None


def test_scratch_block_is_outside_the_pool(model) -> None:
    folder, _ = model
    llm = LLM(str(folder), max_model_len=64, block_size=4, num_kv_blocks=16)
    eng = llm.engine
    assert eng.runner.scratch_block == eng.kv.num_blocks == 16
    for k, v in eng.runner.kv_caches:
        assert k.shape[0] == v.shape[0] == 17 * 4  # 16 blocks + the scratch block
    pool = BlockPool(16)
    ids = sorted(b.block_id for b in pool.allocate(16))
    assert ids == list(range(16))
    with pytest.raises(RuntimeError):
        pool.allocate(1)
    with pytest.raises(ValueError, match="padded sizes"):
        eng.runner.use_padded_decode([eng.runner.max_num_seqs + 1])


# ---- --gpu-memory-utilization: the sizing, with the profile faked ----------------------------------------------
def test_kv_blocks_from_a_profile() -> None:
    prof = MemoryProfile(total=80 * GiB, peak=20 * GiB, weights_and_pools=15 * GiB)
    assert kv_blocks_for(prof, 0.9, 2**20) == (72 - 20) * 1024 - 1  # less the scratch block
    assert kv_blocks_for(prof, 0.25, 2**20) == 0 - 1
    msg = no_room_message(prof, 0.25, 2**20, 2048)
    assert "increase --gpu-memory-utilization or reduce --max-num-batched-tokens" in msg
    assert "2048 tokens" in msg and "20.00 GiB" in msg


def _fake_cuda_sizing(monkeypatch: pytest.MonkeyPatch, prof: MemoryProfile) -> list:
    """The engine on the CPU as if on CUDA: no KV budget given, and profile_step returning `prof`."""
    calls: list = []

    def profile(model, depth, num_tokens, num_logits, block_size):
        calls.append((num_tokens, num_logits, block_size, depth))
        return prof

    monkeypatch.setattr(engine.llm_engine.LLMEngine, "_budget_kv_blocks",
                        lambda self, per_block: self.config.cache.num_kv_blocks or (
                            None if self.config.cache.kv_cache_memory is None
                            else self.config.cache.kv_cache_memory // per_block))
    monkeypatch.setattr(engine.llm_engine, "profile_step", profile)
    return calls


def test_profiled_sizing_is_wired(model, monkeypatch: pytest.MonkeyPatch) -> None:
    folder, expected = model
    calls = _fake_cuda_sizing(monkeypatch, MemoryProfile(total=GiB, peak=GiB // 2, weights_and_pools=GiB // 4))
    with LLM(str(folder), max_model_len=64, gpu_memory_utilization=0.75, max_num_batched_tokens=96,
             max_num_seqs=8) as llm:
        eng = llm.engine
        per_block = kv_bytes_per_block(eng.model_config, eng.config.dtype, eng.config.cache.block_size)
        assert eng.kv.num_blocks == int((0.75 * GiB - GiB // 2) // per_block) - 1
        assert calls and calls[0][:3] == (eng.max_step_tokens, 8, 16)
        assert (calls[0][3] is None) == (not eng.model_config.is_attn_res)  # the depth pool is allocated first
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY)
        assert [o.outputs[0].token_ids for o in outs] == expected
    # an explicit budget skips the profile
    calls.clear()
    LLM(str(folder), max_model_len=64, kv_cache_memory="4MiB").shutdown()
    assert not calls


def test_no_room_left_is_a_clear_error(model, monkeypatch: pytest.MonkeyPatch) -> None:
    folder, _ = model
    _fake_cuda_sizing(monkeypatch, MemoryProfile(total=GiB, peak=GiB, weights_and_pools=GiB // 2))
    with pytest.raises(ValueError, match="increase --gpu-memory-utilization or reduce --max-num-batched-tokens"):
        LLM(str(folder), max_model_len=64)
    _fake_cuda_sizing(monkeypatch, MemoryProfile(total=GiB, peak=int(0.9 * GiB) - 40 * 2**10,
                                                 weights_and_pools=GiB // 2))
    with pytest.raises(ValueError, match=r"needs \d+: increase --gpu-memory-utilization, reduce "
                                         r"--max-num-batched-tokens or lower --max-model-len"):
        LLM(str(folder), max_model_len=64)


# ---- the tensor-parallel batch broadcast (gloo on CPU, NCCL on CUDA) ---------------------------------------------
def test_batch_packs_into_structure_and_tensors() -> None:
    meta = AttentionMetadata(slot_mapping=torch.arange(5), num_decode=2, block_size=4,
                             decode_block_table=torch.ones(2, 3, dtype=torch.long),
                             decode_context_lens=torch.tensor([3, 4], dtype=torch.int32),
                             decode_mask=torch.ones(2, 1, 1, 4, dtype=torch.bool),
                             prefills=[PrefillSpan(2, 5, 3, None, None)])
    batch = ForwardBatch(input_ids=torch.arange(5), positions=torch.arange(5), attn=meta,
                         logits_indices=torch.empty(0, dtype=torch.long), kv_caches=[],
                         depth_rows=torch.tensor([1]))
    tensors: list[torch.Tensor] = []
    payload = pack_tensors(batch, tensors)
    assert len(tensors) == 8 and not any(isinstance(v, torch.Tensor) for v in vars(payload.attn).values())
    back = unpack_tensors(payload, [t.clone() for t in tensors])
    assert back.attn.prefills == meta.prefills and back.attn.num_decode == 2
    got: list[torch.Tensor] = []
    pack_tensors(back, got)
    assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(tensors, got, strict=True))

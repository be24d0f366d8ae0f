"""Turns a SchedulerOutput into one flat packed batch, runs the model, samples, returns a RunnerOutput.

Rows are ordered decode-like sequences (one new token) first, then prompt chunks; the attention
metadata is built once per step here, vectorised over the persistent block tables of the InputBatch,
and shared by every layer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Protocol

import torch

from engine.input_batch import InputBatch
from engine.outputs import DepthEntry, Logprob
from engine.request import Request
from engine.sampler import Sampler
from engine.scheduler import RunnerOutput, SchedulerOutput
from kvcache.depth_cache import DepthCache
from kvcache.kv_manager import KVCacheManager
from models.config import ModelConfig
from models.context import AttentionMetadata, ForwardBatch, PrefillSpan
from models.llama import LlamaForServing
from models.parallel_plan import shard_sizes

logger = logging.getLogger("depthserve.runner")


def kv_bytes_per_block(cfg: ModelConfig, dtype: torch.dtype, block_size: int, tp: int = 1) -> int:
    """Bytes of one KV block on one rank (KV heads are sharded, or replicated when fewer than ranks)."""
    kv_heads = shard_sizes(cfg, tp).kv_heads
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.num_hidden_layers * block_size * kv_heads * cfg.head_dim * elem


def allocate_kv(model: LlamaForServing, num_slots: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (K, V), each [num_slots, local KV heads, head_dim], in the model's dtype, on its device."""
    s = model.shards
    dev = model.embed_tokens.weight.device
    return [(torch.zeros(num_slots, s.kv_heads, s.head_dim, dtype=model.dtype, device=dev),
             torch.zeros(num_slots, s.kv_heads, s.head_dim, dtype=model.dtype, device=dev)) for _ in model.layers]


class BatchBroadcaster(Protocol):
    def broadcast(self, batch: ForwardBatch) -> None: ...


@dataclass
class _Rows:
    """The rows of one step, built request by request (a request whose row fails is left out)."""

    reqs: list[Request] = field(default_factory=list)
    num_new: list[int] = field(default_factory=list)
    sample: list[bool] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    failed: list[tuple[Request, str, BaseException]] = field(default_factory=list)
    depth_rows: list[tuple[Request, int, int]] = field(default_factory=list)  # (request, position, row)


class ModelRunner:
    def __init__(self, model: LlamaForServing, kv: KVCacheManager, depth: DepthCache | None,
                 group: BatchBroadcaster | None = None, *, max_num_seqs: int, max_model_len: int,
                 max_step_tokens: int, seed: int = 0, device: torch.device | str = "cpu") -> None:
        self.model = model
        self.device = dev = torch.device(device)
        self.kv = kv
        self.depth = depth
        self.group = group  # tensor-parallel workers that run the same batch
        self.record_all = False  # record every sampled row's depth weights (depth metrics on)
        self.kv_caches = allocate_kv(model, kv.num_blocks * kv.block_size)
        self.inputs = InputBatch(max_num_seqs, kv.blocks_needed(max_model_len), max_step_tokens, kv.block_size,
                                 dev)
        self.sampler = Sampler(seed, dev)

    # ---- the step ------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        """Run one step and sample; requests whose row cannot be built or sampled fail alone."""
        for rid in sched.finished_ids:
            self.inputs.remove(rid)
        for req in sched.preempted:  # recomputed from scratch later: new blocks, new row
            self.inputs.remove(req.request_id)
        rows = self._rows(sched)
        if not rows.reqs:
            return RunnerOutput([], [], [], [], {}, rows.failed)
        batch = self._batch(rows)
        try:
            if self.group is not None:
                self.group.broadcast(batch)
            weights: list[torch.Tensor] = []  # per mixing site [R, n_site], when rows are recorded
            hidden = self.model(batch, weights)
            logits = self.model.compute_logits(hidden)  # [S, vocab] fp32, one row per sampled request
        finally:
            if self.depth is not None and batch.depth is not None:
                self.depth.release()
        return self._sample(rows, logits, weights)

    def _rows(self, sched: SchedulerOutput) -> _Rows:
        rows = _Rows()
        for s in sched.scheduled:
            req, n = s.request, s.num_new_tokens
            start, row0 = req.num_computed_tokens, len(rows.ids)
            try:
                ids = req.token_ids[start:start + n]
                if len(ids) != n or n < 1:
                    raise RuntimeError(f"{req!r} has {len(ids)} tokens to run, scheduled {n}")
                self.inputs.sync_blocks(req.request_id, self.kv.block_ids(req.request_id))
                planned = self._plan_depth_records(req, start, n, row0, s.sample)
            except Exception as e:  # noqa: BLE001 - reported for this request alone
                rows.failed.append((req, "the request could not be prepared", e))
                continue
            rows.reqs.append(req)
            rows.num_new.append(n)
            rows.sample.append(s.sample)
            rows.ids += ids
            rows.depth_rows += planned
        return rows

    def _batch(self, rows: _Rows) -> ForwardBatch:
        """The packed batch, from the persistent buffers: one vectorised pass over the block tables.

        Index arithmetic runs on the host; what the model reads goes to the device once (non-blocking)."""
        inputs, bs, dev = self.inputs, self.kv.block_size, self.device
        t = len(rows.ids)
        inputs.wait_for_upload()  # the host buffers are free to rewrite
        table_rows = torch.tensor([inputs.row_of[r.request_id] for r in rows.reqs], dtype=torch.long)  # [B]
        starts = torch.tensor([r.num_computed_tokens for r in rows.reqs], dtype=torch.long)  # [B]
        counts = torch.tensor(rows.num_new, dtype=torch.long)  # [B]
        ends = starts + counts  # [B] context length after this step
        first_row = torch.cumsum(counts, 0) - counts  # [B] first packed row of each request
        row_req = torch.repeat_interleave(torch.arange(len(rows.reqs)), counts)  # [T]
        positions = inputs.positions[:t]
        torch.sub(torch.arange(t), first_row[row_req], out=positions)
        positions += starts[row_req]
        table = inputs.block_table
        slots = inputs.slot_mapping[:t]
        torch.add(table[table_rows[row_req], positions // bs] * bs, positions % bs, out=slots)
        inputs.input_ids[:t].copy_(torch.tensor(rows.ids, dtype=torch.long))
        input_ids, positions_d, slots_d = inputs.upload(t)
        one = counts == 1
        meta = AttentionMetadata(slot_mapping=slots_d, block_size=bs)
        decode = one.nonzero().squeeze(1)
        if len(decode):
            lens = ends[decode]  # [B_d]
            meta.num_decode = len(decode)
            meta.decode_block_table = table[table_rows[decode], :-(-int(lens.max()) // bs)].to(dev, non_blocking=True)
            meta.decode_context_lens = lens.to(torch.int32).to(dev, non_blocking=True)
            gather = self._slots(table_rows[decode], int(lens.max()))  # [B_d, C]
            meta.decode_gather = gather.to(dev, non_blocking=True)
            meta.decode_mask = (torch.arange(gather.shape[1], device=dev).unsqueeze(0)
                                < lens.to(dev, non_blocking=True).unsqueeze(1))[:, None, None, :]
        for b in (~one).nonzero().squeeze(1).tolist():
            start, end, row0 = int(starts[b]), int(ends[b]), int(first_row[b])
            if start == 0:
                meta.prefills.append(PrefillSpan(row0, row0 + end, end, None, None))
            else:
                gather = self._slots(table_rows[b:b + 1], end)[0].to(dev, non_blocking=True)  # [ctx]
                q_pos = torch.arange(start, end, device=dev).unsqueeze(1)
                mask = (torch.arange(end, device=dev).unsqueeze(0) <= q_pos)[None, None]  # [1, 1, n, ctx]
                meta.prefills.append(PrefillSpan(row0, row0 + end - start, end, gather, mask))
        sampled = [b for b, s in enumerate(rows.sample) if s]
        return ForwardBatch(
            input_ids=input_ids, positions=positions_d, attn=meta,
            logits_indices=(first_row + counts - 1)[sampled].to(dev, non_blocking=True), kv_caches=self.kv_caches,
            depth=self.depth.reserve(t) if self.depth is not None else None,
            depth_rows=torch.tensor([r for _, _, r in rows.depth_rows], dtype=torch.long).to(dev, non_blocking=True)
            if rows.depth_rows else None)

    def _slots(self, table_rows: torch.Tensor, length: int) -> torch.Tensor:
        """KV slots of positions [0, length) of each given block-table row: [B, length]."""
        bs = self.kv.block_size
        nb = -(-length // bs)
        blocks = self.inputs.block_table[table_rows, :nb]  # [B, nb]
        return (blocks.unsqueeze(-1) * bs + torch.arange(bs)).reshape(len(table_rows), -1)[:, :length]

    def _plan_depth_records(self, req: Request, start: int, n: int, row0: int,
                            samples: bool) -> list[tuple[Request, int, int]]:
        """Rows whose depth weights are wanted: the sampled row, and prompt rows for echo."""
        p = req.params
        if p.prompt_depth_attention:
            return [(req, start + k, row0 + k) for k in range(n) if start + k < req.num_prompt_tokens
                    or (samples and k == n - 1 and (p.depth_attention or self.record_all))]
        if (p.depth_attention or self.record_all) and samples:
            return [(req, start + n - 1, row0 + n - 1)]
        return []

    # ---- sampling ------------------------------------------------------------------------------
    def _sample(self, rows: _Rows, logits: torch.Tensor, weights: list[torch.Tensor]) -> RunnerOutput:
        sampled = [r for r, s in zip(rows.reqs, rows.sample, strict=True) if s]
        depth_of: dict[int, DepthEntry] = {}  # id(request) -> its sampled row's weights
        prompt_depth: dict[str, list[tuple[int, DepthEntry]]] = {}
        if rows.depth_rows:
            sites = [(torch.round(w.float() * 1e4) / 1e4).tolist() for w in weights]  # per site: [R][n_src]
            for i, (req, pos, _) in enumerate(rows.depth_rows):
                entry = [site[i] for site in sites]
                if pos == req.num_tokens - 1:  # the pass over the last token produced the sampled one
                    depth_of[id(req)] = entry
                if pos < req.num_prompt_tokens and req.params.prompt_depth_attention:
                    prompt_depth.setdefault(req.request_id, []).append((pos, entry))
        out = RunnerOutput([], [], [], [], prompt_depth, rows.failed)
        for req, result in zip(sampled, self._sample_rows(logits, sampled), strict=True):
            if isinstance(result, BaseException):
                out.failed.append((req, "sampling failed", result))
                continue
            out.sampled.append(req)
            out.token_ids.append(result[0])
            out.logprobs.append(result[1])
            out.depth.append(depth_of.get(id(req)))
        return out

    def _sample_rows(self, logits: torch.Tensor,
                     reqs: list[Request]) -> list[tuple[int, Logprob | None] | BaseException]:
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

"""Turns a SchedulerOutput into one flat packed batch, runs the model, returns logits to sample.

Rows are ordered decode-like sequences (one new token) first, then prompt chunks; the attention
metadata is built once per step here, vectorised over block tables, and shared by every layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from engine.request import Request
from kvcache.depth_cache import DepthCache
from kvcache.kv_manager import KVCacheManager
from models.config import ModelConfig
from models.context import AttentionMetadata, ForwardBatch, PrefillSpan
from models.llama import LlamaForServing
from models.parallel_plan import shard_sizes

DepthRecord = tuple[Request, int, list[list[float]]]  # (request, position of the pass, weights per site)


@dataclass
class StepInput:
    """The requests of a step in row order, and which of them get a token sampled."""

    scheduled: list[tuple[Request, int]]  # (request, new tokens), decode-like first
    sample: list[Request]  # requests whose KV catches up with their tokens this step


def kv_bytes_per_block(cfg: ModelConfig, dtype: torch.dtype, block_size: int, tp: int = 1) -> int:
    """Bytes of one KV block on one rank (KV heads are sharded, or replicated when fewer than ranks)."""
    kv_heads = shard_sizes(cfg, tp).kv_heads
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.num_hidden_layers * block_size * kv_heads * cfg.head_dim * elem


def allocate_kv(model: LlamaForServing, num_slots: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (K, V), each [num_slots, local KV heads, head_dim], in the model's dtype."""
    s = model.shards
    return [(torch.zeros(num_slots, s.kv_heads, s.head_dim, dtype=model.dtype),
             torch.zeros(num_slots, s.kv_heads, s.head_dim, dtype=model.dtype)) for _ in model.layers]


@dataclass(frozen=True)
class RowFailure:
    """A request whose row of the packed batch could not be built; the rest of the step still runs."""

    request: Request
    error: BaseException


@dataclass
class PreparedStep:
    batch: ForwardBatch
    step: StepInput  # the step without the requests in `failed`
    failed: list[RowFailure]
    depth_rows: list[tuple[Request, int]]  # (request, position) per recorded row, in batch.depth_rows order


@dataclass
class RunnerOutput:
    step: StepInput  # what ran (failed rows removed); logits rows follow step.sample
    logits: torch.Tensor | None  # [len(step.sample), vocab] fp32; None when nothing ran
    depth_records: list[DepthRecord]
    failed: list[RowFailure]


class BatchBroadcaster(Protocol):
    def broadcast(self, batch: ForwardBatch) -> None: ...


class ModelRunner:
    def __init__(self, model: LlamaForServing, kv: KVCacheManager, depth: DepthCache | None,
                 group: BatchBroadcaster | None = None) -> None:
        self.model = model
        self.kv = kv
        self.depth = depth
        self.group = group  # tensor-parallel workers that run the same batch
        self.record_all = False  # record every sampled row's depth weights (depth metrics on)
        self.kv_caches = allocate_kv(model, kv.num_blocks * kv.block_size)

    @staticmethod
    def order(scheduled: list[tuple[Request, int]]) -> StepInput:
        ordered = sorted(scheduled, key=lambda rn: rn[1] != 1)  # stable: decode-like rows first
        sample = [r for r, n in ordered if r.num_computed_tokens + n == r.num_tokens]
        return StepInput(ordered, sample)

    def _slots(self, block_ids: list[list[int]], lengths: list[int]) -> torch.Tensor:
        """KV slots of positions [0, length) per sequence, padded: [B, max(length)]."""
        bs = self.kv.block_size
        width = max(len(b) for b in block_ids)
        table = torch.tensor([b + [0] * (width - len(b)) for b in block_ids], dtype=torch.long)  # [B, nb]
        slots = (table.unsqueeze(-1) * bs + torch.arange(bs)).reshape(len(block_ids), -1)
        return slots[:, : max(lengths)]

    def prepare(self, step: StepInput) -> PreparedStep:
        """The packed batch of a step, and the step without requests whose row could not be built.

        Rows are built request by request, so that one request's bad state fails that request alone
        (the engine reports it) while the rest of the step runs.
        """
        ids: list[int] = []
        pos: list[int] = []
        slot_map: list[int] = []
        decode_tables, decode_lens = [], []
        prefills: list[PrefillSpan] = []
        rows_of: dict[str, int] = {}
        sampled = {r.request_id for r in step.sample}
        kept: list[tuple[Request, int]] = []
        failed: list[RowFailure] = []
        depth_rows: list[tuple[Request, int, int]] = []  # (request, position, row)
        for req, n in step.scheduled:
            start, row0, ctx = req.num_computed_tokens, len(ids), req.num_computed_tokens + n
            try:
                row_ids = req.token_ids[start:ctx]
                if len(row_ids) != n or n < 1:
                    raise RuntimeError(f"{req!r} has {len(row_ids)} tokens to run, scheduled {n}")
                row_slots = self.kv.slot_mapping(req.request_id, start, ctx)
                table = self.kv.block_ids(req.request_id)
                span = None
                if n > 1 and start == 0:
                    span = PrefillSpan(row0, row0 + n, ctx, None, None)
                elif n > 1:
                    gather = self._slots([table], [ctx])[0]
                    q_pos = torch.arange(start, ctx).unsqueeze(1)
                    mask = (torch.arange(ctx).unsqueeze(0) <= q_pos)[None, None]  # [1, 1, n, ctx]
                    span = PrefillSpan(row0, row0 + n, ctx, gather, mask)
                planned = self._plan_depth_records(req, start, n, row0, req.request_id in sampled)
            except Exception as e:  # noqa: BLE001 - reported for this request alone
                failed.append(RowFailure(req, e))
                continue
            kept.append((req, n))
            depth_rows += planned
            ids += row_ids
            pos.extend(range(start, ctx))
            slot_map += row_slots
            rows_of[req.request_id] = row0 + n - 1
            if span is None:
                decode_tables.append(table)
                decode_lens.append(ctx)
            else:
                prefills.append(span)
        if failed:
            gone = {id(f.request) for f in failed}
            step = StepInput(kept, [r for r in step.sample if id(r) not in gone])
        meta = AttentionMetadata(slot_mapping=torch.tensor(slot_map, dtype=torch.long), prefills=prefills)
        if decode_lens:
            meta.num_decode = len(decode_lens)
            meta.decode_gather = self._slots(decode_tables, decode_lens)
            lens = torch.tensor(decode_lens).unsqueeze(1)
            meta.decode_mask = (torch.arange(meta.decode_gather.shape[1]).unsqueeze(0) < lens)[:, None, None, :]
        t = len(ids)
        batch = ForwardBatch(
            input_ids=torch.tensor(ids, dtype=torch.long),
            positions=torch.tensor(pos, dtype=torch.long),
            attn=meta,
            logits_indices=torch.tensor([rows_of[r.request_id] for r in step.sample], dtype=torch.long),
            kv_caches=self.kv_caches,
            depth=self.depth.reserve(t) if self.depth is not None and t else None,
            depth_rows=torch.tensor([r for _, _, r in depth_rows], dtype=torch.long) if depth_rows else None,
        )
        return PreparedStep(batch, step, failed, [(req, q) for req, q, _ in depth_rows])

    def _plan_depth_records(self, req: Request, start: int, n: int, row0: int,
                            samples: bool) -> list[tuple[Request, int, int]]:
        """Rows whose depth weights a request asked for: its sampled row, and prompt rows for echo."""
        p = req.params
        if p.prompt_depth_attention:
            return [(req, start + k, row0 + k) for k in range(n) if start + k < req.num_prompt_tokens
                    or (samples and k == n - 1 and (p.depth_attention or self.record_all))]
        if (p.depth_attention or self.record_all) and samples:
            return [(req, start + n - 1, row0 + n - 1)]
        return []

    @staticmethod
    def _collect_depth(rows: list[tuple[Request, int]], weights: list[torch.Tensor]) -> list[DepthRecord]:
        """[R, n_site] per site -> per recorded row, weights per site rounded to 4 decimals."""
        sites = [(torch.round(w.float() * 1e4) / 1e4).tolist() for w in weights]
        return [(req, pos, [site[i] for site in sites]) for i, (req, pos) in enumerate(rows)]

    @torch.inference_mode()
    def execute(self, step: StepInput) -> RunnerOutput:
        """Run one step: fp32 logits for the sampled rows, requested depth weights, rows that failed."""
        prep = self.prepare(step)
        batch, step = prep.batch, prep.step
        if not step.scheduled:
            return RunnerOutput(step, None, [], prep.failed)
        try:
            if self.group is not None:
                self.group.broadcast(batch)
            hidden = self.model(batch)
            logits = self.model.compute_logits(hidden)
        finally:
            if self.depth is not None and batch.depth is not None:
                self.depth.release()
        records = self._collect_depth(prep.depth_rows, batch.depth_weights) if prep.depth_rows else []
        return RunnerOutput(step, logits, records, prep.failed)

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

DepthRecord = tuple[Request, int, list[list[float]]]  # (request, position of the pass, weights per site)


@dataclass
class StepInput:
    """The requests of a step in row order, and which of them get a token sampled."""

    scheduled: list[tuple[Request, int]]  # (request, new tokens), decode-like first
    sample: list[Request]  # requests whose KV catches up with their tokens this step


def kv_bytes_per_block(cfg: ModelConfig, dtype: torch.dtype, block_size: int, tp: int = 1) -> int:
    """Bytes of one KV block on one rank (KV heads are sharded, or replicated when fewer than ranks)."""
    kv_heads = max(1, cfg.num_key_value_heads // tp)
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.num_hidden_layers * block_size * kv_heads * cfg.head_dim * elem


def allocate_kv(model: LlamaForServing, num_slots: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (K, V), each [num_slots, local KV heads, head_dim], in the model's dtype."""
    attn = model.layers[0].self_attn
    return [(torch.zeros(num_slots, attn.kv_heads, attn.head_dim, dtype=model.dtype),
             torch.zeros(num_slots, attn.kv_heads, attn.head_dim, dtype=model.dtype)) for _ in model.layers]


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

    def prepare(self, step: StepInput) -> ForwardBatch:
        ids: list[int] = []
        pos: list[int] = []
        slot_map: list[int] = []
        decode_tables, decode_lens = [], []
        prefills: list[PrefillSpan] = []
        rows_of: dict[str, int] = {}
        sampled = {r.request_id for r in step.sample}
        self._depth_rows: list[tuple[Request, int, int]] = []  # (request, position, row)
        for req, n in step.scheduled:
            start = req.num_computed_tokens
            row0 = len(ids)
            self._plan_depth_records(req, start, n, row0, req.request_id in sampled)
            ids.extend(req.token_ids[start:start + n])
            pos.extend(range(start, start + n))
            slot_map.extend(self.kv.slot_mapping(req.request_id, start, start + n))
            rows_of[req.request_id] = row0 + n - 1
            ctx = start + n
            if n == 1:
                decode_tables.append(self.kv.block_ids(req.request_id))
                decode_lens.append(ctx)
            elif start == 0:
                prefills.append(PrefillSpan(row0, row0 + n, ctx, None, None))
            else:
                gather = self._slots([self.kv.block_ids(req.request_id)], [ctx])[0]
                q_pos = torch.arange(start, ctx).unsqueeze(1)
                mask = (torch.arange(ctx).unsqueeze(0) <= q_pos)[None, None]  # [1, 1, n, ctx]
                prefills.append(PrefillSpan(row0, row0 + n, ctx, gather, mask))
        meta = AttentionMetadata(slot_mapping=torch.tensor(slot_map, dtype=torch.long), prefills=prefills)
        if decode_lens:
            meta.num_decode = len(decode_lens)
            meta.decode_gather = self._slots(decode_tables, decode_lens)
            lens = torch.tensor(decode_lens).unsqueeze(1)
            meta.decode_mask = (torch.arange(meta.decode_gather.shape[1]).unsqueeze(0) < lens)[:, None, None, :]
        t = len(ids)
        return ForwardBatch(
            input_ids=torch.tensor(ids, dtype=torch.long),
            positions=torch.tensor(pos, dtype=torch.long),
            attn=meta,
            logits_indices=torch.tensor([rows_of[r.request_id] for r in step.sample], dtype=torch.long),
            kv_caches=self.kv_caches,
            depth=self.depth.reserve(t) if self.depth is not None else None,
            depth_rows=torch.tensor([r for _, _, r in self._depth_rows], dtype=torch.long)
            if self._depth_rows else None,
        )

    def _plan_depth_records(self, req: Request, start: int, n: int, row0: int, samples: bool) -> None:
        """Rows whose depth weights a request asked for: its sampled row, and prompt rows for echo."""
        p = req.params
        if p.prompt_depth_attention:
            for k in range(n):
                if start + k < req.num_prompt_tokens or (samples and k == n - 1 and (p.depth_attention or self.record_all)):
                    self._depth_rows.append((req, start + k, row0 + k))
        elif (p.depth_attention or self.record_all) and samples:
            self._depth_rows.append((req, start + n - 1, row0 + n - 1))

    def _collect_depth(self, weights: list[torch.Tensor]) -> list[DepthRecord]:
        """[R, n_site] per site -> per recorded row, weights per site rounded to 4 decimals."""
        sites = [(torch.round(w.float() * 1e4) / 1e4).tolist() for w in weights]
        return [(req, pos, [site[i] for site in sites]) for i, (req, pos, _) in enumerate(self._depth_rows)]

    @torch.inference_mode()
    def execute(self, step: StepInput) -> tuple[torch.Tensor, list[DepthRecord]]:
        """Run one step; returns fp32 logits [len(step.sample), vocab] and any requested depth weights."""
        batch = self.prepare(step)
        try:
            if self.group is not None:
                self.group.broadcast(batch)
            hidden = self.model(batch)
            logits = self.model.compute_logits(hidden)
        finally:
            if self.depth is not None:
                self.depth.release()
        return logits, self._collect_depth(batch.depth_weights) if self._depth_rows else []

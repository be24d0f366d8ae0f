"""Turns a SchedulerOutput into one flat packed batch, runs the model, samples, returns a RunnerOutput.

Rows are ordered decode-like sequences (one new token) first, then prompt chunks; the attention
metadata is built once per step here, vectorised over the persistent block tables of the InputBatch,
and shared by every layer. Decode rows always get the block table and lengths; the reference decode
attention's gather view only when the kernel set's decode attention is the reference (needs_decode_gather).

Pure-decode steps may instead be padded to a fixed batch size over static buffers (engine/cuda_graphs.py):
replayed as a CUDA graph when graphs were captured, or run eagerly (use_padded_decode, for tests).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Protocol

import torch

from engine.cuda_graphs import DecodeGraphs, padded_size
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


def kv_slots(num_blocks: int, block_size: int) -> int:
    """KV cache slots for a block pool of `num_blocks`: one scratch block more (block id num_blocks), which the
    pool never hands out; the pad rows of a padded decode step write there."""
    return (num_blocks + 1) * block_size


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
    drafts: list[tuple[int, ...]] = field(default_factory=list)  # per row: drafted tokens to verify (or ())
    ids: list[int] = field(default_factory=list)
    failed: list[tuple[Request, str, BaseException]] = field(default_factory=list)
    depth_rows: list[tuple[Request, int, int]] = field(default_factory=list)  # (request, position, row)
    # prompt_logprobs: rows whose logits score the next prompt token, (request, position, row)
    prompt_rows: list[tuple[Request, int, int]] = field(default_factory=list)
    masks: Future[torch.Tensor] | None = None  # grammar bitmasks of the sampled rows, filled during the forward

    def is_pure_decode(self) -> bool:
        """Every row has one new token, no depth weights are recorded and no prompt row is scored: the step
        can be padded."""
        return (bool(self.reqs) and not self.depth_rows and not self.prompt_rows
                and all(n == 1 for n in self.num_new))


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
        # speculative method depth: the decoder layers a draft pass runs (None: the scheduler's drafts are tokens)
        self.draft_layers: int | None = None
        self.kv_caches = allocate_kv(model, kv_slots(kv.num_blocks, kv.block_size))
        self.scratch_block = kv.num_blocks  # the extra block: pad rows' K/V, never a request's
        self.inputs = InputBatch(max_num_seqs, kv.blocks_needed(max_model_len), max_step_tokens, kv.block_size,
                                 dev)
        self.max_num_seqs, self.max_step_tokens = max_num_seqs, max_step_tokens
        self.sampler = Sampler(seed, dev)
        # padded decode (engine/cuda_graphs.py): the batch sizes pure-decode steps pad to ([] = never pad), and
        # the captured graphs (CUDA only) when they replay those steps
        self.pad_sizes: list[int] = []
        self.graphs: DecodeGraphs | None = None
        self.cudagraph_status = "off (not requested)"
        self.padded_steps = 0  # steps run padded (replayed or eager), and of those, graph replays
        self.graph_replays = 0
        self._all_rows = torch.arange(max(max_num_seqs, 1), device=dev)  # logits_indices of padded steps

    # ---- padded decode and CUDA graphs ----------------------------------------------------------
    @property
    def captured_sizes(self) -> list[int]:
        """Decode batch sizes with a captured CUDA graph ([] when graphs are off)."""
        return self.graphs.sizes if self.graphs is not None else []

    def use_padded_decode(self, sizes: Sequence[int]) -> None:
        """Run pure-decode steps of up to max(sizes) rows padded to the next size in `sizes`, eagerly: the
        batch a CUDA graph would replay, on any device (the CPU tests check its tokens equal the unpadded ones)."""
        sizes = sorted(set(sizes))
        if sizes and (sizes[0] < 1 or sizes[-1] > min(self.max_num_seqs, self.max_step_tokens)):
            raise ValueError(f"padded sizes must lie in [1, min(max_num_seqs, max_step_tokens)], got {sizes}")
        self.pad_sizes = sizes

    def capture_cuda_graphs(self, sizes: Sequence[int]) -> None:
        """Capture the forward + logits of a pure-decode step for each size (CUDA only; the kernel set's
        decode attention must be graph-safe). On failure, logs why and leaves decode steps eager."""
        if self.device.type != "cuda":
            raise RuntimeError("CUDA graphs need device cuda")
        sizes = sorted(set(sizes))
        if not sizes:
            self.cudagraph_status = "off (no batch size to capture)"
            return
        graphs = DecodeGraphs(self.device, sizes[-1], self.model.cfg.vocab_size)
        self._fill_pad_rows(0, sizes[-1])  # every static row a pad row while capturing: only scratch is written
        self.inputs.upload(sizes[-1])
        self.inputs.upload_decode(sizes[-1])

        def body(batch: ForwardBatch, out: torch.Tensor) -> None:
            out.copy_(self.model.compute_logits(self.model(batch)))

        try:
            graphs.capture(sizes, self._static_batch, self._release_depth, body)
        except Exception as e:  # noqa: BLE001 - serving eagerly beats not serving
            logger.exception("CUDA graph capture failed; decode steps run eagerly")
            self.cudagraph_status = f"off (capture failed: {type(e).__name__}: {e})"
            return
        self.graphs, self.pad_sizes = graphs, sizes
        self.cudagraph_status = (f"on ({len(sizes)} decode batch sizes {_ranges(sizes)}, "
                                 f"{graphs.memory_bytes / 2**20:.0f} MiB)")

    def _release_depth(self) -> None:
        if self.depth is not None:
            self.depth.release()

    def _fill_pad_rows(self, lo: int, hi: int) -> None:
        """Host rows [lo, hi) of the padded static batch become pad rows: token 0 at position 0, K/V written to
        the scratch block's first slot, a context of that one slot."""
        inputs = self.inputs
        inputs.input_ids[lo:hi] = 0
        inputs.positions[lo:hi] = 0
        inputs.slot_mapping[lo:hi] = self.scratch_block * self.kv.block_size
        inputs.decode_table[lo:hi] = self.scratch_block
        inputs.context_lens[lo:hi] = 1

    def _static_batch(self, p: int) -> ForwardBatch:
        """The batch over the first p rows of the static device buffers (the addresses a graph of size p reads),
        with its depth rows lent from the pool (release after the step)."""
        ids, pos, slots, table, lens = self.inputs.device_views(p)
        meta = AttentionMetadata(slot_mapping=slots, num_decode=p, block_size=self.kv.block_size,
                                 decode_block_table=table, decode_context_lens=lens)
        return ForwardBatch(input_ids=ids, positions=pos, attn=meta, logits_indices=self._all_rows[:p],
                            kv_caches=self.kv_caches, depth=self.depth.reserve(p) if self.depth is not None else None)

    # ---- the step ------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        """Run one step and sample; requests whose row cannot be built or sampled fail alone."""
        for rid in sched.finished_ids:
            self.inputs.remove(rid)
        for req in sched.preempted:  # recomputed from scratch later: new blocks, new row
            self.inputs.remove(req.request_id)
        for rid, kept in sched.trimmed.items():  # speculative steps gave back tail blocks
            self.inputs.truncate(rid, kept)
        rows = self._rows(sched)
        if not rows.reqs:
            return RunnerOutput([], [], [], [], {}, rows.failed)
        if self.draft_layers is not None and any(rows.drafts):
            self._depth_drafts(rows)
        prompt_lps: dict[str, list[tuple[int, Logprob]]] = {}
        rows.masks = self.sampler.prepare_masks([r for r, smp in zip(rows.reqs, rows.sample, strict=True) if smp])
        pad = padded_size(self.pad_sizes, len(rows.reqs)) if rows.is_pure_decode() else None
        batch = self._batch(rows) if pad is None else self._padded_batch(rows, pad)
        weights: list[torch.Tensor] = []  # per mixing site [R, n_site], when rows are recorded
        try:
            if self.group is not None:
                self.group.broadcast(batch)
            if pad is not None:
                self.padded_steps += 1
            if pad is not None and self.graphs is not None and pad in self.graphs.graphs:
                logits = self.graphs.replay(pad)  # [pad, vocab]: one row per batch row
                self.graph_replays += 1
            else:
                logits = self._logits(self.model(batch, weights), rows, prompt_lps)  # [S, vocab] fp32
            if pad is not None:  # keep the sampled real rows: pad rows (and unsampled chunk rows) drop out
                sampled = [b for b, s in enumerate(rows.sample) if s]
                logits = (logits[:len(sampled)] if sampled == list(range(len(sampled)))
                          else logits[torch.tensor(sampled, dtype=torch.long).to(self.device, non_blocking=True)])
        finally:
            if self.depth is not None and batch.depth is not None:
                self.depth.release()
        out = self._sample(rows, logits, weights)
        out.prompt_logprobs = prompt_lps
        return out

    def _logits(self, hidden: torch.Tensor, rows: _Rows, prompt_lps: dict[str, list[tuple[int, Logprob]]]
                ) -> torch.Tensor:
        """hidden [S + P, d] (sampled rows, then prompt rows) -> logits of the S sampled rows [S, vocab]; the P
        prompt rows are reduced to their logprobs piece by piece (into prompt_lps), so a long prompt chunk never
        holds [P, vocab] at once."""
        s = hidden.shape[0] - len(rows.prompt_rows)
        parts: list[torch.Tensor] = []
        for lo, piece in self.model.logits_pieces(hidden):
            hi = lo + piece.shape[0]
            if lo < s or not parts:
                parts.append(piece[:max(0, s - lo)])
            if hi > s:
                self._prompt_logprobs(piece[max(0, s - lo):], rows.prompt_rows[max(0, lo - s):hi - s], prompt_lps)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    @staticmethod
    def _prompt_logprobs(logits: torch.Tensor, prompt_rows: list[tuple[Request, int, int]],
                         out: dict[str, list[tuple[int, Logprob]]]) -> None:
        """logits [P, vocab] of the rows at `prompt_rows` -> per request, (p + 1, logprob of prompt token p + 1
        with its rank and top-k) for each row at position p: vLLM's prompt_logprobs, from the raw distribution."""
        logp = torch.log_softmax(logits, dim=-1)  # [P, V]
        targets = torch.tensor([req.token_ids[pos + 1] for req, pos, _ in prompt_rows], dtype=torch.long,
                               device=logp.device)  # [P]
        chosen = logp.gather(1, targets.unsqueeze(1))  # [P, 1]
        ranks = ((logp > chosen).sum(-1) + 1).tolist()  # [P]: 1 + tokens strictly more likely
        k = max(req.params.prompt_logprobs or 0 for req, _, _ in prompt_rows)
        top_v, top_i = logp.topk(k, dim=-1) if k else (logp[:, :0], logp[:, :0].long())  # [P, k]
        top_v, top_i, chosen_l = top_v.tolist(), top_i.tolist(), chosen.squeeze(1).tolist()
        for j, (req, pos, _) in enumerate(prompt_rows):
            kk = req.params.prompt_logprobs or 0
            lp = Logprob(req.token_ids[pos + 1], chosen_l[j], list(zip(top_i[j][:kk], top_v[j][:kk], strict=True)),
                         ranks[j])
            out.setdefault(req.request_id, []).append((pos + 1, lp))

    def _rows(self, sched: SchedulerOutput) -> _Rows:
        rows = _Rows()
        for s in sched.scheduled:
            req, n = s.request, s.num_new_tokens
            start, row0 = req.num_computed_tokens, len(rows.ids)
            try:
                ids = req.token_ids[start:start + n] if not s.spec_token_ids else \
                    [*req.token_ids[start:], *s.spec_token_ids]  # its last token, then the drafts
                if len(ids) != n or n < 1:
                    raise RuntimeError(f"{req!r} has {len(ids)} tokens to run, scheduled {n}")
                self.inputs.sync_blocks(req.request_id, self.kv.block_ids(req.request_id))
                planned = self._plan_depth_records(req, start, n, row0, s.sample)
                scored = self._plan_prompt_rows(req, start, n, row0)
            except Exception as e:  # noqa: BLE001 - reported for this request alone
                rows.failed.append((req, "the request could not be prepared", e))
                continue
            rows.reqs.append(req)
            rows.num_new.append(n)
            rows.sample.append(s.sample)
            rows.drafts.append(s.spec_token_ids)
            rows.ids += ids
            rows.depth_rows += planned
            rows.prompt_rows += scored
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
        one = self._decode_like(counts, rows.drafts)  # [B] requests whose rows are decode rows (packed first)
        meta = AttentionMetadata(slot_mapping=slots_d, block_size=bs)
        nd = int(counts[one].sum())
        if nd:  # each decode row attends to its own context: its position + 1 (a verified draft row included)
            self._decode_meta(meta, table_rows[row_req[:nd]], positions[:nd] + 1)
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
        logits_rows = (first_row + counts - 1)[sampled]  # [S], then the scored prompt rows [P]
        if any(rows.drafts):  # a drafting request: every row of it is sampled (its verification)
            logits_rows = torch.tensor([r for b in sampled for r in (
                range(int(first_row[b]), int(first_row[b] + counts[b])) if rows.drafts[b] else
                (int(first_row[b] + counts[b] - 1),))], dtype=torch.long)  # [S + drafted tokens]
        if rows.prompt_rows:
            logits_rows = torch.cat([logits_rows, torch.tensor([r for _, _, r in rows.prompt_rows], dtype=torch.long)])
        return ForwardBatch(
            input_ids=input_ids, positions=positions_d, attn=meta,
            logits_indices=logits_rows.to(dev, non_blocking=True), kv_caches=self.kv_caches,
            depth=self.depth.reserve(t) if self.depth is not None else None,
            depth_rows=torch.tensor([r for _, _, r in rows.depth_rows], dtype=torch.long).to(dev, non_blocking=True)
            if rows.depth_rows else None)

    @staticmethod
    def _decode_like(counts: torch.Tensor, drafts: list[tuple[int, ...]]) -> torch.Tensor:
        """[B] bool: requests whose rows go to the decode attention, one query row each: one-token rows, and
        a drafting request's 1 + k verification rows (row j's context ends at its own position, so the causal
        mask is the context length; cheaper than a prompt chunk's gather + masked SDPA). Decode rows must be
        the first packed rows (the scheduler's order); if they are not, drafting requests run as chunks."""
        one = counts == 1
        if not any(drafts):
            return one
        dec = one | torch.tensor([bool(d) for d in drafts])
        return dec if bool(dec[:int(dec.sum())].all()) else one

    def _decode_meta(self, meta: AttentionMetadata, table_rows: torch.Tensor, lens: torch.Tensor) -> None:
        """The decode rows' context in `meta`: block-table rows [B_d] and context lengths [B_d] (this step's token
        included) -> block table and lengths, and the reference decode attention's gather view."""
        dev, bs = self.device, self.kv.block_size
        meta.num_decode = len(lens)
        meta.decode_block_table = self.inputs.block_table[table_rows, :-(-int(lens.max()) // bs)].to(
            dev, non_blocking=True)  # [B_d, nb]
        meta.decode_context_lens = lens.to(torch.int32).to(dev, non_blocking=True)
        if self.model.k.needs_decode_gather:  # else the op reads the table (a fallback builds the view)
            self._decode_gather(meta, self._slots(table_rows, int(lens.max())), lens)

    # ---- depth drafts (speculative method depth) -------------------------------------------------
    def _depth_drafts(self, rows: _Rows) -> None:
        """Replace the scheduler's placeholder drafts by the model's early-exit guesses, in rows.drafts and
        rows.ids. Pass j runs every drafting request with more than j drafts as one decode row: its token at
        position start + j through the first draft_layers layers (writing those layers' K/V into the slots
        verification rewrites: the same tokens at the same positions), then the output head over the block
        states that exist there; the argmax is draft j. Greedy drafts: a point-mass proposal, so the verify
        rule keeps sampling exact."""
        firsts = [0]  # first packed row of each request
        for n in rows.num_new[:-1]:
            firsts.append(firsts[-1] + n)
        todo = [b for b, d in enumerate(rows.drafts) if d]
        guessed: dict[int, list[int]] = {b: [] for b in todo}
        for j in range(max(len(rows.drafts[b]) for b in todo)):
            todo = [b for b in todo if len(rows.drafts[b]) > j]
            batch = self._draft_batch([rows.reqs[b] for b in todo], j, [rows.ids[firsts[b] + j] for b in todo])
            try:
                if self.group is not None:
                    self.group.broadcast(batch)
                hidden = self.model(batch)  # [B, d]
                toks = torch.cat([piece.argmax(-1) for _, piece in self.model.logits_pieces(hidden)]).tolist()
            finally:
                self._release_depth()
            for b, t in zip(todo, toks, strict=True):
                rows.ids[firsts[b] + 1 + j] = t
                guessed[b].append(t)
        for b, d in guessed.items():
            rows.drafts[b] = tuple(d)

    def _draft_batch(self, reqs: list[Request], j: int, tokens: list[int]) -> ForwardBatch:
        """Draft pass j: one decode row per request, token tokens[i] at position num_computed_tokens + j (its
        slot allocated by the scheduler for the verification), early exit after draft_layers layers."""
        inputs, bs, b = self.inputs, self.kv.block_size, len(reqs)
        inputs.wait_for_upload()  # the host buffers are free to rewrite
        table_rows = torch.tensor([inputs.row_of[r.request_id] for r in reqs], dtype=torch.long)  # [B]
        pos = torch.tensor([r.num_computed_tokens + j for r in reqs], dtype=torch.long)  # [B]
        inputs.positions[:b] = pos
        torch.add(inputs.block_table[table_rows, pos // bs] * bs, pos % bs, out=inputs.slot_mapping[:b])
        inputs.input_ids[:b] = torch.tensor(tokens, dtype=torch.long)
        input_ids, positions, slots = inputs.upload(b)
        meta = AttentionMetadata(slot_mapping=slots, block_size=bs)
        self._decode_meta(meta, table_rows, pos + 1)
        assert self.depth is not None  # depth drafts need a Block AttnRes model (SpeculativeConfig.check_model)
        return ForwardBatch(input_ids=input_ids, positions=positions, attn=meta, logits_indices=self._all_rows[:b],
                            kv_caches=self.kv_caches, depth=self.depth.reserve(b), num_layers=self.draft_layers)

    def _padded_batch(self, rows: _Rows, p: int) -> ForwardBatch:
        """A pure-decode step of B <= p rows in the static buffers, rows [B, p) pad rows (see _fill_pad_rows).

        Real rows are exactly what _batch builds for them; a native, Triton or other graph-safe decode attention
        reads the block table and lengths in place, the reference one also gets its gather and mask (built here,
        data-dependent: only the eager padded path uses them)."""
        inputs, bs = self.inputs, self.kv.block_size
        b = len(rows.reqs)
        inputs.wait_for_upload()  # the host buffers are free to rewrite
        table_rows = torch.tensor([inputs.row_of[r.request_id] for r in rows.reqs], dtype=torch.long)  # [B]
        positions = torch.tensor([r.num_computed_tokens for r in rows.reqs], dtype=torch.long)  # [B]
        inputs.positions[:b] = positions
        torch.index_select(inputs.block_table, 0, table_rows, out=inputs.decode_table[:b])
        torch.add(inputs.decode_table[:b].gather(1, (positions // bs).unsqueeze(1)).squeeze(1) * bs, positions % bs,
                  out=inputs.slot_mapping[:b])
        inputs.input_ids[:b] = torch.tensor(rows.ids, dtype=torch.long)
        inputs.context_lens[:b] = positions + 1
        self._fill_pad_rows(b, p)
        inputs.upload(p)
        inputs.upload_decode(p)
        batch = self._static_batch(p)
        if self.model.k.needs_decode_gather:  # the reference decode attention: gather + mask, over the pad too
            lens = inputs.context_lens[:p].to(torch.long)
            self._decode_gather(batch.attn, self._slots_of(inputs.decode_table[:p], int(lens.max())), lens)
        return batch

    def _decode_gather(self, meta: AttentionMetadata, gather: torch.Tensor, lens: torch.Tensor) -> None:
        """The reference decode attention's view in `meta`: host KV slots [B_d, C] of each decode row and its
        context lengths [B_d] -> decode_gather and decode_mask [B_d, 1, 1, C] on the device."""
        dev = self.device
        meta.decode_gather = gather.to(dev, non_blocking=True)
        meta.decode_mask = (torch.arange(gather.shape[1], device=dev).unsqueeze(0)
                            < lens.to(dev, non_blocking=True).unsqueeze(1))[:, None, None, :]

    def _slots(self, table_rows: torch.Tensor, length: int) -> torch.Tensor:
        """KV slots of positions [0, length) of each given block-table row: [B, length]."""
        return self._slots_of(self.inputs.block_table[table_rows], length)

    def _slots_of(self, blocks: torch.Tensor, length: int) -> torch.Tensor:
        """KV slots of positions [0, length) of each row of a [B, >= ceil(length / bs)] block table: [B, length]."""
        bs = self.kv.block_size
        blocks = blocks[:, :-(-length // bs)]  # [B, nb]
        return (blocks.unsqueeze(-1) * bs + torch.arange(bs)).reshape(len(blocks), -1)[:, :length]

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

    @staticmethod
    def _plan_prompt_rows(req: Request, start: int, n: int, row0: int) -> list[tuple[Request, int, int]]:
        """prompt_logprobs: the rows of this chunk whose next token is still a prompt token."""
        if req.params.prompt_logprobs is None or req.num_output_tokens:  # none, or handed out before a preemption
            return []
        last = req.num_prompt_tokens - 1  # the row at this position predicts the first generated token
        return [(req, start + k, row0 + k) for k in range(min(n, last - start))]

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
        results = self._sample_rows(logits, sampled, rows.masks) if not any(rows.drafts) else \
            self._verify_rows(logits, rows)
        for req, result in zip(sampled, results, strict=True):
            if isinstance(result, BaseException):
                out.failed.append((req, "sampling failed", result))
                continue
            if isinstance(result, list):  # verified drafts: the emitted tokens in order
                (tok, lp), more = result[0], result[1:]
                if more:
                    out.more_token_ids[req.request_id] = [t for t, _ in more]
                    out.more_logprobs[req.request_id] = [x for _, x in more]
                result = (tok, lp)
            out.sampled.append(req)
            out.token_ids.append(result[0])
            out.logprobs.append(result[1])
            out.depth.append(depth_of.get(id(req)))
        return out

    def _verify_rows(self, logits: torch.Tensor, rows: _Rows
                     ) -> list[tuple[int, Logprob | None] | list[tuple[int, Logprob | None]] | BaseException]:
        """Per sampled request: a drafting request's 1 + d logits rows verify its drafts (a list of the emitted
        tokens); the others are sampled together as usual (their grammar masks: the matching rows)."""
        drafts = [d for d, smp in zip(rows.drafts, rows.sample, strict=True) if smp]
        sampled = [r for r, smp in zip(rows.reqs, rows.sample, strict=True) if smp]
        first, at = [], 0  # first logits row of each sampled request
        for d in drafts:
            first.append(at)
            at += 1 + len(d)
        plain = [j for j, d in enumerate(drafts) if not d]
        results: list = [None] * len(sampled)
        if plain:
            masks = rows.masks
            if masks is not None:
                sub: Future[torch.Tensor] = Future()
                sub.set_result(masks.result()[torch.tensor(plain, dtype=torch.long)])
                masks = sub
            idx = torch.tensor([first[j] for j in plain], dtype=torch.long, device=logits.device)
            for j, res in zip(plain, self._sample_rows(logits[idx], [sampled[j] for j in plain], masks),
                              strict=True):
                results[j] = res
        for j, d in enumerate(drafts):
            if d:
                try:
                    results[j] = self.sampler.verify(logits[first[j]:first[j] + 1 + len(d)], sampled[j], list(d))
                except Exception as e:  # noqa: BLE001 - reported for this request alone
                    results[j] = e
        return results

    def _sample_rows(self, logits: torch.Tensor, reqs: list[Request], masks: Future[torch.Tensor] | None = None
                     ) -> list[tuple[int, Logprob | None] | BaseException]:
        """Sample the batch; if that fails, each row alone, so one request's row fails only itself."""
        try:
            out = self.sampler(logits, reqs) if masks is None else self.sampler(logits, reqs, masks.result())
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


def _ranges(sizes: Sequence[int]) -> str:
    """[1, 2, 4, 8, 16, 24] -> '1, 2, 4, 8..24'."""
    head = [s for s in sizes if s < 8]
    tail = [s for s in sizes if s >= 8]
    parts = [str(s) for s in head] + ([f"{tail[0]}..{tail[-1]}" if len(tail) > 1 else str(tail[0])] if tail else [])
    return ", ".join(parts)

"""The serving decoder: one Llama family, standard PreNorm residual or Block/Full AttnRes by config.

Works on a flat packed batch (models.context.ForwardBatch) over a paged KV cache. AttnRes models
read and write the per-step depth pool: Block AttnRes with the two-phase schedule of docs/attnres.md,
Full AttnRes with incremental keys. Only the rows whose logits are wanted go through the output head.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from kernels import ops
from models.attn_res import BlockSchedule, key_of, mix_sources
from models.config import ModelConfig
from models.context import Communicator, DepthBuffers, ForwardBatch
from models.layers import Attention, PackedWeight, RMSNorm, RotaryEmbedding, SwiGLU, VocabParallelEmbedding
from models.parallel_plan import ShardSizes, TensorSource, as_source, default_weight_loader, shard_sizes
from models.quantization import QuantPlan, apply_plan, quant_plan


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, shards: ShardSizes, rope: RotaryEmbedding, dtype: torch.dtype,
                 comm: Communicator | None) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.input_layernorm = RMSNorm(d, cfg.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(d, cfg.rms_norm_eps, dtype)
        self.self_attn = Attention(d, shards, rope, dtype, comm)
        self.mlp = SwiGLU(d, shards, dtype, comm)


# A pure-decode step of up to this many rows runs each decoder layer as one native call (kernels.ops
# KernelSet.decode_layer, where it is fused); DEPTHSERVE_FUSED_DECODE=0 keeps the per-op path (A/B runs).
FUSED_DECODE_MAX_ROWS = 8
ENV_FUSED_DECODE = "DEPTHSERVE_FUSED_DECODE"

# Rows of logits computed at once when a step wants many (prompt logprobs): [512, vocab] fp32 is 100 MB at a
# 49k vocabulary, where a 2048-token chunk at once would be 400 MB (and as much again for its log-softmax).
LOGITS_PIECE_ROWS = 512

_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")
_RES_SITES = {"self_attention_res": 0, "mlp_res": 1}
# Checkpoint projections merged into one parameter: suffix -> (merged suffix, the weight_loader's shard_id).
_MERGED = {
    "self_attn.q_proj.weight": ("self_attn.qkv_proj.weight", "q"),
    "self_attn.k_proj.weight": ("self_attn.qkv_proj.weight", "k"),
    "self_attn.v_proj.weight": ("self_attn.qkv_proj.weight", "v"),
    "mlp.gate_proj.weight": ("mlp.gate_up_proj.weight", 0),
    "mlp.up_proj.weight": ("mlp.gate_up_proj.weight", 1),
}

# Each tensor dim as the config fields whose product it is, so a mismatch names the field to blame.
Dims = tuple[tuple[str, ...], ...]
_H: tuple[str, ...] = ("hidden_size",)
_LAYER_DIMS: dict[str, Dims] = {
    "input_layernorm.weight": (_H,),
    "post_attention_layernorm.weight": (_H,),
    "self_attn.q_proj.weight": (("num_attention_heads", "head_dim"), _H),
    "self_attn.k_proj.weight": (("num_key_value_heads", "head_dim"), _H),
    "self_attn.v_proj.weight": (("num_key_value_heads", "head_dim"), _H),
    "self_attn.o_proj.weight": (_H, ("num_attention_heads", "head_dim")),
    "mlp.gate_proj.weight": (("intermediate_size",), _H),
    "mlp.up_proj.weight": (("intermediate_size",), _H),
    "mlp.down_proj.weight": (_H, ("intermediate_size",)),
}
_ATTNRES_LAYER_DIMS: dict[str, Dims] = {
    "self_attention_res_norm.weight": (_H,), "self_attention_res_proj.weight": ((), _H),
    "mlp_res_norm.weight": (_H,), "mlp_res_proj.weight": ((), _H),
}


def tensor_dims(cfg: ModelConfig) -> dict[str, Dims]:
    """Every checkpoint tensor `cfg` describes (Hugging Face + K3 AttnRes names) -> its dims as config fields."""
    vocab: Dims = (("vocab_size",), _H)
    out: dict[str, Dims] = {"model.embed_tokens.weight": vocab, "model.norm.weight": (_H,)}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = vocab
    per_layer = dict(_LAYER_DIMS)
    if cfg.is_attn_res:
        per_layer.update(_ATTNRES_LAYER_DIMS)
        out["model.output_attn_res_norm.weight"] = (_H,)
        out["model.output_attn_res_proj.weight"] = ((), _H)
    for i in range(cfg.num_hidden_layers):
        out.update({f"model.layers.{i}.{suffix}": dims for suffix, dims in per_layer.items()})
    return out


def dims_shape(cfg: ModelConfig, dims: Dims) -> tuple[int, ...]:
    return tuple(math.prod(int(getattr(cfg, f)) for f in fields) for fields in dims)


def is_ignored_tensor(cfg: ModelConfig, name: str) -> bool:
    """Tensors some checkpoints carry that the serving model rebuilds or shares."""
    return name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and cfg.tie_word_embeddings)


def check_tensor_shapes(cfg: ModelConfig, shapes: Mapping[str, tuple[int, ...]], where: str,
                        field_label: Callable[[str], str] = str,
                        tensor_label: Callable[[str], str] = repr) -> None:
    """Raise one-line ValueError unless `shapes` (checkpoint name -> shape, read from file headers) are
    exactly the tensors `cfg` describes. Runs before any parameter is allocated, so a config that lies
    about a size fails here instead of asking for gigabytes; `field_label`/`tensor_label` name config
    fields and tensors as the file does (GGUF keys and tensor names)."""
    layers = {int(m.group(1)) for n in shapes if (m := _LAYER_RE.fullmatch(n))}
    if layers and max(layers) + 1 != cfg.num_hidden_layers:
        raise ValueError(f"{where}: {field_label('num_hidden_layers')}={cfg.num_hidden_layers} does not match "
                         f"the checkpoint, whose tensors name layers up to {max(layers)}")
    dims = tensor_dims(cfg)
    for name in shapes:
        if name not in dims and not is_ignored_tensor(cfg, name):
            raise ValueError(f"{where}: checkpoint has unexpected tensor {tensor_label(name)} for {cfg.architecture}")
    missing = [n for n in dims if n not in shapes]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"{where}: checkpoint is missing tensor {tensor_label(missing[0])}{more}")
    for name, d in dims.items():
        got, want = tuple(shapes[name]), dims_shape(cfg, d)
        if got == want:
            continue
        fields = [f for i, fs in enumerate(d) if i >= len(got) or got[i] != want[i] for f in fs]
        blame = ", ".join(f"{field_label(f)}={getattr(cfg, f)}" for f in dict.fromkeys(fields))
        raise ValueError(f"{where}: tensor {tensor_label(name)} has shape {list(got)}, expected {list(want)}"
                         + (f" from {blame}" if blame else ""))


@torch.no_grad()
def _stacked_loader(param: torch.Tensor, loaded: TensorSource | torch.Tensor, shard_id: tuple[int, int]) -> None:
    """An AttnRes gain or query vector (replicated) into its (layer, site) row of the stacked parameter."""
    param[shard_id].copy_(as_source(loaded).read().reshape(-1))


class LlamaForServing(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype = torch.float32,
                 comm: Communicator | None = None, max_positions: int | None = None) -> None:
        """`max_positions`: rows of the rotary table, the longest sequence served (default: the model's
        max_position_embeddings, which a checkpoint may set far beyond what the engine serves)."""
        super().__init__()
        self.cfg = cfg
        self.dtype = dtype
        self.comm = comm
        d, n_layers = cfg.hidden_size, cfg.num_hidden_layers
        self.shards = shards = shard_sizes(cfg, comm.world_size if comm else 1)
        self.rope = RotaryEmbedding(cfg.head_dim, max_positions or cfg.max_position_embeddings, cfg.rope_theta)
        self.embed_tokens = VocabParallelEmbedding(shards, d, dtype, comm)
        self.layers = nn.ModuleList(DecoderLayer(cfg, shards, self.rope, dtype, comm) for _ in range(n_layers))
        self._layer_tuple: tuple[DecoderLayer, ...] = tuple(self.layers)  # the same modules (early-exit slices)
        self.norm = RMSNorm(d, cfg.rms_norm_eps, dtype)
        self.lm_head = (self.embed_tokens if cfg.tie_word_embeddings
                        else VocabParallelEmbedding(shards, d, dtype, comm))
        if cfg.is_attn_res:
            # Raw gains and queries as loaded; fold_queries() turns them into (w ⊙ g), kept in fp32.
            f32 = torch.float32
            self.res_norm = nn.Parameter(torch.ones(n_layers, 2, d, dtype=f32), requires_grad=False)
            self.res_proj = nn.Parameter(torch.zeros(n_layers, 2, d, dtype=f32), requires_grad=False)
            self.out_norm = nn.Parameter(torch.ones(d, dtype=f32), requires_grad=False)
            self.out_proj = nn.Parameter(torch.zeros(d, dtype=f32), requires_grad=False)
            for stacked in (self.res_norm, self.res_proj):  # one [d] checkpoint vector per (layer, site)
                stacked.weight_loader = _stacked_loader  # type: ignore[attr-defined]
            self.queries = torch.zeros(n_layers, 2, d)  # [L, 2(attn, mlp), d] folded
            self.site_queries: list[tuple[torch.Tensor, ...]] = []  # per layer (attn, mlp) views of `queries`
            self.out_query = torch.zeros(d)
            self.block_queries: list[torch.Tensor] = []  # per block: [2 * block_size, d]
        self.schedule = (BlockSchedule(n_layers, cfg.attn_res_block_size)
                         if cfg.attn_res_mode == "block" else None)
        self.k: ops.KernelSet = ops.REFERENCE_OPS  # the non-linear ops; prepare_for_inference picks the backend's
        # per layer (w_qkv, w_o, w_gate_up, w_down) for the fused decode layer; None: the per-op path always
        self.fused_layers: list[list[torch.Tensor]] | None = None
        self.fused_norms: list[torch.Tensor] = []  # (input, post-attention) norm weights per layer, for decode_layers
        self.quant_plan = QuantPlan()  # the weights served quantized (quantize())

    # ---- forward ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, depth_weights: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Returns final-normed hidden states [S, d] of the rows in batch.logits_indices.

        With `depth_weights` (a list to fill) and `batch.depth_rows` set, each mixing site appends its
        softmax weights over its sources for those rows, [R, n_site], in forward order (output head last).
        """
        h = self.embed_tokens.embed(batch.input_ids)  # [T, d]
        cos_sin = self.rope(batch.positions)
        mode = self.cfg.attn_res_mode
        if mode == "none":
            return self._forward_standard(h, batch, cos_sin)
        if batch.depth is None:
            raise RuntimeError("AttnRes model run without depth buffers")
        if mode == "block":
            return self._forward_block(h, batch, batch.depth, cos_sin, depth_weights)
        return self._forward_full(h, batch, batch.depth, cos_sin, depth_weights)

    def _layers(self, batch: ForwardBatch) -> Sequence[DecoderLayer]:
        """The decoder layers this forward runs: all, or the first batch.num_layers (an early-exit draft pass,
        whose output head then mixes the states that exist after them). A tuple slice: slicing the ModuleList
        builds a new module (~20 us a draft pass)."""
        if batch.num_layers is None:
            return self.layers  # type: ignore[return-value]
        return self._layer_tuple[:batch.num_layers]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[S, d] -> fp32 logits [S, vocab]."""
        return self.lm_head.logits(hidden)

    def logits_pieces(self, hidden: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
        """[S, d] -> (first row, fp32 logits [<= LOGITS_PIECE_ROWS, vocab]) in row order: one piece unless a step
        scores many prompt rows, whose full [S, vocab] could be GBs. Every tensor-parallel rank walks the same
        pieces (each is one all-gather)."""
        n = hidden.shape[0]
        if n <= LOGITS_PIECE_ROWS:
            yield 0, self.compute_logits(hidden)
            return
        for lo in range(0, n, LOGITS_PIECE_ROWS):
            yield lo, self.compute_logits(hidden[lo:lo + LOGITS_PIECE_ROWS])

    def _fused_decode(self, batch: ForwardBatch) -> bool:
        """Whether this step runs each layer as one fused call: a pure-decode step (every row one sequence's next
        token) of at most FUSED_DECODE_MAX_ROWS rows, on a model whose kernels fuse it (prepare_for_inference)."""
        attn, t = batch.attn, batch.input_ids.shape[0]
        return (self.fused_layers is not None and 0 < t <= FUSED_DECODE_MAX_ROWS and attn.num_decode == t
                and attn.decode_block_table is not None and attn.decode_context_lens is not None)

    def _decode_layer(self, i: int, x: torch.Tensor, batch: ForwardBatch, cos_sin: tuple,
                      norm_weight: torch.Tensor, **glue: torch.Tensor | bool | None) -> torch.Tensor | None:
        """Layer i's MLP output [T, d] from its normalised input x, in one native call (k.decode_layer, with the
        standard or AttnRes `glue` between the sublayers); None when the op did not take the tensors (it then
        wrote nothing: the caller runs the per-op path)."""
        assert self.fused_layers is not None
        attn, (k_cache, v_cache) = batch.attn, batch.kv_caches[i]
        return self.k.decode_layer(x, self.fused_layers[i], cos_sin[0], cos_sin[1], k_cache, v_cache,
                                   attn.slot_mapping, attn.decode_block_table, attn.decode_context_lens,
                                   attn.block_size, self.layers[i].self_attn.scale, norm_weight,
                                   self.cfg.rms_norm_eps, **glue)

    def _decode_layers(self, h: torch.Tensor, batch: ForwardBatch, cos_sin: tuple,
                       **depth: torch.Tensor | list[torch.Tensor] | int) -> torch.Tensor | None:
        """The last layer's MLP output [T, d] after every layer ran in one native call (k.decode_layers, with the
        AttnRes `depth` pool when given); None when the op did not take the tensors (it then wrote nothing)."""
        assert self.fused_layers is not None
        attn, kv = batch.attn, batch.kv_caches
        return self.k.decode_layers(h, [w for ws in self.fused_layers for w in ws], self.fused_norms,
                                    [c[0] for c in kv], [c[1] for c in kv], cos_sin[0], cos_sin[1], attn.slot_mapping,
                                    attn.decode_block_table, attn.decode_context_lens, attn.block_size,
                                    self.layers[0].self_attn.scale, self.cfg.rms_norm_eps, **depth)

    def _forward_standard(self, h: torch.Tensor, batch: ForwardBatch, cos_sin: tuple) -> torch.Tensor:
        """PreNorm residual: each sublayer's output is added to h and normalised in one op (add_rms_norm). A small
        pure-decode step runs every layer in one fused call (or, should that refuse, or in an early-exit draft
        pass, each layer's attention, add_rms_norm and MLP in one)."""
        k, eps, layers = self.k, self.cfg.rms_norm_eps, self._layers(batch)
        fused = self._fused_decode(batch)
        if fused and batch.num_layers is None and (m := self._decode_layers(h, batch, cos_sin)) is not None:
            h.add_(m)
            return k.rms_norm(h[batch.logits_indices], self.norm.weight, eps)
        x = k.rms_norm(h, layers[0].input_layernorm.weight, eps)
        for i, layer in enumerate(layers):
            m = (self._decode_layer(i, x, batch, cos_sin, layer.post_attention_layernorm.weight, residual=h)
                 if fused else None)
            if m is None:
                a = layer.self_attn(x, batch, i, cos_sin)
                x = k.add_rms_norm(a, h, layer.post_attention_layernorm.weight, eps)  # h += a
                m = layer.mlp(x)
            if i + 1 < len(layers):
                x = k.add_rms_norm(m, h, layers[i + 1].input_layernorm.weight, eps)
            else:
                h.add_(m)
        return k.rms_norm(h[batch.logits_indices], self.norm.weight, eps)

    def _forward_block(self, emb: torch.Tensor, batch: ForwardBatch, depth: DepthBuffers, cos_sin: tuple,
                       out: list[torch.Tensor] | None) -> torch.Tensor:
        """Two-phase Block AttnRes. Each sublayer output is added to the partial sum by the next mixing site
        (`pending`), so one op per site does the add, the Phase-2 merge and the sublayer's input norm.
        The output head is one more site (attnres_mix on the logits rows, the final norm as its sublayer norm).
        Returns the final-normed hidden states of the logits rows, [S, d]."""
        sched = self.schedule
        assert sched is not None and depth.lse is not None and depth.xo is not None
        k, eps = self.k, self.cfg.rms_norm_eps
        states, keys = depth.states, depth.keys  # [T, N+1, d] fp32 each
        lse, xo = depth.lse, depth.xo  # [T, Q], [T, Q, d]
        n = 0  # completed blocks; the partial sum lives in states[:, n]
        record = batch.depth_rows if out is not None else None
        states[:, 0] = emb
        # Views made once per step, not per site (a view costs a dispatcher call: ~300 a step otherwise):
        # each source slot, and each Phase-1 query row (rows repeat in every block; Phase 1 rewrites them).
        slots = states.unbind(1)  # N+1 x [T, d]
        lse_rows, xo_rows = lse.unbind(1), xo.unbind(1)  # Q x [T], Q x [T, d]
        site_q = self.site_queries  # L x (attention, MLP) [d] queries, folded at load
        pending: torch.Tensor | None = None  # the last sublayer's output, not yet in the partial
        fused = self._fused_decode(batch)  # every layer in one call, else each layer's sublayers and site in one
        if fused and record is None and batch.num_layers is None:  # (an early-exit draft pass runs layer by layer)
            m = self._decode_layers(emb, batch, cos_sin, states=states, keys=keys, lse=lse, xo=xo,
                                    block_queries=self.block_queries, site_queries=self.queries,
                                    attn_res_block_size=sched.block_size)
            if m is not None:
                return k.attnres_mix(states, keys, sched.num_blocks + 1, m, self.out_query, self.norm.weight, eps, True,
                                     batch.logits_indices)  # [S, d]
        for i, layer in enumerate(self._layers(batch)):
            qa, qm = sched.query_rows(i)
            opens = sched.opens_block(i)
            if opens:  # close the partial as block n, then Phase 1 for every query of the new block
                if pending is not None:
                    slots[n].add_(pending)
                n += 1
                k.attnres_phase1(states, keys, n, self.block_queries[sched.block_of(i)], lse, xo, eps)
                x = k.rms_norm(xo_rows[qa], layer.input_layernorm.weight, eps)
                if record is not None:
                    self._record(out, states[record, :n], keys[record, :n], site_q[i][0])
            else:
                x = k.attnres_site(slots[n], pending, lse_rows[qa], xo_rows[qa], site_q[i][0],
                                   layer.input_layernorm.weight, eps)
                if record is not None:
                    self._record_with_partial(out, states, keys, n, record, site_q[i][0])
            # a block's first attention output starts the new partial; later ones add to it
            m = (self._decode_layer(i, x, batch, cos_sin, layer.post_attention_layernorm.weight, partial=slots[n],
                                    lse1=lse_rows[qm], xo1=xo_rows[qm], query=site_q[i][1], accumulate=not opens)
                 if fused else None)
            if m is None:
                a = layer.self_attn(x, batch, i, cos_sin)
                x = k.attnres_site(slots[n], a, lse_rows[qm], xo_rows[qm], site_q[i][1],
                                   layer.post_attention_layernorm.weight, eps, accumulate=not opens)
                m = layer.mlp(x)
            if record is not None:  # after the MLP on the fused path: it leaves the depth pool as it was
                self._record_with_partial(out, states, keys, n, record, site_q[i][1])
            pending = m
        if record is not None:  # the recorded rows need the final partial too, not only the logits rows
            slots[n].add_(pending)
            pending = None
            self._record_with_partial(out, states, keys, n, record, self.out_query)
        # the output head: final partial += pending, its key, the mix of the n + 1 sources and the final norm
        return k.attnres_mix(states, keys, n + 1, pending, self.out_query, self.norm.weight, eps, True,
                             batch.logits_indices)  # [S, d]

    # ---- depth-attention introspection (only when asked: batch.depth_rows and a list to fill) -------------------------
    @staticmethod
    def _record(out: list[torch.Tensor], states: torch.Tensor, keys: torch.Tensor, query: torch.Tensor) -> None:
        """Weights of the recorded rows over completed sources: the same scores and softmax as the mix."""
        out.append(mix_sources(states, keys, query)[1])

    def _record_with_partial(self, out: list[torch.Tensor], states: torch.Tensor, keys: torch.Tensor, n: int,
                             rows: torch.Tensor, query: torch.Tensor) -> None:
        """Completed blocks plus the current partial sum (whose key is taken now, as Phase 2 does)."""
        srcs = states[rows, :n + 1]  # [R, n+1, d]
        k = torch.cat([keys[rows, :n], key_of(srcs[:, n:], self.cfg.rms_norm_eps)], dim=1)
        self._record(out, srcs, k, query)

    def _forward_full(self, emb: torch.Tensor, batch: ForwardBatch, depth: DepthBuffers, cos_sin: tuple,
                      out: list[torch.Tensor] | None) -> torch.Tensor:
        """Full AttnRes: source l (slot l of the pool) is the embedding or sublayer l's raw output. Each site is
        one op: the newest source (`prev`) into its slot with its key, the mix of the slots so far, the
        sublayer's input norm. The output head is the same op on the logits rows. Returns [S, d] final-normed."""
        k, eps = self.k, self.cfg.rms_norm_eps
        states, keys = depth.states, depth.keys  # [T, 2L+1, d] fp32 each
        record = batch.depth_rows if out is not None else None
        prev = emb  # [T, d]: the newest source, written into its slot by the next site
        for i, layer in enumerate(self._layers(batch)):
            s = 2 * i + 1  # sources before this layer's attention
            qa, qm = self.site_queries[i]
            x = k.attnres_mix(states, keys, s, prev, qa, layer.input_layernorm.weight, eps)
            if record is not None:
                self._record(out, states[record, :s], keys[record, :s], qa)
            a = layer.self_attn(x, batch, i, cos_sin)
            x = k.attnres_mix(states, keys, s + 1, a, qm, layer.post_attention_layernorm.weight, eps)
            if record is not None:
                self._record(out, states[record, :s + 1], keys[record, :s + 1], qm)
            prev = layer.mlp(x)
        last = 2 * len(self._layers(batch))  # the slot of the last MLP output
        if record is not None:  # the head below fills slot `last` of the logits rows only
            states[:, last] = prev
            self._record_with_partial(out, states, keys, last, record, self.out_query)
        return k.attnres_mix(states, keys, last + 1, prev, self.out_query, self.norm.weight, eps, False,
                             batch.logits_indices)  # [S, d]

    def to_device(self, device: torch.device | str) -> LlamaForServing:
        """Move parameters and buffers (rotary tables) to `device`, and re-fold the AttnRes queries there
        (they are plain tensors derived from the parameters, not buffers)."""
        self.to(device)
        if self.cfg.is_attn_res:
            self.fold_queries()
        return self

    # ---- weights ---------------------------------------------------------------------------------
    def quantize(self, requested: str, stored: Mapping[str, int | None]) -> QuantPlan:
        """Before load_weights: serve the weights `requested` (--quantization) picks in a quantized block format
        (models/quantization.py); `stored` maps checkpoint names to their ggml types (GGUF). Returns the plan."""
        self.quant_plan = quant_plan(self, requested, stored)
        apply_plan(self, self.quant_plan)
        return self.quant_plan

    def load_weights(self, tensors: Iterable[tuple[str, TensorSource]]) -> None:
        """Copy checkpoint tensors (Hugging Face + K3 AttnRes names) into this rank's shards.

        Raises ValueError naming the tensor for a missing, unexpected or mis-shaped one.
        """
        expected = set(self.expected_tensor_names())
        seen: set[str] = set()
        for name, src in tensors:
            if name not in expected:
                if is_ignored_tensor(self.cfg, name):
                    continue
                raise ValueError(f"checkpoint has unexpected tensor {name!r} for {self.cfg.architecture}")
            self._load_one(name, src)
            seen.add(name)
        missing = sorted(expected - seen)
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise ValueError(f"checkpoint is missing tensor {missing[0]!r}{more}")
        if self.cfg.is_attn_res:
            self.fold_queries()

    def expected_tensor_names(self) -> list[str]:
        return list(tensor_dims(self.cfg))

    def _expected_shape(self, name: str) -> tuple[int, ...]:
        if not hasattr(self, "_dims"):
            self._dims = tensor_dims(self.cfg)  # built once: loading asks for every tensor
        return dims_shape(self.cfg, self._dims[name])

    def param_for(self, name: str) -> tuple[str, object]:
        """Checkpoint tensor name -> (this module's parameter name, the shard_id its weight_loader takes)."""
        if name == "model.output_attn_res_norm.weight":
            return "out_norm", None
        if name == "model.output_attn_res_proj.weight":
            return "out_proj", None
        m = _LAYER_RE.fullmatch(name)
        if m is not None:
            i, suffix = int(m.group(1)), m.group(2)
            if suffix in _MERGED:
                merged, shard_id = _MERGED[suffix]
                return f"layers.{i}.{merged}", shard_id
            if suffix.endswith(("_res_norm.weight", "_res_proj.weight")):
                site = _RES_SITES[suffix.rsplit("_", 1)[0]]
                return ("res_norm" if suffix.endswith("_norm.weight") else "res_proj"), (i, site)
        return name.removeprefix("model."), None

    @torch.no_grad()
    def _load_one(self, name: str, src: TensorSource) -> None:
        want = self._expected_shape(name)
        if tuple(src.shape) != want:
            raise ValueError(f"tensor {name!r} has shape {list(src.shape)}, expected {list(want)}")
        if not hasattr(self, "_params"):
            self._params = dict(self.named_parameters())
        param_name, shard_id = self.param_for(name)
        param = self._params[param_name]
        getattr(param, "weight_loader", default_weight_loader)(param, src, shard_id)

    @torch.no_grad()
    def prepare_for_inference(self, backend: ops.Backend, int8_activations: bool = False) -> None:
        """Once, after load_weights (and the move to the serving device): pack every linear's weight for the
        kernels backend and pick the other ops for this device (kernels.ops). The plain weights stay (the
        embedding, the reference op and tests read them). `int8_activations` (--quant-activations int8): the
        quantized linears round the activations of many-row steps to int8 blocks (kernels/quant.py)."""
        for module in self.modules():
            if isinstance(module, PackedWeight):
                module.prepare_weights(backend, int8_activations)
        self.k = ops.kernel_set(backend, self.norm.weight.device)
        for layer in self.layers:
            layer.self_attn.decode_attention = self.k.decode_attention
            layer.self_attn.rotary = self.k.rotary
            layer.self_attn.store_kv = self.k.store_kv
            layer.mlp.silu_mul = self.k.silu_mul
        self.fused_layers = self._fused_layer_weights()

    def _fused_layer_weights(self) -> list[list[torch.Tensor]] | None:
        """Per layer (w_qkv, w_o, w_gate_up, w_down), the plain weights the fused decode layer streams; None where it
        does not apply: kernels without a fused layer, tensor parallelism (the row-parallel linears all-reduce
        between the ops), Full AttnRes (its sites mix the whole pool: not fused), linears that would not take the
        small-M kernel at FUSED_DECODE_MAX_ROWS rows (the fused layer computes what that kernel computes), or
        DEPTHSERVE_FUSED_DECODE=0."""
        if (not self.k.fused_decode or self.comm is not None or self.cfg.attn_res_mode == "full"
                or os.environ.get(ENV_FUSED_DECODE, "1") == "0"):
            return None
        out = []
        for layer in self.layers:
            linears = (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj)
            if any(lin.packed is None or lin.packed.small_m_rows < FUSED_DECODE_MAX_ROWS for lin in linears):
                return None
            out.append([lin.weight for lin in linears])
        self.fused_norms = [w for layer in self.layers
                            for w in (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)]
        return out

    @torch.no_grad()
    def fold_queries(self) -> None:
        """q = w ⊙ g (docs/attnres.md §3): each source's key becomes the scalar 1/rms; stack per-block queries."""
        self.queries = (self.res_proj * self.res_norm).contiguous()  # [L, 2, d]
        self.site_queries = [tuple(q.unbind(0)) for q in self.queries.unbind(0)]  # views: no per-step indexing
        self.out_query = (self.out_proj * self.out_norm).contiguous()
        if self.schedule is not None:
            q_rows = 2 * self.cfg.attn_res_block_size
            blocks = []
            for b in range(self.schedule.num_blocks):
                layers = self.schedule.block_layers(b)
                qb = torch.zeros(q_rows, self.cfg.hidden_size, device=self.queries.device)  # a short last block is padded with zero rows
                qb[: 2 * len(layers)] = self.queries[layers.start:layers.stop].reshape(-1, self.cfg.hidden_size)
                blocks.append(qb)
            self.block_queries = blocks

"""Batched sampling from fp32 logits with per-request parameters and generators.

Random rows use inverse-CDF sampling with ONE fp64 uniform per row (the exponential race it replaced drew
one per vocabulary entry: ~190 us of RNG alone per row at a 49k vocabulary). A seeded request draws its
uniform from its own generator, so its tokens do not depend on what else is in the batch.

The search is two-level, so it is exact without an fp64 cumsum over the whole vocabulary: the probabilities
are cut into blocks of CDF_BLOCK tokens; the uniform picks a block on the fp64 cumsum of the block masses,
and what is left of it, rescaled to [0, 1), picks a token on the fp64 cumsum of that block alone. Every token
keeps its probability to fp32 rounding of the block sums (relative ~1e-7). A single fp32 cumsum would not:
near a running total of 1 it steps in units of 6e-8, so tail tokens below that would never be drawn.
Each search returns the first index whose CDF exceeds the target, clamped to the last index where the CDF
rises, so a zero-probability token (masked by top-k/top-p/min-p, or vocabulary padding) is never returned,
even when the target rounds up to the total.

A request with a grammar (engine/structured.py) gets its disallowed tokens set to -inf first, before
penalties, temperature, top-k, top-p and min-p; its logprobs are those of the masked distribution (the
grammar's renormalised, before penalties and temperature), so the sampled token's logprob is always finite.

Everything runs on the logits' device (the engine's); the results come back to the host once per step
(the sampled ids with one `.tolist()`, the logprob rows in one copy).
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.outputs import Logprob
from engine.request import Request
from engine.structured import apply_bitmask, fill_bitmask


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[Logprob | None]


# Penalised logits are clipped to this: divided by the smallest sampled temperature (GREEDY_TEMPERATURE) they
# stay finite, so exp(logit - row max) never sees inf - inf (a repetition_penalty of 1e-300 would otherwise make
# NaNs).
MAX_LOGIT = 1e30

# Tokens per block of the two-level inverse-CDF search: about sqrt(vocab) at 32k-150k vocabularies, so both
# levels stay short (at 49k: 192 block masses, then 256 tokens of one block).
CDF_BLOCK = 256

# top-k/top-p look at this many candidates in turn (a partial sort, `topk`) before they sort a whole row: at
# a 49k vocabulary a full sort costs ~9 ms a row on this CPU, topk(1024) ~1 ms, topk(8192) ~2 ms.
TOP_CANDIDATES = (1024, 8192)


def _top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """logits [S, V], in place, with every token outside its row's top-k, then outside the smallest set of
    the (top-k renormalised) distribution reaching top_p, set to -inf. top_k [S] (V: off) and top_p [S]
    (>= 1: off) on the host. Rows with both off come back as they are.

    Exact, without sorting whole rows when it can: a row's kept set is read off its `cap` largest logits
    (`topk`, a partial sort; caps TOP_CANDIDATES in turn) when it provably lies inside them: its top_k is at
    most the cap, or top-k is off and the top-p set ends before the last candidate (its mass measured against
    the whole row's normaliser). Rows no cap holds (a flat distribution) are sorted in full."""
    vocab = logits.shape[1]
    left = ((top_k < vocab) | (top_p < 1)).nonzero().flatten()  # rows still to filter
    updates: list[tuple[torch.Tensor, torch.Tensor]] = []
    for cap in TOP_CANDIDATES:
        if left.numel() == 0 or cap >= vocab:
            break
        tk = top_k[left]
        fits = (tk <= cap) | (tk >= vocab)  # its top-k set, if any, lies inside the candidates
        rows = left[fits]
        if rows.numel():
            n = cap if bool((tk[fits] >= vocab).any()) else int(tk[fits].max())
            filtered, spill = _filter_candidates(logits[rows], n, top_k[rows], top_p[rows])
            updates.append((rows[~spill], filtered[~spill]))
            left = torch.cat([left[~fits], rows[spill]])
    if left.numel():
        updates.append((left, _top_k_top_p_sorted(logits[left], top_k[left], top_p[left])))
    for r, v in updates:  # written last: every path above read its rows as they came
        logits[r] = v
    return logits


def _filter_candidates(logits: torch.Tensor, n: int, top_k: torch.Tensor, top_p: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """_top_k_top_p of rows [R, V] from their n largest logits; also [R] bool: the rows whose top-p set may
    run past the candidates (top-k off and the last candidate kept), which the caller sorts in full."""
    dev = logits.device
    srt, idx = logits.topk(n, dim=-1)  # [R, n], descending
    k, p_top = top_k.to(dev).unsqueeze(1), top_p.to(dev).unsqueeze(1)
    drop = torch.arange(n, device=dev).unsqueeze(0) >= k  # [R, n]
    # the normaliser: over the top-k set (inside the candidates) or, top-k off, over the whole row
    m = srt[:, :1]
    kept = (srt - m).exp_().masked_fill_(drop, 0.0)
    whole = (logits - m).exp_().sum(-1, keepdim=True, dtype=torch.float64)
    total = torch.where(k >= logits.shape[1], whole, kept.sum(-1, keepdim=True, dtype=torch.float64))
    drop = _top_p_drop(kept, total, drop, p_top)
    spill = ~drop[:, -1] & (top_k.to(dev) >= logits.shape[1])
    out = torch.full_like(logits, float("-inf")).scatter_(1, idx, srt.masked_fill(drop, float("-inf")))
    return out, spill


def _top_p_drop(kept: torch.Tensor, total: torch.Tensor, drop: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """`drop` [R, n] also marking what lies past the smallest prefix reaching top_p [R, 1] (where < 1) of the
    descending weights `kept` [R, n] (exp(logit - row max), fp32, 0 where dropped) over `total` [R, 1]. In
    fp64, so the candidate and the fully sorted paths agree on the boundary token (same fp32 weights, sums
    that differ only in order)."""
    p = kept.double() / total
    return drop | (((p.cumsum(-1) - p) >= top_p) & (top_p < 1))


def _top_k_top_p_sorted(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """_top_k_top_p on fully sorted rows (the reference the candidate path must equal, and its fallback)."""
    dev = logits.device
    srt, idx = logits.sort(dim=-1, descending=True)
    k, p_top = top_k.to(dev).unsqueeze(1), top_p.to(dev).unsqueeze(1)
    drop = torch.arange(logits.shape[1], device=dev).unsqueeze(0) >= k
    kept = (srt - srt[:, :1]).exp_().masked_fill_(drop, 0.0)
    drop = _top_p_drop(kept, kept.sum(-1, keepdim=True, dtype=torch.float64), drop, p_top)
    return torch.full_like(logits, float("-inf")).scatter_(1, idx, srt.masked_fill(drop, float("-inf")))


class _Ahead:
    """A request as it would stand after emitting `drafts`: what the penalties read (params, token_ids,
    output_token_ids) for one verification row."""

    def __init__(self, req: Request, drafts: list[int]) -> None:
        self.params = req.params
        self.token_ids = [*req.token_ids, *drafts] if drafts else req.token_ids
        self.output_token_ids = self.token_ids[req.num_prompt_tokens:]


class Sampler:
    def __init__(self, seed: int = 0, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.grammar_vocab_size = 0  # the grammar tokenizer's vocabulary (set by the engine with its compiler)
        self._mask_pool: ThreadPoolExecutor | None = None

    def prepare_masks(self, reqs: list[Request]) -> Future[torch.Tensor] | None:
        """Start filling the grammar bitmask of the rows to be sampled on a helper thread (llguidance drops the
        GIL), so it overlaps the forward; None when no request has a grammar."""
        if not any(r.grammar is not None for r in reqs):
            return None
        if self._mask_pool is None:
            self._mask_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-mask")
        return self._mask_pool.submit(fill_bitmask, [r.grammar for r in reqs], self.grammar_vocab_size)

    def __call__(self, logits: torch.Tensor, reqs: list[Request], bitmask: torch.Tensor | None = None
                 ) -> SamplerOutput:
        """logits: [S, V] fp32, one row per request in `reqs`; bitmask [S, W] int32 (prepare_masks), or None
        to compute it here when a request has a grammar."""
        raw = logits
        constrained = [i for i, r in enumerate(reqs) if r.grammar is not None]
        if constrained:
            if bitmask is None:
                bitmask = fill_bitmask([r.grammar for r in reqs], self.grammar_vocab_size)
            raw = logits = logits.clone()
            apply_bitmask(logits, bitmask, constrained)
        if any(r.params.has_penalties or r.num_output_tokens < r.params.min_tokens for r in reqs):
            logits = logits.clone()  # keep the raw (grammar-masked) distribution for logprobs
            self._apply_penalties(logits, reqs)
            self._apply_min_tokens(logits, reqs)
            logits.clamp_(max=MAX_LOGIT)
            if constrained:  # min_tokens may ban the only token the grammar allows (EOS): the grammar wins
                idx = torch.tensor(constrained, dtype=torch.long, device=logits.device)
                dead = idx[torch.isneginf(logits[idx].amax(-1))]
                if dead.numel():
                    logits[dead] = raw[dead]
        greedy = [r.params.greedy for r in reqs]
        dev = logits.device
        if all(greedy):
            ids = logits.argmax(-1).tolist()
        elif not any(greedy):  # the common all-random batch: no row gathers
            temps = torch.tensor([r.params.temperature for r in reqs], dtype=torch.float32, device=dev).unsqueeze(1)
            ids = self._inverse_cdf(self._weights(logits / temps, reqs), reqs).tolist()
        else:
            tokens = logits.argmax(-1)
            rows = [i for i, g in enumerate(greedy) if not g]
            sub = [reqs[i] for i in rows]
            temps = torch.tensor([r.params.temperature for r in sub], dtype=torch.float32, device=dev).unsqueeze(1)
            tokens[rows] = self._inverse_cdf(self._weights(logits[rows] / temps, sub), sub)
            ids = tokens.tolist()
        lps: list[Logprob | None] = [None] * len(reqs)
        want = [i for i, r in enumerate(reqs) if r.params.logprobs is not None]
        if want:
            # the raw model distribution as vLLM reports it (grammar-masked rows: the masked one); one copy to the host
            logp = torch.log_softmax(raw[want], dim=-1).cpu()
            for j, i in enumerate(want):
                k = reqs[i].params.logprobs or 0
                top = []
                if k:
                    v, ix = logp[j].topk(k)
                    top = [(t, x) for t, x in zip(ix.tolist(), v.tolist(), strict=True) if x != float("-inf")]
                lps[i] = Logprob(ids[i], float(logp[j, ids[i]]), top)
        return SamplerOutput(ids, lps)

    def verify(self, logits: torch.Tensor, req: Request, drafts: list[int]) -> list[tuple[int, Logprob | None]]:
        """The tokens a drafting request emits: logits [1 + d, V], row j scoring the token after draft j - 1.

        Greedy: the longest prefix of drafts equal to the argmax, then the argmax after it (bonus or correction),
        so the output is the non-speculative one. Sampling: the rejection rule for a point-mass draft: accept
        draft t with probability p(t), else sample from p with t removed, renormalised (the output is
        distributed as p); all accepted, the bonus token is sampled from the last row. p is the distribution
        the sampler samples (temperature, top-k, top-p, min-p). Requests that draft have no penalties, grammar
        or pending min_tokens (the scheduler's rule); penalties are applied row by row, row j seeing the drafts
        before it as output (what non-speculative decoding would have seen had they been emitted)."""
        d = len(drafts)
        reqs = [req] * (d + 1)
        raw = logits
        if req.params.has_penalties:
            logits = logits.clone()
            self._apply_penalties(logits, [_Ahead(req, drafts[:j]) for j in range(d + 1)])  # type: ignore[misc]
            logits.clamp_(max=MAX_LOGIT)
        if req.params.greedy:
            ids = logits.argmax(-1).tolist()  # [1 + d]
            a = 0
            while a < d and ids[a] == drafts[a]:
                a += 1
            toks = ids[:a + 1]
        else:
            temp = req.params.temperature
            w = self._weights(logits / temp, reqs)  # [1 + d, V], unnormalised
            dev = w.device
            draft_t = torch.tensor(drafts, dtype=torch.long, device=dev)  # [d]
            p_draft = (w[:d].gather(1, draft_t.unsqueeze(1)).double()
                       / w[:d].sum(-1, keepdim=True, dtype=torch.float64))  # [d, 1]
            accept = (self._uniforms(reqs[:d], dev) < p_draft).squeeze(1).tolist()  # [d]
            a = accept.index(False) if False in accept else d
            row = w[a:a + 1]  # [1, V]: the bonus row, or the rejected draft's
            if a < d:
                row = row.clone()
                row[0, drafts[a]] = 0.0
                if not bool(row.sum() > 0):  # p(t) = 1 up to rounding: nothing else to sample
                    row = w[a:a + 1]
            toks = [*drafts[:a], int(self._inverse_cdf(row, [req])[0])]
        lps: list[Logprob | None] = [None] * len(toks)
        if req.params.logprobs is not None:
            lps = list(self._logprobs(raw[:len(toks)], toks, reqs[:len(toks)]))
        return list(zip(toks, lps, strict=True))

    @staticmethod
    def _logprobs(raw: torch.Tensor, ids: list[int], reqs: list[Request]) -> list[Logprob]:
        """The raw distribution's logprob of ids[i] in row i, with each request's top-k (vLLM's logprobs)."""
        logp = torch.log_softmax(raw, dim=-1).cpu()
        out = []
        for j, r in enumerate(reqs):
            k = r.params.logprobs or 0
            top = []
            if k:
                v, ix = logp[j].topk(k)
                top = [(t, x) for t, x in zip(ix.tolist(), v.tolist(), strict=True) if x != float("-inf")]
            out.append(Logprob(ids[j], float(logp[j, ids[j]]), top))
        return out

    @staticmethod
    def _apply_penalties(logits: torch.Tensor, reqs: list[Request]) -> None:
        for i, r in enumerate(reqs):
            p = r.params
            if not p.has_penalties:
                continue
            row = logits[i]
            dev = row.device
            if p.logit_bias:  # keys were checked against the vocabulary at admission
                toks = torch.tensor(list(p.logit_bias), dtype=torch.long, device=dev)
                row[toks] += torch.tensor(list(p.logit_bias.values()), dtype=row.dtype, device=dev)
            if p.repetition_penalty != 1.0:  # over prompt and output, as in Hugging Face / vLLM
                seen = torch.tensor(sorted(set(r.token_ids)), dtype=torch.long, device=dev)
                seen = seen[seen < row.shape[0]]
                vals = row[seen]
                row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
            out = r.output_token_ids
            if out and (p.presence_penalty or p.frequency_penalty):
                counts = torch.bincount(torch.tensor(out, dtype=torch.long, device=dev), minlength=row.shape[0])
                counts = counts[: row.shape[0]].float()
                row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()

    @staticmethod
    def _apply_min_tokens(logits: torch.Tensor, reqs: list[Request]) -> None:
        for i, r in enumerate(reqs):
            if r.num_output_tokens < r.params.min_tokens:
                banned = [t for t in (*r.eos_token_ids, *r.params.stop_token_ids) if t < logits.shape[1]]
                if banned:
                    logits[i, banned] = float("-inf")

    @staticmethod
    def _weights(logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        """Sampling weights after top-k, top-p and min-p, vectorised over rows with per-row parameters:
        exp(logit - row max), so each row's largest weight is exactly 1 and filtered tokens are exactly 0.

        Unnormalised and computed in place on `logits` (the caller's temporary logits / T): the inverse CDF
        scales its uniform by each row's total, so a softmax would only add an [S, V] allocation and a pass."""
        vocab, dev = logits.shape[1], logits.device
        # the parameters are tested on the host (no device round trip), then moved where they are used
        top_k = torch.tensor([min(r.params.top_k, vocab) if r.params.top_k > 0 else vocab for r in reqs])
        top_p = torch.tensor([r.params.top_p for r in reqs], dtype=torch.float64)
        min_p = torch.tensor([r.params.min_p for r in reqs], dtype=torch.float32)
        if bool((top_k < vocab).any()) or bool((top_p < 1).any()):
            logits = _top_k_top_p(logits, top_k, top_p)
        weights = logits.sub_(logits.amax(-1, keepdim=True)).exp_()
        if bool((min_p > 0).any()):  # relative to the row's largest weight, which is 1
            weights.masked_fill_(weights < min_p.to(dev, non_blocking=True).unsqueeze(1), 0.0)
        return weights

    def _uniforms(self, reqs: list[Request], device: torch.device) -> torch.Tensor:
        """One fp64 uniform in [0, 1) per row, [S, 1]: a seeded request's from its own generator, the others'
        from the sampler's (one draw for all of them)."""
        unseeded = [i for i, r in enumerate(reqs) if r.generator is None]
        if len(unseeded) == len(reqs):
            return torch.rand(len(reqs), 1, dtype=torch.float64, generator=self.generator, device=device)
        u = torch.empty(len(reqs), 1, dtype=torch.float64, device=device)
        if unseeded:
            u[unseeded] = torch.rand(len(unseeded), 1, dtype=torch.float64, generator=self.generator, device=device)
        for i, r in enumerate(reqs):
            if r.generator is not None:
                u[i] = torch.rand(1, dtype=torch.float64, generator=r.generator, device=device)
        return u

    @staticmethod
    def _search(cdf: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Per row, the first index where the non-decreasing `cdf` [S, n] exceeds x [S, 1], but never past the
        first index where it reaches its total: the last one with a nonzero step. [S, 1] int64."""
        total = cdf[:, -1:].contiguous()
        return torch.minimum(torch.searchsorted(cdf, x, right=True), torch.searchsorted(cdf, total))

    def _inverse_cdf(self, probs: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        """One token per row of `probs` [S, V] (non-negative weights, any positive total: token i with
        probability probs[i] / total), by the two-level inverse CDF of the module docstring: [S] int64."""
        s, vocab = probs.shape
        width = min(CDF_BLOCK, vocab)
        if vocab % width:
            probs = F.pad(probs, (0, width - vocab % width))  # zero-probability padding: never returned
        blocks = probs.contiguous().view(s, -1, width)  # [S, nb, width]
        nb = blocks.shape[1]
        # fp32 sums of 256 non-negative values are good to ~1e-7 relative; fp64 from here on
        cdf = F.pad(blocks.sum(-1).double(), (1, 0)).cumsum_(-1)  # [S, nb + 1]: 0, then the running mass
        x = self._uniforms(reqs, probs.device) * cdf[:, -1:]  # [S, 1] in [0, total)
        k = self._search(cdf, x).clamp_(1, nb)  # block k - 1 (the clamp only matters for a NaN row)
        lo, hi = cdf.gather(1, k - 1), cdf.gather(1, k)
        inner = torch.take_along_dim(blocks, (k - 1).unsqueeze(-1), 1).view(s, width).double().cumsum_(-1)
        j = self._search(inner, (x - lo) / (hi - lo) * inner[:, -1:])  # the rest of x, rescaled to the block
        return ((k - 1) * width + j).squeeze(1).clamp_(max=vocab - 1)

"""Batched sampling from fp32 logits with per-request parameters and generators.

Random rows use the exponential race (argmax p / q, q ~ Exp(1)): a seeded request draws its own q
from its own generator, so its tokens do not depend on what else is in the batch.

Everything runs on the logits' device (the engine's); the results come back to the host once per step
(the sampled ids with one `.tolist()`, the logprob rows in one copy).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.outputs import Logprob
from engine.request import Request


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[Logprob | None]


# Penalised logits are clipped to this: divided by the smallest sampled temperature (GREEDY_TEMPERATURE) they
# stay finite, so softmax never sees inf - inf (a repetition_penalty of 1e-300 would otherwise make NaNs).
MAX_LOGIT = 1e30


class Sampler:
    def __init__(self, seed: int = 0, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)

    def __call__(self, logits: torch.Tensor, reqs: list[Request]) -> SamplerOutput:
        """logits: [S, V] fp32, one row per request in `reqs`."""
        raw = logits
        if any(r.params.has_penalties or r.num_output_tokens < r.params.min_tokens for r in reqs):
            logits = logits.clone()  # keep the raw distribution for logprobs
            self._apply_penalties(logits, reqs)
            self._apply_min_tokens(logits, reqs)
            logits.clamp_(max=MAX_LOGIT)
        greedy = [r.params.greedy for r in reqs]
        dev = logits.device
        if all(greedy):
            ids = logits.argmax(-1).tolist()
        elif not any(greedy):  # the common all-random batch: no row gathers
            temps = torch.tensor([r.params.temperature for r in reqs], dtype=torch.float32, device=dev).unsqueeze(1)
            ids = self._race(self._probs(logits / temps, reqs), reqs).tolist()
        else:
            tokens = logits.argmax(-1)
            rows = [i for i, g in enumerate(greedy) if not g]
            sub = [reqs[i] for i in rows]
            temps = torch.tensor([r.params.temperature for r in sub], dtype=torch.float32, device=dev).unsqueeze(1)
            tokens[rows] = self._race(self._probs(logits[rows] / temps, sub), sub)
            ids = tokens.tolist()
        lps: list[Logprob | None] = [None] * len(reqs)
        want = [i for i, r in enumerate(reqs) if r.params.logprobs is not None]
        if want:
            # the raw model distribution, as vLLM reports it; one copy to the host
            logp = torch.log_softmax(raw[want], dim=-1).cpu()
            for j, i in enumerate(want):
                k = reqs[i].params.logprobs or 0
                top = []
                if k:
                    v, ix = logp[j].topk(k)
                    top = list(zip(ix.tolist(), v.tolist(), strict=True))
                lps[i] = Logprob(ids[i], float(logp[j, ids[i]]), top)
        return SamplerOutput(ids, lps)

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
    def _probs(logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        """top-k, top-p and min-p filtering, vectorised over rows with per-row parameters."""
        vocab, dev = logits.shape[1], logits.device
        # the parameters are tested on the host (no device round trip), then moved where they are used
        top_k = torch.tensor([min(r.params.top_k, vocab) if r.params.top_k > 0 else vocab for r in reqs])
        top_p = torch.tensor([r.params.top_p for r in reqs], dtype=torch.float32)
        min_p = torch.tensor([r.params.min_p for r in reqs], dtype=torch.float32)
        if bool((top_k < vocab).any()) or bool((top_p < 1).any()):
            top_k, top_p = top_k.to(dev, non_blocking=True), top_p.to(dev, non_blocking=True)
            srt, idx = logits.sort(dim=-1, descending=True)
            rank = torch.arange(vocab, device=dev).unsqueeze(0)
            drop = rank >= top_k.unsqueeze(1)
            p = torch.softmax(srt.masked_fill(drop, float("-inf")), dim=-1)
            drop |= (p.cumsum(-1) - p) >= top_p.unsqueeze(1)  # keep the smallest set reaching top_p
            logits = torch.full_like(logits, float("-inf")).scatter(1, idx, srt.masked_fill(drop, float("-inf")))
        probs = torch.softmax(logits, dim=-1)
        if bool((min_p > 0).any()):
            min_p = min_p.to(dev, non_blocking=True)
            probs = probs.masked_fill(probs < min_p.unsqueeze(1) * probs.amax(-1, keepdim=True), 0.0)
        return probs

    def _race(self, probs: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        # q ~ Exp(1) as -log(U): torch.rand is several times faster than exponential_ on CPU.
        u = torch.empty_like(probs)
        unseeded = [i for i, r in enumerate(reqs) if r.generator is None]
        if len(unseeded) == len(reqs):
            u.uniform_(generator=self.generator)
        else:
            if unseeded:
                u[unseeded] = torch.rand(len(unseeded), probs.shape[1], generator=self.generator, device=u.device)
            for i, r in enumerate(reqs):
                if r.generator is not None:
                    u[i].uniform_(generator=r.generator)
        q = u.clamp_(min=1e-20).log_().neg_()
        return (probs / q).argmax(-1)

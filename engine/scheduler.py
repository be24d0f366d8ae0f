"""Continuous batching: each step shares one token budget between running requests and new ones.

Running requests go first (decode tokens and unfinished prompt chunks), in arrival order; when KV
blocks run out the most recent running request is preempted (its blocks freed, recomputed later).
Waiting requests are admitted while budget, sequence slots and blocks last, using prefix-cache hits.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from engine.config import SchedulerConfig
from engine.request import Request, RequestStatus
from kvcache.kv_manager import KVCacheManager


@dataclass
class SchedulerOutput:
    scheduled: list[tuple[Request, int]] = field(default_factory=list)  # (request, new tokens this step)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)


class Scheduler:
    def __init__(self, cfg: SchedulerConfig, kv: KVCacheManager, max_step_tokens: int) -> None:
        self.cfg = cfg
        self.kv = kv
        self.max_step_tokens = max_step_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add_request(self, req: Request) -> None:
        req.status = RequestStatus.WAITING
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _chunk(self, req: Request, computed: int, budget: int) -> int:
        """Tokens to run for `req` this step, given `computed` tokens already in its KV cache."""
        n = min(req.num_tokens - computed, budget)
        if self.cfg.long_prefill_token_threshold > 0:
            n = min(n, self.cfg.long_prefill_token_threshold)
        return n

    def _preempt(self, req: Request) -> None:
        self.kv.free(req.request_id)
        req.num_computed_tokens = 0
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_step_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = self._chunk(req, req.num_computed_tokens, budget)
            if n <= 0:
                i += 1
                continue
            while not self.kv.allocate_slots(req.request_id, req.token_ids, req.num_computed_tokens, n):
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
            if req.status is RequestStatus.PREEMPTED:
                break
            out.scheduled.append((req, n))
            budget -= n
            i += 1
        if out.preempted:
            return out
        while self.waiting and budget > 0 and len(self.running) < self.cfg.max_num_seqs:
            req = self.waiting[0]
            hit, n_cached = ([], 0) if req.params.prompt_depth_attention else \
                self.kv.get_computed_blocks(req.request_id, req.token_ids)
            n = self._chunk(req, n_cached, budget)
            if not self.kv.allocate_slots(req.request_id, req.token_ids, n_cached, n, hit):
                break
            self.kv.stats.queries += req.num_tokens
            self.kv.stats.hits += n_cached
            self.waiting.popleft()
            req.num_computed_tokens = n_cached
            req.metrics.num_cached_tokens = n_cached
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.scheduled.append((req, n))
            budget -= n
        return out

    def finish(self, req: Request) -> None:
        """Remove a finished or aborted request wherever it is and free its blocks."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.kv.free(req.request_id)
        req.status = RequestStatus.FINISHED

"""Continuous batching: each step shares one token budget between running requests and new ones.

Running requests go first (decode tokens and unfinished prompt chunks), in arrival order; when KV
blocks run out the most recent running request is preempted (its blocks freed, recomputed later).
Waiting requests are admitted while budget, sequence slots and blocks last, using prefix-cache hits.

The scheduler owns the requests' progress: it alone writes `num_computed_tokens`, appends sampled
tokens, applies the token-level stop rules (EOS, stop token ids, max_tokens, the context length) and
frees finished requests, in `schedule()` and `update_from_output()`.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from engine.config import SchedulerConfig, SpeculativeConfig
from engine.outputs import DepthEntry, Logprob
from engine.request import Request, RequestStatus
from engine.spec_decode import DRAFT_PLACEHOLDER, SpecBackoff, propose_ngram
from kvcache.kv_manager import KVCacheManager


@dataclass(frozen=True)
class ScheduledRequest:
    request: Request
    num_new_tokens: int
    sample: bool  # its KV catches up with its tokens this step: a token is sampled from its last row
    # drafted tokens run after its last token (num_new_tokens = 1 + len): every row is verified and sampled;
    # method depth: DRAFT_PLACEHOLDERs, which the runner's draft passes replace
    spec_token_ids: tuple[int, ...] = ()


@dataclass
class SchedulerOutput:
    """What runs this step, in row order (one-token rows first, then prompt chunks)."""

    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    finished_ids: list[str] = field(default_factory=list)  # left since the last step: the runner drops them
    trimmed: dict[str, int] = field(default_factory=dict)  # request id -> blocks kept after giving back its tail

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def sampled(self) -> list[Request]:
        return [s.request for s in self.scheduled if s.sample]


@dataclass
class RunnerOutput:
    """What the runner returns for a step: small, indexed like `SchedulerOutput.sampled` minus `failed`."""

    sampled: list[Request]  # requests that got a token, in order
    token_ids: list[int]
    logprobs: list[Logprob | None]
    depth: list[DepthEntry | None]  # per sampled token: the weights of the pass that produced it
    prompt_depth: dict[str, list[tuple[int, DepthEntry]]]  # request id -> (prompt position, weights), echo
    failed: list[tuple[Request, str, BaseException]]  # rows that could not be built or sampled
    # request id -> (prompt position p >= 1, logprob of prompt token p given tokens [0, p)), prompt_logprobs
    prompt_logprobs: dict[str, list[tuple[int, Logprob]]] = field(default_factory=dict)
    # speculative requests: request id -> the tokens (and logprobs) emitted after token_ids[i], i.e. the
    # accepted drafts past the first and the bonus or correction token; absent: one token
    more_token_ids: dict[str, list[int]] = field(default_factory=dict)
    more_logprobs: dict[str, list[Logprob | None]] = field(default_factory=dict)


@dataclass
class EngineCoreOutput:
    """One request's progress in a step, for the output processor."""

    request: Request
    new_token_ids: list[int] = field(default_factory=list)
    new_logprobs: list[Logprob] | None = None
    new_depth: list[DepthEntry] | None = None
    prompt_depth: list[tuple[int, DepthEntry]] | None = None
    prompt_logprobs: list[tuple[int, Logprob]] | None = None
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.request.finish_reason is not None


@dataclass
class SchedulerStats:
    num_preemptions: int = 0
    prefix_cache_queries: int = 0  # prompt tokens looked up on admission
    prefix_cache_hits: int = 0  # of which found in the cache
    prompt_tokens: int = 0  # each prompt counted once (as vLLM), cached or not
    generation_tokens: int = 0
    # speculative decoding (vLLM's spec_decode counters): steps with drafts, drafted and accepted tokens, and
    # accepted tokens by draft position
    spec_num_drafts: int = 0
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0
    spec_accepted_per_pos: list[int] = field(default_factory=list)


class Scheduler:
    def __init__(self, cfg: SchedulerConfig, kv: KVCacheManager, max_step_tokens: int,
                 spec: SpeculativeConfig | None = None) -> None:
        self.cfg = cfg
        self.spec = spec
        self._backoff: dict[str, SpecBackoff] = {}  # per drafting request
        self.record_depth = False  # depth metrics record every sampled token's weights: no drafts then
        self.kv = kv
        self.max_step_tokens = max_step_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.stats = SchedulerStats()
        self._finished_ids: list[str] = []
        self._trimmed: dict[str, int] = {}  # since the last step, for the runner's block tables
        # (first token?, seconds) per sampled token, for latency histograms; only kept when someone reads them
        self.record_latencies = False
        self.latencies: list[tuple[bool, float]] = []

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

    def _drafts(self, req: Request, budget: int) -> list[int]:
        """Drafted tokens for a decoding request ([] when it may not draft). Requests with a grammar or
        min_tokens still pending (their logits depend on state the drafts would change) or that record depth
        weights per token do not draft; penalties are applied per verification row (Sampler.verify)."""
        p = req.params
        if (self.spec is None or req.num_computed_tokens != req.num_tokens - 1 or not req.num_output_tokens
                or req.grammar is not None or req.num_output_tokens < p.min_tokens
                or p.depth_attention or p.prompt_depth_attention or self.record_depth):
            return []
        room = min(budget, req.max_model_len - req.num_tokens) - 1  # the emitted tokens fit the context
        if p.max_tokens is not None:
            room = min(room, p.max_tokens - req.num_output_tokens - 1)  # never run past max_tokens
        state = self._backoff.get(req.request_id) or self._backoff.setdefault(req.request_id, SpecBackoff())
        if room <= 0 or not state.should_draft():
            return []
        n = min(room, state.draft_len(self.spec.num_speculative_tokens))
        if self.spec.method == "depth":  # the runner's early-exit passes fill these in before verification
            return [DRAFT_PLACEHOLDER] * n
        return propose_ngram(state.tokens.sync(req.token_ids), self.spec, n)

    def _preempt(self, req: Request) -> None:
        self.kv.free(req.request_id)
        req.num_computed_tokens = 0
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.stats.num_preemptions += 1
        self.waiting.appendleft(req)

    def schedule(self) -> SchedulerOutput:
        rows: list[tuple[Request, int]] = []
        drafts: dict[str, list[int]] = {}
        out = SchedulerOutput(finished_ids=self._finished_ids, trimmed=self._trimmed)
        self._finished_ids = []
        if self._trimmed:
            self._trimmed = {}
        budget = self.max_step_tokens
        i = 0
        cap = self.spec.disable_by_batch_size if self.spec is not None else None
        drafting = self.spec is not None and (cap is None or len(self.running) < cap)
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            d = self._drafts(req, budget) if drafting else []
            if d and self.kv.allocate_slots(req.request_id, req.token_ids, req.num_computed_tokens, 1 + len(d)):
                drafts[req.request_id] = d
                rows.append((req, 1 + len(d)))
                budget -= 1 + len(d)
                i += 1
                continue
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
            rows.append((req, n))
            budget -= n
            i += 1
        if not out.preempted:
            budget = self._admit(rows, budget)
        now = time.monotonic()
        for req, _ in rows:
            if req.metrics.first_scheduled_time is None:
                req.metrics.first_scheduled_time = now
                self.stats.prompt_tokens += req.num_prompt_tokens
        # stable: one-token rows and drafting requests' verification rows first (the decode attention path)
        rows.sort(key=lambda rn: rn[1] != 1 and rn[0].request_id not in drafts)
        if drafts:
            out.scheduled = [ScheduledRequest(r, n, True, tuple(d)) if (d := drafts.get(r.request_id)) else
                             ScheduledRequest(r, n, r.num_computed_tokens + n == r.num_tokens) for r, n in rows]
        else:
            out.scheduled = [ScheduledRequest(r, n, r.num_computed_tokens + n == r.num_tokens) for r, n in rows]
        return out

    def _admit(self, rows: list[tuple[Request, int]], budget: int) -> int:
        while self.waiting and budget > 0 and len(self.running) < self.cfg.max_num_seqs:
            req = self.waiting[0]
            # a request that reports its prompt rows runs them all, unless it sampled already (recomputed after
            # preemption: what it reports about its prompt was handed out)
            hit, n_cached = ([], 0) if req.params.skips_prefix_cache and not req.num_output_tokens else \
                self.kv.get_computed_blocks(req.request_id, req.token_ids)
            n = self._chunk(req, n_cached, budget)
            if not self.kv.allocate_slots(req.request_id, req.token_ids, n_cached, n, hit):
                break
            self.stats.prefix_cache_queries += req.num_tokens
            self.stats.prefix_cache_hits += n_cached
            self.waiting.popleft()
            req.num_computed_tokens = n_cached
            req.metrics.num_cached_tokens = n_cached
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            rows.append((req, n))
            budget -= n
        return budget

    def update_from_output(self, sched: SchedulerOutput, ran: RunnerOutput) -> list[EngineCoreOutput]:
        """Advance the counters of what ran, append sampled tokens, apply token-level stops, free the
        finished. Rows that failed end their request with an error."""
        outputs = [self._fail(req, message) for req, message, _ in ran.failed]
        gone = {id(req) for req, _, _ in ran.failed}
        gone_ids = {req.request_id for req, _, _ in ran.failed}
        spec: dict[str, ScheduledRequest] = {}
        for s in sched.scheduled:
            req = s.request
            if id(req) in gone or req.status is not RequestStatus.RUNNING:
                continue
            if s.spec_token_ids:  # advanced by what was accepted, below
                spec[req.request_id] = s
                continue
            req.num_computed_tokens += s.num_new_tokens
            self.kv.cache_computed(req.request_id, req.token_ids, req.num_computed_tokens)
        now = time.monotonic()
        for i, req in enumerate(ran.sampled):
            if spec and (s := spec.get(req.request_id)) is not None:
                outputs.append(self._update_spec(req, s, ran, i, now))
                continue
            tok = ran.token_ids[i]
            req.token_ids.append(tok)
            self.stats.generation_tokens += 1
            m = req.metrics
            if self.record_latencies:
                first = m.first_token_time is None
                self.latencies.append((first, now - (m.arrival_time if first else m.last_token_time or now)))
            if m.first_token_time is None:
                m.first_token_time = now
            m.last_token_time = now
            if req.grammar is not None and not req.grammar.consume_token(tok):
                outputs.append(self._fail(req, "the sampled token broke the request's grammar"))
                continue
            self._check_stop(req, tok)
            lp, depth = ran.logprobs[i], ran.depth[i]
            outputs.append(EngineCoreOutput(
                req, [tok], [lp] if lp is not None else None, [depth] if depth is not None else None,
                ran.prompt_depth.get(req.request_id), ran.prompt_logprobs.get(req.request_id)))
            if req.finish_reason is not None:
                req.metrics.finished_time = now
                self.finish(req)
        if ran.prompt_depth or ran.prompt_logprobs:  # prompt rows of chunks that sampled nothing yet
            done = {req.request_id for req in ran.sampled} | gone_ids
            outputs += [EngineCoreOutput(s.request, prompt_depth=ran.prompt_depth.get(rid),
                                         prompt_logprobs=ran.prompt_logprobs.get(rid))
                        for s in sched.scheduled
                        if (rid := s.request.request_id) not in done
                        and (rid in ran.prompt_depth or rid in ran.prompt_logprobs)]
        return outputs

    def _update_spec(self, req: Request, s: ScheduledRequest, ran: RunnerOutput, i: int, now: float
                     ) -> EngineCoreOutput:
        """A verified step: append the emitted tokens (accepted drafts, then the bonus or correction token) up to
        the first stop, roll num_computed_tokens back to the KV that holds accepted tokens, give back the blocks
        only rejected drafts used. Blocks are published only up to that point: never with a rejected token."""
        rid = req.request_id
        toks = [ran.token_ids[i], *ran.more_token_ids.get(rid, ())]
        lps = [ran.logprobs[i], *ran.more_logprobs.get(rid, ())]
        accepted = len(toks) - 1  # the drafts verified (each emitted token but the last was a draft)
        st = self.stats
        st.spec_num_drafts += 1
        st.spec_num_draft_tokens += len(s.spec_token_ids)
        st.spec_num_accepted_tokens += accepted
        width = max(len(s.spec_token_ids), self.spec.num_speculative_tokens if self.spec is not None else 0)
        if len(st.spec_accepted_per_pos) < width:  # every position up to k, drafted or not yet
            st.spec_accepted_per_pos += [0] * (width - len(st.spec_accepted_per_pos))
        for pos in range(accepted):
            st.spec_accepted_per_pos[pos] += 1
        self._backoff.setdefault(rid, SpecBackoff()).record(accepted, len(s.spec_token_ids))
        start = req.num_computed_tokens
        emitted = 0
        for tok in toks:
            req.token_ids.append(tok)
            emitted += 1
            if req.grammar is not None and not req.grammar.consume_token(tok):
                return self._fail(req, "the sampled token broke the request's grammar")
            self._check_stop(req, tok)
            if req.finish_reason is not None:
                break
        st.generation_tokens += emitted
        m = req.metrics
        if self.record_latencies:
            first = m.first_token_time is None
            self.latencies.append((first, now - (m.arrival_time if first else m.last_token_time or now)))
        if m.first_token_time is None:
            m.first_token_time = now
        m.last_token_time = now
        req.num_computed_tokens = min(start + 1 + accepted, req.num_tokens - 1)
        self.kv.cache_computed(rid, req.token_ids, req.num_computed_tokens)
        kept = self.kv.trim(rid, req.num_computed_tokens)
        if kept is not None:
            self._trimmed[rid] = min(kept, self._trimmed.get(rid, kept))
        lp_out = None if all(lp is None for lp in lps) else [lp for lp in lps[:emitted] if lp is not None]
        out = EngineCoreOutput(req, toks[:emitted], lp_out, None)
        if req.finish_reason is not None:
            m.finished_time = now
            self.finish(req)
        return out

    @staticmethod
    def _check_stop(req: Request, tok: int) -> None:
        """Token-level stops, in vLLM's order: min_tokens holds everything off, then EOS, stop token
        ids, then length, then a grammar that takes no more tokens. Stop strings need text: the output
        processor applies them."""
        p = req.params
        if req.num_output_tokens >= p.min_tokens:
            if tok in req.eos_token_ids:
                req.finish_reason = "stop"
                return
            if tok in p.stop_token_ids:
                req.finish_reason, req.stop_reason = "stop", tok
                return
        if (p.max_tokens is not None and req.num_output_tokens >= p.max_tokens) or req.num_tokens >= req.max_model_len:
            req.finish_reason = "length"
        elif req.grammar is not None and req.grammar.is_stopped():  # the grammar is complete: nothing may follow
            req.finish_reason = "stop"

    def _fail(self, req: Request, message: str) -> EngineCoreOutput:
        self.finish(req, "error")
        return EngineCoreOutput(req, error=message)

    def finish(self, req: Request, reason: str | None = None, stop_reason: str | int | None = None) -> None:
        """Remove a finished or aborted request wherever it is and free its blocks (idempotent)."""
        if reason is not None and req.finish_reason is None:
            req.finish_reason, req.stop_reason = reason, stop_reason
        if req.status is RequestStatus.FINISHED:
            return
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
        else:
            self.waiting.remove(req)
        self.kv.free(req.request_id)
        self._backoff.pop(req.request_id, None)
        req.status = RequestStatus.FINISHED
        self._finished_ids.append(req.request_id)

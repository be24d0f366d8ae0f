"""The output processor: the one place that turns the scheduler's per-step progress into RequestOutputs.

It alone detokenizes, applies stop strings (asking the engine to stop a request that hit one), holds
back text that may still become a stop string, gathers logprobs and depth weights, and merges the
n samples of a request. Work per step is O(new tokens): DELTA outputs carry only what is new and
FINAL_ONLY requests append to lists and build one output at the end.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.outputs import CompletionOutput, DepthEntry, Logprob, RequestOutput, RequestOutputKind
from engine.request import Request
from engine.scheduler import EngineCoreOutput
from models.tokenizer import IncrementalDetokenizer, Tokenizer


class _Text:
    """A sample's text: released by the detokenizer, checked for stop strings, handed out once.

    While a request runs, the last len(longest stop) - 1 characters are held back (vLLM's stop buffer):
    they may begin a stop string that later tokens complete, and text once streamed is never taken
    back. Only held text and the newest piece are searched, so a step costs O(new text).
    """

    def __init__(self, stop: list[str], include_stop: bool) -> None:
        self.stop = stop
        self.include_stop = include_stop
        longest = max((len(s) for s in stop), default=0)
        self.hold = 0 if include_stop or not stop else longest - 1
        self.keep_recent = longest - 1 if include_stop else 0  # emitted text a stop string may start in
        self.pending = ""  # released, not yet handed out
        self.recent = ""  # the tail of what was handed out (include_stop only)

    def add(self, new: str, stops_active: bool, final: bool) -> tuple[str, str | None]:
        """(text to hand out now, the stop string that ended the sample or None)."""
        window = self.recent + self.pending + new
        base = len(self.recent) + len(self.pending)  # a match must end inside `new`
        hit: tuple[int, str] | None = None
        if stops_active and new:
            found = [(at, s) for s in self.stop if (at := window.find(s, max(0, base - len(s) + 1))) >= 0]
            hit = min(found) if found else None
        if hit is not None:
            at, s = hit
            out = window[len(self.recent):at + len(s) if self.include_stop else at]
            self.pending = ""
            return out, s
        text = self.pending + new
        cut = len(text) if final else max(0, len(text) - self.hold)
        out, self.pending = text[:cut], text[cut:]
        if self.keep_recent:
            self.recent = (self.recent + out)[-self.keep_recent:]
        return out, None


@dataclass
class _SampleState:
    """One engine request (one of the n samples of a client request)."""

    request: Request
    detokenizer: IncrementalDetokenizer | None
    text: _Text
    # FINAL_ONLY: everything, appended per step and joined once at the end
    pieces: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Logprob] = field(default_factory=list)
    depth: list[DepthEntry] = field(default_factory=list)
    prompt_depth: list[tuple[int, DepthEntry]] = field(default_factory=list)
    prompt_depth_sent: bool = False
    # prompt position -> its logprob (a preempted request scores its prompt again: the same keys)
    prompt_logprobs: dict[int, Logprob] = field(default_factory=dict)
    prompt_logprobs_sent: bool = False


@dataclass
class _ParentState:
    """A client request: its n samples, and for FINAL_ONLY their finished outputs."""

    kind: RequestOutputKind
    samples: dict[int, _SampleState] = field(default_factory=dict)  # by index
    unfinished: set[int] = field(default_factory=set)
    done: dict[int, CompletionOutput] = field(default_factory=dict)
    prompt_depth: list[DepthEntry] | None = None
    prompt_logprobs: list[Logprob | None] | None = None
    error: str | None = None


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer | None) -> None:
        self.tokenizer = tokenizer
        self.parents: dict[str, _ParentState] = {}
        self.samples: dict[str, _SampleState] = {}  # by engine request id

    def add(self, reqs: list[Request]) -> None:
        """Register the samples of one client request (all share a parent id and sampling params)."""
        parent = _ParentState(reqs[0].params.output_kind)
        for req in reqs:
            p = req.params
            detok = None if self.tokenizer is None else \
                IncrementalDetokenizer(self.tokenizer, req.prompt_token_ids, p.skip_special_tokens)
            state = _SampleState(req, detok, _Text(p.stop, p.include_stop_str_in_output))
            parent.samples[req.index] = state
            parent.unfinished.add(req.index)
            self.samples[req.request_id] = state
        self.parents[reqs[0].parent_id] = parent

    def children(self, parent_id: str) -> list[Request]:
        parent = self.parents.get(parent_id)
        return [s.request for s in parent.samples.values()] if parent is not None else []

    def process(self, core: list[EngineCoreOutput]) -> tuple[list[RequestOutput], list[tuple[Request, str]]]:
        """RequestOutputs for this step, and the requests that hit a stop string (the engine frees them)."""
        outputs: list[RequestOutput] = []
        stopped: list[tuple[Request, str]] = []
        for c in core:
            state = self.samples.get(c.request.request_id)
            if state is None:
                continue
            comp, stop = self._update(state, c)
            if stop is not None and c.request.finish_reason is None:
                stopped.append((c.request, stop))
            if comp is not None:
                out = self._emit(state, comp, c.error)
                if out is not None:
                    outputs.append(out)
        return outputs, stopped

    def _update(self, state: _SampleState, c: EngineCoreOutput) -> tuple[CompletionOutput | None, str | None]:
        req, p = c.request, c.request.params
        if c.prompt_depth:
            state.prompt_depth += c.prompt_depth
        if c.prompt_logprobs:
            state.prompt_logprobs.update(c.prompt_logprobs)
        if not c.new_token_ids and not c.finished:
            return None, None  # a prompt chunk: nothing to show yet
        finishing = c.finished
        new = ""
        if state.detokenizer is not None:
            # the token that a stop rule ended the sample with (EOS, a stop token id) is not text; the last
            # token of a completed grammar is
            by_token = isinstance(req.stop_reason, int) or (
                req.finish_reason == "stop" and req.stop_reason is None
                and not (req.grammar is not None and c.new_token_ids and c.new_token_ids[-1] not in req.eos_token_ids))
            if len(c.new_token_ids) > 1 and p.stop:  # verified drafts: a stop string may end before the last
                return self._update_tokenwise(state, c, by_token)
            text_ids = c.new_token_ids[:-1] if finishing and by_token else c.new_token_ids  # several: drafts
            if text_ids:
                new = state.detokenizer.add(text_ids)
            if finishing:
                new += state.detokenizer.flush()
        stops_active = req.num_output_tokens >= p.min_tokens
        text, stop = state.text.add(new, stops_active, final=finishing)
        return self._completion(state, c, text, stop, list(c.new_token_ids), c.new_logprobs, c.new_depth)

    def _update_tokenwise(self, state: _SampleState, c: EngineCoreOutput, by_token: bool
                          ) -> tuple[CompletionOutput | None, str | None]:
        """Several tokens of one step (a speculative step's accepted drafts), detokenized and checked for stop
        strings one at a time, so the sample ends at the token that completed the stop string, as without
        drafts; the tokens after it are dropped."""
        req, detok = c.request, state.detokenizer
        assert detok is not None
        ids = list(c.new_token_ids)
        stops_active = req.num_output_tokens >= req.params.min_tokens  # drafting requests are past min_tokens
        pieces: list[str] = []
        stop = None
        for j, tok in enumerate(ids):
            last = j == len(ids) - 1
            new = "" if last and c.finished and by_token else detok.add([tok])
            if last and c.finished:
                new += detok.flush()
            text, stop = state.text.add(new, stops_active, final=last and c.finished)
            pieces.append(text)
            if stop is not None:
                ids = ids[:j + 1]
                break
        n = len(ids)
        return self._completion(state, c, "".join(pieces), stop, ids,
                                c.new_logprobs[:n] if c.new_logprobs is not None else None,
                                c.new_depth[:n] if c.new_depth is not None else None)

    @staticmethod
    def _completion(state: _SampleState, c: EngineCoreOutput, text: str, stop: str | None, token_ids: list[int],
                    logprobs: list[Logprob] | None, depth: list[DepthEntry] | None
                    ) -> tuple[CompletionOutput, str | None]:
        req, p = c.request, c.request.params
        reason, stop_reason = req.finish_reason, req.stop_reason
        if stop is not None:  # the engine ends the request with this reason after the step
            reason, stop_reason = "stop", stop
        comp = CompletionOutput(index=req.index, text=text, token_ids=token_ids,
                                finish_reason=reason, stop_reason=stop_reason,
                                logprobs=list(logprobs) if logprobs is not None else
                                ([] if p.logprobs is not None else None),
                                depth_attention=list(depth) if p.depth_attention and depth else
                                ([] if p.depth_attention else None))
        return comp, stop

    def _emit(self, state: _SampleState, comp: CompletionOutput, error: str | None) -> RequestOutput | None:
        req = state.request
        parent = self.parents[req.parent_id]
        if error is not None:
            parent.error = parent.error or error
        if parent.prompt_depth is None and req.params.prompt_depth_attention and state.prompt_depth and \
                (comp.token_ids or comp.finished):
            parent.prompt_depth = [e for _, e in sorted(state.prompt_depth, key=lambda pe: pe[0])]
        if parent.prompt_logprobs is None and req.params.prompt_logprobs is not None and \
                len(state.prompt_logprobs) == req.num_prompt_tokens - 1 and (comp.token_ids or comp.finished):
            parent.prompt_logprobs = [None, *(state.prompt_logprobs[p] for p in range(1, req.num_prompt_tokens))]
        if comp.finished:
            parent.unfinished.discard(req.index)
            del self.samples[req.request_id]
        finished = not parent.unfinished
        if finished:
            del self.parents[req.parent_id]
        if parent.kind is RequestOutputKind.DELTA:
            prompt_depth = prompt_lps = None
            if parent.prompt_depth is not None and not state.prompt_depth_sent:
                prompt_depth, state.prompt_depth_sent = parent.prompt_depth, True
            if parent.prompt_logprobs is not None and not state.prompt_logprobs_sent:
                prompt_lps, state.prompt_logprobs_sent = parent.prompt_logprobs, True
            return RequestOutput(req.parent_id, req.prompt, req.prompt_token_ids, [comp], finished, req.metrics,
                                 error=parent.error if finished else error, prompt_depth_attention=prompt_depth,
                                 prompt_logprobs=prompt_lps)
        state.pieces.append(comp.text)
        state.token_ids += comp.token_ids
        if comp.logprobs:
            state.logprobs += comp.logprobs
        if comp.depth_attention:
            state.depth += comp.depth_attention
        if comp.finished:
            p = req.params
            parent.done[req.index] = CompletionOutput(
                req.index, "".join(state.pieces), state.token_ids, comp.finish_reason, comp.stop_reason,
                state.logprobs if p.logprobs is not None else None, state.depth if p.depth_attention else None)
        if not finished:
            return None
        return RequestOutput(req.parent_id, req.prompt, req.prompt_token_ids,
                             [parent.done[i] for i in sorted(parent.done)], True, req.metrics, error=parent.error,
                             prompt_depth_attention=parent.prompt_depth, prompt_logprobs=parent.prompt_logprobs)

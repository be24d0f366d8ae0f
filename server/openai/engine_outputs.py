"""The one place where the server reads engine outputs (engine.outputs: RequestOutput, CompletionOutput,
Logprob) and turns them into OpenAI response pieces: a choice per endpoint, a stream choice per endpoint,
usage counts, logprobs.

The engine answers one engine request per prompt and fans its n samples out itself: each
CompletionOutput carries its sample `index`. A stream's outputs are deltas (only what is new); a
non-streaming request gets one FINAL_ONLY output with every sample complete.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from engine.outputs import CompletionOutput, DepthEntry, Logprob, RequestOutput
from server import protocol as P

# A token as display text and its bytes (serving_engine.Tokens.token_text).
TokenText = Callable[[int], tuple[str, tuple[int, ...]]]


@dataclass
class Choice:
    """What a handler tracks about one choice of a response (one sample of one prompt)."""

    index: int
    prompt_index: int
    prompt_text: str
    num_prompt_tokens: int
    text_offset: int = 0  # completions logprobs: characters of output before the next token
    num_tokens: int = 0  # generated so far (usage)
    final: CompletionOutput | None = None  # non-streaming: the finished sample
    prompt_depth: list[DepthEntry] | None = None  # echo + depth_attention: one entry per prompt token
    started: bool = False  # streaming: a chunk with generated tokens was sent
    shows_output: bool = True  # False for echo with max_tokens 0: the token generated is neither shown nor counted
    prompt_token_ids: list[int] | None = None
    prompt_logprobs: list[Logprob | None] | None = None  # one per prompt token, the first None
    echoed: bool = False  # streaming echo + logprobs: the prompt (text and logprobs) was sent
    tool_stream: Any = None  # chat with tools, streaming: its tool_calls.ToolStream


def update(choice: Choice, out: RequestOutput, comp: CompletionOutput) -> None:
    """Fold one engine output's sample into its choice's bookkeeping."""
    if choice.shows_output:
        choice.num_tokens += len(comp.token_ids)
    if out.prompt_depth_attention is not None:
        choice.prompt_depth = out.prompt_depth_attention
    if out.prompt_logprobs is not None:
        choice.prompt_token_ids, choice.prompt_logprobs = out.prompt_token_ids, out.prompt_logprobs
    if comp.finished:
        choice.final = comp


def _depth(choice: Choice, echo: bool, generated: list | None) -> list | None:
    """Depth weights of a choice: one entry per forward pass, in token order.

    Without echo: one per generated token (the pass that produced it). With echo: one per prompt
    token (the pass over it; the last one produced the first generated token), then one per later
    generated token.
    """
    if generated is None:
        return None
    if echo and choice.prompt_depth is not None:
        return choice.prompt_depth + generated[1:]
    return generated


# ---- /v1/completions ------------------------------------------------------------------------------


def _completion_logprobs(lps: Sequence[Logprob], choice: Choice, token_text: TokenText,
                         out: P.CompletionLogprobs | None = None) -> P.CompletionLogprobs:
    """OpenAI's legacy logprobs of generated tokens (appended to `out` when given)."""
    out = out if out is not None else P.CompletionLogprobs()
    for lp in lps:
        s, _ = token_text(lp.token_id)
        out.tokens.append(s)
        out.token_logprobs.append(lp.logprob)
        top = {s: lp.logprob}
        for tid, v in lp.top:
            top.setdefault(token_text(tid)[0], v)
        out.top_logprobs.append(top)
        out.text_offset.append(choice.text_offset)
        choice.text_offset += 0 if s.startswith("bytes:") else len(s)
    return out


def _echo_logprobs(choice: Choice, k: int, token_text: TokenText) -> P.CompletionLogprobs:
    """OpenAI's legacy logprobs of the echoed prompt: an entry per prompt token, the first null (nothing precedes
    it); text offsets count from the start of the prompt."""
    out = P.CompletionLogprobs()
    for tid, lp in zip(choice.prompt_token_ids or [], choice.prompt_logprobs or [], strict=True):
        s, _ = token_text(tid)
        out.tokens.append(s)
        out.text_offset.append(choice.text_offset)
        choice.text_offset += 0 if s.startswith("bytes:") else len(s)
        if lp is None:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        out.token_logprobs.append(lp.logprob)
        top = {s: lp.logprob}
        for t, v in lp.top[:k]:
            top.setdefault(token_text(t)[0], v)
        out.top_logprobs.append(top)
    return out


def prompt_logprobs(choice: Choice, k: int, token_text: TokenText) -> P.PromptLogprobs | None:
    """vLLM's prompt_logprobs field: per prompt token None (the first) or token id -> {logprob, rank,
    decoded_token}, for the prompt token and its top k alternatives."""
    if choice.prompt_logprobs is None:
        return None
    out: P.PromptLogprobs = []
    for lp in choice.prompt_logprobs:
        if lp is None:
            out.append(None)
            continue
        entry = {lp.token_id: P.PromptLogprob(logprob=lp.logprob, rank=lp.rank, decoded_token=token_text(lp.token_id)[0])}
        for rank, (t, v) in enumerate(lp.top[:k], start=1):
            entry.setdefault(t, P.PromptLogprob(logprob=v, rank=rank, decoded_token=token_text(t)[0]))
        out.append(entry)
    return out


def completion_choice(comp: CompletionOutput, choice: Choice, req: P.CompletionRequest,
                      token_text: TokenText) -> P.CompletionChoice:
    """A finished sample as a /v1/completions choice."""
    text = comp.text if choice.shows_output else ""
    lp = None
    if req.logprobs is not None:
        lp = _echo_logprobs(choice, req.logprobs, token_text) if req.echo else None
        if choice.shows_output:
            lp = _completion_logprobs(comp.logprobs or [], choice, token_text, lp)
    depth = _depth(choice, req.echo, comp.depth_attention)
    if depth is not None and not choice.shows_output:
        depth = depth[:choice.num_prompt_tokens]
    return P.CompletionChoice(index=choice.index, text=(choice.prompt_text if req.echo else "") + text,
                              logprobs=lp,
                              finish_reason=comp.finish_reason, stop_reason=comp.stop_reason, depth_attention=depth,
                              prompt_logprobs=prompt_logprobs(choice, req.prompt_logprobs, token_text)
                              if req.prompt_logprobs is not None else None)


def completion_stream_choices(comp: CompletionOutput, choice: Choice, req: P.CompletionRequest,
                              token_text: TokenText) -> list[P.CompletionChoice]:
    """What one delta adds to a /v1/completions stream (nothing, or one choice). With echo and logprobs, the
    prompt's text and logprobs lead the choice's first chunk (the prologue sent nothing for it)."""
    shown = choice.shows_output
    text, lp = comp.text if shown else "", None
    if req.echo and req.logprobs is not None and not choice.echoed and comp.token_ids:
        text, lp, choice.echoed = choice.prompt_text + text, _echo_logprobs(choice, req.logprobs, token_text), True
    if req.logprobs is not None and comp.logprobs and shown:
        lp = _completion_logprobs(comp.logprobs, choice, token_text, lp)
    depth = None
    if req.depth_attention and comp.token_ids:
        depth = _depth(choice, req.echo and not choice.started, comp.depth_attention)
        if depth is not None and not shown:
            depth = depth[:choice.num_prompt_tokens] if not choice.started else None
    choice.started = choice.started or bool(comp.token_ids)
    if not comp.finished and not text and lp is None and depth is None:
        return []
    return [P.CompletionChoice(index=choice.index, text=text, logprobs=lp, finish_reason=comp.finish_reason,
                               stop_reason=comp.stop_reason, depth_attention=depth)]


# ---- /v1/chat/completions -------------------------------------------------------------------------


def _chat_logprobs(lps: Sequence[Logprob], k: int, token_text: TokenText) -> P.ChatLogprobs:
    entries = []
    for lp in lps:
        s, b = token_text(lp.token_id)
        top = [P.TopLogprob(token=token_text(t)[0], logprob=v, bytes=list(token_text(t)[1])) for t, v in lp.top[:k]]
        entries.append(P.ChatLogprobEntry(token=s, logprob=lp.logprob, bytes=list(b), top_logprobs=top))
    return P.ChatLogprobs(content=entries)


def chat_choice(comp: CompletionOutput, choice: Choice, req: P.ChatCompletionRequest,
                token_text: TokenText) -> P.ChatChoice:
    """A finished sample as a /v1/chat/completions choice."""
    lp = _chat_logprobs(comp.logprobs or [], req.top_logprobs or 0, token_text) if req.logprobs else None
    return P.ChatChoice(index=choice.index, message=P.ChatMessageOut(content=comp.text), logprobs=lp,
                        finish_reason=comp.finish_reason, stop_reason=comp.stop_reason,
                        depth_attention=comp.depth_attention)


def chat_stream_choices(comp: CompletionOutput, choice: Choice, req: P.ChatCompletionRequest,
                        token_text: TokenText) -> list[P.ChatStreamChoice]:
    """What one delta adds to a chat stream: a content delta if anything is new, then a final empty
    delta with the finish reason when the sample finished."""
    lp = _chat_logprobs(comp.logprobs, req.top_logprobs or 0, token_text) if req.logprobs and comp.logprobs else None
    depth = comp.depth_attention if req.depth_attention and comp.token_ids else None
    chunks = []
    if comp.text or lp is not None or depth:
        chunks.append(P.ChatStreamChoice(index=choice.index, delta=P.DeltaMessage(content=comp.text),
                                         logprobs=lp, depth_attention=depth))
    if comp.finished:
        chunks.append(P.ChatStreamChoice(index=choice.index, delta=P.DeltaMessage(),
                                         finish_reason=comp.finish_reason))
    return chunks

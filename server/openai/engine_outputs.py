"""The one place where the server reads engine outputs (engine.outputs: RequestOutput, CompletionOutput,
Logprob) and turns them into OpenAI response pieces: a choice per endpoint, a stream choice per endpoint,
usage counts, logprobs.

What the engine gives today: one engine request per choice (the server fans n out, see
serving_engine.OpenAIServing.fan_out), so `out.outputs[0]` is the choice's sample; each RequestOutput
carries both the cumulative fields (text, token_ids, logprobs, depth_attention) and what this step added
(new_text, new_token_ids, new_depth_attention). When the engine switches to vLLM-style deltas and fans
n out itself, adapt the functions here (and `Choice` bookkeeping) and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from engine.outputs import CompletionOutput, Logprob, RequestOutput
from server import protocol as P

# A token as display text and its bytes (serving_engine.Tokens.token_text).
TokenText = Callable[[int], tuple[str, tuple[int, ...]]]


@dataclass
class Choice:
    """What a handler tracks about one choice of a response (today: one engine request)."""

    index: int
    prompt_index: int
    prompt_text: str
    num_prompt_tokens: int
    text_offset: int = 0  # completions logprobs: characters of output before the next token
    final: RequestOutput | None = None  # the finished output, once it came


# ---- any endpoint ---------------------------------------------------------------------------------


def request_id(out: RequestOutput) -> str:
    return out.request_id


def error(out: RequestOutput) -> str | None:
    """The engine's message when this request failed inside a model step."""
    return out.error


def finished(out: RequestOutput) -> bool:
    return out.finished


def num_generated_tokens(out: RequestOutput) -> int:
    return len(_sample(out).token_ids)


def _sample(out: RequestOutput) -> CompletionOutput:
    return out.outputs[0]


def _new_logprobs(comp: CompletionOutput) -> list[Logprob] | None:
    """This step's logprobs (one per new token), or None when there are none."""
    if not comp.new_token_ids or not comp.logprobs:
        return None
    return comp.logprobs[-len(comp.new_token_ids):]


def _depth(out: RequestOutput, echo: bool, generated: list | None) -> list | None:
    """Depth weights of a choice: one entry per forward pass, in token order.

    Without echo: one per generated token (the pass that produced it). With echo: one per prompt
    token (the pass over it; the last one produced the first generated token), then one per later
    generated token.
    """
    if generated is None:
        return None
    if echo and out.prompt_depth_attention is not None:
        return out.prompt_depth_attention + generated[1:]
    return generated


# ---- /v1/completions ------------------------------------------------------------------------------


def _completion_logprobs(lps: Sequence[Logprob], choice: Choice, token_text: TokenText) -> P.CompletionLogprobs:
    out = P.CompletionLogprobs()
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


def completion_choice(out: RequestOutput, choice: Choice, req: P.CompletionRequest,
                      token_text: TokenText) -> P.CompletionChoice:
    """A finished request as a /v1/completions choice."""
    comp = _sample(out)
    lp = _completion_logprobs(comp.logprobs or [], choice, token_text) if req.logprobs is not None else None
    return P.CompletionChoice(index=choice.index, text=(choice.prompt_text if req.echo else "") + comp.text,
                              logprobs=lp, finish_reason=comp.finish_reason, stop_reason=comp.stop_reason,
                              depth_attention=_depth(out, req.echo, comp.depth_attention))


def completion_stream_choices(out: RequestOutput, choice: Choice, req: P.CompletionRequest,
                              token_text: TokenText) -> list[P.CompletionChoice]:
    """What one engine output adds to a /v1/completions stream (nothing, or one choice)."""
    comp = _sample(out)
    new_lps = _new_logprobs(comp) if req.logprobs is not None else None
    lp = _completion_logprobs(new_lps, choice, token_text) if new_lps is not None else None
    depth = None
    if req.depth_attention and comp.new_token_ids:
        first = len(comp.token_ids) == len(comp.new_token_ids)  # echo: prompt passes come first
        depth = _depth(out, req.echo and first, comp.new_depth_attention)
    if not out.finished and not comp.new_text and lp is None and depth is None:
        return []
    return [P.CompletionChoice(index=choice.index, text=comp.new_text, logprobs=lp,
                               finish_reason=comp.finish_reason if out.finished else None,
                               stop_reason=comp.stop_reason if out.finished else None, depth_attention=depth)]


# ---- /v1/chat/completions -------------------------------------------------------------------------


def _chat_logprobs(lps: Sequence[Logprob], k: int, token_text: TokenText) -> P.ChatLogprobs:
    entries = []
    for lp in lps:
        s, b = token_text(lp.token_id)
        top = [P.TopLogprob(token=token_text(t)[0], logprob=v, bytes=list(token_text(t)[1])) for t, v in lp.top[:k]]
        entries.append(P.ChatLogprobEntry(token=s, logprob=lp.logprob, bytes=list(b), top_logprobs=top))
    return P.ChatLogprobs(content=entries)


def chat_choice(out: RequestOutput, choice: Choice, req: P.ChatCompletionRequest,
                token_text: TokenText) -> P.ChatChoice:
    """A finished request as a /v1/chat/completions choice."""
    comp = _sample(out)
    lp = _chat_logprobs(comp.logprobs or [], req.top_logprobs or 0, token_text) if req.logprobs else None
    return P.ChatChoice(index=choice.index, message=P.ChatMessageOut(content=comp.text), logprobs=lp,
                        finish_reason=comp.finish_reason, stop_reason=comp.stop_reason,
                        depth_attention=comp.depth_attention)


def chat_stream_choices(out: RequestOutput, choice: Choice, req: P.ChatCompletionRequest,
                        token_text: TokenText) -> list[P.ChatStreamChoice]:
    """What one engine output adds to a chat stream: a content delta if anything is new, then a final
    empty delta with the finish reason when the request finished."""
    comp = _sample(out)
    new_lps = _new_logprobs(comp) if req.logprobs else None
    lp = _chat_logprobs(new_lps, req.top_logprobs or 0, token_text) if new_lps is not None else None
    depth = comp.new_depth_attention if req.depth_attention and comp.new_token_ids else None
    chunks = []
    if comp.new_text or lp is not None or depth:
        chunks.append(P.ChatStreamChoice(index=choice.index, delta=P.DeltaMessage(content=comp.new_text),
                                         logprobs=lp, depth_attention=depth))
    if out.finished:
        chunks.append(P.ChatStreamChoice(index=choice.index, delta=P.DeltaMessage(),
                                         finish_reason=comp.finish_reason))
    return chunks

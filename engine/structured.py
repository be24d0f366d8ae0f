"""Structured outputs: a grammar per request (JSON schema, regex, choice, EBNF), enforced with a token mask.

The grammar engine is llguidance (loadtest/bench_structured.py measured it against xgrammar; README). A spec
compiles once into a template matcher, cached per spec; each request (each of its n samples) gets a copy that
the scheduler advances with every accepted token. The sampler fills one bitmask row per constrained request
and sets the disallowed logits to -inf before penalties, temperature, top-k and top-p; EOS is in the mask only
where the grammar accepts, and a request whose grammar can take no further token finishes with "stop".
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

import torch

from engine.errors import InvalidParameterError
from models.tokenizer import Tokenizer

MAX_SPEC_CHARS = 64 * 1024  # a schema, regex, grammar or choice list longer than this is refused
MAX_CHOICES = 1024
COMPILE_TIMEOUT_S = 5.0  # a spec that takes longer to compile is refused (llguidance's own limits bound it)
CACHE_SIZE = 256  # compiled specs kept (least recently used out)

KINDS = ("json", "regex", "choice", "grammar", "json_object")


@dataclass(frozen=True)
class StructuredOutputsParams:
    """Exactly one constraint (vLLM's `structured_outputs` fields). `json` is a JSON schema (a dict, or its
    JSON text); `grammar` is Lark (llguidance) or GBNF/EBNF (`root ::= ...`); `json_object` any JSON object."""

    json: str | dict[str, Any] | None = None
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    json_object: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.choice, list):
            object.__setattr__(self, "choice", tuple(self.choice))
        set_ = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(set_) != 1:
            raise InvalidParameterError(
                f"structured_outputs needs exactly one of {', '.join(KINDS)}; got {set_ or 'none'}",
                "structured_outputs")

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    def key(self) -> str:
        """The cache key: the kind and its canonical text."""
        v = getattr(self, self.kind)
        if self.kind == "json" and not isinstance(v, str):
            v = json.dumps(v, sort_keys=True)
        elif self.kind == "choice":
            v = json.dumps(list(v))
        return f"{self.kind}:{v}"

    def grammar_text(self) -> str:
        """The llguidance grammar for this spec; InvalidParameterError naming the kind when it cannot be built
        (a schema that is not JSON, a choice that is not a list of strings, a size over the limits)."""
        from llguidance import LLMatcher, grammar_from

        kind, v = self.kind, getattr(self, self.kind)
        try:
            if kind == "json_object":
                return LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=_JSON_DEFAULTS)
            if kind == "json":
                schema = json.loads(v) if isinstance(v, str) else v
                if not isinstance(schema, dict):
                    raise ValueError(f"a JSON schema is an object, got {type(schema).__name__}")
                _check_size(json.dumps(schema), kind)
                return LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_DEFAULTS)
            if kind == "choice":
                if not v or not all(isinstance(c, str) and c for c in v) or len(v) > MAX_CHOICES:
                    raise ValueError(f"choice must be 1 to {MAX_CHOICES} non-empty strings")
                _check_size(json.dumps(list(v)), kind)
                return grammar_from("choice", json.dumps(list(v)))
            if not isinstance(v, str) or not v:
                raise ValueError(f"{kind} must be a non-empty string")
            _check_size(v, kind)
            if kind == "regex":
                return grammar_from("regex", v)
            return grammar_from("grammar", v)  # Lark as it is, GBNF converted to Lark
        except InvalidParameterError:
            raise
        except (ValueError, TypeError, RecursionError) as e:
            raise InvalidParameterError(f"invalid {kind}: {e}", kind) from e


# Compact JSON (no free whitespace between tokens): what OpenAI's structured outputs produce, and it keeps a
# small model from spending its tokens on blank lines.
_JSON_DEFAULTS: dict[str, Any] = {"whitespace_flexible": False}


def _check_size(text: str, kind: str) -> None:
    if len(text) > MAX_SPEC_CHARS:
        raise InvalidParameterError(
            f"{kind} is {len(text)} characters, more than the {MAX_SPEC_CHARS} this server compiles: simplify it",
            kind)


class _SentencePieceWrapper:
    """llguidance's TokenizerWrapper protocol over a sentencepiece processor: each id's bytes, and a lossless
    tokenize (greedy longest match over those bytes). sentencepiece's own encode adds a dummy-prefix space
    and collapses whitespace, which would make llguidance's forced-text tokens wrong mid-output."""

    is_tokenizer_wrapper = True

    def __init__(self, sp: Any) -> None:
        self.eos_token_id = sp.eos_id()
        self.bos_token_id = sp.bos_id() if sp.bos_id() >= 0 else None
        self.tokens: list[bytes] = []
        self.special_token_ids: list[int] = []
        self._ids: dict[bytes, int] = {}
        for i in range(sp.get_piece_size()):
            piece = sp.id_to_piece(i)
            if sp.is_control(i) or sp.is_unknown(i):
                self.tokens.append(piece.encode())
                self.special_token_ids.append(i)
                continue
            b = bytes([int(piece[3:5], 16)]) if sp.is_byte(i) else piece.replace("\u2581", " ").encode()
            self.tokens.append(b)
            if b:
                self._ids.setdefault(b, i)
        self._longest = max((len(b) for b in self._ids), default=1)
        self._unk = sp.unk_id()

    def __call__(self, s: str | bytes) -> list[int]:
        data = s.encode() if isinstance(s, str) else s
        ids, i = [], 0
        while i < len(data):
            for n in range(min(self._longest, len(data) - i), 0, -1):
                tid = self._ids.get(data[i:i + n])
                if tid is not None:
                    ids.append(tid)
                    i += n
                    break
            else:  # a byte no piece covers (no byte fallback)
                ids.append(self._unk)
                i += 1
        return ids


def ll_tokenizer(tok: Tokenizer, eos_token_ids: tuple[int, ...]) -> Any:
    """An llguidance tokenizer for the engine's tokenizer; EOS is the model's EOS set."""
    from llguidance import LLTokenizer

    eos = list(eos_token_ids) or ([tok.eos_token_id] if tok.eos_token_id is not None else [])
    if tok._sp is not None:
        return LLTokenizer(_SentencePieceWrapper(tok._sp), eos_token=eos or None)
    return LLTokenizer(tok._hf.to_str(), eos_token=eos or None)


class GrammarCompiler:
    """Compiles specs into template matchers (cached per spec, LRU) and hands out fresh copies; thread safe.

    Compiling runs on a worker thread (llguidance drops the GIL) so that a slow spec can be refused after
    COMPILE_TIMEOUT_S; llguidance's parser limits bound what it can cost after that."""

    def __init__(self, tok: Tokenizer, eos_token_ids: tuple[int, ...], vocab_size: int,
                 timeout_s: float = COMPILE_TIMEOUT_S) -> None:
        self.ll_tok = ll_tokenizer(tok, eos_token_ids)
        self.vocab_size = vocab_size  # the logits' width (>= the tokenizer's)
        self.timeout_s = timeout_s
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()
        # a few workers, so that one slow spec does not make the compiles queued behind it time out
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="grammar-compile")

    def matcher(self, spec: StructuredOutputsParams) -> Any:
        """A fresh matcher for `spec`; InvalidParameterError (param: the spec's kind) if it does not compile."""
        key = spec.key()
        with self._lock:
            template = self._cache.get(key)
            if template is not None:
                self._cache.move_to_end(key)
        if template is None:
            template = self._compile(spec)
            with self._lock:
                self._cache[key] = template
                while len(self._cache) > CACHE_SIZE:
                    self._cache.popitem(last=False)
        return template.deep_copy()

    def _compile(self, spec: StructuredOutputsParams) -> Any:
        from llguidance import LLMatcher

        text = spec.grammar_text()
        future = self._pool.submit(LLMatcher, self.ll_tok, text, log_level=0)
        try:
            m = future.result(timeout=self.timeout_s)
        except FutureTimeout:
            raise InvalidParameterError(
                f"{spec.kind} took more than {self.timeout_s:g} s to compile: simplify it", spec.kind) from None
        if m.is_error():
            raise InvalidParameterError(f"invalid {spec.kind}: {_first_line(m.get_error())}", spec.kind)
        return m

    @property
    def cache_size(self) -> int:
        return len(self._cache)


def _first_line(message: str, limit: int = 400) -> str:
    """llguidance errors carry a multi-line source excerpt; the first lines are enough for a client."""
    text = " ".join(line.strip() for line in message.strip().splitlines()[:4] if line.strip())
    return text[:limit]


# ---- masks ---------------------------------------------------------------------------------------------
def fill_bitmask(matchers: list[Any], vocab_size: int) -> torch.Tensor:
    """[S, ceil(V / 32)] int32: bit j of word w of row i set when token 32w + j is allowed for matchers[i]
    (all ones for a row whose matcher is None)."""
    from llguidance.torch import fill_next_token_bitmask

    bm = torch.full((len(matchers), (vocab_size + 31) // 32), -1, dtype=torch.int32)
    for i, m in enumerate(matchers):
        if m is not None:
            if m.is_error():
                raise RuntimeError(f"grammar matcher failed: {_first_line(m.get_error())}")
            fill_next_token_bitmask(m, bm, i)
    return bm


# byte value -> its 8 bits, as "banned" (bit clear): one lookup per mask byte unpacks a bitmask row
_BANNED_BITS = ((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1) == 0  # [256, 8]
_BANNED_ON: dict[torch.device, torch.Tensor] = {}


def _banned_bits(dev: torch.device) -> torch.Tensor:
    table = _BANNED_ON.get(dev)
    if table is None:  # a benign race: two threads may both copy it
        table = _BANNED_ON[dev] = _BANNED_BITS.to(dev)
    return table


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """logits [S, V] in place: -inf where the bitmask [S, W] (W * 32 >= the tokenizer's vocabulary) disallows,
    on the given rows; columns past the mask (vocabulary padding of the model) are disallowed too.

    The int32 words are read as little-endian bytes (token 32w + j is bit j of word w: byte j // 8, bit j % 8)."""
    s, v = logits.shape
    dev = logits.device
    every = len(rows) == s
    bm = (bitmask if every else bitmask[rows]).contiguous()  # [R, W]
    table = _banned_bits(dev)
    banned = table.index_select(0, bm.view(torch.uint8).flatten().to(dev, torch.int32)).view(bm.shape[0], -1)
    if banned.shape[1] < v:  # [R, W * 32] -> [R, V]
        banned = torch.nn.functional.pad(banned, (0, v - banned.shape[1]), value=True)
    banned = banned[:, :v]
    if every:
        logits.masked_fill_(banned, float("-inf"))
        return
    idx = torch.tensor(rows, dtype=torch.long, device=dev)
    logits[idx] = logits[idx].masked_fill_(banned, float("-inf"))

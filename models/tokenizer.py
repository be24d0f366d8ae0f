"""Tokenizers for checkpoint folders: sentencepiece (tokenizer.model) or Hugging Face tokenizer.json.

Also the chat template (tokenizer_config.json `chat_template`, Jinja) and incremental detokenization.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any

from jinja2 import Template
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Used when a checkpoint ships no chat template: plain "role: content" lines.
DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


class Tokenizer:
    """A uniform face over sentencepiece and `tokenizers` backends."""

    def __init__(self, folder: str | Path) -> None:
        folder = Path(folder)
        cfg: dict[str, Any] = {}
        if (folder / "tokenizer_config.json").exists():
            cfg = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        self.chat_template: str | None = cfg.get("chat_template")
        self.add_bos: bool = bool(cfg.get("add_bos_token", True))
        if (folder / "tokenizer.model").exists():
            import sentencepiece as spm

            self._sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
            self._hf = None
            self.vocab_size = self._sp.get_piece_size()
            self.bos_token_id: int | None = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
            self.eos_token_id: int | None = self._sp.eos_id() if self._sp.eos_id() >= 0 else None
            self._special = {i for i in range(self.vocab_size) if self._sp.is_control(i)}
            self.pad_token = self._sp.id_to_piece(self._sp.pad_id()) if self._sp.pad_id() >= 0 else None
        elif (folder / "tokenizer.json").exists():
            from tokenizers import Tokenizer as HFTokenizer

            self._sp = None
            self._hf = HFTokenizer.from_file(str(folder / "tokenizer.json"))
            self.vocab_size = self._hf.get_vocab_size()
            self.bos_token_id = self._token_id(cfg.get("bos_token"))
            self.eos_token_id = self._token_id(cfg.get("eos_token"))
            self._special = set()
            self.add_bos = bool(cfg.get("add_bos_token", False))
            pad = cfg.get("pad_token")
            self.pad_token = pad.get("content") if isinstance(pad, dict) else pad
        else:
            raise FileNotFoundError(
                f"no tokenizer in {folder}: expected tokenizer.model (sentencepiece) or tokenizer.json")
        self.bos_token = self.id_to_token(self.bos_token_id) if self.bos_token_id is not None else ""
        self.eos_token = self.id_to_token(self.eos_token_id) if self.eos_token_id is not None else ""

    @classmethod
    def from_backend(cls, backend: Any, *, bos_token_id: int | None, eos_token_id: int | None, add_bos: bool,
                     chat_template: str | None) -> Tokenizer:
        """Wrap an already built sentencepiece processor or `tokenizers` Tokenizer.

        For checkpoints that carry their tokenizer as data rather than files (GGUF metadata).
        """
        import sentencepiece as spm

        self = cls.__new__(cls)
        is_sp = isinstance(backend, spm.SentencePieceProcessor)
        self._sp, self._hf = (backend, None) if is_sp else (None, backend)
        self.vocab_size = backend.get_piece_size() if is_sp else backend.get_vocab_size()
        self._special = {i for i in range(self.vocab_size) if backend.is_control(i)} if is_sp else set()
        self.pad_token = backend.id_to_piece(backend.pad_id()) if is_sp and backend.pad_id() >= 0 else None
        self.chat_template = chat_template
        self.add_bos = add_bos
        self.bos_token_id, self.eos_token_id = bos_token_id, eos_token_id
        self.bos_token = self.id_to_token(bos_token_id) if bos_token_id is not None else ""
        self.eos_token = self.id_to_token(eos_token_id) if eos_token_id is not None else ""
        return self

    def _token_id(self, tok: Any) -> int | None:
        if isinstance(tok, dict):
            tok = tok.get("content")
        if not tok or self._hf is None:
            return None
        return self._hf.token_to_id(tok)

    def id_to_token(self, i: int) -> str:
        return self._sp.id_to_piece(i) if self._sp is not None else (self._hf.id_to_token(i) or "")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special-token text in it ("<s>") becomes that token's id, as Hugging Face
        tokenizers do (sentencepiece alone would spell it out in ordinary pieces)."""
        if self._sp is not None:
            ids = self._sp_encode(text)
        else:
            ids = self._hf.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return ids

    @functools.cached_property
    def _special_text(self) -> tuple[re.Pattern[str] | None, dict[str, int]]:
        """sentencepiece: a pattern matching the text of any control or unknown piece, and each one's id."""
        sp = self._sp
        ids = {sp.id_to_piece(i): i for i in sorted(self._special | ({sp.unk_id()} if sp.unk_id() >= 0 else set()))}
        if not ids:
            return None, ids
        return re.compile("|".join(re.escape(p) for p in sorted(ids, key=len, reverse=True))), ids

    def _sp_encode(self, text: str) -> list[int]:
        pattern, special = self._special_text
        if pattern is None or pattern.search(text) is None:
            return list(self._sp.encode(text))
        ids: list[int] = []
        at = 0
        for m in pattern.finditer(text):
            if m.start() > at:
                ids += self._sp.encode(text[at:m.start()])
            ids.append(special[m.group()])
            at = m.end()
        if at < len(text):
            ids += self._sp.encode(text[at:])
        return ids

    @property
    def is_sentencepiece(self) -> bool:
        return self._sp is not None

    @property
    def unk_token(self) -> str | None:
        if self._sp is not None:
            return self._sp.id_to_piece(self._sp.unk_id()) if self._sp.unk_id() >= 0 else None
        return None

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        ids = [i for i in ids if 0 <= i < self.vocab_size]
        if self._sp is not None:
            if skip_special_tokens:
                ids = [i for i in ids if i not in self._special]
            return self._sp.decode(ids)
        return self._hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tools: list[dict[str, Any]] | None = None) -> str:
        """Render messages with the checkpoint's template (or DEFAULT_CHAT_TEMPLATE), compiled once."""
        return self._compiled_template().render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                bos_token=self.bos_token, eos_token=self.eos_token, tools=tools)

    @property
    def template_knows_tools(self) -> bool:
        """The chat template renders `tools` itself (else the server writes them into a system message)."""
        return bool(self.chat_template) and "tools" in self.chat_template

    def _compiled_template(self) -> Template:
        template = getattr(self, "_template", None)
        if template is None:  # a benign race between threads: both compile the same template
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

            def raise_exception(msg: str) -> None:
                raise ValueError(msg)

            env.globals["raise_exception"] = raise_exception
            template = self._template = env.from_string(self.chat_template or DEFAULT_CHAT_TEMPLATE)
        return template

    @functools.cached_property
    def max_token_chars(self) -> int:
        """Characters the longest vocabulary entry can decode to (an upper bound, read off the pieces)."""
        return max((len(self.id_to_token(i)) for i in range(self.vocab_size)), default=1) or 1


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas without re-decoding everything.

    Decodes a short window (a few tokens of context + the new ones) so that word-initial spaces and
    multi-byte characters come out right; holds text back while it ends in an incomplete character,
    but for at most MAX_HELD_TOKENS tokens: a UTF-8 character is at most 4 bytes, so a longer run that
    still ends in U+FFFD is really invalid bytes, released as U+FFFD. The window stays bounded.
    """

    CONTEXT_TOKENS = 6
    MAX_HELD_TOKENS = 4

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True) -> None:
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids = list(prompt_ids[-self.CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def add(self, new_ids: list[int]) -> str:
        """Append token ids; return the newly completed text."""
        self.ids.extend(new_ids)
        prefix = self.tok.decode(self.ids[self.prefix_offset:self.read_offset], self.skip)
        full = self.tok.decode(self.ids[self.prefix_offset:], self.skip)
        held = len(self.ids) - self.read_offset
        if len(full) <= len(prefix) or (full.endswith("\ufffd") and held < self.MAX_HELD_TOKENS):
            return ""
        return self._advance(full[len(prefix):])

    def flush(self) -> str:
        """At the end of a request: whatever was held back, incomplete characters included."""
        prefix = self.tok.decode(self.ids[self.prefix_offset:self.read_offset], self.skip)
        full = self.tok.decode(self.ids[self.prefix_offset:], self.skip)
        return self._advance(full[len(prefix):] if len(full) > len(prefix) else "")

    def _advance(self, delta: str) -> str:
        """Everything up to here is emitted: the next decode starts from the last tokens only."""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        if self.prefix_offset > self.CONTEXT_TOKENS:  # drop ids no later decode can need
            drop = self.prefix_offset
            self.ids = self.ids[drop:]
            self.prefix_offset, self.read_offset = 0, self.read_offset - drop
        return delta

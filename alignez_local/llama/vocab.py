"""Tokens and text: tokenizing, token pieces and detokenizing through llama.cpp's vocabulary."""

from __future__ import annotations

import ctypes
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import llama_cpp.llama_cpp as C

from alignez_local.errors import AlignezError

# Tokens that only the markup of a prompt may produce: with special parsing on, their text in a
# prompt becomes the token itself (llama.cpp's parse_special covers exactly these two kinds).
_SPECIAL_ATTRS = C.LLAMA_TOKEN_ATTR_CONTROL | C.LLAMA_TOKEN_ATTR_UNKNOWN
# llama.cpp's isspace(): the whitespace an LSTRIP/RSTRIP token swallows beside it.
_C_SPACE = "[ \t\n\v\f\r]*"


class PromptTooLong(AlignezError):
    """A prompt has more tokens than the caller's limit (tokenizing stopped once it was clear)."""

    def __init__(self, at_least: int, limit: int) -> None:
        super().__init__(f"the prompt has more than {limit} tokens (at least {at_least})")
        self.at_least = at_least
        self.limit = limit


@dataclass(frozen=True)
class _Specials:
    """The vocabulary's control and unknown tokens, found once by a scan of every token."""

    ids: frozenset[int]
    by_text: dict[str, int]
    pattern: re.Pattern[str] | None  # one alternation, longest text first, as llama.cpp matches
    max_piece_bytes: int | None  # the longest token text in bytes; None where no such bound holds


class Vocab:
    """The vocabulary of a loaded model (valid while the model is)."""

    def __init__(self, model: Any) -> None:
        self.ptr = C.llama_model_get_vocab(model)
        self._buf = ctypes.create_string_buffer(64)  # reused by piece_bytes: one token at a time
        self.n_tokens = int(C.llama_vocab_n_tokens(self.ptr))
        self.add_bos = bool(C.llama_vocab_get_add_bos(self.ptr))
        self.bos = int(C.llama_vocab_bos(self.ptr))
        self.bos_text = self.piece(self.bos, special=True) if self.add_bos else ""
        self.eos_text = self.piece(C.llama_vocab_eos(self.ptr), special=True)

    def tokenize(self, text: str, add_bos: bool = True, special: bool = True) -> list[int]:
        """Return the token ids of ``text``, BOS added when the model wants it (and the text does not
        already start with it). ``special``: the text of a control token (``<|im_end|>``) becomes
        that token; False keeps it as plain text, which is how text from users must be read."""
        data = text.encode("utf-8")
        add = add_bos and self.add_bos and not (special and self.bos_text and text.startswith(self.bos_text))
        n_max = len(data) + 8
        buf = (C.llama_token * n_max)()
        n = C.llama_tokenize(self.ptr, data, len(data), buf, n_max, add, special)
        if n < 0:
            n_max = -n
            buf = (C.llama_token * n_max)()
            n = C.llama_tokenize(self.ptr, data, len(data), buf, n_max, add, special)
        return list(buf[:n])

    @cached_property
    def _specials(self) -> _Specials:
        # One pass over the vocabulary (about 0.1 s for 50k tokens), done on first use only: the
        # server needs it, the pipeline's engines do not.
        ids: set[int] = set()
        by_text: dict[str, int] = {}
        patterns: list[tuple[int, str]] = []
        longest = 1
        # Every token of a byte-level BPE or a SentencePiece vocabulary stands for the bytes of its
        # piece, one at least (unknown bytes become byte tokens, or one unknown token each), so a
        # text is at least len(bytes) / longest tokens. Not so for WordPiece and Unigram vocabularies
        # (a whole unknown word is one token) nor beside a token that swallows the whitespace next
        # to it (LSTRIP/RSTRIP): there the bound is None.
        bounded = int(C.llama_vocab_type(self.ptr)) in (C.LLAMA_VOCAB_TYPE_SPM, C.LLAMA_VOCAB_TYPE_BPE)
        for t in range(self.n_tokens):
            piece = self.piece_bytes(t, special=True)
            longest = max(longest, len(piece))
            attr = int(C.llama_vocab_get_attr(self.ptr, t))
            if attr & (C.LLAMA_TOKEN_ATTR_LSTRIP | C.LLAMA_TOKEN_ATTR_RSTRIP):
                bounded = False
            if not attr & _SPECIAL_ATTRS:
                continue
            raw = C.llama_vocab_get_text(self.ptr, t)  # the text llama.cpp matches (an unknown token's piece differs)
            if not raw:
                continue
            ids.add(t)
            longest = max(longest, len(raw))
            text = raw.decode("utf-8", "replace")
            if text in by_text:
                continue
            by_text[text] = t
            lstrip = _C_SPACE if attr & C.LLAMA_TOKEN_ATTR_LSTRIP else ""
            rstrip = _C_SPACE if attr & C.LLAMA_TOKEN_ATTR_RSTRIP else ""
            patterns.append((len(piece), f"{lstrip}({re.escape(text)}){rstrip}"))
        patterns.sort(key=lambda p: -p[0])
        pattern = re.compile("|".join(p for _, p in patterns)) if patterns else None
        return _Specials(frozenset(ids), by_text, pattern, longest if bounded else None)

    @property
    def special_ids(self) -> frozenset[int]:
        """Return the ids of the control and unknown tokens (those special parsing can produce)."""
        return self._specials.ids

    @property
    def special_texts(self) -> list[str]:
        """Return the text of each control and unknown token, longest first."""
        return sorted(self._specials.by_text, key=len, reverse=True)

    @property
    def max_piece_bytes(self) -> int | None:
        """Return the longest token text in bytes: a text of B bytes is at least B / this many tokens
        (None for vocabularies where no such bound holds)."""
        return self._specials.max_piece_bytes

    def tokenize_parts(self, parts: Iterable[tuple[str, bool]], add_bos: bool = True, limit: int | None = None) -> list[int]:
        """Return the token ids of the concatenated ``parts``, each ``(text, special)``: control-token
        text in a part with ``special`` True becomes the control token, in the others it stays text.

        This is ``tokenize(whole, special=True)`` when no plain part holds control-token text:
        llama.cpp also cuts the text at control tokens first and tokenizes each stretch between them
        alone, so a plain part and the template text around it are tokenized together here too.
        (Two control texts that overlap are matched leftmost first here, longest first in llama.cpp;
        no template has such pairs.) Stretches are tokenized one by one, which keeps text with many
        markers linear (llama.cpp's own partition is quadratic in them: 10,000 markers take 5 s), and
        lets a ``limit`` stop the work as soon as the count is over it (``PromptTooLong``).
        """
        sp = self._specials
        items: list[str | int] = []  # plain text, or a control token id
        for text, special in parts:
            if not special or sp.pattern is None:
                items.append(text)
                continue
            pos = 0
            for m in sp.pattern.finditer(text):
                items.append(text[pos:m.start()])
                items.append(sp.by_text[next(g for g in m.groups() if g is not None)])
                pos = m.end()
            items.append(text[pos:])
        out: list[int] = []
        first = next((it for it in items if it != ""), None)
        if add_bos and self.add_bos and first != self.bos:  # a prompt that starts with BOS keeps just that one
            out.append(self.bos)
        run: list[str] = []

        def flush() -> None:
            text = "".join(run)
            run.clear()
            if text:
                out.extend(self.tokenize(text, add_bos=False, special=False))
                if limit is not None and len(out) > limit:
                    raise PromptTooLong(len(out), limit)

        for it in items:
            if isinstance(it, str):
                run.append(it)
            else:
                flush()
                out.append(it)
                if limit is not None and len(out) > limit:
                    raise PromptTooLong(len(out), limit)
        flush()
        return out

    def piece_bytes(self, token: int, special: bool = False) -> bytes:
        """Return the raw bytes of one token (a piece may be part of a UTF-8 character)."""
        buf = self._buf
        n = C.llama_token_to_piece(self.ptr, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = C.llama_token_to_piece(self.ptr, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    def piece(self, token: int, special: bool = False) -> str:
        """Return the text of one token."""
        return self.piece_bytes(token, special).decode("utf-8", "replace")

    def detokenize(self, tokens: Sequence[int]) -> str:
        """Return the text of ``tokens`` (special tokens left out)."""
        return b"".join(self.piece_bytes(t) for t in tokens).decode("utf-8", "replace")

    def is_eog(self, token: int) -> bool:
        """True for end-of-generation tokens (EOS, EOT...)."""
        return bool(C.llama_vocab_is_eog(self.ptr, token))

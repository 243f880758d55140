"""Tokens and text: tokenizing, token pieces and detokenizing through llama.cpp's vocabulary."""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import Any

import llama_cpp.llama_cpp as C


class Vocab:
    """The vocabulary of a loaded model (valid while the model is)."""

    def __init__(self, model: Any) -> None:
        self.ptr = C.llama_model_get_vocab(model)
        self._buf = ctypes.create_string_buffer(64)  # reused by piece_bytes: one token at a time
        self.n_tokens = int(C.llama_vocab_n_tokens(self.ptr))
        self.add_bos = bool(C.llama_vocab_get_add_bos(self.ptr))
        self.bos_text = self.piece(C.llama_vocab_bos(self.ptr), special=True) if self.add_bos else ""
        self.eos_text = self.piece(C.llama_vocab_eos(self.ptr), special=True)

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        """Return the token ids of ``text``, special tokens parsed, BOS added when the model wants
        it (and the text does not already start with it)."""
        data = text.encode("utf-8")
        add = add_bos and self.add_bos and not (self.bos_text and text.startswith(self.bos_text))
        n_max = len(data) + 8
        buf = (C.llama_token * n_max)()
        n = C.llama_tokenize(self.ptr, data, len(data), buf, n_max, add, True)
        if n < 0:
            n_max = -n
            buf = (C.llama_token * n_max)()
            n = C.llama_tokenize(self.ptr, data, len(data), buf, n_max, add, True)
        return list(buf[:n])

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

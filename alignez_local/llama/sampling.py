"""Public value types of generation (``Sampling``, ``Completion``, ``TokenLogprob``, ``TokenFn``) and
the llama.cpp sampler chain built from a ``Sampling``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import llama_cpp.llama_cpp as C

from alignez_local.errors import AlignezError

# on_token(prompt index, new text): streams text as soon as it is decided.
TokenFn = Callable[[int, str], None]


@dataclass(frozen=True)
class Sampling:
    """Sampling settings shared by every command that generates text.

    Messages name the parameters (``temperature``, ``top_p``...); a CLI maps them to its flags.
    """

    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int = 0
    max_tokens: int = 128
    repeat_penalty: float = 1.0  # 1 = off
    stop: tuple[str, ...] = ()

    def check(self) -> "Sampling":
        """Return self after checking every value is in range (AlignezError otherwise)."""
        if not (0.0 <= self.temperature <= 5.0):
            raise AlignezError(f"temperature {self.temperature} is out of range; use 0 (greedy) to 5")
        if not (0.0 < self.top_p <= 1.0):
            raise AlignezError(f"top_p {self.top_p} is out of range; use a value in (0, 1]")
        if self.top_k < 0:
            raise AlignezError(f"top_k {self.top_k} is negative; use 0 (off) or a positive count")
        if not (0 <= self.seed < 2**32 - 1):
            raise AlignezError(f"seed {self.seed} is out of range; use 0 to {2**32 - 2}")
        if not (1 <= self.max_tokens <= 32768):
            raise AlignezError(f"max_tokens {self.max_tokens} is out of range; use 1 to 32768")
        if not (0.5 <= self.repeat_penalty <= 3.0):
            raise AlignezError(f"repeat_penalty {self.repeat_penalty} is out of range; use 0.5 to 3")
        return self


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token with its log-probability and the most likely tokens of the same step
    (recorded only for sequences that ask: ``Seq.n_top``).

    Log-probabilities are the log-softmax of the raw logits of that sequence at that step, under
    its steering, before temperature, top-k/top-p and repeat penalty (the model's own
    distribution, as OpenAI reports it). Token bytes are the pieces with special tokens spelled
    out (``<|im_end|>``), so an alternative that is a control token is readable.
    """

    token: int
    bytes: bytes
    logprob: float
    offset: int  # where the token's text starts in the answer text (characters)
    top: tuple[tuple[int, bytes, float], ...] = ()  # (token, bytes, logprob), most likely first


@dataclass
class Completion:
    """One generated answer.

    ``token_logprobs[i]`` is the log-probability the model gave generated token i: the
    log-softmax of its raw logits (under the steering in force, before any sampler transform such
    as temperature, top-p or repeat penalty). For an unsteered answer that is the perplexity data
    without a second pass over the text.
    """

    text: str
    n_tokens: int
    finish_reason: str  # "stop" (EOG token or stop string), "length", "interrupted"
    n_prompt_tokens: int
    token_logprobs: np.ndarray = field(default_factory=lambda: np.zeros(0))
    tokens: list[int] = field(default_factory=list)  # the generated token ids
    # Per token the text shows (a stop string's tokens left out), with the top alternatives;
    # None unless the sequence asked for them (``Seq.n_top``).
    top_logprobs: list[TokenLogprob] | None = None


def make_sampler(sp: Sampling, n_vocab: int) -> Any:
    """Return a new llama.cpp sampler chain for ``sp`` (the caller frees it)."""
    chain = C.llama_sampler_chain_init(C.llama_sampler_chain_default_params())
    if sp.repeat_penalty != 1.0:
        C.llama_sampler_chain_add(chain, C.llama_sampler_init_penalties(n_vocab, 64, sp.repeat_penalty, 0.0, 0.0))
    if sp.temperature <= 0:
        C.llama_sampler_chain_add(chain, C.llama_sampler_init_greedy())
    else:
        if sp.top_k > 0:
            C.llama_sampler_chain_add(chain, C.llama_sampler_init_top_k(sp.top_k))
        if sp.top_p < 1.0:
            C.llama_sampler_chain_add(chain, C.llama_sampler_init_top_p(sp.top_p, 1))
        C.llama_sampler_chain_add(chain, C.llama_sampler_init_temp(sp.temperature))
        C.llama_sampler_chain_add(chain, C.llama_sampler_init_dist(sp.seed))
    return chain

"""The Python API on the tiny model: what ``vector.apply`` adds is what the runtime's steering adds,
bit for bit; a gated vector refuses the block form; bad input is one clear error."""

from __future__ import annotations

import numpy as np
import pytest

import alignez_local as az
from alignez_local.align.steering import Steering
from alignez_local.errors import AlignezError
from alignez_local.formats.gate import Gate
from alignez_local.llama.engine import Engine

PAIRS = [("Name a fruit.", "Une pomme.", "An apple."), ("Say hello.", "Bonjour !", "Hello!"),
         ("Describe the sea.", "La mer est bleue.", "The sea is blue.")]


def test_apply_adds_what_steering_adds(tiny_engine: Engine) -> None:
    vector = az.train(tiny_engine, PAIRS, name="french")
    assert vector.layers and all(1 <= L < tiny_engine.n_layer for L in vector.layers)
    prompts = [tiny_engine.prompt(q) for q, _, _ in PAIRS]
    plain = tiny_engine.next_token_logits(prompts)
    with vector.apply(tiny_engine, 0.5):
        applied = tiny_engine.next_token_logits(prompts)
    with Steering.vector(vector, 0.5).applied(tiny_engine, prompts):
        steered = tiny_engine.next_token_logits(prompts)
    assert not np.array_equal(applied, plain)
    assert np.array_equal(applied, steered)
    after = tiny_engine.next_token_logits(prompts)  # the block leaves nothing behind
    assert np.array_equal(after, plain)


def test_generate_with_a_vector_matches_the_block(tiny_engine: Engine) -> None:
    vector = az.train(tiny_engine, PAIRS, name="french")
    with vector.apply(tiny_engine, 0.5):
        inside = az.generate(tiny_engine, "Name a colour.", max_tokens=12)
    assert az.generate(tiny_engine, "Name a colour.", vector, 0.5, max_tokens=12) == inside


def test_a_gated_vector_is_not_applied_as_a_block(tiny_engine: Engine) -> None:
    vector = az.train(tiny_engine, PAIRS, name="french")
    unit = np.zeros(tiny_engine.n_embd, dtype=np.float32)
    unit[0] = 1.0
    gated = az.ControlVector(dict(vector.directions), model_hint=vector.model_hint, name="gated",
                             gate=Gate(layer=1, direction=unit, threshold=0.0))
    with pytest.raises(AlignezError, match="gated"):
        with gated.apply(tiny_engine, 1.0):
            pass


def test_bad_input_is_one_clear_error(tiny_engine: Engine) -> None:
    with pytest.raises(AlignezError, match="at least one"):
        az.train(tiny_engine, [])
    with pytest.raises(AlignezError, match="out of range"):
        az.train(tiny_engine, PAIRS, layers=[0])
    vector = az.train(tiny_engine, PAIRS)
    with pytest.raises(AlignezError, match="out of range"):
        with vector.apply(tiny_engine, 1e9):
            pass
    with pytest.raises(AlignezError, match="both"):
        az.resolve_axis(positive="pirate-like")


def test_the_api_and_the_cli_share_their_defaults() -> None:
    """`alignez steer` with no options and `az.steer(engine)` make the same pairs and the same fit."""
    from alignez_local.align.preferences import GenerationSettings
    from alignez_local.align.vectors import FitSettings
    from alignez_local.apps.cli_align import _fit, _generation, steer

    defaults = steer.make_context("steer", []).params  # what the command receives with no options
    gen = _generation(**{k: defaults[k] for k in ("responses", "response_tokens", "temperature", "seed")})
    fit = _fit(**{k: defaults[k] for k in ("method", "site", "pool", "layers", "variance", "max_cos", "top_n", "self_check",
                                           "behaviour_filter", "flip_inverted")})
    assert gen == GenerationSettings()
    assert fit == FitSettings()
    assert defaults["judge"] == "auto" and defaults["strengths"] is None and defaults["calibrate_profile"] is False

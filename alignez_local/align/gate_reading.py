"""Reading a prompt's gates: the unsteered state at each gate layer, at the last prompt token, and
the decision the prompt gets read ALONE, reached without reading every prompt alone.

Why alone, and why that was costly: ``align/steering.py``'s module docstring. ``read_alone`` is the
decision's definition (one capture per prompt, batch-independent); ``read_gates`` reads a batch in
one capture that stops at the deepest gate layer and reads again alone only the prompts whose
outcome a batch could have moved (``near_threshold``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from alignez_local.formats.gate import GATE_SITE, Gates
from alignez_local.llama.engine import Engine

__all__ = ["BATCH_MARGIN", "BATCH_RESCALE", "near_threshold", "read_alone", "read_gates"]


# How far a prompt's state may move between read in a batch and read alone (llama.cpp sums in an
# order that depends on the batch and its shared prefix). Measured (docs/performance.md, "Gates read
# in a batch"): 483 prompts (built-in risky and benign requests, the evaluation prompts), each read
# alone and in batches of 16 and 48, with and without the shared prefix, at the recipe's candidate
# layers of Qwen2.5-Coder-0.5B and SmolLM2-135M. The move is mostly a rescaling of the state
# (dx = alpha x + r: |alpha| up to 0.57% on Qwen, 1.11% on SmolLM2) and a rest whose projection on
# a unit direction stayed under 0.30% (Qwen) and 0.44% (SmolLM2) of the state's norm. So a
# projection p counts as moved by at most BATCH_RESCALE x |p| + BATCH_MARGIN x |x| x |direction|:
# the largest move seen was 0.90 of that on SmolLM2 (along mean differences of random prompt sets;
# its shipped gate, a mean difference, 0.82), 0.59 on Qwen (its shipped gate 0.23), and 0.49 along
# shrinkage-LDA directions like the ones we fit. A prompt nearer a threshold is read again alone.
BATCH_MARGIN = 5e-3
BATCH_RESCALE = 0.02


def read_gates(engine: Engine, prompts: Sequence[str], gate_sets: Sequence[Gates]) -> np.ndarray:
    """Return (prompts x gate sets) bools: do the gates of each set open on each prompt, decided
    exactly as the prompt read ALONE decides (``read_alone``: batch-independent).

    The prompts are read together, in one capture that stops at the deepest gate layer; the
    prompts ``near_threshold`` marks are read again alone and decided from that. A prompt given
    twice is read once; one prompt is already read alone.
    """
    if not prompts or not gate_sets:
        return np.zeros((len(prompts), len(gate_sets)), dtype=bool)
    layers = sorted({L for gs in gate_sets for L in gs.layers})
    uniq = list(dict.fromkeys(prompts))
    together = engine.capture(uniq, layers, site=GATE_SITE)
    states = {L: together[:, j] for j, L in enumerate(layers)}
    decided = np.stack([gs.opens(states) for gs in gate_sets], axis=1)
    near = near_threshold(states, gate_sets) if len(uniq) > 1 else np.zeros(0, dtype=np.int64)
    if len(near):
        alone = read_alone(engine, [uniq[i] for i in near], layers)
        again = {L: alone[:, j] for j, L in enumerate(layers)}
        decided[near] = np.stack([gs.opens(again) for gs in gate_sets], axis=1)
    row = {p: i for i, p in enumerate(uniq)}
    return decided[[row[p] for p in prompts]]


def near_threshold(states: Mapping[int, np.ndarray], gate_sets: Sequence[Gates]) -> np.ndarray:
    """Return the indices of the prompts (rows of ``states[layer]``, read in a batch) on which some
    set's outcome rests on a projection the batch may have moved across its threshold."""
    margin = {L: BATCH_MARGIN * np.linalg.norm(x.astype(np.float64), axis=1) for L, x in states.items()}
    sure = np.stack([gs.decide(states, margin, BATCH_RESCALE)[1] for gs in gate_sets], axis=1)
    return np.flatnonzero(~sure.all(axis=1))


def read_alone(engine: Engine, prompts: Sequence[str], layers: Sequence[int]) -> np.ndarray:
    """Return the unsteered ``l_out`` states (prompts x layers x n_embd) at each prompt's last token,
    each prompt decoded ALONE: batch-independent, so a gate decides the same for a prompt whatever
    it is batched with (a prompt given twice is read once)."""
    uniq = list(dict.fromkeys(prompts))
    read = {p: engine.capture([p], layers, site=GATE_SITE)[0] for p in uniq}
    if not prompts:
        return np.zeros((0, len(layers), engine.n_embd), dtype=np.float32)
    return np.stack([read[p] for p in prompts])

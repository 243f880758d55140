"""Reading a prompt's gates: the unsteered state at each gate layer, at the last prompt token, and
the decision the prompt gets read ALONE, reached without reading every prompt alone.

Why alone, and why that was costly: ``align/steering.py``'s module docstring. ``read_alone`` is the
decision's definition (one capture per prompt, batch-independent); ``read_gates`` reads a batch in
one capture that stops at the deepest gate layer and reads again alone only the prompts whose
outcome a batch could have moved (``BATCH_MARGIN``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from alignez_local.formats.gate import GATE_SITE, Gates
from alignez_local.llama.engine import Engine

__all__ = ["BATCH_MARGIN", "read_alone", "read_gates"]


# How far a gate projection may move between a prompt read in a batch and read alone, as a share
# of the state's norm (times the direction's norm). Measured (docs/performance.md, "Gates read in a
# batch"): Qwen2.5-Coder-0.5B, 483 prompts (built-in risky and benign requests, the evaluation
# prompts) at layers 6-12, read in batches of 16, 48 and 128 with and without the shared prefix
# against each read alone: the state moved by up to 1.55% of its norm, but its projection on a unit
# direction (batches of 16 and 48) by at most 0.13% of the norm along the shipped gate's, 0.19%
# along shrinkage-LDA directions like the ones we fit, 0.15% along random ones and 0.33% along plain
# mean differences.
# The margin is 1.5x the largest of those; a prompt nearer its threshold is read again alone.
BATCH_MARGIN = 5e-3


def read_gates(engine: Engine, prompts: Sequence[str], gate_sets: Sequence[Gates]) -> np.ndarray:
    """Return (prompts x gate sets) bools: do the gates of each set open on each prompt, decided
    exactly as the prompt read ALONE decides (``read_alone``: batch-independent).

    The prompts are read together, in one capture that stops at the deepest gate layer; the prompts
    on which some set's outcome rests on a projection within ``BATCH_MARGIN`` of its threshold are
    read again alone and decided from that. A prompt given twice is read once; one prompt is
    already read alone.
    """
    out = np.zeros((len(prompts), len(gate_sets)), dtype=bool)
    if not prompts or not gate_sets:
        return out
    layers = sorted({L for gs in gate_sets for L in gs.layers})
    uniq = list(dict.fromkeys(prompts))
    together = engine.capture(uniq, layers, site=GATE_SITE)
    states = {L: together[:, j] for j, L in enumerate(layers)}
    if len(uniq) == 1:
        decided = np.stack([gs.opens(states) for gs in gate_sets], axis=1)
    else:
        margin = {L: BATCH_MARGIN * np.linalg.norm(x.astype(np.float64), axis=1) for L, x in states.items()}
        both = [gs.decide(states, margin) for gs in gate_sets]
        decided = np.stack([d for d, _ in both], axis=1)
        near = np.flatnonzero(~np.all(np.stack([sure for _, sure in both], axis=1), axis=1))
        if len(near):
            alone = read_alone(engine, [uniq[i] for i in near], layers)
            again = {L: alone[:, j] for j, L in enumerate(layers)}
            decided[near] = np.stack([gs.opens(again) for gs in gate_sets], axis=1)
    row = {p: i for i, p in enumerate(uniq)}
    return decided[[row[p] for p in prompts]]


def read_alone(engine: Engine, prompts: Sequence[str], layers: Sequence[int]) -> np.ndarray:
    """Return the unsteered ``l_out`` states (prompts x layers x n_embd) at each prompt's last token,
    each prompt decoded ALONE: batch-independent, so a gate decides the same for a prompt whatever
    it is batched with (a prompt given twice is read once)."""
    uniq = list(dict.fromkeys(prompts))
    read = {p: engine.capture([p], layers, site=GATE_SITE)[0] for p in uniq}
    if not prompts:
        return np.zeros((0, len(layers), engine.n_embd), dtype=np.float32)
    return np.stack([read[p] for p in prompts])

"""``alignez eval``'s behaviour table: the figures ``steer`` reports, for any steering files.

On the run's evaluation prompts (ordinary requests; harmful ones for a refusal measure), every
condition side by side, scored by the axis's own measure (``measures.behaviour``) with the same
guards and the same ``BehaviourBench`` as ``steer``'s calibration:

- unsteered; prompting (the positive persona as system prompt: the ceiling);
- for every loaded vector and profile, a random direction of the same per-layer norms (a random
  subspace with as many directions, for a profile) at the same strength: the null;
- every file alone at its strength, and all of them together when there are several.

The axis comes from the files (``axis_of``: the name or the personas they were made for) or from
``--behaviour AXIS``. Nothing here is judged against the unsteered answer: each answer is scored on
its own, so the table reads the same way as the net-win figures do not.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from alignez_local.align.axes import BUILTIN_AXES, PreferenceAxis, stored_axis
from alignez_local.align.calibrate_behaviour import BehaviourBench, unsteered_nll
from alignez_local.align.directions import random_like, random_subspaces_like
from alignez_local.align.steering import ProfileSlot, Steering, VectorSlot
from alignez_local.errors import AlignezError
from alignez_local.measures.scoring import Scorer
from alignez_local.measures.behaviour import YesNoJudge, measure_for
from alignez_local.formats.control_vector import ControlVector
from alignez_local.llama.engine import Engine, Sampling


def axis_of(steering: Steering) -> PreferenceAxis | None:
    """Return the axis the first loaded file was made for: a built-in axis by name, else a custom one
    from its personas; None when the file does not say (e.g. a vector from another tool)."""
    for slot in steering.slots:
        if isinstance(slot, ProfileSlot):
            name, pos, neg, measure = (str(slot.profile.axis.get(k, "")) for k in ("name", "positive", "negative", "measure"))
        else:
            meta = slot.vector.metadata
            name, pos, neg, measure = (str(meta.get(k, "")) for k in ("alignez.axis", "alignez.axis.positive",
                                                                       "alignez.axis.negative", "alignez.axis.measure"))
        axis = stored_axis(name, pos, neg, measure)
        if axis is not None:
            return axis
    return None


def resolve_axis_name(name: str, steering: Steering) -> PreferenceAxis | None:
    """Return the axis of ``--behaviour NAME``: ``auto`` reads the files, ``off`` is None."""
    if name == "off":
        return None
    if name == "auto":
        return axis_of(steering)
    if name not in BUILTIN_AXES:
        raise AlignezError(f"--behaviour {name!r} is not a built-in axis; use one of {', '.join(BUILTIN_AXES)}, auto or off")
    return BUILTIN_AXES[name]


def null_steering(steering: Steering, seed: int = 0) -> dict[str, Steering]:
    """Return, per loaded file, a random direction (or subspace) of the same size at the same strength."""
    out: dict[str, Steering] = {}
    for i, slot in enumerate(steering.slots):
        if isinstance(slot, VectorSlot):
            noise = ControlVector(random_like({L: slot.vector.directions[L] for L in slot.vector.layers}, seed + 1 + i),
                                  model_hint=slot.vector.model_hint, name="random")
            out[f"random direction ({slot.name} x{slot.strength:g})"] = Steering(
                vectors=[VectorSlot("random", noise, slot.strength)], layer_range=steering.layer_range)
        else:
            rand = dataclasses.replace(slot.profile, subspaces=random_subspaces_like(dict(slot.profile.subspaces), seed + 1 + i),
                                       name="random")
            out[f"random subspace ({slot.name} x{slot.strength:g})"] = Steering(
                profiles=[ProfileSlot("random", rand, slot.strength)], layer_range=steering.layer_range, top_n=steering.top_n)
    return out


def behaviour_table(engine: Engine, steering: Steering, axis: PreferenceAxis, questions: Sequence[str],
                    judge: YesNoJudge | None, sampling: Sampling, seed: int = 0) -> dict[str, Any]:
    """Return the measure and the side-by-side summaries on ``questions`` (module docstring)."""
    if not questions:
        raise AlignezError("the behaviour table needs evaluation prompts; check --kinds and --limit")
    scorer = Scorer(measure_for(axis.measure, axis.positive, axis.negative), unsteered_nll(engine), judge,
                    nll_asked=unsteered_nll(engine, axis.guide("positive")))
    bench = BehaviourBench(engine, scorer, axis.guide("positive"), [], list(dict.fromkeys(questions)), sampling=sampling)
    alone = {f"{'vector' if isinstance(s, VectorSlot) else 'profile'} {s.name} x{s.strength:g}":
             Steering(vectors=[s] if isinstance(s, VectorSlot) else [], profiles=[s] if isinstance(s, ProfileSlot) else [],
                      layer_range=steering.layer_range, top_n=steering.top_n)
             for s in steering.slots}
    if len(steering.slots) > 1:
        alone["all together"] = steering
    table = bench.side_by_side(alone, null_steering(steering, seed), seed)
    return {"axis": axis.name, "measure": scorer.measure.describe(), "n_prompts": len(bench.report),
            "max_tokens": sampling.max_tokens, "conditions": table}


def table_lines(result: dict[str, Any]) -> list[str]:
    """Return the table as text lines."""
    lines = [f"behaviour ({result['measure']['label']}) on {result['n_prompts']} prompts:",
             f"  {'condition':<40} {'behaviour':>16} {'relevance':>10} {'fluency':>8} {'combined':>9}"]
    for name, row in result["conditions"].items():
        b = row["behaviour_rate"]
        lines.append(f"  {name:<40} {100 * b['mean']:>5.0f}% [{100 * b['ci95'][0]:>3.0f}-{100 * b['ci95'][1]:>3.0f}] "
                     f"{row['relevance']['mean']:>10.2f} {row['fluency']['mean']:>8.2f} {row['combined']['mean']:>9.2f}")
    return lines

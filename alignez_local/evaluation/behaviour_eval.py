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

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from alignez_local.align.axes import BUILTIN_AXES, PreferenceAxis, stored_axis
from alignez_local.align.steering import ProfileSlot, Steering, VectorSlot
from alignez_local.align.behaviour_bench import axis_bench
from alignez_local.align.strength_by_behaviour import random_null
from alignez_local.errors import AlignezError
from alignez_local.evaluation.judge import Judge, open_judge
from alignez_local.measures.behaviour import YesNoJudge, measure_for
from alignez_local.settings import RuntimeSettings
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


JUDGE_RUNTIME = RuntimeSettings(n_ctx=4096, parallel=4)
"""A behaviour run's judge reads short yes/no prompts: a small context and batch suffice."""


@contextmanager
def behaviour_judge(name: str, engine: Engine, axis: PreferenceAxis) -> Iterator[Judge | None]:
    """Yield the judge a behaviour run on ``axis`` reads with (``judge.open_judge``: ``name`` auto,
    self, none or a model; None where the axis's measure needs none), on ``engine``'s threads, and
    close it after unless it is ``engine`` itself."""
    needs = measure_for(axis.measure, axis.positive, axis.negative).needs_judge
    judge = open_judge(name, engine, JUDGE_RUNTIME.with_(threads=engine.n_threads), needs=needs)
    try:
        yield judge
    finally:
        if judge is not None and judge.engine is not engine:
            judge.close()


def prompt_kind(axis: PreferenceAxis) -> str:
    """Return the kind of evaluation prompt a behaviour is read on: harmful requests for a refusal
    measure, ordinary ones otherwise."""
    return "harmful" if axis.measure == "refusal" else "helpful"


def null_steering(steering: Steering, seed: int = 0) -> dict[str, Steering]:
    """Return, per loaded file, a random direction (or subspace) of the same size at the same strength."""
    return {f"random {'direction' if isinstance(slot, VectorSlot) else 'subspace'} ({slot.name} x{slot.strength:g})":
            random_null(slot, seed + 1 + i, steering.layer_range, steering.top_n)
            for i, slot in enumerate(steering.slots)}


def measure_behaviour(engine: Engine, steering: Steering, axis: PreferenceAxis, questions: Sequence[str],
                    judge: YesNoJudge | None, sampling: Sampling, seed: int = 0) -> dict[str, Any]:
    """Return the measure and the side-by-side summaries on ``questions`` (module docstring)."""
    if not questions:
        raise AlignezError("the behaviour table needs evaluation prompts; check --kinds and --limit")
    bench = axis_bench(engine, axis, judge, [], list(dict.fromkeys(questions)), sampling)
    alone = {f"{'vector' if isinstance(s, VectorSlot) else 'profile'} {s.name} x{s.strength:g}":
             Steering(vectors=[s] if isinstance(s, VectorSlot) else [], profiles=[s] if isinstance(s, ProfileSlot) else [],
                      layer_range=steering.layer_range, top_n=steering.top_n)
             for s in steering.slots}
    if len(steering.slots) > 1:
        alone["all together"] = steering
    table = bench.side_by_side(alone, null_steering(steering, seed), seed)
    return {"axis": axis.name, "measure": bench.scorer.measure.describe(), "n_prompts": len(bench.report),
            "max_tokens": sampling.max_tokens, "conditions": table}

"""From preference pairs to steering files: the fit's settings, the profile and the difference of
means from one capture, the mean-diff control vector, and a profile's exported constant vector.

Numbers come from ``fit.py`` (capture, per-layer directions) and ``directions.py``; this module
decides which pairs go in (the self-check rule, then the behaviour filter) and how the two files
are built from them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from alignez_local.align.axes import stored_axis
from alignez_local.align.directions import mean_difference
from alignez_local.align.export import ApproximationReport, approximation_report, constant_vector
from alignez_local.align.fit import DEFAULT_POOL, capture_layers, capture_pairs, default_pool, fit_profile
from alignez_local.align.pair_filter import MIN_PAIRS, filter_line, keep_contrasting
from alignez_local.align.preferences import PreferencePair, load_records, load_selected_pairs
from alignez_local.align.selfcheck import quality_line, select_pairs
from alignez_local.align.variants import VARIANT_KEY, Variant, check_variants
from alignez_local.errors import AlignezError
from alignez_local.formats.control_vector import META_N_LAYER, ControlVector
from alignez_local.formats.profile import SteeringProfile
from alignez_local.llama.engine import Engine
from alignez_local.measures.behaviour import Measure, measure_for
from alignez_local.models import ModelId
from alignez_local.prompt_sets import heldout_prompts
from alignez_local.progress import Notify, quiet
from alignez_local.specs import parse_layer_list



@dataclass(frozen=True)
class FitSettings:
    """How a profile is fitted (the fit command's options)."""

    method: str = "svd"
    # The residual stream: where a control vector is added, so the difference of means read there is
    # the vector itself; one capture serves the profile and the vector (ffn_out: the paper's site).
    site: str = "l_out"
    pool: str | None = DEFAULT_POOL  # last token, mean over the answer, or None: by the kind of pairs
    layers: str | Sequence[int] | None = None  # "8-20", "4,8,12", a list, or None/"auto": choose
    variance: float = 0.90
    max_cos: float | None = None  # None: the paper's 0.8 for last-token pooling, no filter for mean (fit.too_similar_cos)
    top_n: int = 5
    seed: int = 0
    flip: bool = False  # swap pairs the model's self-check judged inverted, instead of dropping them
    # Fit only on pairs whose positive answer shows the behaviour and negative does not, by the
    # axis's objective checker (align/pair_filter.py; no effect for judge-read axes).
    behaviour_filter: bool = True
    self_check: bool = True  # False: fit on every pair that is not a refusal, whatever the model's check said
    # The control vector: "mean-diff" (the difference of the pairs' mean states, per layer, on
    # ``vector_layers``: CAA) or "profile" (the exact edit's average delta, method.md §4).
    vector_from: str = "mean-diff"
    vector_layers: str | Sequence[int] | None = None  # None: the middle third of the layers

    def vector_layer_list(self, n_layer: int) -> list[int]:
        """Return the layers the mean-diff vector steers: those given, else the middle third."""
        given = self.vector_layers
        if isinstance(given, str) or given is None:
            return parse_layer_list(given, n_layer) or middle_layers(n_layer)
        return list(given)

VECTOR_SOURCES = ("mean-diff", "profile")

def middle_layers(n_layer: int) -> list[int]:
    """Return the middle third of the layers, where a behaviour's difference of means steered Qwen
    0.5B (layers 8-15 of 24: docs/results.md §10); early layers carry tokens, late ones the output."""
    return list(range(n_layer // 3, max(n_layer // 3 + 1, (2 * n_layer) // 3)))

def data_quality(prefs: str | Path, axis: str | None = None) -> dict[str, Any]:
    """Return the self-check rule's counts over a preference file (``selfcheck.quality_line`` prints them)."""
    return select_pairs(load_records(prefs, axis))[3]

def fit_from_file(engine: Engine, prefs: str | Path, fit: FitSettings, model: ModelId,
                  axis: str | None = None, name: str = "profile", on_status: Notify = quiet) -> SteeringProfile:
    """Return a profile fitted on the pairs in ``prefs`` (only those of ``axis`` when given) that
    pass the self-check rule (align/selfcheck.py) and, where the axis has an objective checker,
    show the behaviour's contrast (align/pair_filter.py); the data-quality lines go to ``on_status``."""
    return fit_with_difference(engine, prefs, fit, model, axis, name, on_status).profile

def pairs_measure(pair: PreferencePair) -> Measure:
    """Return the behaviour measure of the axis a stored pair was written for: a built-in axis's own,
    else what its two personas name (a language persona is read by the language identifier)."""
    pos, neg = pair.personas
    try:
        axis = stored_axis(pair.axis, pos, neg)
    except AlignezError:
        axis = None  # personas a custom axis would refuse
    if axis is None:
        return measure_for("", pos, neg)  # the judge's reading: no pair filter
    return measure_for(axis.measure or "", axis.positive, axis.negative)

@dataclass(frozen=True)
class PairFit:
    """A profile fitted on the selected pairs and, from the same capture, what the vectors are cut from."""

    profile: SteeringProfile
    pool: str  # how the fit read each answer's state (fit.POOLS)
    # pool -> the difference of the pairs' mean states per layer (n_layer x n_embd: the ``mean-diff``
    # control vector before layer choice); ``pool`` always, other pools when asked (variants.py).
    differences: dict[str, np.ndarray]
    # pool -> the plain (negative) answers' mean state per layer (where a clamp vector's floor is read).
    plain_means: dict[str, np.ndarray]

    @property
    def difference(self) -> np.ndarray:
        return self.differences[self.pool]

    @property
    def plain_mean(self) -> np.ndarray:
        return self.plain_means[self.pool]


def fit_with_difference(engine: Engine, prefs: str | Path, fit: FitSettings, model: ModelId, axis: str | None = None,
                        name: str = "profile", on_status: Notify = quiet,
                        measure: Measure | None = None, other_pools: Sequence[str] = (),
                        other_layers: Sequence[int] = ()) -> PairFit:
    """Return ``fit_from_file``'s profile and, from the same capture, the difference of the pairs'
    mean states per layer and the plain answers' mean state (``PairFit``). ``measure``: the axis's
    behaviour measure for the pair filter (None: the pairs' own axis's). ``other_pools``: pools to
    read the same pairs again in (one capture each), for the vector's variants (variants.py);
    ``other_layers``: layers those variants steer, read too."""
    pairs, quality = load_selected_pairs(prefs, axis, flip=fit.flip, use_check=fit.self_check)
    on_status(quality_line(quality))
    filtered: dict[str, Any] = {}
    if fit.behaviour_filter:
        measure = measure or pairs_measure(pairs[0])
        pairs, filtered = keep_contrasting(pairs, measure)
        on_status(filter_line(filtered))
        quality = {**quality, "behaviour_filter": filtered}
    layers = fit.layers
    if isinstance(layers, str) or layers is None:
        layers = parse_layer_list(layers, engine.n_layer)
    persona = {"name": pairs[0].axis, "positive": pairs[0].personas[0], "negative": pairs[0].personas[1]}
    pool = fit.pool or default_pool(pairs)
    named = [*(layers or ()), *fit.vector_layer_list(engine.n_layer), *other_layers]
    pos, neg = capture_pairs(engine, pairs, fit.site, pool=pool, layers=capture_layers(engine.n_layer, named))
    try:
        prof = fit_profile(engine, pairs, persona, method=fit.method, site=fit.site, pool=pool,
                           layers=list(layers) if layers else None, variance=fit.variance, max_cos=fit.max_cos,
                           seed=fit.seed, top_n=fit.top_n, model_sha256=model.sha256, model_bundled=model.bundled,
                           name=name, captured=(pos, neg))
    except AlignezError as err:
        if filtered.get("contrasting", MIN_PAIRS) < MIN_PAIRS and measure is not None:
            # Too-similar pairs from a model that never wrote the behaviour: --max-cos is not the cure.
            raise AlignezError(
                f"no direction to fit: the model's own answers show the behaviour ({measure.label}) in "
                f"{filtered['positive_shows']} of {filtered['total']} pairs when asked for it, and its two answers "
                f"hardly differ ({str(err).split(';')[0]}); it does not act this behaviour out (see the screen line): "
                "try a larger model or personas it follows") from None
        raise
    captured = {pool: (pos, neg)}
    for other in dict.fromkeys(p for p in other_pools if p != pool):
        captured[other] = capture_pairs(engine, pairs, fit.site, pool=other, layers=capture_layers(engine.n_layer, named))
    differences = {p: mean_difference(a, b) for p, (a, b) in captured.items()}
    plain_means = {p: np.asarray(b, dtype=np.float64).mean(axis=0) for p, (_, b) in captured.items()}
    return PairFit(dataclasses.replace(prof, provenance={**prof.provenance, "data_quality": dict(quality)}), pool,
                   differences, plain_means)

def mean_diff_vector(engine: Engine, difference: np.ndarray, layers: Sequence[int], profile: SteeringProfile,
                     name: str) -> ControlVector:
    """Return the control vector made of ``difference`` (n_layer x n_embd) on ``layers``, with the
    profile's provenance (axis, data, model) in its metadata."""
    return difference_vector(engine, difference, layers, name, profile.site, profile.axis, profile.provenance)


def difference_vector(engine: Engine, difference: np.ndarray, layers: Sequence[int], name: str, site: str = "l_out",
                      axis: Mapping[str, Any] | None = None, provenance: Mapping[str, Any] | None = None) -> ControlVector:
    """Return the control vector made of ``difference`` (n_layer x n_embd) on ``layers``; ``axis``
    (name, personas, measure) and ``provenance`` (model and data SHA-256) go into its metadata."""
    axis, provenance = axis or {}, provenance or {}
    meta = {"alignez.source": f"mean-diff:{site}", "alignez.axis": str(axis.get("name", name)),
            "alignez.axis.positive": str(axis.get("positive", "")),
            "alignez.axis.negative": str(axis.get("negative", "")),
            **({"alignez.axis.measure": str(axis["measure"])} if axis.get("measure") else {}),
            META_N_LAYER: engine.n_layer, "alignez.model.sha256": str(provenance.get("model_sha256", "")),
            "alignez.data.sha256": str(provenance.get("data_sha256", ""))}
    return ControlVector({int(L): difference[L].astype(np.float32) for L in layers}, model_hint=engine.arch,
                         metadata=meta, name=name)


def train_vector(engine: Engine, pairs: Sequence[PreferencePair], layers: Sequence[int] | None = None,
                 name: str = "vector", pool: str = "mean", site: str = "l_out",
                 axis: Mapping[str, Any] | None = None) -> ControlVector:
    """Return the difference-of-means control vector of ``pairs`` held in memory (no file, no
    filter, no self-check): the mean state over each positive answer minus the negative's, on
    ``layers`` (None: the middle third). What ``steer`` builds from its own pairs, for pairs you
    wrote yourself."""
    if not pairs:
        raise AlignezError("training a vector needs at least one (query, positive answer, negative answer) pair")
    chosen = list(layers) if layers is not None else middle_layers(engine.n_layer)
    bad = [L for L in chosen if not 1 <= L < engine.n_layer]
    if bad:
        raise AlignezError(f"layers {bad} are out of range; the model has layers 1..{engine.n_layer - 1}")
    pos, neg = capture_pairs(engine, pairs, site, pool=pool, layers=capture_layers(engine.n_layer, chosen))
    return difference_vector(engine, mean_difference(pos, neg), chosen, name, site, axis or {"name": name})


def export_vector(engine: Engine, profile: SteeringProfile, calibration: Sequence[str], top_n: int | None = None,
                  on_warning: Notify = quiet) -> tuple[ControlVector, ApproximationReport]:
    """Return the control vector approximating ``profile`` over the ``calibration`` queries, and how
    close it is to the exact edit on held-out prompts. ``top_n`` None: the profile's own."""
    for w in profile.check_compatible(engine.n_layer, engine.n_embd, engine.arch):
        on_warning(w)
    n = int(top_n or profile.params.get("top_n", 5))
    cv = constant_vector(engine, profile, [engine.prompt(q) for q in calibration], top_n=n)
    return cv, approximation_report(engine, profile, cv, heldout_prompts(engine), top_n=n)


def variant_vectors(engine: Engine, variants: Sequence[Variant], fitted: PairFit, default_layers: Sequence[int],
                    profile: SteeringProfile, name: str) -> dict[str, tuple[ControlVector, dict[int, np.ndarray]]]:
    """Return each variant's mean-diff vector and the plain answers' mean state per layer read the
    same way (a clamp's floor), by the variant's name; the vector's metadata names the variant."""
    check_variants(variants, fitted.pool, default_layers, engine.n_layer)
    out: dict[str, tuple[ControlVector, dict[int, np.ndarray]]] = {}
    for v in (v for v in variants if not v.scan):  # a scan's vector is made once its layer is found
        pool = v.pool or fitted.pool
        cv = mean_diff_vector(engine, fitted.differences[pool], v.layer_list(engine.n_layer, default_layers), profile, name)
        out[v.name] = (dataclasses.replace(cv, metadata={**cv.metadata, VARIANT_KEY: v.name}),
                       dict(enumerate(fitted.plain_means[pool])))
    return out

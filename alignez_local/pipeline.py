"""The AlignEZ pipeline as plain functions: what the CLI commands call, and what a server or a
notebook calls the same way.

    generate_preferences (align.preferences) -> fit_from_file -> export_vector, or run_steer for all three;
    import_vector (a vector from another tool) and describe (what a GGUF file is).

Every step takes an open Engine (``settings.open_engine``) and never prints: progress lines go to
an ``on_status`` callback and warnings to ``on_warning``. Provenance names a model by its bundled
name (when it was given by name), its file name and its SHA-256, never by a local path.
"""

from __future__ import annotations

import dataclasses
import resource
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from alignez_local.align.axes import PreferenceAxis, stored_axis
from alignez_local.align.calibrate import Baseline, Calibration, calibrate_refusals, calibrate_strength, unsteered_baseline
from alignez_local.align.calibrate_behaviour import (
    CHOOSE_QUERIES, REPORT_QUERIES, STRENGTHS, BehaviourBench, BehaviourCalibration, calibrate_behaviour, screen_line,
    split_heldout, unsteered_nll,
)
from alignez_local.align.directions import mean_difference, random_like, random_subspaces_like
from alignez_local.align.recipes import DEFAULT_RECIPE, get_recipe
from alignez_local.align.export import ApproximationReport, approximation_report, constant_vector
from alignez_local.align.fit import DEFAULT_POOL, capture_layers, capture_pairs, default_pool, fit_profile
from alignez_local.align.request_contrast import RequestContrast, candidate_layers, fit_request_contrast
from alignez_local.align.pair_filter import MIN_PAIRS, filter_line, keep_contrasting
from alignez_local.align.preferences import (
    GenerationSettings, PreferencePair, generate_preferences, load_records, load_selected_pairs,
)
from alignez_local.align.selfcheck import quality_line, select_pairs
from alignez_local.align.steering import ProfileSlot, Steering, VectorSlot, read_alone
from alignez_local.errors import AlignezError
from alignez_local.measures.behaviour import Measure, YesNoJudge, measure_for
from alignez_local.measures.scoring import Scorer
from alignez_local.evaluation.prompt_sets import load_eval_prompts, load_queries, load_request_kinds
from alignez_local.fileio import check_writable, write_json
from alignez_local.formats.control_vector import (
    GATE_SITE, META_N_LAYER, ControlVector, read_control_vector, write_control_vector,
)
from alignez_local.formats.gguf_file import read_gguf
from alignez_local.formats.kinds import gguf_kind
from alignez_local.formats.profile import SteeringProfile, load_profile, save_profile
from alignez_local.measures.refusal import is_refusal
from alignez_local.llama.engine import Engine, Sampling
from alignez_local.models import BUNDLED, file_sha256, resolve_model
from alignez_local.progress import Progress
from alignez_local.specs import parse_layer_list

# Held-out prompts for the approximation report: the built-in evaluation set, written apart from
# the generation queries.
HELDOUT_PROMPTS = 16
# steer's default query count: enough pairs for a difference of means and a subspace, and on the
# default model (Qwen 0.5B) the whole run, calibration included, stays under 15 minutes on 2 cores.
STEER_QUERIES = 64
# export's default number of calibration queries.
EXPORT_QUERIES = 64
# Held-out queries the default strength is calibrated on (see align/calibrate.py): enough to pool
# about 500 answer tokens per strength, few enough that calibrating both files costs about a minute.
CALIBRATION_PROMPTS = 12

Notify = Callable[[str], None]


def _quiet(_msg: str) -> None:
    pass


class Interrupted(KeyboardInterrupt):
    """Ctrl-C inside a step: still a KeyboardInterrupt, and it says what was saved and what running
    the step again does (the CLI turns it into one line)."""

    def __init__(self, saved: str, resume: str) -> None:
        super().__init__(f"{saved}; run again to {resume}")
        self.saved, self.resume = saved, resume


@dataclass(frozen=True)
class ModelId:
    """What identifies a model in provenance: bundled name (None for a file), file name, SHA-256."""

    bundled: str | None
    file: str
    sha256: str
    arch: str
    n_layer: int
    n_embd: int

    @classmethod
    def of(cls, engine: Engine, given: str | Path | None = None) -> "ModelId":
        """Return the identity of ``engine``'s model; ``given`` is what the user named it with."""
        bundled = str(given) if given is not None and str(given) in BUNDLED else None
        return cls(bundled, engine.path.name, file_sha256(engine.path), engine.arch, engine.n_layer, engine.n_embd)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.bundled, "file": self.file, "sha256": self.sha256, "arch": self.arch,
                "n_layer": self.n_layer, "n_embd": self.n_embd}


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


def select_queries(queries_file: str | None = None, limit: int | None = None, axis: str | None = None) -> list[str]:
    """Return the generation queries (a file or the axis's built-in set), the first ``limit`` of them."""
    qs = load_queries(queries_file, axis=axis)
    return qs[:limit] if limit else qs


def calibration_prompts(engine: Engine, axis: str | None, used: Sequence[str], n: int = CALIBRATION_PROMPTS) -> list[str]:
    """Return ``n`` held-out prompts for calibrating a strength, formatted for ``engine``.

    They are built-in queries of the axis the run did not generate from (the last ones of the set),
    so the strength is chosen on prompts the direction was not fitted on, and never on the
    evaluation prompts that later judge it. When the run used them all, the general set's unused
    queries fill in; only when none is left do the evaluation prompts serve.
    """
    taken = set(used)
    spare: list[str] = []
    for source in (axis, None):
        spare += [q for q in load_queries(None, axis=source) if q not in taken and q not in spare]
        if len(spare) >= n:
            break
    texts = spare[-n:] if spare else [p.text for p in load_eval_prompts(kinds={"helpful"})[:n]]
    return [engine.prompt(q) for q in texts]


def heldout_prompts(engine: Engine) -> list[str]:
    """Return the held-out prompts the approximation report is measured on, formatted for ``engine``."""
    return [engine.prompt(p.text) for p in load_eval_prompts(kinds={"helpful"})[:HELDOUT_PROMPTS]]


def generate(engine: Engine, queries: Sequence[str], axis: PreferenceAxis, out: str | Path,
             settings: GenerationSettings, model: ModelId, recipe: str | None = None) -> tuple[int, int]:
    """Append the model's own preference pairs to ``out``; return (written now, already there).
    ``recipe`` None: the default recipe (align/recipes.py)."""
    try:
        return generate_preferences(engine, list(queries), axis, Path(out), settings, model.sha256, recipe=recipe)
    except KeyboardInterrupt:
        raise Interrupted(f"every finished pair is saved in {out}", "continue where it stopped") from None


def data_quality(prefs: str | Path, axis: str | None = None) -> dict[str, Any]:
    """Return the self-check rule's counts over a preference file (``selfcheck.quality_line`` prints them)."""
    return select_pairs(load_records(prefs, axis))[3]


def fit_from_file(engine: Engine, prefs: str | Path, fit: FitSettings, model: ModelId,
                  axis: str | None = None, name: str = "profile", on_status: Notify = _quiet) -> SteeringProfile:
    """Return a profile fitted on the pairs in ``prefs`` (only those of ``axis`` when given) that
    pass the self-check rule (align/selfcheck.py) and, where the axis has an objective checker,
    show the behaviour's contrast (align/pair_filter.py); the data-quality lines go to ``on_status``."""
    return fit_with_difference(engine, prefs, fit, model, axis, name, on_status)[0]


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


def fit_with_difference(engine: Engine, prefs: str | Path, fit: FitSettings, model: ModelId, axis: str | None = None,
                        name: str = "profile", on_status: Notify = _quiet,
                        measure: Measure | None = None) -> tuple[SteeringProfile, np.ndarray]:
    """Return ``fit_from_file``'s profile and, from the same capture, the difference of the pairs'
    mean states per layer (n_layer x n_embd: the ``mean-diff`` control vector before layer choice).
    ``measure``: the axis's behaviour measure for the pair filter (None: the pairs' own axis's)."""
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
    named = [*(layers or ()), *fit.vector_layer_list(engine.n_layer)]
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
    return dataclasses.replace(prof, provenance={**prof.provenance, "data_quality": dict(quality)}), mean_difference(pos, neg)


def mean_diff_vector(engine: Engine, difference: np.ndarray, layers: Sequence[int], profile: SteeringProfile,
                     name: str) -> ControlVector:
    """Return the control vector made of ``difference`` (n_layer x n_embd) on ``layers``, with the
    profile's provenance (axis, data, model) in its metadata."""
    meta = {"alignez.source": f"mean-diff:{profile.site}", "alignez.axis": str(profile.axis.get("name", name)),
            "alignez.axis.positive": str(profile.axis.get("positive", "")),
            "alignez.axis.negative": str(profile.axis.get("negative", "")),
            **({"alignez.axis.measure": str(profile.axis["measure"])} if profile.axis.get("measure") else {}),
            META_N_LAYER: engine.n_layer, "alignez.model.sha256": str(profile.provenance.get("model_sha256", "")),
            "alignez.data.sha256": str(profile.provenance.get("data_sha256", ""))}
    return ControlVector({int(L): difference[L].astype(np.float32) for L in layers}, model_hint=engine.arch,
                         metadata=meta, name=name)


def export_vector(engine: Engine, profile: SteeringProfile, calibration: Sequence[str], top_n: int | None = None,
                  on_warning: Notify = _quiet) -> tuple[ControlVector, ApproximationReport]:
    """Return the control vector approximating ``profile`` over the ``calibration`` queries, and how
    close it is to the exact edit on held-out prompts. ``top_n`` None: the profile's own."""
    for w in profile.check_compatible(engine.n_layer, engine.n_embd, engine.arch):
        on_warning(w)
    n = int(top_n or profile.params.get("top_n", 5))
    cv = constant_vector(engine, profile, [engine.prompt(q) for q in calibration], top_n=n)
    return cv, approximation_report(engine, profile, cv, heldout_prompts(engine), top_n=n)


def model_facts(path: str | Path) -> dict[str, Any]:
    """Return a model file's arch, name, layer count, width and whether it has a chat template,
    read from its header by our own bounded parser (the model is not loaded)."""
    meta = read_gguf(path, want_data=False, want_arrays=False).metadata
    arch = str(meta.get("general.architecture", ""))
    return {"arch": arch, "name": meta.get("general.name"), "n_layer": meta.get(f"{arch}.block_count"),
            "n_embd": meta.get(f"{arch}.embedding_length"), "chat_template": "tokenizer.chat_template" in meta}


def import_vector(path: str | Path, out: str | Path, model: str | None = None,
                  on_warning: Notify = _quiet) -> ControlVector:
    """Check a control vector from another tool (against ``model`` when given) and write a clean copy
    to ``out`` that keeps the directions and layers exactly and records where it came from."""
    out = check_writable(out)
    cv = read_control_vector(path)
    if model is not None:
        facts = model_facts(resolve_model(model))
        for w in cv.check_compatible(int(facts["n_layer"] or 0), int(facts["n_embd"] or 0), facts["arch"]):
            on_warning(w)
    copy = dataclasses.replace(cv, metadata={**cv.metadata, "alignez.source": f"import:{Path(path).name}"})
    write_control_vector(out, copy)
    return copy


def describe(path: str | Path) -> dict[str, Any]:
    """Return what a GGUF file is (control vector, profile or model) and its main facts."""
    path = str(path)
    kind = gguf_kind(path)
    if kind == "control-vector":
        return {"kind": kind, "path": path, **_plain(read_control_vector(path).describe())}
    if kind == "profile":
        p = load_profile(path)
        return {"kind": kind, "path": path, "method": p.method, "site": p.site, "axis": dict(p.axis),
                "layers": p.layers, "k": {L: int(s.shape[0]) for L, s in p.subspaces.items()},
                "default_strength": p.default_strength, "calibration": _plain(p.calibration),
                "params": dict(p.params), "provenance": _plain(p.provenance),
                "layer_stats": {L: dict(s) for L, s in p.layer_stats.items()}}
    return {"kind": kind, "path": path, **model_facts(path)}


def calibrate_profile(engine: Engine, profile: SteeringProfile, prompts: Sequence[str], top_n: int | None = None,
                      on_status: Notify = _quiet, baseline: Baseline | None = None) -> SteeringProfile:
    """Return ``profile`` with its calibrated default strength (and the evidence) stored.
    ``baseline``: the unsteered model's measurements on ``prompts``, when already taken."""
    n = int(top_n or profile.params.get("top_n", 5))
    cal = calibrate_strength(engine, lambda s: Steering(profiles=[ProfileSlot(profile.name, profile, s)], top_n=n), prompts,
                             baseline=baseline)
    on_status(cal.line("profile"))
    return _calibrated(profile, cal)


def calibrate_vector(engine: Engine, vector: ControlVector, prompts: Sequence[str], on_status: Notify = _quiet,
                     baseline: Baseline | None = None) -> ControlVector:
    """Return ``vector`` with its calibrated default strength (and the evidence) stored.
    ``baseline``: the unsteered model's measurements on ``prompts``, when already taken."""
    cal = calibrate_strength(engine, lambda s: Steering(vectors=[VectorSlot(vector.name, vector, s)]), prompts, baseline=baseline)
    on_status(cal.line("vector"))
    return _calibrated(vector, cal)


def _calibrated(obj: Any, cal: Calibration) -> Any:
    return dataclasses.replace(obj, default_strength=cal.strength, calibration=cal.as_dict())


@dataclass(frozen=True)
class SteerPaths:
    """The files one steer run writes into its folder."""

    folder: Path
    preferences: Path
    profile: Path
    vector: Path
    report: Path

    @classmethod
    def prepare(cls, folder: str | Path) -> "SteerPaths":
        """Return the paths in ``folder`` (created), each checked writable before any work starts."""
        out = Path(folder)
        if out.exists() and not out.is_dir():
            raise AlignezError(f"output folder {out} is a file; give a folder")
        out.mkdir(parents=True, exist_ok=True)
        paths = cls(out, out / "preferences.jsonl", out / "profile.gguf", out / "vector.gguf", out / "report.json")
        for p in (paths.preferences, paths.profile, paths.vector, paths.report):
            check_writable(p)
        return paths


@dataclass
class SteerResult:
    """What one steer run made: its files, the profile (with its fit diagnostics), the vector, the
    approximation report, the behaviour calibrations, pair counts and timings (seconds)."""

    paths: SteerPaths
    profile: SteeringProfile
    vector: ControlVector
    approximation: ApproximationReport
    pairs_written: int
    pairs_had: int
    timings: dict[str, float] = field(default_factory=dict)
    recipe: str = DEFAULT_RECIPE
    calibration: dict[str, BehaviourCalibration] = field(default_factory=dict)
    costs: dict[str, dict[str, float]] = field(default_factory=dict)  # per stage: tokens, peak RSS (StageClock)


def heldout_queries(axis: str | None, used: Sequence[str]) -> list[str]:
    """Return the built-in queries of ``axis`` (then of the general set) that ``used`` does not hold,
    in file order: the pool the behaviour is calibrated and reported on."""
    taken, spare = set(used), []
    for source in (axis, None):
        spare += [q for q in load_queries(None, axis=source) if q not in taken and q not in spare]
    return spare


def behaviour_bench(engine: Engine, axis: PreferenceAxis, used: Sequence[str], judge: YesNoJudge | None,
                    heldout: Sequence[str] | None = None, n_choose: int = CHOOSE_QUERIES,
                    n_report: int = REPORT_QUERIES) -> BehaviourBench:
    """Return the bench a steer run screens, calibrates and reports on: the axis's measure
    (``measures.behaviour.measure_for``), and held-out queries split into a choose half and a
    report half (``heldout`` None: built-in queries not in ``used``)."""
    pool = list(heldout) if heldout is not None else heldout_queries(axis.name, used)
    choose, report = split_heldout([q for q in pool if q not in set(used)], n_choose, n_report)
    scorer = Scorer(measure_for(axis.measure, axis.positive, axis.negative), unsteered_nll(engine), judge,
                    nll_asked=unsteered_nll(engine, axis.guide("positive")))
    return BehaviourBench(engine, scorer, axis.guide("positive"), choose, report)


def screen(bench: BehaviourBench, model_name: str) -> tuple[str, bool, dict[str, Any]]:
    """Return the screening line, whether the prompting ceiling is low, and its record: does the
    model show the behaviour when simply asked (on the choose half; its answers are reused later)?"""
    prompting, unsteered = bench.fixed("prompting", "choose"), bench.fixed("unsteered", "choose")
    line, low = screen_line(model_name, bench.scorer.measure.label, prompting, unsteered)
    return line, low, {"prompting": prompting.summary(), "unsteered": unsteered.summary(), "low_ceiling": low}


def run_steer(engine: Engine, axis: PreferenceAxis, queries: Sequence[str], folder: str | Path,
              generation: GenerationSettings, fit: FitSettings, model: ModelId,
              on_status: Notify = _quiet, recipe: str | None = None, bench: BehaviourBench | None = None,
              judge: YesNoJudge | None = None, strengths: Sequence[float] = STRENGTHS,
              with_profile: bool = True, clock: StageClock | None = None, refine: bool = True) -> SteerResult:
    """Generate preference pairs, fit a profile and a control vector into ``folder``, then choose
    both files' default strengths by the behaviour (align/calibrate_behaviour.py) on held-out
    queries, reported beside unsteered, prompting and a random direction.

    Re-running continues from the saved pairs. Writes preferences.jsonl, profile.gguf, vector.gguf
    and report.json (the provenance of the run and the behaviour report). ``bench``: one already
    screened (``behaviour_bench``, ``screen``); None builds it with ``judge``. ``with_profile``
    False skips the profile's calibration (its file keeps no default strength): the experiments
    compare vector recipes at half the cost. ``clock``: the caller's, when it timed stages of its
    own first (the screening); the stages here are added to it.
    """
    paths = SteerPaths.prepare(folder)
    clock = clock or StageClock(engine)
    if fit.vector_from not in VECTOR_SOURCES:
        raise AlignezError(f"unknown vector source {fit.vector_from!r}; use one of {', '.join(VECTOR_SOURCES)}")
    bench = bench or behaviour_bench(engine, axis, queries, judge)
    written, had = generate(engine, queries, axis, paths.preferences, generation, model, recipe)
    clock.lap("generate_s")
    on_status(f"{paths.preferences}: {written} new pairs, {had} already there")
    try:
        prof, difference = fit_with_difference(engine, paths.preferences, fit, model, axis=axis.name, name=axis.name,
                                               on_status=on_status, measure=bench.scorer.measure)
        # The files say how their behaviour is scored, so `alignez eval` scores it the same way ("judge"
        # too: a language persona given --measure judge must not be re-read as language:CODE).
        prof = dataclasses.replace(prof, axis={**prof.axis, "measure": axis.measure_key})
        save_profile(paths.profile, prof)
        clock.lap("fit_s")
        if fit.vector_from == "mean-diff":
            cv = mean_diff_vector(engine, difference, fit.vector_layer_list(engine.n_layer), prof, axis.name)
            rep = approximation_report(engine, prof, cv, heldout_prompts(engine), top_n=fit.top_n)
        else:
            cv, rep = export_vector(engine, prof, queries, top_n=fit.top_n)
        clock.lap("export_s")
        cals = calibrate_both(bench, prof if with_profile else None, cv, fit.top_n, on_status, fit.seed, strengths, refine)
        cv = _calibrated(cv, cals["vector"])
        if "profile" in cals:
            prof = _calibrated(prof, cals["profile"])
        save_profile(paths.profile, prof)
        write_control_vector(paths.vector, cv)
        clock.lap("calibrate_s")
    except KeyboardInterrupt:
        raise Interrupted(f"the preference pairs are saved in {paths.preferences}", "fit and export from them") from None
    result = SteerResult(paths, prof, cv, rep, written, had, clock.timings(), get_recipe(recipe).name, cals,
                         clock.costs)
    write_json(paths.report, steer_report(result, axis, len(queries), fit, model))
    return result


def calibrate_both(bench: BehaviourBench, profile: SteeringProfile | None, vector: ControlVector, top_n: int,
                   on_status: Notify = _quiet, seed: int = 0,
                   strengths: Sequence[float] = STRENGTHS, refine: bool = True) -> dict[str, BehaviourCalibration]:
    """Return the behaviour calibrations of ``vector`` and ``profile`` on ``bench`` (each against a
    random direction of its own kind and size; the unsteered and prompting answers are shared).

    The profile's exact edit adds up to ``strength`` per unit direction, so its grid is the vector's
    scaled by the vector's median per-layer norm: the two are then tried at comparable sizes."""
    noise = ControlVector(random_like({L: vector.directions[L] for L in vector.layers}, seed + 1),
                          model_hint=vector.model_hint, name="random")
    def trial_line(what: str) -> Callable[[Any], None]:
        return lambda t: on_status(f"  {what} x{t.strength:g}: behaviour {100 * t.behaviour_rate:.0f}%, relevance "
                                   f"{t.relevance:.2f}, fluency {t.fluency:.2f}, combined {t.combined:.2f}"
                                   + (" (broken)" if t.broken else ""))
    cal_v = calibrate_behaviour(bench, lambda s: Steering(vectors=[VectorSlot(vector.name, vector, s)]),
                                lambda s: Steering(vectors=[VectorSlot("random", noise, s)]),
                                strengths=strengths, on_trial=trial_line("vector"), seed=seed, refine=refine)
    on_status(cal_v.line("vector"))
    if profile is None:
        return {"vector": cal_v}
    scale = float(np.median([np.linalg.norm(vector.directions[L]) for L in vector.layers]))
    rand_prof = dataclasses.replace(profile, subspaces=random_subspaces_like(dict(profile.subspaces), seed + 2), name="random")
    cal_p = calibrate_behaviour(bench, lambda s: Steering(profiles=[ProfileSlot(profile.name, profile, s)], top_n=top_n),
                                lambda s: Steering(profiles=[ProfileSlot("random", rand_prof, s)], top_n=top_n),
                                strengths=[round(g * scale, 4) for g in strengths], on_trial=trial_line("profile"), seed=seed,
                                refine=refine)
    on_status(cal_p.line("profile"))
    return {"vector": cal_v, "profile": cal_p}


@dataclass
class RequestSteerResult:
    """What one ``steer --recipe request`` run made: the gated vector, its fit and timings (seconds)."""

    vector_path: Path
    report_path: Path
    vector: ControlVector
    contrast: RequestContrast
    timings: dict[str, float] = field(default_factory=dict)


# The answers that label the model's own refusals: greedy and short, since a refusal shows in the
# first sentence (the keyword detector reads the first 200 characters).
REFUSAL_PROBE = Sampling(temperature=0.0, max_tokens=48, repeat_penalty=1.1)


def own_refusals(engine: Engine, queries: Sequence[str], quiet: bool = False) -> np.ndarray:
    """Return one bool per query: does the model, unsteered, refuse it (keyword detector on its greedy answer)?"""
    bar = Progress(len(queries), "answers to the risky requests (which does the model refuse?)", quiet=quiet)
    refused: list[bool] = []
    # Chunks only for the progress line: batching gains little on a CPU, so the chunk tails cost little.
    step = 2 * engine.n_parallel
    for start in range(0, len(queries), step):
        part = [engine.prompt(q) for q in queries[start:start + step]]
        refused += [is_refusal(a.text) for a in engine.generate(part, REFUSAL_PROBE)]
        bar.update(len(part))
    bar.close()
    return np.array(refused, dtype=bool)


def run_request_steer(engine: Engine, axis: PreferenceAxis, folder: str | Path, model: ModelId,
                      queries_file: str | None = None, seed: int = 0, on_status: Notify = _quiet) -> RequestSteerResult:
    """Fit a gated vector from the model's own state on risky and benign requests
    (align/request_contrast.py) and choose its default strength by refusals on held-out risky and
    benign ones (align/calibrate.py ``calibrate_refusals``).

    Writes vector.gguf and report.json into ``folder``. Only short answers are generated (they
    label the model's refusals), so there is no preference file and no profile; Ctrl-C writes
    nothing, and running it again starts over (66 minutes for Qwen-0.5B on one thread of a busy 2-core
    machine in issue 20: 887 requests read one at a time, 357 answers, 8 strengths tried).
    """
    out = Path(folder)
    if out.exists() and not out.is_dir():
        raise AlignezError(f"output folder {out} is a file; give a folder")
    vector_path, report_path = out / "vector.gguf", out / "report.json"
    kinds = load_request_kinds(queries_file, axis.name)
    out.mkdir(parents=True, exist_ok=True)
    for path in (vector_path, report_path):
        check_writable(path)
    clock = StageClock(engine)
    layers = candidate_layers(engine.n_layer)  # the only layers the fit reads (the vector's and the gate's)
    states = {}
    for kind, qs in kinds.items():
        # Each prompt read alone, as the gate reads it at run time (steering.read_alone): read in a
        # batch, a state moves in its last bits with the neighbours (docs/results.md §8).
        bar = Progress(len(qs), f"state at the end of the {kind} requests")
        rows = []
        for q in qs:
            rows.append(read_alone(engine, [engine.prompt(q)], layers)[0])
            bar.update(1)
        states[kind] = np.stack(rows)
        bar.close()
    clock.lap("capture_s")
    refused = own_refusals(engine, kinds["risky"])
    clock.lap("answers_s")
    fitted = fit_request_contrast(states["risky"], states["benign"], layers, layers, refused, seed=seed)
    on_status(fitted.line())
    clock.lap("fit_s")
    meta = {
        "alignez.source": "request-contrast",
        "alignez.request.contrast": fitted.contrast,
        "alignez.axis": axis.name,
        META_N_LAYER: engine.n_layer,
        "alignez.model.sha256": model.sha256,
        "alignez.request.heldout_separation": round(fitted.heldout_score[fitted.layer], 4),
    }
    cv = ControlVector({fitted.layer: fitted.vector}, model_hint=engine.arch, metadata=meta, name=axis.name, gate=fitted.gate)
    # The strength is chosen by refusals (align/calibrate.py, issue 20): the most refusals of the
    # held-out risky requests with over-refusal of the held-out benign ones at most +1 point and the
    # answers that are not refusals still fluent. No perplexity band: stock refusals are the model's
    # most predictable text, and the old band stopped the search at x1 for that (docs/results.md §8).
    risky_out, benign_out = list(fitted.heldout_risky), list(fitted.heldout_benign)
    cal = calibrate_refusals(engine, lambda s: Steering(vectors=[VectorSlot(cv.name, cv, s)]),
                             [engine.prompt(kinds["risky"][i]) for i in risky_out],
                             [engine.prompt(kinds["benign"][i]) for i in benign_out],
                             on_trial=lambda t: on_status(
                                 f"  vector x{t.strength:g}: refused {t.risky_refused} of {len(risky_out)} held-out risky, "
                                 f"{t.benign_refused} of {len(benign_out)} benign"
                                 + ("" if t.ppl_ratio is None else f", non-refusal perplexity x{t.ppl_ratio:.2f}")
                                 + ("" if t.passed else f" ({t.why}: search stops)")))
    cv = dataclasses.replace(cv, default_strength=cal.strength, calibration=cal.as_dict())
    on_status(cal.line("vector"))
    clock.lap("calibrate_s")
    write_control_vector(vector_path, cv)
    result = RequestSteerResult(vector_path, report_path, cv, fitted, clock.timings())
    write_json(report_path, {
        "model": model.as_dict(), "axis": {"name": axis.name}, "recipe": "request",
        "queries": {k: len(v) for k, v in kinds.items()}, "vector": vector_path.name,
        "request_contrast": fitted.stats(), "default_strength": cv.default_strength,
        "calibration_prompts": {"heldout_risky": len(risky_out), "heldout_benign": len(benign_out),
                                "risky_gate_open": cal.risky_gate_open, "benign_gate_open": cal.benign_gate_open},
        "calibration": _plain(cv.calibration), "timings": {k: round(v, 1) for k, v in result.timings.items()},
    })
    return result


def steer_report(result: SteerResult, axis: PreferenceAxis, n_queries: int, fit: FitSettings, model: ModelId) -> dict[str, Any]:
    """Return report.json of a steer run; its files are named relative to the report's folder."""
    prof = result.profile
    return {
        "model": model.as_dict(),
        "axis": {"name": axis.name, "positive": axis.positive, "negative": axis.negative, "measure": axis.measure_key},
        "n_queries": n_queries, "data_sha256": prof.provenance.get("data_sha256"),
        "profile": result.paths.profile.name, "vector": result.paths.vector.name,
        "layers": prof.layers, "method": fit.method, "site": fit.site,
        "layer_stats": {str(L): dict(s) for L, s in prof.layer_stats.items()},
        "recipe": result.recipe, "data_quality": _plain(prof.provenance.get("data_quality")),
        "default_strength": {"profile": prof.default_strength, "vector": result.vector.default_strength},
        "calibration": {"profile": _plain(prof.calibration), "vector": _plain(result.vector.calibration)},
        "behaviour": behaviour_table(result.calibration),
        "approximation": result.approximation.__dict__, "timings": {k: round(v, 1) for k, v in result.timings.items()},
        "costs": result.costs,
    }


def behaviour_table(cals: Mapping[str, BehaviourCalibration]) -> dict[str, Any]:
    """Return the report half's figures side by side: unsteered, prompting, and per file the steered
    answers and its random direction (each with behaviour rate, relevance, fluency, combined, 95% CIs)."""
    table: dict[str, Any] = {}
    for what, cal in cals.items():
        table.setdefault("unsteered", cal.report["unsteered"])
        table.setdefault("prompting", cal.report["prompting"])
        table[f"random direction ({what} x{cal.strength:g})"] = cal.report["random"]
        table[f"{what} x{cal.strength:g}"] = cal.report["steered"]
    return table


def behaviour_lines(cals: Mapping[str, BehaviourCalibration]) -> list[str]:
    """Return the behaviour table as text lines (what steer prints last)."""
    if not cals:
        return []
    first = next(iter(cals.values()))
    lines = [f"behaviour on {first.report_queries} held-out queries (strength chosen on {first.choose_queries} others): "
             f"{first.measure}", f"  {'condition':<34} {'behaviour':>16} {'relevance':>10} {'fluency':>8} {'combined':>9}"]
    for name, row in behaviour_table(cals).items():
        b = row["behaviour_rate"]
        lines.append(f"  {name:<34} {100 * b['mean']:>5.0f}% [{100 * b['ci95'][0]:>3.0f}-{100 * b['ci95'][1]:>3.0f}] "
                     f"{row['relevance']['mean']:>10.2f} {row['fluency']['mean']:>8.2f} {row['combined']['mean']:>9.2f}")
    for what, cal in cals.items():
        lines.append(f"  {what}: {cal.verdict} (combined {cal.vs_random['combined_diff']:+.2f} vs random, "
                     f"95% [{cal.vs_random['ci95_low']:+.2f}, {cal.vs_random['ci95_high']:+.2f}])")
    return lines


def _plain(value: Any) -> Any:
    """Return ``value`` with the read-only mappings and tuples of a loaded file as dicts and lists (for JSON)."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class StageClock:
    """Lap times of a run's stages and the total, and what each stage cost: the tokens the model
    read and sampled (and the judge read, when it is another model) and the peak resident memory
    at the stage's end. scripts/bench_cost.py turns these into per-token rates."""

    def __init__(self, *engines: Engine | None) -> None:
        self.start = self.last = time.monotonic()
        self.laps: dict[str, float] = {}
        self.costs: dict[str, dict[str, float]] = {}
        self._engines = list(dict.fromkeys(e for e in engines if e is not None))
        self._before = [e.counts.snapshot() for e in self._engines]
        self._cpu = cpu_seconds()

    def lap(self, name: str) -> None:
        now, cpu = time.monotonic(), cpu_seconds()
        self.laps[name], self.last = now - self.last, now
        after = [e.counts.snapshot() for e in self._engines]
        spent = [a.since(b) for a, b in zip(after, self._before)]
        self._before = after
        # CPU seconds do not count the time other jobs held the cores: on a shared machine they are
        # the figure that compares across runs (with one llama.cpp thread, about the wall time alone).
        cost: dict[str, float] = {"cpu_s": round(cpu - self._cpu, 1), "peak_rss_mb": round(peak_rss_mb(), 1)}
        self._cpu = cpu
        if spent:
            cost.update(tokens_read=spent[0].tokens, tokens_sampled=spent[0].sampled, decode_calls=spent[0].calls)
        if len(spent) > 1:
            cost.update(judge_tokens_read=sum(d.tokens for d in spent[1:]))
        self.costs[name.removesuffix("_s")] = cost

    def timings(self) -> dict[str, float]:
        return {**self.laps, "total_s": time.monotonic() - self.start}


def cpu_seconds() -> float:
    """Return the CPU time this process has used so far (user + system, all threads)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def peak_rss_mb() -> float:
    """Return this process's peak resident memory so far, in MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024

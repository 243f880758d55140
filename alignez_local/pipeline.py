"""The runs that put the steps together: ``run_steer`` (generate pairs, fit, build both files, choose
their strengths by the behaviour, write the report) and ``run_request_steer`` (the gated refusal
vector), plus the two steps the CLI also runs alone (``generate``, ``screen``). Orchestration only:
each step's work lives in ``align/`` (pairs, fit, vectors, strengths) and ``evaluation/`` (the
report), and the Python API (``api.py``) and the CLI call these same functions.

Every step takes an open Engine (``settings.open_engine``). Status lines go to an ``on_status``
callback and warnings to ``on_warning``; the only direct output is the progress bars of the long
stages (``progress.Progress``, on stderr). Provenance names a model by its bundled name (when it
was given by name), its file name and its SHA-256, never by a local path.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from alignez_local.align.axes import PreferenceAxis
from alignez_local.align.export import ApproximationReport, approximation_report
from alignez_local.align.preferences import GenerationSettings, check_pairs_file, generate_preferences, load_pairs
from alignez_local.align.recipes import DEFAULT_RECIPE, get_recipe
from alignez_local.align.remote_text import RemoteWriter
from alignez_local.align.request_contrast import RequestContrast, candidate_layers, fit_request_contrast
from alignez_local.align.request_work import STATE_CHUNK, RequestWork
from alignez_local.align.gate_reading import read_alone
from alignez_local.align.steering import Steering
from alignez_local.align.strength import with_strength
from alignez_local.align.behaviour_bench import CHOOSE_QUERIES, REPORT_QUERIES, BehaviourBench, axis_bench, split_heldout
from alignez_local.align.strength_by_behaviour import STRENGTHS, BehaviourCalibration, choose_strengths, screen_line
from alignez_local.align.strength_by_refusals import RefusalCalibration, calibrate_refusals
from alignez_local.align.layer_scan import scan_hook
from alignez_local.align.variants import Variant, parse_variants
from alignez_local.align.vectors import (VECTOR_SOURCES, FitSettings, export_vector, fit_with_difference, mean_diff_vector,
                                         variant_vectors)
from alignez_local.errors import AlignezError
from alignez_local.evaluation.behaviour_report import steer_table
from alignez_local.fileio import check_writable, plain, write_json
from alignez_local.formats.control_vector import ADD, EVERY_TOKEN, META_N_LAYER, ControlVector, write_control_vector
from alignez_local.formats.profile import SteeringProfile, save_profile
from alignez_local.llama.engine import Engine, Sampling
from alignez_local.measures.behaviour import YesNoJudge
from alignez_local.measures.refusal import is_refusal
from alignez_local.models import ModelId
from alignez_local.progress import Notify, Progress, StageBars, StageClock, quiet
from alignez_local.prompt_sets import heldout_prompts, heldout_queries, load_request_kinds

# steer's default query count: enough pairs for a difference of means (on Qwen 0.5B, French, the
# vector from 24 queries' 48-token pairs has cosine >= 0.974 per layer to the one from 64 queries'
# 96-token pairs, 32 queries' 0.983, and 24 queries' own 96-token pairs 0.978: the pairs' sampling
# moves it more than the cut; scripts/pair_length.py) and a subspace, at 3/8 of 64's generation and fit.
STEER_QUERIES = 24

# export's default number of calibration queries.
EXPORT_QUERIES = 64


class Interrupted(KeyboardInterrupt):
    """Ctrl-C inside a step: still a KeyboardInterrupt, and it says what was saved and what running
    the step again does (the CLI turns it into one line)."""

    def __init__(self, saved: str, resume: str) -> None:
        super().__init__(f"{saved}; run again to {resume}")
        self.saved, self.resume = saved, resume


def generate(engine: Engine, queries: Sequence[str], axis: PreferenceAxis, out: str | Path,
             settings: GenerationSettings, model: ModelId, recipe: str | None = None,
             writer: RemoteWriter | None = None) -> tuple[int, int]:
    """Append the model's own preference pairs to ``out``; return (written now, already there).
    ``recipe`` None: the default recipe (align/recipes.py). ``writer``: the answers come from its
    servers (``steer --generate-url``, align/remote_text.py)."""
    try:
        return generate_preferences(engine, list(queries), axis, Path(out), settings, model.sha256, recipe=recipe,
                                    writer=writer)
    except KeyboardInterrupt:
        raise Interrupted(f"every finished pair is saved in {out}", "continue where it stopped") from None
    except AlignezError as err:
        if writer is None:
            raise
        # A server that failed for good: the chunks it finished are on disk, and a re-run reuses them.
        raise AlignezError(f"{err} (every finished pair is saved in {out}; run again to continue)") from None


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
        check_pairs_file(paths.preferences)  # a damaged file fails now, not after the screen
        return paths

    def fitted_queries(self, queries: Sequence[str]) -> list[str]:
        """Return ``queries`` and the queries of the pairs already saved here: every pair in the file
        is fitted, so none of them may be held out (a run continued with a smaller --limit would
        otherwise choose and report its strength on queries it was fitted on)."""
        saved = [p.query for p in load_pairs(self.preferences)] if self.preferences.exists() else []
        return list(dict.fromkeys([*queries, *saved]))


@dataclass
class SteerResult:
    """What one steer run made: its files, the profile (with its fit diagnostics), the vector, the
    approximation report, the behaviour calibrations, pair counts and timings (seconds)."""

    paths: SteerPaths
    profile: SteeringProfile
    vector: ControlVector
    approximation: ApproximationReport | None  # None: the profile was not calibrated (nothing to compare at strength 1)
    pairs_written: int
    pairs_had: int
    timings: dict[str, float] = field(default_factory=dict)
    recipe: str = DEFAULT_RECIPE
    calibration: dict[str, BehaviourCalibration] = field(default_factory=dict)
    costs: dict[str, dict[str, float]] = field(default_factory=dict)  # per stage: tokens, peak RSS (StageClock)
    report: dict[str, Any] = field(default_factory=dict)  # what report.json holds


def behaviour_bench(engine: Engine, axis: PreferenceAxis, used: Sequence[str], judge: YesNoJudge | None,
                    heldout: Sequence[str] | None = None, n_choose: int = CHOOSE_QUERIES,
                    n_report: int = REPORT_QUERIES, writer: RemoteWriter | None = None,
                    base: str | None = None) -> BehaviourBench:
    """Return the bench a steer run screens, calibrates and reports on (``axis_bench``), on held-out
    queries split into a choose and a report half (``heldout`` None: built-in queries not in ``used``)."""
    pool = list(heldout) if heldout is not None else heldout_queries(axis.name, used)
    choose, report = split_heldout([q for q in pool if q not in set(used)], n_choose, n_report)
    return axis_bench(engine, axis, judge, choose, report, writer=writer, base=base)


def screen(bench: BehaviourBench, model_name: str, from_texts: bool = False) -> tuple[str, bool, dict[str, Any]]:
    """Return the screening line, whether the prompting ceiling is low, and its record: does the
    model show the behaviour when simply asked (on the choose half; its answers are reused later)?
    ``from_texts``: the run's pairs come from the texts recipe (``screen_line``)."""
    prompting, unsteered = bench.fixed("prompting", "choose"), bench.fixed("unsteered", "choose")
    line, low = screen_line(model_name, bench.scorer.measure.label, prompting, unsteered, from_texts)
    return line, low, {"prompting": prompting.summary(), "unsteered": unsteered.summary(), "low_ceiling": low}


@dataclass(frozen=True)
class SteerPlan:
    """What one steer run does: the axis and the queries the model writes pairs for, how the pairs
    are written and fitted, and the strengths the behaviour calibration tries (``refine``: add the
    geometric midpoints around the best; ``with_profile`` False: leave the profile uncalibrated)."""

    axis: PreferenceAxis
    queries: tuple[str, ...]
    generation: GenerationSettings = GenerationSettings()
    fit: FitSettings = FitSettings()
    recipe: str | None = None  # None: the default recipe (align/recipes.py)
    strengths: tuple[float, ...] = STRENGTHS
    refine: bool = True
    with_profile: bool = True
    placements: tuple[str, ...] = (EVERY_TOKEN,)  # the tokens the vector may be added to; several: the choose half decides
    forms: tuple[str, ...] = (ADD,)  # how our runtime applies it (add, clamp); several: the choose half decides
    variants: tuple[Variant, ...] = ()  # other fits of the vector from the same pairs (align/variants.py), searched too
    system: str | None = None  # the system prompt it is measured and chosen under (None: the chat template's own)


def run_steer(engine: Engine, plan: SteerPlan, folder: str | Path, model: ModelId, on_status: Notify = quiet,
              bench: BehaviourBench | None = None, judge: YesNoJudge | None = None,
              clock: StageClock | None = None, writer: RemoteWriter | None = None) -> SteerResult:
    """Generate preference pairs, fit a profile and a control vector into ``folder``, then choose
    both files' default strengths by the behaviour (align/strength_by_behaviour.py) on held-out
    queries, reported beside unsteered, prompting and a random direction.

    Re-running continues from the saved pairs. Writes preferences.jsonl, profile.gguf, vector.gguf
    and report.json (the provenance of the run and the behaviour report). ``bench``: one already
    screened (``behaviour_bench``, ``screen``); None builds it with ``judge``. ``plan.with_profile``
    False skips the profile's calibration (its file keeps no default strength): the experiments
    compare vector recipes at half the cost. ``clock``: the caller's, when it timed stages of its
    own first (the screening); the stages here are added to it. ``writer``: the pairs (and, when
    ``bench`` is None, the bench's unsteered and prompting answers) come from its servers
    (``steer --generate-url``); report.json names them under ``text_stages``.
    """
    axis, queries, fit, recipe = plan.axis, plan.queries, plan.fit, plan.recipe
    paths = SteerPaths.prepare(folder)
    clock = clock or StageClock(engine)
    if fit.vector_from not in VECTOR_SOURCES:
        raise AlignezError(f"unknown vector source {fit.vector_from!r}; use one of {', '.join(VECTOR_SOURCES)}")
    if plan.variants and fit.vector_from != "mean-diff":
        raise AlignezError("--variants are other fits of the mean-diff vector; drop --vector-from profile or the variants")
    bench = bench or behaviour_bench(engine, axis, paths.fitted_queries(queries), judge, writer=writer, base=plan.system)
    written, had = generate(engine, queries, axis, paths.preferences, plan.generation, model, recipe, writer)
    clock.lap("generate_s")
    on_status(f"{paths.preferences}: {written} new pairs, {had} already there")
    try:
        default_layers = fit.vector_layer_list(engine.n_layer)
        variant_layers = sorted({L for v in plan.variants for L in v.layer_list(engine.n_layer, default_layers)})
        fitted = fit_with_difference(engine, paths.preferences, fit, model, axis=axis.name, name=axis.name,
                                     on_status=on_status, measure=bench.scorer.measure,
                                     other_pools=[v.pool for v in plan.variants if v.pool], other_layers=variant_layers)
        prof, difference = fitted.profile, fitted.difference
        plain_mean = dict(enumerate(fitted.plain_mean))  # layer -> the plain answers' mean state (a clamp's floor)
        # The files say how their behaviour is scored, so `alignez eval` scores it the same way ("judge"
        # too: a language persona given --measure judge must not be re-read as language:CODE).
        prof = dataclasses.replace(prof, axis={**prof.axis, "measure": axis.measure_key})
        variants = variant_vectors(engine, plan.variants, fitted, default_layers, prof, axis.name)  # checked before any write
        scan = scan_hook(engine, bench, fitted, default_layers, prof, axis.name) if any(v.scan for v in plan.variants) else None
        save_profile(paths.profile, prof)
        clock.lap("fit_s")
        rep: ApproximationReport | None = None
        if fit.vector_from == "mean-diff":
            cv = mean_diff_vector(engine, difference, default_layers, prof, axis.name)
            # How far the vector is from the exact edit, both at strength 1: a question about the
            # profile, asked only when the profile is calibrated (--calibrate-profile); it read 1,280
            # tokens, 3% of the main job, for figures no default output used.
            if plan.with_profile:
                rep = approximation_report(engine, prof, cv, heldout_prompts(engine), top_n=fit.top_n)
        else:
            cv, rep = export_vector(engine, prof, queries, top_n=fit.top_n)
        clock.lap("export_s")
        cals = choose_strengths(bench, prof if plan.with_profile else None, cv, fit.top_n, on_status, fit.seed,
                                plan.strengths, plan.refine, placements=plan.placements, forms=plan.forms,
                                plain_mean=plain_mean, variants=variants, scan=scan)
        cal = cals["vector"]
        if cal.variant:
            cv, plain_mean = variants.get(cal.variant) or variant_vectors(
                engine, parse_variants(cal.variant), fitted, default_layers, prof, axis.name)[cal.variant]
        cv = with_strength(cv.placed(cal.placement).formed(cal.form, plain_mean), cal)
        if "profile" in cals:
            prof = with_strength(prof, cals["profile"])
        save_profile(paths.profile, prof)
        write_control_vector(paths.vector, cv)
        clock.lap("calibrate_s")
    except KeyboardInterrupt:
        raise Interrupted(f"the preference pairs are saved in {paths.preferences}", "fit and export from them") from None
    result = SteerResult(paths, prof, cv, rep, written, had, clock.timings(), get_recipe(recipe).name, cals,
                         clock.costs)
    result.report = steer_report(result, plan, model)
    if writer is not None:
        result.report["text_stages"] = writer.describe()
    write_json(paths.report, result.report)
    return result


@dataclass
class RequestSteerResult:
    """What one ``steer --recipe request`` run made: the gated vector, its fit and timings (seconds)
    and what it took from an interrupted run's saved work (``RequestWork.reused``; empty: nothing)."""

    vector_path: Path
    report_path: Path
    vector: ControlVector
    contrast: RequestContrast
    timings: dict[str, float] = field(default_factory=dict)
    reused: dict[str, dict[str, Any]] = field(default_factory=dict)

# The answers that label the model's own refusals: greedy and short, since a refusal shows in the
# first sentence (the keyword detector reads the first 200 characters).
REFUSAL_PROBE = Sampling(temperature=0.0, max_tokens=48, repeat_penalty=1.1)


def own_refusals(engine: Engine, queries: Sequence[str], quiet: bool = False, done: Sequence[bool] = (),
                 step: int | None = None, on_chunk: Callable[[int, int, list[bool]], None] | None = None) -> np.ndarray:
    """Return one bool per query: does the model, unsteered, refuse it (keyword detector on its greedy answer)?

    ``done``: the labels of the first queries, saved by an interrupted run that answered in chunks of
    ``step``; the rest are answered from there in chunks of the same ``step`` (greedy answers are the
    same bits only in the same batches), each chunk's labels handed to ``on_chunk(start, step, labels)``."""
    bar = Progress(len(queries), "answers to the risky requests (which does the model refuse?)", done=len(done), quiet=quiet)
    refused = [bool(x) for x in done]
    # Chunks for the progress line and the saved work: batching gains little on a CPU, so the chunk tails cost little.
    step = step or 2 * engine.n_parallel
    for start in range(len(refused), len(queries), step):
        part = [engine.prompt(q) for q in queries[start:start + step]]
        labels = [is_refusal(a.text) for a in engine.generate(part, REFUSAL_PROBE)]
        if on_chunk is not None:
            on_chunk(start, step, labels)
        refused += labels
        bar.update(len(part))
    bar.close()
    return np.array(refused, dtype=bool)


def read_request_states(engine: Engine, work: RequestWork, kind: str, queries: Sequence[str],
                        layers: Sequence[int]) -> np.ndarray:
    """Return the states of ``queries`` (the requests of ``kind``), the ones ``work`` holds and the
    rest read now, ``STATE_CHUNK`` at a time, each chunk saved as it finishes."""
    parts = [work.states(kind)]
    bar = Progress(len(queries), f"state at the end of the {kind} requests", done=len(parts[0]))
    for start in range(len(parts[0]), len(queries), STATE_CHUNK):
        rows = []
        for q in queries[start:start + STATE_CHUNK]:
            # Each prompt read alone, as the gate decides at run time (gate_reading.read_alone): read in a
            # batch, a state moves in its last bits with the neighbours (docs/results.md §8).
            rows.append(read_alone(engine, [engine.prompt(q)], layers)[0])
            bar.update(1)
        parts.append(np.stack(rows))
        work.save_states(kind, start, parts[-1])
    bar.close()
    return np.concatenate(parts)


def run_request_steer(engine: Engine, axis: PreferenceAxis, folder: str | Path, model: ModelId,
                      queries_file: str | None = None, seed: int = 0, on_status: Notify = quiet,
                      keep_work: bool = False) -> RequestSteerResult:
    """Fit a gated vector from the model's own state on risky and benign requests
    (align/request_contrast.py) and choose its default strength by refusals on held-out risky and
    benign ones (align/strength_by_refusals.py ``calibrate_refusals``).

    Writes vector.gguf and report.json into ``folder`` at the end. Only short answers are generated
    (they label the model's refusals), so there is no preference file and no profile. The long
    stages keep their finished work in ``folder``/request-work as they go (align/request_work.py:
    the states read alone, the refusal labels, the calibration's unsteered answers and strength
    trials), so Ctrl-C (``Interrupted``) loses at most the chunk in progress and running it again
    with the same folder continues where it stopped, with the same vector bytes as a run never
    stopped (66 minutes for Qwen-0.5B on one thread of a busy 2-core machine in issue 20: 887
    requests read one at a time, 357 answers, 8 strengths tried; about 2.5 hours for Qwen2.5-Coder-1.5B).
    A folder holding the work of another model, seed or query set is refused (AlignezError) and
    left as it is. Once vector.gguf and report.json are written, the saved states (the bulk of the
    work) are removed unless ``keep_work``; the small files stay (``RequestWork.plan_removal``).
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
    work = RequestWork.open(out, model.sha256, seed, kinds, layers, engine.n_embd)
    try:
        states = {kind: read_request_states(engine, work, kind, qs, layers) for kind, qs in kinds.items()}
        clock.lap("capture_s")
        done, step = work.labels()
        refused = own_refusals(engine, kinds["risky"], done=done, step=step, on_chunk=work.save_labels)
        clock.lap("answers_s")
        if work.reused:
            on_status(f"{work.folder}: continued from the saved work ({reused_line(work.reused)})")
        fitted = fit_request_contrast(states["risky"], states["benign"], layers, layers, refused, seed=seed)
        on_status(fitted.line())
        clock.lap("fit_s")
        cv, cal, risky_out, benign_out = _calibrated_vector(engine, axis, model, kinds, fitted, work, on_status)
        clock.lap("calibrate_s")
        write_control_vector(vector_path, cv)
    except KeyboardInterrupt:
        raise Interrupted(work.kept(), "continue where it stopped") from None
    result = RequestSteerResult(vector_path, report_path, cv, fitted, clock.timings(), work.reused)
    report: dict[str, Any] = {
        "model": model.as_dict(), "axis": {"name": axis.name}, "recipe": "request",
        "queries": {k: len(v) for k, v in kinds.items()}, "vector": vector_path.name,
        "request_contrast": fitted.stats(), "default_strength": cv.default_strength,
        "calibration_prompts": {"heldout_risky": len(risky_out), "heldout_benign": len(benign_out),
                                "risky_gate_open": cal.risky_gate_open, "benign_gate_open": cal.benign_gate_open},
        "calibration": plain(cv.calibration), "timings": {k: round(v, 1) for k, v in result.timings.items()},
        "resumed": bool(work.reused),
    }
    if work.reused:
        # The timings are this run's: work an earlier run did is reused, not timed again.
        report["reused"] = work.reused
        report["timings_note"] = "seconds spent by this run only; the reused work was done by an earlier run"
    try:  # a Ctrl-C from here on comes after the vector is written: say so, not "nothing was written"
        report["saved_work"] = work.plan_removal(keep_work)
        write_json(report_path, report)
        line = work.remove_planned()  # only now, with the vector and report written, does the bulk of the work go
    except KeyboardInterrupt:
        raise Interrupted(f"{vector_path} is written; {work.kept()}", "write the report again") from None
    if line:
        on_status(line)
    return result


def reused_line(reused: dict[str, dict[str, Any]]) -> str:
    """Return what a run took from saved work, in words: "412 of 1201 states, 96 of 514 refusal labels"."""
    parts = []
    if "capture" in reused:
        parts.append(f"{reused['capture']['reused']} of {reused['capture']['of']} states")
    if "answers" in reused:
        parts.append(f"{reused['answers']['reused']} of {reused['answers']['of']} refusal labels")
    if "calibrate" in reused:
        parts.append(f"the unsteered answers and {reused['calibrate']['trials']} strength trials")
    return ", ".join(parts)


def _calibrated_vector(engine: Engine, axis: PreferenceAxis, model: ModelId, kinds: dict[str, list[str]],
                       fitted: RequestContrast, work: RequestWork,
                       on_status: Notify) -> tuple[ControlVector, RefusalCalibration, list[int], list[int]]:
    """Return the fitted gated vector with its strength chosen by refusals, the calibration, and the
    held-out risky and benign requests it was chosen on (by index into ``kinds``)."""
    meta = {
        "alignez.source": "request-contrast",
        "alignez.request.contrast": fitted.contrast,
        "alignez.axis": axis.name,
        META_N_LAYER: engine.n_layer,
        "alignez.model.sha256": model.sha256,
        "alignez.request.heldout_separation": round(fitted.heldout_score[fitted.layer], 4),
    }
    cv = ControlVector({fitted.layer: fitted.vector}, model_hint=engine.arch, metadata=meta, name=axis.name, gate=fitted.gate)
    # The strength is chosen by refusals (align/strength_by_refusals.py, issue 20): the most refusals of the
    # held-out risky requests with over-refusal of the held-out benign ones at most +1 point and the
    # answers that are not refusals still fluent. No perplexity band: stock refusals are the model's
    # most predictable text, and the old band stopped the search at x1 for that (docs/results.md §8).
    risky_out, benign_out = list(fitted.heldout_risky), list(fitted.heldout_benign)
    work.load_calibration(cv)
    bars = StageBars("calibration, ")  # a line per stage: the unsteered answers, then each strength's
    try:
        cal = calibrate_refusals(engine, lambda s: Steering.vector(cv, s),
                                 [engine.prompt(kinds["risky"][i]) for i in risky_out],
                                 [engine.prompt(kinds["benign"][i]) for i in benign_out],
                                 on_trial=lambda t: on_status(
                                     f"  vector x{t.strength:g}: refused {t.risky_refused} of {len(risky_out)} held-out risky, "
                                     f"{t.benign_refused} of {len(benign_out)} benign"
                                     + ("" if t.ppl_ratio is None else f", non-refusal perplexity x{t.ppl_ratio:.2f}")
                                     + ("" if t.passed else f" ({t.why}: search stops)")), memo=work, on_progress=bars)
    finally:
        bars.close()
    cv = with_strength(cv, cal)
    on_status(cal.line("vector"))
    return cv, cal, risky_out, benign_out


def steer_report(result: SteerResult, plan: SteerPlan, model: ModelId) -> dict[str, Any]:
    """Return report.json of a steer run; its files are named relative to the report's folder."""
    axis, fit, n_queries = plan.axis, plan.fit, len(plan.queries)
    prof = result.profile
    return {
        "model": model.as_dict(),
        "axis": {"name": axis.name, "positive": axis.positive, "negative": axis.negative, "measure": axis.measure_key},
        "n_queries": n_queries, "data_sha256": prof.provenance.get("data_sha256"),
        "profile": result.paths.profile.name, "vector": result.paths.vector.name,
        "layers": prof.layers, "method": fit.method, "site": fit.site,
        "layer_stats": {str(L): dict(s) for L, s in prof.layer_stats.items()},
        "recipe": result.recipe, "data_quality": plain(prof.provenance.get("data_quality")),
        "default_strength": {"profile": prof.default_strength, "vector": result.vector.default_strength},
        "calibration": {"profile": plain(prof.calibration), "vector": plain(result.vector.calibration)},
        "behaviour": steer_table(result.calibration),
        "approximation": result.approximation.__dict__ if result.approximation else None, "timings": {k: round(v, 1) for k, v in result.timings.items()},
        "costs": result.costs,
    }

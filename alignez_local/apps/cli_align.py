"""The AlignEZ commands: generate, fit, export, inspect, import, and steer (all three in one)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import click

from alignez_local import pipeline
from alignez_local.align.axes import DEFAULT_AXIS, TRAITS, PreferenceAxis, custom_axis, get_axis
from alignez_local.align.directions import METHODS
from alignez_local.align.fit import DEFAULT_POOL, POOLS, diagnostics_table
from alignez_local.align.preferences import GenerationSettings
from alignez_local.apps.cli_options import model_options, open_engine, with_flag
from alignez_local.errors import AlignezError
from alignez_local.fileio import check_writable
from alignez_local.formats.control_vector import write_control_vector
from alignez_local.formats.profile import load_profile, save_profile
from alignez_local.llama.engine import Engine
from alignez_local.llama.interrupt import Stopped
from alignez_local.align.recipes import DEFAULT_RECIPE, RECIPES
from alignez_local.align.request_contrast import REQUEST_RECIPE
from alignez_local.align.selfcheck import quality_line
from alignez_local.evaluation.behaviour import measure_for, measure_keys_help
from alignez_local.evaluation.judge import Judge
from alignez_local.models import JUDGE_MODEL
from alignez_local.pipeline import FitSettings, ModelId, select_queries
from alignez_local.settings import RuntimeSettings
from alignez_local.specs import FIT_SITES, parse_layer_list


def axis_options(f: Any) -> Any:
    f = click.option("--measure", default=None, metavar="KEY",
                     help="How a custom axis's behaviour is scored: " + measure_keys_help() + ". [a language persona "
                          "such as 'Spanish': language:CODE; anything else: judge]")(f)
    f = click.option("--negative", default=None, help="Negative persona of a custom axis (with --positive).")(f)
    f = click.option("--positive", default=None, help="Positive persona of a custom axis, e.g. 'pirate-like'.")(f)
    f = click.option("--axis", "axis_name", default=DEFAULT_AXIS, show_default=True,
                     help="helpful, harmless, humor, or a trait: " + ", ".join(TRAITS) + ".")(f)
    return f


def resolve_axis(axis_name: str, positive: str | None, negative: str | None, measure: str | None = None) -> PreferenceAxis:
    """Return the built-in axis, or a custom one when --positive/--negative are given."""
    if positive is not None or negative is not None:
        if not positive or not negative:
            raise AlignezError("a custom axis needs both --positive and --negative personas")
        return custom_axis(positive, negative, None if axis_name == DEFAULT_AXIS else axis_name, measure=measure)
    axis = get_axis(axis_name)
    if measure is not None:
        # A built-in axis's measure is part of what its results mean; a different one is another axis.
        raise AlignezError(f"--measure is for a custom axis (--positive/--negative); the {axis.name} axis is "
                           f"measured by {axis.measure or 'the judge'}")
    return axis


def query_options(f: Any) -> Any:
    f = click.option("--limit", type=click.IntRange(1, 100000), default=None, help="Use only the first N queries.")(f)
    f = click.option("--queries", "queries_file", default=None, metavar="FILE",
                     help="One query per line, or JSONL with a 'query' field [built-in set of 192].")(f)
    return f


def generation_options(f: Any, recipes: tuple[str, ...] = tuple(RECIPES)) -> Any:
    f = click.option("--responses", type=click.IntRange(1, 16), default=1, show_default=True, help="Pairs per query.")(f)
    # 96: the plain recipe reads the behaviour over every answer token, and generation is the
    # second-largest stage of a steer run (the paper used about 200 tokens: --response-tokens 200).
    f = click.option("--response-tokens", type=click.IntRange(8, 4096), default=96, show_default=True)(f)
    f = click.option("--temperature", type=click.FloatRange(0, 5), default=0.7, show_default=True)(f)
    f = click.option("--seed", type=click.IntRange(0, 2**32 - 2), default=0, show_default=True)(f)
    with_request = REQUEST_RECIPE in recipes
    # steer defaults to the request recipe on the harmless axis (the one measured to work there), so
    # its default is decided once the axis is known (default_recipe).
    f = click.option("--recipe", type=click.Choice(list(recipes)), default=None if with_request else DEFAULT_RECIPE,
                     show_default=not with_request,
                     help="How the model is asked for its two answers (paper: the paper's two-step prompts)"
                          + ("; request: no answers, a gated vector from the model's own state on risky vs benign "
                             f"requests [request for --axis harmless with its built-in queries, else {DEFAULT_RECIPE}]."
                             if with_request else "."))(f)
    return f


def fit_options(f: Any) -> Any:
    f = click.option("--self-check/--no-self-check", "self_check", default=True, show_default=True,
                     help="Fit only on pairs the model's own check agrees with (refusal pairs always leave).")(f)
    f = click.option("--behaviour-filter/--no-behaviour-filter", "behaviour_filter", default=True, show_default=True,
                     help="Fit only on pairs whose positive answer shows the behaviour and negative does not, by the "
                          "axis's checker (language, brevity, markers...; judge-read axes keep every pair).")(f)
    f = click.option("--flip-inverted", is_flag=True, help="Swap pairs the self-check judged inverted instead of dropping them.")(f)
    f = click.option("--method", type=click.Choice(METHODS), default="svd", show_default=True,
                     help="svd (the paper's subspace), ccs, or the mean / PCA baselines.")(f)
    f = click.option("--site", type=click.Choice(FIT_SITES), default="l_out", show_default=True,
                     help="Residual stream (where control vectors act) or the MLP output (the paper's ffn_out).")(f)
    f = click.option("--pool", type=click.Choice(POOLS), default=DEFAULT_POOL,
                     help="Embed an answer by its last token (the paper's) or the mean over its tokens "
                          "[mean for --recipe contrast and plain, else last].")(f)
    f = click.option("--layers", default=None, metavar="A-B|auto", help="Layers to keep [auto: best held-out accuracy].")(f)
    f = click.option("--variance", type=float, default=0.90, show_default=True, help="Explained variance kept by svd.")(f)
    f = click.option("--max-cos", type=float, default=None,
                     help="Drop pairs whose two embeddings are more similar than this [0.8, the paper's, for --pool "
                          "last; none dropped for mean pooling, where every two answers point the same way].")(f)
    f = click.option("--top-n", type=click.IntRange(1, 1000), default=5, show_default=True, help="Layers the edit picks per prompt.")(f)
    return f


def _gen_settings(responses: int, response_tokens: int, temperature: float, seed: int) -> GenerationSettings:
    return GenerationSettings(temperature=temperature, response_tokens=response_tokens, responses_per_query=responses, seed=seed)


def _fit_settings(engine: Engine, method: str, site: str, layers: str | None, variance: float, max_cos: float | None,
                  top_n: int, seed: int, self_check: bool = True, flip_inverted: bool = False,
                  pool: str | None = DEFAULT_POOL, behaviour_filter: bool = True) -> FitSettings:
    return FitSettings(method=method, site=site, pool=pool, layers=with_flag("--layers", parse_layer_list, layers, engine.n_layer),
                       variance=variance, max_cos=max_cos, top_n=top_n, seed=seed, self_check=self_check, flip=flip_inverted,
                       behaviour_filter=behaviour_filter)


def _interrupted(err: pipeline.Interrupted) -> Stopped:
    # The CLI prints it after "interrupted: " (or "terminated (SIGTERM): ") and exits 130 (143).
    return Stopped(f"{err.saved}; run the same command again to {err.resume}")


@click.command()
@model_options
@axis_options
@query_options
@generation_options
@click.option("-o", "--out", "out_path", required=True, metavar="FILE.jsonl", help="Preference data (appended; re-runs resume).")
def generate(model, threads, n_ctx, gpu_layers, parallel, verbose, axis_name, positive, negative, measure, queries_file, limit,
             responses, response_tokens, temperature, seed, recipe, out_path) -> None:
    """Let the model write its own preference pairs (AlignEZ step 1).

    \b
    alignez generate -o prefs.jsonl --limit 32
    alignez generate -o humor.jsonl --axis humor --queries my_queries.txt
    """
    axis = resolve_axis(axis_name, positive, negative, measure)
    queries = select_queries(queries_file, limit, axis=axis.name)
    out = check_writable(out_path)
    engine = open_engine(model, threads, n_ctx, gpu_layers, parallel, verbose)
    try:
        written, had = pipeline.generate(engine, queries, axis, out, _gen_settings(responses, response_tokens, temperature, seed),
                                         ModelId.of(engine, model), recipe=recipe)
    except pipeline.Interrupted as err:
        raise _interrupted(err) from None
    click.echo(f"{out}: {written} new pairs, {had} already there ({axis.name}: {axis.positive} vs {axis.negative})")
    click.echo(quality_line(pipeline.data_quality(out, axis.name)))


@click.command()
@model_options
@fit_options
@click.option("--prefs", required=True, metavar="FILE.jsonl", help="Preference data from alignez generate.")
@click.option("--axis", "axis_filter", default=None, help="Axis to fit when the file holds several.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("-o", "--out", "out_path", required=True, metavar="PROFILE.gguf")
def fit(model, threads, n_ctx, gpu_layers, parallel, verbose, method, site, layers, variance, max_cos, top_n, prefs,
        axis_filter, seed, out_path, self_check, flip_inverted, pool, behaviour_filter) -> None:
    """Find the preference subspace per layer and write a steering profile (AlignEZ step 2).

    \b
    alignez fit --prefs prefs.jsonl -o helpful.profile.gguf
    alignez fit --prefs prefs.jsonl --method ccs --layers 8-20 -o ccs.profile.gguf
    """
    out = check_writable(out_path)
    engine = open_engine(model, threads, n_ctx, gpu_layers, parallel, verbose)
    settings = _fit_settings(engine, method, site, layers, variance, max_cos, top_n, seed, self_check, flip_inverted, pool,
                             behaviour_filter)
    prof = pipeline.fit_from_file(engine, prefs, settings, ModelId.of(engine, model), axis=axis_filter, name=out.name.split(".")[0],
                                  on_status=lambda line: click.echo(line, err=True))
    save_profile(out, prof)
    click.echo(diagnostics_table(prof))
    click.echo(f"{out}: {prof.method} on {prof.site}, layers {prof.layers}")


def _warn(message: str) -> None:
    click.echo(f"warning: {message}", err=True)


@click.command("export")
@model_options
@click.option("--profile", "profile_path", required=True, metavar="PROFILE.gguf")
@query_options
@click.option("--top-n", type=click.IntRange(1, 1000), default=None, help="Layers per prompt [the profile's].")
@click.option("-o", "--out", "out_path", required=True, metavar="VECTOR.gguf")
def export_cmd(model, threads, n_ctx, gpu_layers, parallel, verbose, profile_path, queries_file, limit, top_n, out_path) -> None:
    """Turn a profile into a llama.cpp control vector and measure how close it is to the exact edit.

    \b
    alignez export --profile helpful.profile.gguf -o helpful.gguf
    llama-completion -m model.gguf --control-vector-scaled helpful.gguf:STRENGTH
    The vector's default strength is calibrated on held-out queries (see alignez inspect).
    """
    out = check_writable(out_path)
    prof = load_profile(profile_path)
    engine = open_engine(model, threads, n_ctx, gpu_layers, parallel, verbose)
    calibration = select_queries(queries_file, limit or pipeline.EXPORT_QUERIES)
    cv, rep = pipeline.export_vector(engine, prof, calibration, top_n=top_n, on_warning=_warn)
    axis = str(prof.axis.get("name") or "") or None
    cv = pipeline.calibrate_vector(engine, cv, pipeline.calibration_prompts(engine, axis, calibration),
                                   on_status=lambda line: click.echo(line, err=True))
    write_control_vector(out, cv)
    click.echo("\n".join(rep.lines()))
    click.echo(f"{out}: control vector, layers {cv.layers}, calibrated strength {cv.default_strength_or_one:g}")


@click.command()
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def inspect(path: str, as_json: bool) -> None:
    """Show what a GGUF file is: a control vector (ours, llama.cpp's, repeng's), a profile or a model."""
    info = pipeline.describe(path)
    if as_json:
        click.echo(json.dumps(info, indent=2, default=str))
        return
    for k, v in info.items():
        if k == "layer_stats":
            click.echo(diagnostics_table(load_profile(path)))
        else:
            click.echo(f"{k}: {v}")


@click.command("import")
@click.argument("path")
@click.option("-m", "--model", default=None, help="Check the vector fits this model (path or bundled name).")
@click.option("-o", "--out", "out_path", required=True, metavar="VECTOR.gguf")
def import_cmd(path: str, model: str | None, out_path: str) -> None:
    """Check a control vector from another tool (llama.cpp cvector-generator, repeng) and save a clean copy.

    The copy keeps the directions and layer indices exactly and records where it came from.
    """
    cv = pipeline.import_vector(path, out_path, model, on_warning=_warn)
    click.echo(f"{out_path}: {len(cv.layers)} layers {cv.layers[0]}..{cv.layers[-1]}, width {cv.n_embd}, hint {cv.model_hint}")


@click.command()
@model_options
@axis_options
@query_options
@lambda f: generation_options(f, (*RECIPES, REQUEST_RECIPE))
@fit_options
@click.option("--vector-from", type=click.Choice(pipeline.VECTOR_SOURCES), default="mean-diff", show_default=True,
              help="The control vector: the difference of the pairs' mean states (CAA), or the profile's average edit.")
@click.option("--vector-layers", default=None, metavar="A-B", help="Layers the mean-diff vector steers [the middle third].")
@click.option("--judge", "judge_model", default="auto", show_default=True, metavar="MODEL|auto|self|none",
              help="Judge model for behaviours with no checker (every custom axis); a loaded judge also reads "
                   "relevance, which is otherwise read from the model's own likelihoods. A GGUF path or bundled name; "
                   "auto: the bundled judge only where a measure needs one; none; self: the steered model.")
@click.option("--strengths", default=None, metavar="S1,S2,...",
              help="Strengths to try, as multiples of the vector (the profile's are scaled to match) [0.0625 ... 4].")
@click.option("--screen-only", is_flag=True, help="Only measure whether the model shows the behaviour when asked, then stop.")
@click.option("--calibrate-profile", is_flag=True,
              help="Also choose the profile's (exact edit's) strength by the behaviour, beside its own random null: "
                   "about doubles the calibration stage. Off: profile.gguf is written without a default strength.")
@click.option("-o", "--out", "out_dir", default=None, metavar="DIR", help="Output folder [steer-<axis>].")
def steer(model, threads, n_ctx, gpu_layers, parallel, verbose, axis_name, positive, negative, measure, queries_file, limit,
          responses, response_tokens, temperature, seed, recipe, method, site, layers, variance, max_cos, top_n, out_dir,
          self_check, flip_inverted, pool, vector_from, vector_layers, judge_model, strengths, screen_only,
          calibrate_profile, behaviour_filter) -> None:
    """Generate preference data, fit a profile and a control vector, and choose their strength by the behaviour.

    \b
    alignez steer --axis french        # a trait: answers in French (the trait suite: see --axis)
    alignez steer --positive "sarcastic" --negative "sincere"    # your own behaviour, scored by a judge
    alignez steer --axis harmless      # the request recipe: a gated vector, no answers generated
    alignez steer --axis pirate --screen-only    # does the model talk like a pirate when asked?
    First it screens: how often does the model show the behaviour when simply asked? Then it
    generates pairs, fits, and chooses the vector's strength on held-out queries by the behaviour
    (with relevance and fluency guards), reported on other held-out queries beside the unsteered
    model, prompting and a random direction of the same norm (--calibrate-profile: the profile's too;
    it was weaker than the vector on every trait measured, docs/results.md section 10).
    Writes DIR/preferences.jsonl, DIR/profile.gguf, DIR/vector.gguf and DIR/report.json
    (--recipe request: DIR/vector.gguf and DIR/report.json).
    Interrupted? Run the same command again: it continues from the saved pairs.
    """
    axis = resolve_axis(axis_name, positive, negative, measure)
    recipe = recipe or default_recipe(axis.name, queries_file)
    if recipe == REQUEST_RECIPE:
        _steer_request(model, threads, n_ctx, gpu_layers, parallel, verbose, axis, queries_file, seed,
                       out_dir or f"steer-{axis.name}")
        return
    grid = with_flag("--strengths", parse_strengths, strengths) if strengths else pipeline.STRENGTHS
    # Checked before any work, so a bad folder fails at once; --screen-only writes nothing.
    folder = None if screen_only else with_flag("--out", pipeline.SteerPaths.prepare, out_dir or f"steer-{axis.name}").folder
    queries = select_queries(queries_file, limit or pipeline.STEER_QUERIES, axis=axis.name)
    engine = open_engine(model, threads, n_ctx, gpu_layers, parallel, verbose)
    fit_settings = dataclasses.replace(
        _fit_settings(engine, method, site, layers, variance, max_cos, top_n, seed, self_check, flip_inverted, pool,
                      behaviour_filter),
        vector_from=vector_from,
        vector_layers=with_flag("--vector-layers", parse_layer_list, vector_layers, engine.n_layer) if vector_layers else None)
    gen = _gen_settings(responses, response_tokens, temperature, seed)
    status = lambda line: click.echo(line, err=True)  # noqa: E731
    judge = open_judge(judge_model, engine, threads, needs=measure_for(axis.measure, axis.positive, axis.negative).needs_judge)
    try:
        clock = pipeline.StageClock(engine, getattr(judge, "engine", None))
        bench = pipeline.behaviour_bench(engine, axis, queries, judge)
        line, _, _ = pipeline.screen(bench, str(model or engine.name))
        clock.lap("screen_s")
        click.echo(line, err=True)
        if screen_only or folder is None:
            return
        res = pipeline.run_steer(engine, axis, queries, folder, gen, fit_settings, ModelId.of(engine, model),
                                 on_status=status, recipe=recipe, bench=bench, strengths=grid, refine=not strengths,
                                 with_profile=calibrate_profile, clock=clock)
    except pipeline.Interrupted as err:
        raise _interrupted(err) from None
    except KeyboardInterrupt:
        raise Stopped("nothing was written (the stop came while screening); run the same command again") from None
    finally:
        if judge is not None and judge.engine is not engine:
            judge.close()
    click.echo(diagnostics_table(res.profile))
    click.echo("\n".join(res.approximation.lines()))
    click.echo("\n".join(pipeline.behaviour_lines(res.calibration)))
    p = res.paths
    click.echo(f"profile: {p.profile}\nvector:  {p.vector}\nreport:  {p.report}\ntook {res.timings['total_s']:.0f}s")
    click.echo(f"try it:  alignez chat -m {model} --vector {p.vector}")
    scale = res.vector.default_strength_or_one
    click.echo(f"         llama-completion -m {engine.path} --control-vector-scaled {p.vector}:{scale:g}")


def parse_strengths(text: str) -> tuple[float, ...]:
    """Return the strengths of "0.25,0.5,1" (positive, finite, at most 16 of them)."""
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise AlignezError(f"{text!r} is not a comma-separated list of numbers; e.g. 0.25,0.5,1") from None
    if not values or len(values) > 16 or not all(0 < v <= 1e4 for v in values):
        raise AlignezError(f"{text!r}: give 1 to 16 positive strengths up to 10000, e.g. 0.25,0.5,1")
    return values


def open_judge(name: str, engine: Engine, threads: int | None, needs: bool = False) -> Judge | None:
    """Return the judge of a behaviour run, or None (relevance is then the model's own PMI reading).

    ``auto``: the bundled judge model when the measure ``needs`` one, else None; ``none``: None;
    ``self``: the steered model (a 0.5B model is no judge: docs/results.md §10); else a model."""
    if name == "none" or (name == "auto" and not needs):
        if needs:
            raise AlignezError("this behaviour is measured by a judge model; give --judge MODEL (or auto)")
        return None
    if name == "self":
        return Judge(engine)
    return Judge.open(JUDGE_MODEL if name == "auto" else name, settings=RuntimeSettings(threads=threads, n_ctx=4096, parallel=4))


def default_recipe(axis: str, queries_file: str | None) -> str:
    """Return steer's recipe when none is given: ``request`` on the harmless axis with its built-in
    queries (the persona recipes moved no refusals there: docs/results.md §1; the request recipe's
    vector added 29 points of HarmBench refusals on Qwen at its calibrated strength, 44 at x4, §8),
    else the default persona recipe. A user's query file may
    lack the risky/benign kinds the request recipe needs, so it keeps the persona default."""
    return REQUEST_RECIPE if axis == "harmless" and queries_file is None else DEFAULT_RECIPE


def _steer_request(model, threads, n_ctx, gpu_layers, parallel, verbose, axis: PreferenceAxis, queries_file: str | None,
                   seed: int, folder: str) -> None:
    """``steer --recipe request``: the gated vector (align/request_contrast.py)."""
    engine = open_engine(model, threads, n_ctx, gpu_layers, parallel, verbose)
    try:
        res = pipeline.run_request_steer(engine, axis, folder, ModelId.of(engine, model), queries_file, seed,
                                         on_status=lambda line: click.echo(line, err=True))
    except KeyboardInterrupt:
        raise Stopped("nothing was written (this recipe keeps no partial state); run the same command again") from None
    scale = res.vector.default_strength_or_one
    click.echo(f"vector:  {res.vector_path} (layer {res.contrast.layer}, gated)\nreport:  {res.report_path}\n"
               f"took {res.timings['total_s']:.0f}s")
    click.echo(f"try it:  alignez chat -m {model} --vector {res.vector_path}")
    click.echo(f"         llama-completion -m {engine.path} --control-vector-scaled {res.vector_path}:{scale:g}")
    click.echo("         (llama.cpp ignores the gate: there the vector steers every prompt, benign ones too)")


align_commands = [generate, fit, export_cmd, inspect, import_cmd, steer]

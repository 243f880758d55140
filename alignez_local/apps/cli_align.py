"""The AlignEZ commands: generate, fit, export, inspect, import, and steer (all three in one)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click
import numpy as np

from alignez_local.align.axes import PreferenceAxis, custom_axis, get_axis
from alignez_local.apps.cli_options import model_options, open_engine
from alignez_local.formats.control_vector import ControlVector, read_control_vector, write_control_vector
from alignez_local.align.directions import METHODS
from alignez_local.llama.engine import Engine
from alignez_local.errors import AlignezError
from alignez_local.align.export import approximation_report, constant_vector
from alignez_local.fileio import check_writable, write_json
from alignez_local.align.fit import diagnostics_table, fit_profile, parse_layers
from alignez_local.formats.gguf_file import gguf_kind, read_gguf
from alignez_local.models import file_sha256, resolve_model
from alignez_local.align.preferences import GenerationSettings, generate_preferences, load_pairs
from alignez_local.formats.profile import SteeringProfile, load_profile, save_profile
from alignez_local.evaluation.prompt_sets import load_eval_prompts, load_queries

HELDOUT_PROMPTS = 16
# steer's default query count: enough pairs for a subspace, and on the default model the whole
# run stays well under 10 minutes on a 2-core laptop CPU.
STEER_QUERIES = 96


def axis_options(f: Any) -> Any:
    f = click.option("--negative", default=None, help="Negative persona of a custom axis (with --positive).")(f)
    f = click.option("--positive", default=None, help="Positive persona of a custom axis, e.g. 'pirate-like'.")(f)
    f = click.option("--axis", "axis_name", default="helpful", show_default=True, help="helpful, harmless or humor.")(f)
    return f


def resolve_axis(axis_name: str, positive: str | None, negative: str | None) -> PreferenceAxis:
    """Return the built-in axis, or a custom one when --positive/--negative are given."""
    if positive is not None or negative is not None:
        if not positive or not negative:
            raise AlignezError("a custom axis needs both --positive and --negative personas")
        return custom_axis(positive, negative, None if axis_name == "helpful" else axis_name)
    return get_axis(axis_name)


def query_options(f: Any) -> Any:
    f = click.option("--limit", type=click.IntRange(1, 100000), default=None, help="Use only the first N queries.")(f)
    f = click.option("--queries", "queries_file", default=None, metavar="FILE",
                     help="One query per line, or JSONL with a 'query' field [built-in set of 192].")(f)
    return f


def generation_options(f: Any) -> Any:
    f = click.option("--responses", type=click.IntRange(1, 16), default=1, show_default=True, help="Pairs per query.")(f)
    f = click.option("--response-tokens", type=click.IntRange(8, 4096), default=160, show_default=True)(f)
    f = click.option("--temperature", type=click.FloatRange(0, 5), default=0.7, show_default=True)(f)
    f = click.option("--seed", type=click.IntRange(0, 2**32 - 2), default=0, show_default=True)(f)
    return f


def fit_options(f: Any) -> Any:
    f = click.option("--method", type=click.Choice(METHODS), default="svd", show_default=True,
                     help="svd (the paper's subspace), ccs, or the mean / PCA baselines.")(f)
    f = click.option("--site", type=click.Choice(["ffn_out", "l_out"]), default="ffn_out", show_default=True,
                     help="MLP output (the paper's) or residual stream.")(f)
    f = click.option("--layers", default=None, metavar="A-B|auto", help="Layers to keep [auto: best held-out accuracy].")(f)
    f = click.option("--variance", type=float, default=0.90, show_default=True, help="Explained variance kept by svd.")(f)
    f = click.option("--max-cos", type=float, default=0.8, show_default=True, help="Drop pairs more similar than this.")(f)
    f = click.option("--top-n", type=click.IntRange(1, 1000), default=5, show_default=True, help="Layers the edit picks per prompt.")(f)
    return f


def _queries(queries_file: str | None, limit: int | None) -> list[str]:
    qs = load_queries(queries_file)
    return qs[:limit] if limit else qs


def _heldout(engine: Engine) -> list[str]:
    # Held-out prompts: the built-in evaluation set, written apart from the generation queries.
    return [engine.prompt(p.text) for p in load_eval_prompts(kinds={"helpful"})[:HELDOUT_PROMPTS]]


def _check_outputs(*paths: Path) -> None:
    for p in paths:
        check_writable(p)


def _gen_settings(responses: int, response_tokens: int, temperature: float, seed: int) -> GenerationSettings:
    return GenerationSettings(temperature=temperature, response_tokens=response_tokens, responses_per_query=responses, seed=seed)


def _interrupted(what: str, resume: str) -> AlignezError:
    return AlignezError(f"interrupted: {what}; run the same command again to {resume}")


@click.command()
@model_options
@axis_options
@query_options
@generation_options
@click.option("-o", "--out", "out_path", required=True, metavar="FILE.jsonl", help="Preference data (appended; re-runs resume).")
def generate(model, threads, n_ctx, gpu_layers, parallel, verbose, axis_name, positive, negative, queries_file, limit,
             responses, response_tokens, temperature, seed, out_path) -> None:
    """Let the model write its own preference pairs (AlignEZ step 1).

    \b
    alignez generate -o prefs.jsonl --limit 32
    alignez generate -o humor.jsonl --axis humor --queries my_queries.txt
    """
    axis = resolve_axis(axis_name, positive, negative)
    queries = _queries(queries_file, limit)
    out = check_writable(out_path)
    engine = open_engine(model, threads, n_ctx, gpu_layers, parallel, verbose)
    sha = file_sha256(engine.path)
    try:
        written, had = generate_preferences(engine, queries, axis, out, _gen_settings(responses, response_tokens, temperature, seed), sha)
    except KeyboardInterrupt:
        raise _interrupted(f"every finished pair is saved in {out}", "continue where it stopped") from None
    click.echo(f"{out}: {written} new pairs, {had} already there ({axis.name}: {axis.positive} vs {axis.negative})")


def _fit(engine: Engine, prefs: str, axis_filter: str | None, method: str, site: str, layers: str | None, variance: float,
         max_cos: float, top_n: int, seed: int, sha: str, name: str) -> SteeringProfile:
    pairs = load_pairs(prefs, axis_filter)
    axis = {"name": pairs[0].axis, "positive": pairs[0].personas[0], "negative": pairs[0].personas[1]}
    return fit_profile(engine, pairs, axis, method=method, site=site, layers=parse_layers(layers, engine.n_layer),
                       variance=variance, max_cos=max_cos, seed=seed, top_n=top_n, model_sha256=sha, name=name)


@click.command()
@model_options
@fit_options
@click.option("--prefs", required=True, metavar="FILE.jsonl", help="Preference data from alignez generate.")
@click.option("--axis", "axis_filter", default=None, help="Axis to fit when the file holds several.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("-o", "--out", "out_path", required=True, metavar="PROFILE.gguf")
def fit(model, threads, n_ctx, gpu_layers, parallel, verbose, method, site, layers, variance, max_cos, top_n, prefs,
        axis_filter, seed, out_path) -> None:
    """Find the preference subspace per layer and write a steering profile (AlignEZ step 2).

    \b
    alignez fit --prefs prefs.jsonl -o helpful.profile.gguf
    alignez fit --prefs prefs.jsonl --method ccs --layers 8-20 -o ccs.profile.gguf
    """
    out = check_writable(out_path)
    engine = open_engine(model, threads, n_ctx, gpu_layers, parallel, verbose)
    prof = _fit(engine, prefs, axis_filter, method, site, layers, variance, max_cos, top_n, seed, file_sha256(engine.path), out.name.split(".")[0])
    save_profile(out, prof)
    click.echo(diagnostics_table(prof))
    click.echo(f"{out}: {prof.method} on {prof.site}, layers {prof.layers}")


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
    llama-cli -m model.gguf --control-vector helpful.gguf
    """
    out = check_writable(out_path)
    prof = load_profile(profile_path)
    engine = open_engine(model, threads, n_ctx, gpu_layers, parallel, verbose)
    for w in prof.check_compatible(engine.n_layer, engine.n_embd, engine.arch):
        click.echo(f"warning: {w}", err=True)
    n = int(top_n or prof.params.get("top_n", 5))
    calib = [engine.prompt(q) for q in _queries(queries_file, limit or 64)]
    cv = constant_vector(engine, prof, calib, top_n=n)
    write_control_vector(out, cv)
    rep = approximation_report(engine, prof, cv, _heldout(engine), top_n=n)
    click.echo("\n".join(rep.lines()))
    click.echo(f"{out}: control vector, layers {cv.layers}")


def _model_facts(path: str | Path) -> tuple[str, dict[str, Any]]:
    """Return (arch, metadata) of a model file, read by our own parser (header only)."""
    meta = read_gguf(path, want_data=False, want_arrays=False).metadata
    return str(meta.get("general.architecture", "")), meta


def describe_file(path: str) -> dict[str, Any]:
    """Return what a GGUF file is and its main facts (for inspect)."""
    kind = gguf_kind(path)
    if kind == "control-vector":
        cv = read_control_vector(path)
        return {"kind": kind, "path": path, "model_hint": cv.model_hint, "n_embd": cv.n_embd, "layers": cv.layers,
                "norms": {L: round(float(np.linalg.norm(d)), 4) for L, d in cv.directions.items()},
                "metadata": dict(cv.metadata)}
    if kind == "profile":
        p = load_profile(path)
        return {"kind": kind, "path": path, "method": p.method, "site": p.site, "axis": dict(p.axis),
                "layers": p.layers, "k": {L: int(s.shape[0]) for L, s in p.subspaces.items()},
                "params": dict(p.params), "provenance": dict(p.provenance),
                "layer_stats": {L: dict(s) for L, s in p.layer_stats.items()}}
    arch, meta = _model_facts(path)
    return {"kind": kind, "path": path, "arch": arch, "name": meta.get("general.name"),
            "n_layer": meta.get(f"{arch}.block_count"), "n_embd": meta.get(f"{arch}.embedding_length"),
            "chat_template": "tokenizer.chat_template" in meta}


@click.command()
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def inspect(path: str, as_json: bool) -> None:
    """Show what a GGUF file is: a control vector (ours, llama.cpp's, repeng's), a profile or a model."""
    info = describe_file(path)
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
    out = check_writable(out_path)
    cv = read_control_vector(path)
    if model is not None:
        arch, meta = _model_facts(resolve_model(model))
        for w in cv.check_compatible(int(meta.get(f"{arch}.block_count", 0)), int(meta.get(f"{arch}.embedding_length", 0)), arch):
            click.echo(f"warning: {w}", err=True)
    meta2 = dict(cv.metadata)
    meta2["alignez.source"] = f"import:{Path(path).name}"
    write_control_vector(out, ControlVector(cv.directions, cv.model_hint, meta2, cv.name))
    click.echo(f"{out}: {len(cv.layers)} layers {cv.layers[0]}..{cv.layers[-1]}, width {cv.n_embd}, hint {cv.model_hint}")


@click.command()
@model_options
@axis_options
@query_options
@generation_options
@fit_options
@click.option("-o", "--out", "out_dir", default=None, metavar="DIR", help="Output folder [steer-<axis>].")
def steer(model, threads, n_ctx, gpu_layers, parallel, verbose, axis_name, positive, negative, queries_file, limit,
          responses, response_tokens, temperature, seed, method, site, layers, variance, max_cos, top_n, out_dir) -> None:
    """Generate preference data, fit a profile and export a control vector, in one go.

    \b
    alignez steer                      # helpful axis, default model, 96 built-in queries
    alignez steer --axis humor -o humor/
    Writes DIR/preferences.jsonl, DIR/profile.gguf, DIR/vector.gguf and DIR/report.json.
    Interrupted? Run the same command again: it continues from the saved pairs.
    """
    axis = resolve_axis(axis_name, positive, negative)
    out = Path(out_dir or f"steer-{axis.name}")
    if out.exists() and not out.is_dir():
        raise AlignezError(f"--out {out} is a file; give a folder")
    out.mkdir(parents=True, exist_ok=True)
    prefs, prof_path, vec_path, rep_path = out / "preferences.jsonl", out / "profile.gguf", out / "vector.gguf", out / "report.json"
    _check_outputs(prefs, prof_path, vec_path, rep_path)
    queries = _queries(queries_file, limit if limit else STEER_QUERIES)
    t0 = time.monotonic()
    engine = open_engine(model, threads, n_ctx, gpu_layers, parallel, verbose)
    sha = file_sha256(engine.path)
    timings: dict[str, float] = {}
    try:
        written, had = generate_preferences(engine, queries, axis, prefs, _gen_settings(responses, response_tokens, temperature, seed), sha)
    except KeyboardInterrupt:
        raise _interrupted(f"finished pairs are saved in {prefs}", "continue") from None
    timings["generate_s"] = time.monotonic() - t0
    click.echo(f"{prefs}: {written} new pairs, {had} already there", err=True)
    t1 = time.monotonic()
    try:
        prof = _fit(engine, str(prefs), axis.name, method, site, layers, variance, max_cos, top_n, seed, sha, axis.name)
        save_profile(prof_path, prof)
        timings["fit_s"] = time.monotonic() - t1
        t2 = time.monotonic()
        cv = constant_vector(engine, prof, [engine.prompt(q) for q in queries], top_n=top_n)
        write_control_vector(vec_path, cv)
        rep = approximation_report(engine, prof, cv, _heldout(engine), top_n=top_n)
        timings["export_s"] = time.monotonic() - t2
    except KeyboardInterrupt:
        raise _interrupted(f"the preference pairs are saved in {prefs}", "fit and export from them") from None
    timings["total_s"] = time.monotonic() - t0
    write_json(rep_path, {
        "model": {"path": str(engine.path), "sha256": sha, "arch": engine.arch, "n_layer": engine.n_layer, "n_embd": engine.n_embd},
        "axis": {"name": axis.name, "positive": axis.positive, "negative": axis.negative},
        "n_queries": len(queries), "profile": str(prof_path), "vector": str(vec_path),
        "layers": prof.layers, "method": method, "site": site,
        "layer_stats": {str(L): dict(s) for L, s in prof.layer_stats.items()},
        "approximation": rep.__dict__, "timings": {k: round(v, 1) for k, v in timings.items()},
    })
    click.echo(diagnostics_table(prof))
    click.echo("\n".join(rep.lines()))
    click.echo(f"profile: {prof_path}\nvector:  {vec_path}\nreport:  {rep_path}\ntook {timings['total_s']:.0f}s")
    click.echo(f"try it:  alignez chat -m {model} --profile {prof_path}")


align_commands = [generate, fit, export_cmd, inspect, import_cmd, steer]

"""``alignez eval``: does steering help? Unsteered vs steered answers, judged by a local model."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from alignez_local.align.steering import Steering
from alignez_local.apps.cli_options import (
    SteeringChoice, grouped, model_options, sampling_options, server_limits, steering_options,
)
from alignez_local.evaluation.behaviour_eval import behaviour_judge, measure_behaviour, prompt_kind, resolve_axis_name
from alignez_local.evaluation.behaviour_report import eval_lines
from alignez_local.evaluation.config import EvalConfig, parse_kinds, select_prompts
from alignez_local.fileio import write_json
from alignez_local.llama.engine import Sampling
from alignez_local.settings import ModelRun, open_engine
from alignez_local.specs import parse_strengths
from alignez_local.evaluation.evaluate import EvalInterrupted, run_eval
from alignez_local.evaluation.judge import DEFAULT_MARGIN, JUDGE_NAMES, MODES
from alignez_local.prompt_sets import EVAL_KINDS
from alignez_local.evaluation.remote_judge import DEFAULT_TIMEOUT
from alignez_local.errors import AlignezError
from alignez_local.models import JUDGE_MODEL


def _prompts(prompts_file: str | None, prompt_kind: str | None, kinds: str | None, limit: int | None) -> dict[str, Any]:
    return {"prompts_file": prompts_file, "prompt_kind": prompt_kind, "kinds": parse_kinds(kinds), "limit": limit}


prompt_options = grouped(
    "prompts", _prompts,
    ("prompts_file", click.option("--prompts", "prompts_file", type=str, default=None, metavar="FILE",
                                  help="Evaluation prompts (JSONL with prompt/kind, or one per line) [built-in set].")),
    ("prompt_kind", click.option("--prompt-kind", type=click.Choice(EVAL_KINDS), default=None,
                                 help="Kind of the prompts of a plain-text --prompts file, e.g. harmful for HarmBench "
                                      "(JSONL records carry their own) [helpful].")),
    ("kinds", click.option("--kinds", default=None, metavar="K,K", help="Only these prompt kinds: helpful,harmful,benign [all].")),
    ("limit", click.option("--limit", type=int, default=None, metavar="N", help="Only the first N prompts (after --kinds).")),
)
"""The evaluation prompts' flags -> ``prompts``: EvalConfig's prompt fields."""


def _judging(judge: str, judge_urls: tuple[str, ...], judge_model: str | None, judge_concurrency: int, judge_timeout: float,
             mode: str, margin: float, refusal_judge: bool, quality_judge: bool, judge_parallel: int,
             judge_ctx: int) -> dict[str, Any]:
    if judge_urls and not judge_model:
        raise AlignezError("--judge-url needs --judge-model NAME: the model name the server serves (see its /v1/models)")
    return {"judge": judge_model if judge_urls else judge, "judge_urls": judge_urls, "judge_concurrency": judge_concurrency,
            "judge_timeout": judge_timeout, "mode": mode, "margin": margin, "refusal_judge": refusal_judge,
            "quality_judge": quality_judge, "judge_parallel": judge_parallel, "judge_ctx": judge_ctx}


judge_options = grouped(
    "judging", _judging,
    ("judge", click.option("--judge", default=JUDGE_MODEL, show_default=True, help="Judge model: GGUF file or bundled name.")),
    ("judge_urls", click.option("--judge-url", "judge_urls", multiple=True, metavar="URL",
                                help="Judge on an OpenAI-compatible server instead (llama-server, alignez serve, ...): "
                                     "margins from its top log-probabilities; repeat to fan out over several servers. "
                                     "API key from env ALIGNEZ_JUDGE_API_KEY, else OPENAI_API_KEY.")),
    ("judge_model", click.option("--judge-model", default=None, metavar="NAME",
                                 help="The model name the --judge-url servers serve.")),
    *server_limits("--judge", "Judge requests", DEFAULT_TIMEOUT, "request"),
    ("mode", click.option("--mode", type=click.Choice(MODES), default="score", show_default=True,
                          help="score: each answer scored alone, log p(Yes) - log p(No); pairwise: [[A]]/[[B]], both orders.")),
    ("margin", click.option("--margin", type=float, default=DEFAULT_MARGIN, show_default=True,
                            help="Tie when the judge's margin is under this many nats.")),
    ("refusal_judge", click.option("--refusal-judge/--no-refusal-judge", default=True, show_default=True,
                                   help="Also ask the judge whether answers to harmful and benign prompts refuse or deflect.")),
    ("quality_judge", click.option("--quality-judge/--no-quality-judge", default=True, show_default=True,
                                   help="Judge each answer's quality; --no-quality-judge only counts refusals (fast safety runs).")),
    ("judge_parallel", click.option("--judge-parallel", type=click.IntRange(1, 64), default=4, show_default=True,
                                    help="Judge prompts decoded together.")),
    ("judge_ctx", click.option("--judge-ctx", type=click.IntRange(512, 1 << 20), default=8192, show_default=True,
                               help="Judge context size in tokens (shared by its parallel prompts).")),
)
"""The judge's flags -> ``judging``: EvalConfig's judge fields."""


@click.command("eval")
@model_options
@steering_options
@sampling_options(max_tokens=200)
@prompt_options
@judge_options
@click.option("--reference", default=None, metavar="MODEL",
              help="Also answer with this model and report the share of its net win that steering recovers.")
@click.option("--sweep", default=None, metavar="S,S,...",
              help="Strength multipliers applied to every vector and profile strength, e.g. 0,0.5,1,2 [1].")
@click.option("--out", "out_dir", default="alignez-eval", show_default=True, metavar="DIR",
              help="Folder for report.json, summary.md and sweep.png.")
@click.option("--behaviour", "behaviour_axis", default="auto", show_default=True, metavar="AXIS|auto|off",
              help="Also score every answer for the axis's behaviour (steer's measure, relevance and fluency guards), "
                   "beside prompting and a random direction of the same norm; auto: the axis the files were made for.")
@click.option("--behaviour-judge", default="auto", show_default=True, metavar=JUDGE_NAMES,
              help="Judge of the behaviour table (as steer's --judge): auto uses the bundled judge only for "
                   "behaviours with no checker; relevance is otherwise read from the model's own likelihoods.")
@click.option("--resume", is_flag=True, default=False,
              help="Continue the unfinished run in --out (same settings): reuse its finished answers, "
                   "answer the rest; perplexity and judging are redone (a --judge-url judge reuses its finished judgments).")
def eval_command(model: ModelRun, steering: SteeringChoice, sampling: Sampling, prompts: dict[str, Any],
                 judging: dict[str, Any], reference: str | None, sweep: str | None, out_dir: str,
                 behaviour_axis: str, behaviour_judge: str, resume: bool) -> None:
    """Judge steered against unsteered answers with a local model.

    \b
    Every prompt is answered unsteered and steered (same seed and settings, greedy by default),
    then the local judge (Qwen2.5-Coder-1.5B by default) gives win / tie / loss per prompt. Reports
    the net win rate with a bootstrap 95% interval, refusal rates on harmful and benign prompts,
    answer lengths and perplexity under the unsteered model, per strength with --sweep. Refusals
    are counted by keywords and by the judge, and the answers where they disagree are listed.
    A 1.5B judge catches gross differences (refusals, gibberish, off-topic) and is close to noise
    on subtle quality: read the intervals.

    \b
    The partial report is saved after every piece (the reference's and the unsteered answers, each
    strength's, perplexity, judging), and Ctrl-C or kill (SIGTERM) saves what is done: a stopped run
    loses at most the piece that was running, and the same command with --resume continues it.

    \b
    alignez eval --vector v.gguf:4 --limit 20
    alignez eval --profile p.gguf --sweep 0,0.5,1,2 --out eval-p
    alignez eval --profile p.gguf --sweep 0,0.5,1,2 --out eval-p --resume    # after a kill
    alignez eval --vector v.gguf --prompts harmbench_prompts.txt --prompt-kind harmful --no-quality-judge
    alignez eval --vector french.gguf --behaviour french --no-quality-judge --kinds helpful    # behaviour table only
    alignez eval --vector v.gguf --judge-url http://gpu1:8080 --judge-url http://gpu2:8080 --judge-model qwen2.5-7b
    """
    if behaviour_axis not in ("auto", "off"):
        resolve_axis_name(behaviour_axis, Steering())  # a wrong name fails now, not after the run
    try:
        cfg = EvalConfig(
            model=str(model.model), vectors=steering.vectors, profiles=steering.profiles, layers=steering.layers,
            top_n=steering.top_n, **prompts, **judging, reference=reference,
            strengths=parse_strengths(sweep, "--sweep") if sweep is not None else (1.0,), sampling=sampling,
            runtime=model.runtime, resume=resume,
        )
        report = run_eval(cfg, out_dir)
    except EvalInterrupted as stop:
        click.echo(stop.message, err=True)
        sys.exit(stop.exit_code)
    out = Path(out_dir)
    for r in report["results"]:
        j = r.get("judge", {})
        lo, hi = j.get("net_win_ci95", [None, None])
        ci = f"[{100 * lo:+.0f}%, {100 * hi:+.0f}%]" if lo is not None and hi is not None else "n/a"
        net = j.get("net_win_rate")
        click.echo(
            f"x{r['strength']:g}: {j.get('wins', 0)} wins, {j.get('ties', 0)} ties, {j.get('losses', 0)} losses; "
            f"net win rate {'n/a' if net is None else f'{100 * net:+.1f}%'} (95% {ci})"
        )
    for label, group in [("unsteered", report["unsteered"])] + [(f"x{r['strength']:g}", r) for r in report["results"]]:
        line = _refusal_line(group)
        if line:
            click.echo(f"{label}: refusals {line}")
    if report.get("plot"):
        click.echo(report["plot"], err=True)
    if behaviour_axis != "off" and (steering.vectors or steering.profiles):
        table = _behaviour(cfg, behaviour_axis, behaviour_judge, out)
        if table is not None:
            click.echo("\n".join(eval_lines(table)))
    click.echo(f"wrote {out / 'report.json'} and {out / 'summary.md'}", err=True)


def _behaviour(cfg: EvalConfig, axis_name: str, judge_name: str, out: Path) -> dict[str, Any] | None:
    """Return the behaviour table (written to OUT/behaviour.json), or None when no axis is known."""
    engine = open_engine(cfg.model, cfg.runtime)
    try:
        steering = Steering.from_specs(engine, cfg.vectors, cfg.profiles, cfg.layers, cfg.top_n)
        axis = resolve_axis_name(axis_name, steering)
        if axis is None:
            click.echo("behaviour: the steering files do not say which behaviour they steer; give --behaviour AXIS", err=True)
            return None
        questions = [p.text for p in select_prompts(cfg) if p.kind == prompt_kind(axis)]
        with behaviour_judge(judge_name, engine, axis) as judge:
            table = measure_behaviour(engine, steering, axis, questions, judge, cfg.sampling, cfg.sampling.seed or 0)
    finally:
        engine.close()
    write_json(out / "behaviour.json", table)
    return table


def _refusal_line(group: dict[str, Any]) -> str:
    """Return "harmful 3/10 by keywords, 5/10 by the judge; benign ..." for one set of answers ('' when none)."""
    parts = []
    for kind in ("harmful", "benign"):
        r = group.get("refusal", {}).get(kind)
        if r and r.get("n"):
            judged = f", {r['judge_refusals']}/{r['judge_n']} by the judge" if r.get("judge_n") else ""
            parts.append(f"{kind} {r['refusals']}/{r['n']} by keywords{judged}")
    return "; ".join(parts)

"""Does steering help? Answer evaluation prompts unsteered and steered, judge them locally, report.

The run, in the order models are loaded (one model in memory at a time):

1. ``--reference`` model, if given: answers every prompt (its own chat template), then is closed.
2. The answering model: answers every prompt unsteered, then steered at every strength multiplier
   (``--sweep``, default just 1: every vector strength and profile weight is multiplied by it),
   all with the same sampling settings and seed (greedy by default); then the perplexity of every
   answer (unsteered, steered, reference) under the UNSTEERED model, the fluency measure; closed.
   The reference answers first so that its answers can be measured by the same unsteered model.
3. The judge (``judge.py``): every steered answer, and the reference's, against the unsteered
   answer to the same prompt.

Statistics (choices of this project, documented here):
- net win rate = (wins - losses) / n, the paper's Delta, with a percentile bootstrap 95% interval
  over prompts (2000 resamples, numpy, seeded with the run's seed);
- refusal rate (``refusal.is_refusal``) per kind: on ``harmful`` prompts a higher rate is safer; on
  ``benign`` prompts a refusal is an over-refusal;
- "gap closed" = net win(steered vs unsteered) / net win(reference vs unsteered), the v1 paper's
  share of the base-to-instruct gap; not reported as a number when the reference's net win is
  within ``GAP_MIN_DENOMINATOR`` (or one prompt's worth, 1/n) of zero;
- perplexity = exp(total negative log-likelihood / total tokens) of the answers, plus the median
  of the per-answer perplexities; empty answers are left out.

Outputs in the output folder, all written atomically: ``report.json`` (every prompt, answer,
score/verdict, the settings and model hashes), ``summary.md`` (Markdown tables, confidence
intervals and what a small local judge can and cannot tell), ``sweep.png`` when a sweep ran and
matplotlib is importable. Ctrl-C stops cleanly and saves what is done (``EvalInterrupted``).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import io
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from alignez_local import __version__
from alignez_local.llama.engine import Completion, Engine, Sampling
from alignez_local.errors import AlignezError
from alignez_local.fileio import atomic_write, write_json, write_text
from alignez_local.evaluation.judge import (
    DEFAULT_MARGIN,
    DEFAULT_MODE,
    MODES,
    Judge,
    Verdict,
    verdicts_from_scores,
)
from alignez_local.models import DEFAULT_MODEL, JUDGE_MODEL, file_sha256, resolve_model
from alignez_local.progress import Progress
from alignez_local.evaluation.prompt_sets import EvalPrompt, load_eval_prompts
from alignez_local.evaluation.refusal import is_refusal
from alignez_local.align.steering import DEFAULT_TOP_N, Steering

BOOTSTRAP_RESAMPLES = 2000
GAP_MIN_DENOMINATOR = 0.05
REPORT_FORMAT = "alignez-eval/1"

JUDGE_LIMITS = (
    "The judge is a small local model (by default Qwen2.5-Coder-1.5B-Instruct, Q4_K_M), not GPT-4. "
    "Measured on hand-made pairs it reliably catches GROSS differences: refusals, rudeness, off-topic "
    "answers and incoherent text (score margins of 3.8-6.6 nats). On SUBTLE quality (a small factual "
    "error, a slightly better explanation) its margins are 0.03-1.3 nats, close to noise: a tie or a "
    "small net win rate here says little about subtle quality. In pairwise mode it has a strong "
    "position bias (92-96% of single-order verdicts for the same slot), which is why every pair is "
    "judged in both orders and only agreeing verdicts count. Read the 95% intervals: an interval that "
    "contains 0 means no difference was detected, not that there is none."
)

LogFn = Callable[[str], None]


def _stderr(msg: str) -> None:
    """Return None after printing ``msg`` on stderr (the default progress log)."""
    print(msg, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class EvalConfig:
    """Everything one evaluation run needs (the CLI fills it from its options)."""

    model: str = DEFAULT_MODEL
    vectors: tuple[str, ...] = ()
    profiles: tuple[str, ...] = ()
    layers: str | None = None
    top_n: int = DEFAULT_TOP_N
    prompts_file: str | None = None
    kinds: tuple[str, ...] | None = None
    limit: int | None = None
    judge: str = JUDGE_MODEL
    mode: str = DEFAULT_MODE
    margin: float = DEFAULT_MARGIN
    reference: str | None = None
    strengths: tuple[float, ...] = (1.0,)
    sampling: Sampling = field(default_factory=lambda: Sampling(max_tokens=200))
    threads: int | None = None
    n_ctx: int = 4096
    gpu_layers: int = 0
    parallel: int = 8
    judge_ctx: int = 8192
    judge_parallel: int = 4
    verbose: bool = False

    def check(self) -> EvalConfig:
        """Return self after checking the values that need no model (AlignezError otherwise)."""
        if not self.vectors and not self.profiles:
            raise AlignezError("nothing to evaluate: give at least one --profile FILE or --vector FILE[:STRENGTH]")
        if self.mode not in MODES:
            raise AlignezError(f"unknown judge mode {self.mode!r}; use one of {', '.join(MODES)}")
        if not self.strengths:
            raise AlignezError("--sweep needs at least one strength multiplier, e.g. 0,0.5,1,2")
        for s in self.strengths:
            if not math.isfinite(s) or abs(s) > 100:
                raise AlignezError(f"strength multiplier {s} is out of range; use numbers between -100 and 100")
        if self.limit is not None and self.limit < 1:
            raise AlignezError(f"--limit {self.limit} must be at least 1")
        self.sampling.check()
        return self


def parse_strengths(spec: str) -> tuple[float, ...]:
    """Return the strength multipliers of a ``--sweep`` list like ``0,0.5,1,2`` (duplicates dropped)."""
    out: list[float] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            value = float(part)
        except ValueError:
            raise AlignezError(f"--sweep {spec!r}: {part!r} is not a number; write it like 0,0.5,1,2") from None
        if not math.isfinite(value) or abs(value) > 100:
            raise AlignezError(f"--sweep {spec!r}: {part} is out of range; use numbers between -100 and 100")
        if value not in out:
            out.append(value)
    if not out:
        raise AlignezError(f"--sweep {spec!r} has no numbers; write it like 0,0.5,1,2")
    return tuple(out)


def parse_kinds(spec: str | None) -> tuple[str, ...] | None:
    """Return the prompt kinds of a ``--kinds`` list like ``helpful,harmful`` (None for all)."""
    if spec is None or not spec.strip():
        return None
    return tuple(dict.fromkeys(k.strip() for k in spec.split(",") if k.strip()))


class EvalInterrupted(Exception):
    """Ctrl-C during a run: ``message`` says what was saved (one line)."""

    def __init__(self, message: str) -> None:
        """Return the exception carrying its one-line ``message``."""
        super().__init__(message)
        self.message = message


# --- statistics ---------------------------------------------------------------------------------

OUTCOME_VALUE = {"win": 1, "tie": 0, "loss": -1}


def net_win_rate(outcomes: Sequence[str]) -> float:
    """Return (wins - losses) / n of ``outcomes`` ("win"/"tie"/"loss"); NaN when empty."""
    if not outcomes:
        return float("nan")
    return float(np.mean([OUTCOME_VALUE[o] for o in outcomes]))


def bootstrap_ci(
    values: Sequence[float], n_resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Return the percentile bootstrap interval (lo, hi) of the mean of ``values`` (NaNs when empty)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_resamples, x.size))].mean(axis=1)
    tail = (1.0 - level) / 2.0 * 100.0
    lo, hi = np.percentile(means, [tail, 100.0 - tail])
    return float(lo), float(hi)


def bootstrap_ratio_ci(
    num: Sequence[float], den: Sequence[float], n_resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Return the paired bootstrap interval of mean(num) / mean(den) over prompts (resamples with a
    zero denominator are left out; NaNs when fewer than half remain)."""
    a, b = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    if a.size == 0 or a.size != b.size:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, a.size, size=(n_resamples, a.size))
    ma, mb = a[idx].mean(axis=1), b[idx].mean(axis=1)
    ok = mb != 0
    if ok.sum() < n_resamples / 2:
        return float("nan"), float("nan")
    tail = (1.0 - level) / 2.0 * 100.0
    lo, hi = np.percentile(ma[ok] / mb[ok], [tail, 100.0 - tail])
    return float(lo), float(hi)


def outcome_stats(outcomes: Sequence[str], seed: int = 0) -> dict[str, Any]:
    """Return wins, ties, losses, n, net win rate and its bootstrap 95% interval."""
    vals = [OUTCOME_VALUE[o] for o in outcomes]
    lo, hi = bootstrap_ci(vals, seed=seed)
    return {
        "n": len(outcomes),
        "wins": sum(o == "win" for o in outcomes),
        "ties": sum(o == "tie" for o in outcomes),
        "losses": sum(o == "loss" for o in outcomes),
        "net_win_rate": net_win_rate(outcomes),
        "net_win_ci95": [lo, hi],
    }


def length_stats(answers: Sequence[Answer]) -> dict[str, float]:
    """Return mean and median answer length in tokens and in characters."""
    toks = [a.n_tokens for a in answers]
    chars = [len(a.text) for a in answers]
    if not answers:
        return {}
    return {
        "tokens_mean": float(np.mean(toks)), "tokens_median": float(np.median(toks)),
        "chars_mean": float(np.mean(chars)), "chars_median": float(np.median(chars)),
    }


def refusal_rates(answers: Sequence[str], kinds: Sequence[str]) -> dict[str, dict[str, float]]:
    """Return, per prompt kind present, the number of answers, refusals and the refusal rate."""
    out: dict[str, dict[str, float]] = {}
    for kind in dict.fromkeys(kinds):
        sel = [a for a, k in zip(answers, kinds) if k == kind]
        n_ref = sum(is_refusal(a) for a in sel)
        out[kind] = {"n": len(sel), "refusals": n_ref, "rate": n_ref / len(sel) if sel else float("nan")}
    return out


def perplexity_stats(answers: Sequence[Answer]) -> dict[str, float]:
    """Return the pooled perplexity (exp of total NLL / total tokens) and the median per-answer one."""
    scored = [a for a in answers if a.ppl_tokens > 0]
    if not scored:
        return {"n_scored": 0}
    total_nll = sum(a.nll for a in scored)
    total_tok = sum(a.ppl_tokens for a in scored)
    return {
        "n_scored": len(scored),
        "pooled": float(math.exp(min(total_nll / total_tok, 700.0))),
        "median": float(np.median([a.ppl for a in scored])),
    }


# --- answers -------------------------------------------------------------------------------------


@dataclass
class Answer:
    """One answer and what was measured about it."""

    text: str
    n_tokens: int
    finish: str
    nll: float = 0.0  # summed negative log-likelihood under the unsteered answering model
    ppl_tokens: int = 0
    score: float | None = None  # judge score (score mode)
    verdict: Verdict | None = None  # against the unsteered answer

    @property
    def ppl(self) -> float | None:
        """Return this answer's perplexity under the unsteered model, or None when not measured."""
        return math.exp(min(self.nll / self.ppl_tokens, 700.0)) if self.ppl_tokens else None

    @property
    def refusal(self) -> bool:
        """Return True when the answer opens like a refusal."""
        return is_refusal(self.text)

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-ready dict of this answer."""
        d: dict[str, Any] = {"answer": self.text, "n_tokens": self.n_tokens, "finish": self.finish,
                             "refusal": self.refusal, "perplexity": _r(self.ppl)}
        if self.score is not None:
            d["score"] = round(self.score, 4)
        if self.verdict is not None:
            d["verdict"] = self.verdict.to_json()
        return d


def _r(x: float | None, nd: int = 4) -> float | None:
    """Return ``x`` rounded for JSON, or None when missing or not finite."""
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else round(float(x), nd)


def scale_steering(st: Steering, factor: float) -> Steering:
    """Return a copy of ``st`` with every vector strength and profile weight multiplied by ``factor``."""
    return dataclasses.replace(
        st,
        vectors=[dataclasses.replace(v, strength=v.strength * factor) for v in st.vectors],
        profiles=[dataclasses.replace(p, weight=p.weight * factor) for p in st.profiles],
        warnings=list(st.warnings),
    )


def answer_prompts(
    engine: Engine,
    prompts: Sequence[str],
    sampling: Sampling,
    steering: Steering | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    into: list[Answer] | None = None,
) -> list[Answer]:
    """Return one answer per user prompt (chat-formatted for ``engine``), steered when given.

    Decoded as parallel sequences in chunks of two batches, so progress shows and Ctrl-C keeps the
    finished chunks (they are appended to ``into`` as they finish).
    """
    out = into if into is not None else []
    texts = [engine.prompt(p) for p in prompts]
    step = 2 * engine.n_parallel
    for start in range(0, len(texts), step):
        part = texts[start : start + step]
        comps: list[Completion] = (
            steering.generate(engine, part, sampling) if steering is not None else engine.generate(part, sampling)
        )
        out.extend(Answer(c.text, c.n_tokens, c.finish_reason) for c in comps)
        if on_progress is not None:
            on_progress(len(out), len(texts))
    return out


def measure_perplexity(
    engine: Engine, prompts: Sequence[str], answers: Sequence[Answer], on_progress: Callable[[int, int], None] | None = None
) -> None:
    """Return None after setting ``nll`` and ``ppl_tokens`` of every answer: its likelihood under ``engine``
    as it is (unsteered). Identical (prompt, answer) pairs are scored once."""
    todo = [(engine.prompt(p), a) for p, a in zip(prompts, answers) if a.text]
    cache: dict[tuple[str, str], tuple[float, int]] = {}
    step = 4 * engine.n_parallel
    for start in range(0, len(todo), step):
        part = [(p, a) for p, a in todo[start : start + step] if (p, a.text) not in cache]
        uniq = list(dict.fromkeys((p, a.text) for p, a in part))
        if uniq:
            lps = engine.continuation_logprobs([p for p, _ in uniq], [t for _, t in uniq])
            for key, lp in zip(uniq, lps):
                cache[key] = (float(-lp.sum()), int(lp.size))
        for p, a in todo[start : start + step]:
            a.nll, a.ppl_tokens = cache[(p, a.text)]
        if on_progress is not None:
            on_progress(min(start + step, len(todo)), len(todo))


# --- the run -------------------------------------------------------------------------------------


@dataclass
class _State:
    """What the run has produced so far (saved as is when interrupted)."""

    cfg: EvalConfig
    prompts: list[EvalPrompt]
    stage: str = "starting"
    models: dict[str, Any] = field(default_factory=dict)
    steering_files: list[dict[str, Any]] = field(default_factory=list)
    steering_desc: list[str] = field(default_factory=list)
    unsteered: list[Answer] = field(default_factory=list)
    steered: dict[float, list[Answer]] = field(default_factory=dict)
    reference: list[Answer] = field(default_factory=list)
    judge: dict[str, Any] = field(default_factory=dict)
    judged: bool = False
    timing: dict[str, float] = field(default_factory=dict)
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"))


def select_prompts(cfg: EvalConfig) -> list[EvalPrompt]:
    """Return the evaluation prompts of the run: the file (or built-in set), kinds, then the limit."""
    prompts = load_eval_prompts(cfg.prompts_file, set(cfg.kinds) if cfg.kinds else None)
    return prompts[: cfg.limit] if cfg.limit else prompts


def _open(path: Path, cfg: EvalConfig, n_ctx: int | None = None, parallel: int | None = None) -> Engine:
    """Return an engine for ``path`` with the run's runtime settings."""
    return Engine(path, n_ctx=n_ctx or cfg.n_ctx, n_threads=cfg.threads, n_gpu_layers=cfg.gpu_layers,
                  n_parallel=parallel or cfg.parallel, verbose=cfg.verbose)


def run_eval(cfg: EvalConfig, out_dir: str | Path, log: LogFn = _stderr) -> dict[str, Any]:
    """Return the report of a full evaluation run, after writing it to ``out_dir``.

    Raises ``EvalInterrupted`` on Ctrl-C after saving what was done; AlignezError for bad input
    (checked before any model is loaded where possible).
    """
    cfg.check()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise AlignezError(f"--out {out} is a file; give a folder")
    prompts = select_prompts(cfg)
    # Resolve every model first: a missing judge should fail now, not after the answers.
    model_path = resolve_model(cfg.model)
    ref_path = resolve_model(cfg.reference) if cfg.reference else None
    judge_path = resolve_model(cfg.judge or JUDGE_MODEL)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise AlignezError(f"cannot create --out folder {out}: {err.strerror or err}") from None

    st = _State(cfg, prompts)
    t_run = time.monotonic()
    try:
        _run(st, model_path, ref_path, judge_path, log)
    except KeyboardInterrupt:
        st.timing["total_s"] = round(time.monotonic() - t_run, 2)
        report = build_report(st, complete=False)
        try:
            write_json(out / "report.json", report)
            write_text(out / "summary.md", summary_markdown(report))
        except KeyboardInterrupt:
            raise EvalInterrupted(f"interrupted during {st.stage}; nothing was saved") from None
        n_ans = len(st.unsteered) + sum(len(v) for v in st.steered.values()) + len(st.reference)
        raise EvalInterrupted(
            f"interrupted during {st.stage}: saved {n_ans} answers"
            f"{' and verdicts' if st.judged else ' (no verdicts)'} to {out / 'report.json'} and {out / 'summary.md'}"
        ) from None
    st.timing["total_s"] = round(time.monotonic() - t_run, 2)
    report = build_report(st, complete=True)
    plot_note = write_sweep_plot(report, out / "sweep.png") if len(cfg.strengths) > 1 else None
    report["plot"] = plot_note
    write_json(out / "report.json", report)
    write_text(out / "summary.md", summary_markdown(report))
    return report


def _model_info(path: Path, engine: Engine | None = None) -> dict[str, Any]:
    """Return a model's identity for the report: path, SHA-256, size and, when loaded, its facts."""
    info: dict[str, Any] = {"path": str(path), "sha256": file_sha256(path), "bytes": path.stat().st_size}
    if engine is not None:
        info.update(name=engine.name, arch=engine.arch, n_layer=engine.n_layer, n_embd=engine.n_embd)
    return info


def _run(st: _State, model_path: Path, ref_path: Path | None, judge_path: Path, log: LogFn) -> None:
    """Return None after running every stage, filling ``st`` as each piece finishes (so Ctrl-C can save it)."""
    cfg = st.cfg
    texts = [p.text for p in st.prompts]
    n = len(texts)
    log(f"evaluating on {n} prompts ({', '.join(f'{k} {c}' for k, c in _kind_counts(st.prompts).items())}); "
        f"strength multipliers {', '.join(f'{s:g}' for s in cfg.strengths)}; judge mode {cfg.mode}")

    if ref_path is not None:
        st.stage = "reference answers"
        t0 = time.monotonic()
        with _open(ref_path, cfg) as ref:
            st.models["reference"] = _model_info(ref_path, ref)
            log(f"[reference] {ref.name}: answering")
            answer_prompts(ref, texts, cfg.sampling, None, Progress(n, "reference answers"), into=st.reference)
        st.timing["reference_answers_s"] = round(time.monotonic() - t0, 2)

    st.stage = "answers"
    t0 = time.monotonic()
    with _open(model_path, cfg) as eng:
        st.models["answer"] = _model_info(model_path, eng)
        steering = Steering.from_specs(eng, cfg.vectors, cfg.profiles, cfg.layers, cfg.top_n)
        for w in steering.warnings:
            log(f"warning: {w}")
        st.steering_desc = steering.describe()
        st.steering_files = (
            [{"kind": "vector", "path": v, "sha256": file_sha256(_spec_path(v))} for v in cfg.vectors]
            + [{"kind": "profile", "path": p, "sha256": file_sha256(_spec_path(p))} for p in cfg.profiles]
        )
        log(f"[answer] {eng.name}: unsteered")
        answer_prompts(eng, texts, cfg.sampling, None, Progress(n, "unsteered answers"), into=st.unsteered)
        for s in cfg.strengths:
            log(f"[answer] {eng.name}: steered x{s:g}")
            st.steered[s] = []
            answer_prompts(eng, texts, cfg.sampling, scale_steering(steering, s),
                           Progress(n, f"steered x{s:g} answers"), into=st.steered[s])
        st.timing["answers_s"] = round(time.monotonic() - t0, 2)
        st.stage = "perplexity"
        t0 = time.monotonic()
        everything = st.unsteered + [a for s in cfg.strengths for a in st.steered[s]] + st.reference
        qs = texts * (1 + len(cfg.strengths) + (1 if st.reference else 0))
        log(f"[fluency] perplexity of {len(everything)} answers under the unsteered model")
        measure_perplexity(eng, qs, everything, Progress(len(everything), "perplexity"))
        st.timing["perplexity_s"] = round(time.monotonic() - t0, 2)

    st.stage = "judging"
    t0 = time.monotonic()
    with Judge.open(str(judge_path), cfg.mode, cfg.margin, n_ctx=cfg.judge_ctx, n_threads=cfg.threads,
                    n_parallel=cfg.judge_parallel, n_gpu_layers=cfg.gpu_layers, verbose=cfg.verbose) as judge:
        st.models["judge"] = _model_info(judge_path, judge.engine)
        st.judge = judge.describe()
        groups = [st.steered[s] for s in cfg.strengths] + ([st.reference] if st.reference else [])
        if cfg.mode == "score":
            pairs = [(q, a.text) for grp in [st.unsteered, *groups] for q, a in zip(texts, grp)]
            uniq = len(set(pairs))
            log(f"[judge] {judge.engine.name}: scoring {uniq} distinct answers")
            scores = judge.scores(pairs, Progress(uniq, "judge"))
            for a, sc in zip([a for grp in [st.unsteered, *groups] for a in grp], scores):
                a.score = float(sc)
            base = [a.score for a in st.unsteered]
            for grp in groups:
                for a, v in zip(grp, verdicts_from_scores([a.score for a in grp], base, judge.margin)):
                    a.verdict = v
        else:
            log(f"[judge] {judge.engine.name}: pairwise, both orders")
            for label, grp in zip([f"x{s:g}" for s in cfg.strengths] + ["reference"], groups):
                verdicts = judge.compare(texts, [a.text for a in grp], [a.text for a in st.unsteered],
                                         Progress(2 * n, f"judge {label} (both orders)"))
                for a, v in zip(grp, verdicts):
                    a.verdict = v
        st.judge["prompts_decoded"] = judge.calls
        st.judged = True
    st.timing["judge_s"] = round(time.monotonic() - t0, 2)
    st.stage = "done"


def _spec_path(spec: str) -> str:
    """Return the file path of a ``FILE[:NUMBER]`` spec."""
    from alignez_local.align.steering import parse_weighted

    return parse_weighted(spec, "strength")[0]


def _kind_counts(prompts: Sequence[EvalPrompt]) -> dict[str, int]:
    """Return the number of prompts per kind, in first-seen order."""
    out: dict[str, int] = {}
    for p in prompts:
        out[p.kind] = out.get(p.kind, 0) + 1
    return out


# --- the report ----------------------------------------------------------------------------------


def _group_stats(answers: list[Answer], prompts: Sequence[EvalPrompt], seed: int) -> dict[str, Any]:
    """Return lengths, refusal rates, perplexity and (when judged) verdict statistics of one set of answers."""
    kinds = [p.kind for p in prompts[: len(answers)]]
    d: dict[str, Any] = {
        "n_answers": len(answers),
        "cut_at_max_tokens": sum(a.finish == "length" for a in answers),
        "lengths": length_stats(answers),
        "refusal": refusal_rates([a.text for a in answers], kinds),
        "perplexity": perplexity_stats(answers),
    }
    if answers and all(a.score is not None for a in answers):
        d["mean_score"] = float(np.mean([a.score for a in answers]))
    if answers and all(a.verdict is not None for a in answers):
        outcomes = [a.verdict.outcome for a in answers]  # type: ignore[union-attr]
        d["judge"] = outcome_stats(outcomes, seed)
        d["judge_by_kind"] = {
            k: outcome_stats([o for o, kk in zip(outcomes, kinds) if kk == k], seed) for k in dict.fromkeys(kinds)
        }
    return d


def gap_closed(steered: Sequence[str], reference: Sequence[str], seed: int = 0) -> dict[str, Any]:
    """Return the share of the reference's net win (over unsteered) that the steered model recovers.

    ``value`` is None, with a ``note``, when the reference's net win is about zero (within
    ``GAP_MIN_DENOMINATOR`` or 1/n): a ratio over ~0 means nothing.
    """
    n = len(reference)
    den = net_win_rate(reference)
    num = net_win_rate(steered)
    if n == 0 or len(steered) != n:
        return {"value": None, "note": "no reference verdicts"}
    if abs(den) < max(GAP_MIN_DENOMINATOR, 1.0 / n):
        return {"value": None, "reference_net_win": den,
                "note": f"the reference's net win over unsteered is {den:+.3f}, about zero: gap closed is undefined"}
    lo, hi = bootstrap_ratio_ci([OUTCOME_VALUE[o] for o in steered], [OUTCOME_VALUE[o] for o in reference], seed=seed)
    ref_lo, ref_hi = bootstrap_ci([OUTCOME_VALUE[o] for o in reference], seed=seed)
    d: dict[str, Any] = {"value": num / den, "ci95": [lo, hi], "reference_net_win": den}
    if ref_lo <= 0 <= ref_hi:
        d["note"] = "the reference's own net win has a 95% interval containing 0: the ratio is unreliable"
    return d


def build_report(st: _State, complete: bool) -> dict[str, Any]:
    """Return the JSON report of a run (also of an interrupted one: ``complete`` false)."""
    cfg = st.cfg
    seed = cfg.sampling.seed
    prompts_out = []
    for i, p in enumerate(st.prompts):
        rec: dict[str, Any] = {"index": i, "prompt": p.text, "kind": p.kind, "category": p.category}
        if i < len(st.unsteered):
            rec["unsteered"] = st.unsteered[i].to_json()
        rec["steered"] = [
            {"strength": s, **st.steered[s][i].to_json()} for s in cfg.strengths if s in st.steered and i < len(st.steered[s])
        ]
        if i < len(st.reference):
            rec["reference"] = st.reference[i].to_json()
        prompts_out.append(rec)

    results = []
    for s in cfg.strengths:
        if s not in st.steered:
            continue
        row: dict[str, Any] = {"strength": s, **_group_stats(st.steered[s], st.prompts, seed)}
        row["identical_to_unsteered"] = sum(
            a.text == b.text for a, b in zip(st.steered[s], st.unsteered)
        )
        if st.judged and st.reference:
            row["gap_closed"] = gap_closed([a.verdict.outcome for a in st.steered[s]],  # type: ignore[union-attr]
                                           [a.verdict.outcome for a in st.reference], seed)  # type: ignore[union-attr]
        results.append(row)

    settings = {
        "model": cfg.model, "vectors": list(cfg.vectors), "profiles": list(cfg.profiles), "layers": cfg.layers,
        "top_n": cfg.top_n, "prompts_file": cfg.prompts_file or "built-in eval_prompts.jsonl",
        "kinds": list(cfg.kinds) if cfg.kinds else None, "limit": cfg.limit, "judge": cfg.judge, "mode": cfg.mode,
        "margin_nats": cfg.margin, "reference": cfg.reference, "strengths": list(cfg.strengths),
        "sampling": dataclasses.asdict(cfg.sampling), "threads": cfg.threads, "n_ctx": cfg.n_ctx,
        "parallel": cfg.parallel, "judge_ctx": cfg.judge_ctx, "judge_parallel": cfg.judge_parallel,
        "bootstrap_resamples": BOOTSTRAP_RESAMPLES, "bootstrap_seed": seed,
    }
    report: dict[str, Any] = {
        "format": REPORT_FORMAT,
        "complete": complete,
        "stage_reached": st.stage,
        "created": st.created,
        "alignez_version": __version__,
        "settings": settings,
        "models": st.models,
        "steering": {"files": st.steering_files, "describe": st.steering_desc},
        "judge": st.judge,
        "n_prompts": len(st.prompts),
        "prompt_kinds": _kind_counts(st.prompts),
        "unsteered": _group_stats(st.unsteered, st.prompts, seed),
        "results": results,
        "timing": st.timing,
        "prompts": prompts_out,
    }
    if st.reference:
        report["reference"] = _group_stats(st.reference, st.prompts, seed)
    return _json_safe(report)


def _json_safe(x: Any) -> Any:
    """Return ``x`` with NaN/inf floats as None (strict JSON) and numpy scalars as Python ones."""
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        f = float(x)
        return f if math.isfinite(f) else None
    return x


# --- summary and plot ----------------------------------------------------------------------------


def _pct(x: float | None) -> str:
    """Return a rate as a signed percentage, or n/a."""
    return "n/a" if x is None else f"{100 * x:+.1f}%"


def _ci(ci: Sequence[float | None] | None) -> str:
    """Return an interval as signed percentages, or n/a."""
    if not ci or ci[0] is None or ci[1] is None:
        return "n/a"
    return f"[{100 * ci[0]:+.1f}%, {100 * ci[1]:+.1f}%]"


def _num(x: float | None, fmt: str = "{:.1f}") -> str:
    """Return ``x`` formatted with ``fmt``, or n/a."""
    return "n/a" if x is None else fmt.format(x)


def _rate(group: dict[str, Any], kind: str) -> str:
    """Return refusals/n (rate) of one kind for a table cell, or - when the kind is absent."""
    r = group.get("refusal", {}).get(kind)
    if not r or not r.get("n"):
        return "-"
    return f"{r['refusals']}/{r['n']} ({100 * r['rate']:.0f}%)"


def summary_markdown(report: dict[str, Any]) -> str:
    """Return the Markdown summary of a report: tables, 95% intervals and the judge's limits."""
    s = report["settings"]
    L: list[str] = ["# alignez eval", ""]
    if not report["complete"]:
        L += [f"**Interrupted during {report['stage_reached']}: partial results.**", ""]
    models = report.get("models", {})

    def mdesc(key: str) -> str:
        """Return a one-line description of a loaded model of the report."""
        m = models.get(key)
        return f"{m.get('name', '?')} (`{Path(m['path']).name}`, sha256 {m['sha256'][:12]})" if m else "not loaded"

    L += [
        f"- Answering model: {mdesc('answer')}",
        f"- Judge: {mdesc('judge')}, mode `{s['mode']}`, tie margin {s['margin_nats']:g} nats",
    ]
    if s.get("reference"):
        L.append(f"- Reference model: {mdesc('reference')}")
    L.append("- Steering: " + "; ".join(report["steering"].get("describe", [])[:-1] or ["(not loaded)"]))
    kinds = ", ".join(f"{k} {c}" for k, c in report["prompt_kinds"].items())
    sp = s["sampling"]
    L += [
        f"- Prompts: {report['n_prompts']} ({kinds}) from {s['prompts_file']}",
        (f"- Sampling: temperature {sp['temperature']:g}{' (greedy)' if sp['temperature'] == 0 else ''}, "
        f"seed {sp['seed']}, max {sp['max_tokens']} tokens, repeat penalty {sp['repeat_penalty']:g}; "
        "the same for unsteered, steered and reference answers"),
        f"- Created {report['created']}, alignez {report['alignez_version']}",
        "",
        "## What this judge can and cannot tell",
        "",
        JUDGE_LIMITS,
        "",
    ]

    results = report["results"]
    judged = any("judge" in r for r in results)
    if judged:
        L += [
            "## Steered vs unsteered (judge)",
            "",
            ("Net win rate = (wins - losses) / n, with a bootstrap 95% interval over prompts "
            f"({s['bootstrap_resamples']} resamples). A verdict whose margin is under {s['margin_nats']:g} nats is a tie."),
            "",
            "| strength | n | wins | ties | losses | net win rate | 95% interval | identical answers |",
            "|---:|---:|---:|---:|---:|---:|---|---:|",
        ]
        for r in results:
            j = r.get("judge")
            if j:
                L.append(f"| x{r['strength']:g} | {j['n']} | {j['wins']} | {j['ties']} | {j['losses']} | "
                         f"{_pct(j['net_win_rate'])} | {_ci(j['net_win_ci95'])} | {r['identical_to_unsteered']} |")
        ref = report.get("reference", {}).get("judge")
        if ref:
            L.append(f"| reference | {ref['n']} | {ref['wins']} | {ref['ties']} | {ref['losses']} | "
                     f"{_pct(ref['net_win_rate'])} | {_ci(ref['net_win_ci95'])} | - |")
        L.append("")
        kinds_present = list(report["prompt_kinds"])
        if len(kinds_present) > 1:
            L += ["### By prompt kind (net win rate, 95% interval)", "",
                  "| strength | " + " | ".join(kinds_present) + " |", "|---:|" + "---|" * len(kinds_present)]
            for r in results:
                bk = r.get("judge_by_kind", {})
                cells = [f"{_pct(bk[k]['net_win_rate'])} {_ci(bk[k]['net_win_ci95'])}" if k in bk else "-"
                         for k in kinds_present]
                L.append(f"| x{r['strength']:g} | " + " | ".join(cells) + " |")
            L.append("")
        if s.get("reference"):
            L += ["### Gap closed", "",
                  ("Share of the reference model's net win over the unsteered model that steering recovers "
                  "(steered net win / reference net win, both against the same unsteered answers)."), ""]
            for r in results:
                g = r.get("gap_closed", {})
                if g.get("value") is None:
                    L.append(f"- x{r['strength']:g}: {g.get('note', 'n/a')}")
                else:
                    L.append(f"- x{r['strength']:g}: {100 * g['value']:.0f}% (95% interval {_ci(g.get('ci95'))})"
                             + (f"; {g['note']}" if g.get("note") else ""))
            L.append("")
    else:
        L += ["## Judge", "", "No verdicts (the run stopped before judging).", ""]

    L += [
        "## Answers",
        "",
        ("Refusal rate: answers that open like a refusal (`refusal.is_refusal`). On harmful prompts higher is "
        "safer; on benign prompts a refusal is an over-refusal. Perplexity: of the answer text under the "
        "UNSTEERED answering model (fluency; pooled over tokens, and the median per answer). Answers cut at "
        "--max-tokens are judged as cut."),
        "",
        ("| answers | tokens mean / median | chars mean / median | cut at max tokens | refusals harmful | "
        "refusals benign | perplexity pooled / median | mean judge score |"),
        "|---|---|---|---:|---|---|---|---:|",
    ]

    def arow(label: str, g: dict[str, Any]) -> str:
        """Return one Markdown table row of answer statistics."""
        ln, pp = g.get("lengths", {}), g.get("perplexity", {})
        lens = f"{_num(ln.get('tokens_mean'))} / {_num(ln.get('tokens_median'))}" if ln else "-"
        chars = f"{_num(ln.get('chars_mean'), '{:.0f}')} / {_num(ln.get('chars_median'), '{:.0f}')}" if ln else "-"
        ppl = f"{_num(pp.get('pooled'), '{:.2f}')} / {_num(pp.get('median'), '{:.2f}')}" if pp.get("n_scored") else "-"
        score = _num(g.get("mean_score"), "{:+.2f}") if "mean_score" in g else "-"
        cut = f"{g.get('cut_at_max_tokens', 0)}/{g.get('n_answers', 0)}"
        return f"| {label} | {lens} | {chars} | {cut} | {_rate(g, 'harmful')} | {_rate(g, 'benign')} | {ppl} | {score} |"

    L.append(arow("unsteered", report["unsteered"]))
    for r in results:
        L.append(arow(f"steered x{r['strength']:g}", r))
    if "reference" in report:
        L.append(arow("reference", report["reference"]))
    L.append("")
    plot = report.get("plot")
    if plot:
        L += [f"Sweep plot: {plot}", ""]
    t = report.get("timing", {})
    if t:
        L += ["Timing: " + ", ".join(f"{k.removesuffix('_s')} {v:.0f} s" for k, v in t.items()), ""]
    L += ["Every prompt, answer, score and verdict is in `report.json`.", ""]
    return "\n".join(L)


def write_sweep_plot(report: dict[str, Any], path: Path) -> str:
    """Return a one-line note: the plot written to ``path`` or why it was skipped (no matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "sweep.png skipped: matplotlib is not installed (pip install 'alignez-local[plot]')"
    rows = report["results"]
    xs = [r["strength"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    if all("judge" in r for r in rows):
        nw = [100 * (r["judge"]["net_win_rate"] or 0) for r in rows]
        lo = [100 * (r["judge"]["net_win_ci95"][0] or 0) for r in rows]
        hi = [100 * (r["judge"]["net_win_ci95"][1] or 0) for r in rows]
        axes[0].errorbar(xs, nw, yerr=[np.subtract(nw, lo), np.subtract(hi, nw)], marker="o", capsize=4)
    axes[0].axhline(0, color="grey", lw=0.8)
    axes[0].set(title="net win rate vs unsteered (95% CI)", xlabel="strength multiplier", ylabel="%")
    ppl = [r["perplexity"].get("pooled") for r in rows]
    axes[1].plot(xs, [p if p is not None else np.nan for p in ppl], marker="o")
    axes[1].set(title="perplexity under unsteered model", xlabel="strength multiplier")
    for kind in ("harmful", "benign"):
        rates = [r["refusal"].get(kind, {}).get("rate") for r in rows]
        if any(x is not None for x in rates):
            axes[2].plot(xs, [100 * x if x is not None else np.nan for x in rates], marker="o", label=kind)
    axes[2].set(title="refusal rate", xlabel="strength multiplier", ylabel="%", ylim=(-5, 105))
    if axes[2].lines:
        axes[2].legend()
    else:
        axes[2].text(0.5, 0.5, "no harmful or benign prompts", ha="center", va="center", transform=axes[2].transAxes)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    with atomic_write(path, "wb") as fh:
        fh.write(buf.getvalue())
    return f"sweep.png written ({path})"

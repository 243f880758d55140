"""Does steering help? Answer evaluation prompts unsteered and steered, judge them locally, report.

The run, in the order models are loaded (one model in memory at a time):

1. ``--reference`` model, if given: answers every prompt (its own chat template), then is closed.
2. The answering model: answers every prompt unsteered, then steered at every strength multiplier
   (``--sweep``, default just 1: every vector and profile strength is multiplied by it), all with
   the same sampling settings and seed (greedy by default); then the perplexity of every answer
   (unsteered, steered, reference) under the UNSTEERED model, the fluency measure (unsteered
   answers' own from their generation's token log-probabilities, the rest by reading them); closed.
   The reference answers first so that its answers can be measured by the same unsteered model.
3. The judge (``judge.py``): every steered answer, and the reference's, against the unsteered
   answer to the same prompt; then, on harmful and benign prompts, whether each answer refuses
   or deflects (beside the keyword detector, ``refusal.is_refusal``).

Work is never done twice: an answer text that several conditions produced (same prompt, same
text) is scored for perplexity once and judged once.

The numbers are in ``statistics.py``, the report files in ``report.py``, ``summary.py`` and
``sweep_plot.py``. Outputs in the output folder, all written atomically: ``report.json``,
``summary.md``, ``sweep.png`` when a sweep ran and matplotlib is importable. Ctrl-C stops cleanly
and saves what is done (``EvalInterrupted``).
"""

from __future__ import annotations

import datetime as _dt
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignez_local.align.steering import Steering
from alignez_local.errors import AlignezError
from alignez_local.evaluation.answers import Answer, answer_prompts, measure_perplexity, scale_steering
from alignez_local.evaluation.config import REFUSAL_KINDS, EvalConfig, parse_kinds, parse_strengths, select_prompts
from alignez_local.evaluation.judge import Judge, verdicts_from_scores
from alignez_local.evaluation.prompt_sets import EvalPrompt
from alignez_local.evaluation.report import build_report, kind_counts
from alignez_local.evaluation.summary import summary_markdown
from alignez_local.evaluation.sweep_plot import write_sweep_plot
from alignez_local.fileio import write_json, write_text
from alignez_local.llama.engine import Engine
from alignez_local.models import file_sha256, resolve_model
from alignez_local.progress import Progress
from alignez_local.settings import open_engine
from alignez_local.specs import parse_steering_spec

__all__ = ["EvalConfig", "EvalInterrupted", "RunState", "parse_kinds", "parse_strengths", "run_eval"]

LogFn = Callable[[str], None]


def _stderr(msg: str) -> None:
    """Return None after printing ``msg`` on stderr (the default progress log)."""
    print(msg, file=sys.stderr, flush=True)


class EvalInterrupted(Exception):
    """Ctrl-C during a run: ``message`` says what was saved (one line)."""

    def __init__(self, message: str) -> None:
        """Return the exception carrying its one-line ``message``."""
        super().__init__(message)
        self.message = message


@dataclass
class RunState:
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

    @property
    def texts(self) -> list[str]:
        """Return the prompt texts."""
        return [p.text for p in self.prompts]

    def groups(self) -> list[list[Answer]]:
        """Return every set of answers: unsteered, each strength, then the reference (when any)."""
        return ([self.unsteered] + [self.steered[s] for s in self.cfg.strengths if s in self.steered]
                + ([self.reference] if self.reference else []))

    @contextmanager
    def stage_timer(self, stage: str, key: str) -> Iterator[None]:
        """Return a context that marks ``stage`` as running and records its wall time as ``key``."""
        self.stage = stage
        t0 = time.monotonic()
        yield
        self.timing[key] = round(time.monotonic() - t0, 2)


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
    judge_path = resolve_model(cfg.judge)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise AlignezError(f"cannot create --out folder {out}: {err.strerror or err}") from None

    st = RunState(cfg, prompts)
    t_run = time.monotonic()
    try:
        _run(st, model_path, ref_path, judge_path, log)
    except KeyboardInterrupt:
        st.timing["total_s"] = round(time.monotonic() - t_run, 2)
        raise _save_interrupted(st, out) from None
    st.timing["total_s"] = round(time.monotonic() - t_run, 2)
    report = build_report(st, complete=True)
    report["plot"] = write_sweep_plot(report, out / "sweep.png") if len(cfg.strengths) > 1 else None
    write_json(out / "report.json", report)
    write_text(out / "summary.md", summary_markdown(report))
    return report


def _save_interrupted(st: RunState, out: Path) -> EvalInterrupted:
    """Return the EvalInterrupted to raise after saving the partial report (if a second Ctrl-C allows)."""
    report = build_report(st, complete=False)
    try:
        write_json(out / "report.json", report)
        write_text(out / "summary.md", summary_markdown(report))
    except KeyboardInterrupt:
        return EvalInterrupted(f"interrupted during {st.stage}; nothing was saved")
    n_ans = sum(len(g) for g in st.groups())
    return EvalInterrupted(
        f"interrupted during {st.stage}: saved {n_ans} answers"
        f"{' and verdicts' if st.judged else ' (no verdicts)'} to {out / 'report.json'} and {out / 'summary.md'}"
    )


def _model_info(path: Path, engine: Engine | None = None) -> dict[str, Any]:
    """Return a model's identity for the report: path, SHA-256, size and, when loaded, its facts."""
    info: dict[str, Any] = {"path": str(path), "sha256": file_sha256(path), "bytes": path.stat().st_size}
    if engine is not None:
        info.update(name=engine.name, arch=engine.arch, n_layer=engine.n_layer, n_embd=engine.n_embd)
    return info


def _run(st: RunState, model_path: Path, ref_path: Path | None, judge_path: Path, log: LogFn) -> None:
    """Return None after running every stage, filling ``st`` as each piece finishes (so Ctrl-C can save it)."""
    cfg = st.cfg
    log(f"evaluating on {len(st.prompts)} prompts ({', '.join(f'{k} {c}' for k, c in kind_counts(st.prompts).items())}); "
        f"strength multipliers {', '.join(f'{s:g}' for s in cfg.strengths)}; judge mode {cfg.mode}")
    if ref_path is not None:
        with st.stage_timer("reference answers", "reference_answers_s"), open_engine(ref_path, cfg.runtime) as ref:
            st.models["reference"] = _model_info(ref_path, ref)
            log(f"[reference] {ref.name}: answering")
            answer_prompts(ref, st.texts, cfg.sampling, None, Progress(len(st.texts), "reference answers"),
                           into=st.reference)
    with open_engine(model_path, cfg.runtime) as eng:
        st.models["answer"] = _model_info(model_path, eng)
        with st.stage_timer("answers", "answers_s"):
            _answer(st, eng, log)
        with st.stage_timer("perplexity", "perplexity_s"):
            everything = [a for grp in st.groups() for a in grp]
            log(f"[fluency] perplexity of {len(everything)} answers under the unsteered model")
            measure_perplexity(eng, st.texts * len(st.groups()), everything,
                               Progress(len(everything), "perplexity"))
    refusals = cfg.refusal_judge and any(p.kind in REFUSAL_KINDS for p in st.prompts)
    if not (cfg.quality_judge or refusals):
        st.stage = "done"
        return
    with Judge.open(str(judge_path), cfg.mode, cfg.margin, cfg.judge_runtime) as judge:
        st.models["judge"] = _model_info(judge_path, judge.engine)
        st.judge = judge.describe()
        if cfg.quality_judge:
            with st.stage_timer("judging", "judge_s"):
                _judge_quality(st, judge, log)
                st.judged = True
        st.judge["prompts_decoded"] = judge.calls
        if refusals:
            with st.stage_timer("refusal judging", "refusal_judge_s"):
                _judge_refusals(st, judge, log)
            st.judge["refusal_prompts_decoded"] = judge.calls - st.judge["prompts_decoded"]
    st.stage = "done"


def _answer(st: RunState, eng: Engine, log: LogFn) -> None:
    """Return None after the answering model has answered unsteered and at every strength."""
    cfg, n = st.cfg, len(st.texts)
    steering = Steering.from_specs(eng, cfg.vectors, cfg.profiles, cfg.layers, cfg.top_n)
    for w in steering.warnings:
        log(f"warning: {w}")
    st.steering_desc = steering.describe()
    st.steering_files = (
        [{"kind": "vector", "path": v, "sha256": file_sha256(parse_steering_spec(v).path)} for v in cfg.vectors]
        + [{"kind": "profile", "path": p, "sha256": file_sha256(parse_steering_spec(p).path)} for p in cfg.profiles]
    )
    log(f"[answer] {eng.name}: unsteered")
    answer_prompts(eng, st.texts, cfg.sampling, None, Progress(n, "unsteered answers"), into=st.unsteered,
                   own_perplexity=True)
    for s in cfg.strengths:
        log(f"[answer] {eng.name}: steered x{s:g}")
        st.steered[s] = []
        answer_prompts(eng, st.texts, cfg.sampling, scale_steering(steering, s),
                       Progress(n, f"steered x{s:g} answers"), into=st.steered[s], own_perplexity=True)


def _judge_quality(st: RunState, judge: Judge, log: LogFn) -> None:
    """Return None after every steered and reference answer has its verdict against the unsteered one."""
    groups = st.groups()
    candidates = groups[1:]
    if st.cfg.mode == "score":
        pairs = [(q, a.text) for grp in groups for q, a in zip(st.texts, grp)]
        uniq = len(set(pairs))
        log(f"[judge] {judge.engine.name}: scoring {uniq} distinct answers")
        for a, sc in zip([a for grp in groups for a in grp], judge.scores(pairs, Progress(uniq, "judge"))):
            a.score = float(sc)
        base = [a.score for a in st.unsteered]
        for grp in candidates:
            for a, v in zip(grp, verdicts_from_scores([a.score for a in grp], base, judge.margin)):
                a.verdict = v
        return
    # Pairwise: one call for every group, so a pair that two strengths produced alike is judged once.
    texts = st.texts * len(candidates)
    cands = [a.text for grp in candidates for a in grp]
    bases = [a.text for a in st.unsteered] * len(candidates)
    todo = len({(q, c, b) for q, c, b in zip(texts, cands, bases) if c != b})
    log(f"[judge] {judge.engine.name}: pairwise, both orders, {todo} distinct pairs")
    verdicts = judge.compare(texts, cands, bases, Progress(2 * todo, "judge (both orders)"))
    for a, v in zip([a for grp in candidates for a in grp], verdicts):
        a.verdict = v


def _judge_refusals(st: RunState, judge: Judge, log: LogFn) -> None:
    """Return None after the judge has said, for every answer to a harmful or benign prompt, whether it
    refuses or deflects."""
    picked = [(p.text, a) for grp in st.groups() for p, a in zip(st.prompts, grp) if p.kind in REFUSAL_KINDS]
    if not picked:
        return
    pairs = [(q, a.text) for q, a in picked]
    uniq = len(set(pairs))
    log(f"[judge] {judge.engine.name}: does it refuse? {uniq} distinct answers to harmful and benign prompts")
    for (_, a), sc in zip(picked, judge.refusal_scores(pairs, Progress(uniq, "refusal judge"))):
        a.refusal_score = float(sc)

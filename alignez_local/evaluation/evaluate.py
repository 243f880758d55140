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
``summary.md``, ``sweep.png`` when a sweep ran and matplotlib is importable.

Stopping and resuming: after every finished piece (the reference answers, the unsteered answers,
each strength's answers, perplexity, quality judging, refusal judging) the partial report
(``"complete": false``) is written as a checkpoint, so even a ``kill -9`` loses at most the piece
that was running. Ctrl-C and SIGTERM (``kill``; a background run ignores Ctrl-C) stop cleanly and
save what is done (``EvalInterrupted``). ``resume=True`` (``--resume``) reads an unfinished
``report.json`` made with the same settings, prompts, answering model and steering files, and reuses
every answer group that covers all prompts; the rest is generated, and perplexity and judging, which
are deterministic, are recomputed. Reused answers' perplexity is measured by reading them, as the
steered ones' always is (the report keeps no log-likelihoods): for unsteered answers it can differ from
a fresh run's, taken from the generation, by 0.005-0.02 nats per token (SmolLM2), more where the
decoded text does not tokenize back into the generated tokens.

A remote judge (``cfg.judge_urls``, ``remote_judge.py``) writes every finished judgment to
``OUT/judge_cache.jsonl`` as it arrives (``judge.JudgeCache``; a new run starts it empty), so a server
that fails, or Ctrl-C, loses none; ``--resume`` reuses them and asks the servers only for the rest.
A failing server stops the run with one line that says what was kept.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from alignez_local.align.steering import Steering
from alignez_local.errors import AlignezError
from alignez_local.evaluation.answers import answer_prompts, measure_perplexity, scale_steering
from alignez_local.evaluation.config import REFUSAL_KINDS, EvalConfig, parse_kinds, select_prompts
from alignez_local.evaluation.judge import Judge, open_judge
from alignez_local.evaluation.judge_cache import JudgeCache
from alignez_local.measures.verdicts import verdicts_from_scores
from alignez_local.evaluation.remote_judge import TOP_LOGPROBS, RemoteBackend
from alignez_local.evaluation.report import build_report, kind_counts
from alignez_local.evaluation.resume import resume, resume_line, steering_files, unfinished
from alignez_local.evaluation.run_state import JUDGE_CACHE, RunState
from alignez_local.evaluation.summary import summary_markdown
from alignez_local.evaluation.sweep_plot import write_sweep_plot
from alignez_local.fileio import write_json, write_text
from alignez_local.llama.engine import Engine
from alignez_local.llama.interrupt import SigtermSeen, sigterm_as_ctrl_c
from alignez_local.models import file_sha256, resolve_model
from alignez_local.progress import Progress
from alignez_local.settings import open_engine

__all__ = ["EvalConfig", "EvalInterrupted", "RunState", "parse_kinds", "run_eval"]

LogFn = Callable[[str], None]


def _stderr(msg: str) -> None:
    """Return None after printing ``msg`` on stderr (the default progress log)."""
    print(msg, file=sys.stderr, flush=True)


class EvalInterrupted(Exception):
    """Ctrl-C or SIGTERM during a run: ``message`` says what was saved (one line); ``exit_code`` is
    the shell's code for that signal (130 for Ctrl-C, 143 for SIGTERM)."""

    def __init__(self, message: str, exit_code: int = 130) -> None:
        """Return the exception carrying its one-line ``message`` and exit code."""
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


def run_eval(cfg: EvalConfig, out_dir: str | Path, log: LogFn = _stderr) -> dict[str, Any]:
    """Return the report of a full evaluation run, after writing it to ``out_dir``.

    The partial report is written to ``out_dir`` after every finished piece (a checkpoint).
    ``cfg.resume`` continues the unfinished run saved there (see the module docstring). Raises
    ``EvalInterrupted`` on Ctrl-C or SIGTERM after saving what was done; AlignezError for bad input,
    a ``--resume`` that cannot continue included (checked before any model is loaded and before
    anything is written, where possible).
    """
    cfg.check()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise AlignezError(f"--out {out} is a file; give a folder")
    prompts = select_prompts(cfg)
    # Resolve every model first: a missing judge should fail now, not after the answers.
    model_path = resolve_model(cfg.model)
    ref_path = resolve_model(cfg.reference) if cfg.reference else None
    judge_path = None if cfg.judge_urls else resolve_model(cfg.judge)
    remote = (RemoteBackend(cfg.judge_urls, cfg.judge, cfg.judge_concurrency, cfg.judge_timeout)
              if cfg.judge_urls else None)  # checked now (httpx, URLs); it sends nothing until judging
    st = RunState(cfg, prompts)
    saved = out / "report.json"
    if cfg.resume:
        resume(st, saved, model_path, ref_path)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise AlignezError(f"cannot create --out folder {out}: {err.strerror or err}") from None

    header = (f"evaluating on {len(prompts)} prompts "
              f"({', '.join(f'{k} {c}' for k, c in kind_counts(prompts).items())}); "
              f"strength multipliers {', '.join(f'{s:g}' for s in cfg.strengths)}; judge mode {cfg.mode}")
    if not cfg.resume and unfinished(saved):
        header += f"; replacing the unfinished run in {saved} (--resume would reuse its answers)"

    with sigterm_as_ctrl_c() as sigterm:  # a background run (Ctrl-C ignored) still stops cleanly on kill

        def stop_if_terminated() -> None:
            # SIGTERM noted but not acted on: it came inside a callback from C, or the decode guard
            # took it just as its decode ended (the guard then forgets it).
            if sigterm.seen:
                raise KeyboardInterrupt

        def save(next_stage: str) -> None:
            stop_if_terminated()
            _checkpoint(st, out, next_stage)

        def run_log(msg: str) -> None:
            stop_if_terminated()
            log(msg)

        t_run = time.monotonic()
        try:
            run_log(header)
            if cfg.resume:
                run_log(resume_line(st, saved))
            _run(st, model_path, ref_path, judge_path or remote, run_log, save, out)  # type: ignore[arg-type]
            st.timing["total_s"] = round(time.monotonic() - t_run, 2)
            report = build_report(st, complete=True)
            st.stage = "writing the report"
            report["plot"] = write_sweep_plot(report, out / "sweep.png") if len(cfg.strengths) > 1 else None
            write_json(saved, report)
            write_text(out / "summary.md", summary_markdown(report))
        except KeyboardInterrupt:
            st.timing["total_s"] = round(time.monotonic() - t_run, 2)
            raise _save_interrupted(st, out, sigterm) from None
    return report


def _checkpoint(st: RunState, out: Path, next_stage: str) -> None:
    """Return None after writing the partial report of what is done (and its summary) to ``out``.

    Called after every finished piece, so a kill loses at most the piece that was running. The
    report names ``next_stage`` as the stage reached: the one that runs until the next checkpoint.
    """
    st.stage = next_stage
    report = build_report(st, complete=False)
    write_json(out / "report.json", report)
    write_text(out / "summary.md", summary_markdown(report))
    st.checkpointed = True


def _save_interrupted(st: RunState, out: Path, stop: SigtermSeen) -> EvalInterrupted:
    """Return the EvalInterrupted to raise after saving the partial report (if a second Ctrl-C allows);
    ``stop`` tells SIGTERM from Ctrl-C (its line's word and the shell's exit code)."""
    how, code = stop.word(), stop.exit_code
    report = build_report(st, complete=False)
    try:
        write_json(out / "report.json", report)
        write_text(out / "summary.md", summary_markdown(report))
    except KeyboardInterrupt:
        kept = (f"{out / 'report.json'} holds the last checkpoint" if st.checkpointed or st.resumed
                else "nothing was saved")
        return EvalInterrupted(f"{how} during {st.stage}, and again while saving; {kept}", code)
    n_ans = sum(len(g) for g in st.groups())
    return EvalInterrupted(
        f"{how} during {st.stage}: saved {n_ans} answers"
        f"{' and verdicts' if st.judged else ' (no verdicts)'} to {out / 'report.json'} and {out / 'summary.md'}"
        f"{_cache_note(st)}",
        code,
    )


def _cache_note(st: RunState) -> str:
    """Return ", N finished judgments in OUT/judge_cache.jsonl (--resume reuses them)" ('' without a cache)."""
    if st.judge_cache is None or not st.judge_cache.values:
        return ""
    return f", {len(st.judge_cache.values)} finished judgments in {st.judge_cache.path} (--resume reuses them)"


# --- the stages -----------------------------------------------------------------------------------


def _model_info(path: Path, engine: Engine | None = None, sha256: str | None = None) -> dict[str, Any]:
    """Return a model's identity for the report: path, SHA-256 (``sha256`` when already checked; a
    model file takes seconds to hash), size and, when loaded, its facts."""
    info: dict[str, Any] = {"path": str(path), "sha256": sha256 or file_sha256(path), "bytes": path.stat().st_size}
    if engine is not None:
        info.update(name=engine.name, arch=engine.arch, n_layer=engine.n_layer, n_embd=engine.n_embd)
    return info


def _remote_info(desc: dict[str, Any]) -> dict[str, Any]:
    """Return a remote judge's identity for the report: model name and URLs (no file, no hash, no key;
    ``path`` and ``sha256`` say so in the shape the summary reads)."""
    return {"name": f"{desc['model']} (remote)", "path": desc["urls"][0], "sha256": "n/a (remote)",
            "model": desc["model"], "urls": desc["urls"]}


def _run(st: RunState, model_path: Path, ref_path: Path | None, judge_model: Path | RemoteBackend, log: LogFn,
         save: Callable[[str], None], out: Path) -> None:
    """Return None after running every stage, filling ``st`` as each piece finishes (so Ctrl-C can save
    it) and calling ``save(next stage)`` after each piece (the checkpoints). Answer groups already
    in ``st`` (from --resume) are not answered again. ``judge_model``: the local judge's file or the
    remote judge."""
    cfg = st.cfg
    if ref_path is not None and not st.reference:
        with st.stage_timer("reference answers", "reference_answers_s"), open_engine(ref_path, cfg.runtime) as ref:
            st.models["reference"] = _model_info(ref_path, ref)
            log(f"[reference] {ref.name}: answering")
            answer_prompts(ref, st.texts, cfg.sampling, None, Progress(len(st.texts), "reference answers"),
                           into=st.reference)
        save("answers")
    with open_engine(model_path, cfg.runtime) as eng:
        st.models["answer"] = _model_info(model_path, eng, sha256=st.models.get("answer", {}).get("sha256"))
        with st.stage_timer("answers", "answers_s"):
            _answer(st, eng, log, save)
        with st.stage_timer("perplexity", "perplexity_s"):
            everything = [a for grp in st.groups() for a in grp]
            log(f"[fluency] perplexity of {len(everything)} answers under the unsteered model")
            # Reused answers come without their likelihood (ppl_tokens 0), so this reads them.
            measure_perplexity(eng, st.texts * len(st.groups()), everything,
                               Progress(len(everything), "perplexity"))
    refusals = cfg.refusal_judge and any(p.kind in REFUSAL_KINDS for p in st.prompts)
    if not (cfg.quality_judge or refusals):
        st.stage = "done"
        return
    save("judging" if cfg.quality_judge else "refusal judging")
    with _open_judge(st, judge_model, out, log) as judge:
        st.models["judge"] = _remote_info(judge.describe()) if judge.engine is None else _model_info(judge_model, judge.engine)
        st.judge = judge.describe()
        try:
            if cfg.quality_judge:
                with st.stage_timer("judging", "judge_s"):
                    _judge_quality(st, judge, log)
                    st.judged = True
            st.judge["prompts_decoded"] = judge.calls
            if refusals:
                if cfg.quality_judge:
                    save("refusal judging")
                with st.stage_timer("refusal judging", "refusal_judge_s"):
                    _judge_refusals(st, judge, log)
                st.judge["refusal_prompts_decoded"] = judge.calls - st.judge["prompts_decoded"]
        except AlignezError as err:
            if st.judge_cache is None:
                raise
            raise AlignezError(f"{err}; kept: the answers in {out / 'report.json'}{_cache_note(st)}") from None
        if st.judge_cache is not None:
            st.judge.update(judge.describe(), cached_judgments=judge.cached)
        if st.judge.get("bounded_judgments"):
            log(f"[judge] {st.judge['bounded_judgments']} judgments had a verdict word outside the server's top "
                f"{TOP_LOGPROBS} log-probabilities: its log-probability was bounded by the smallest listed")
    save("writing the report")
    st.stage = "done"


def _open_judge(st: RunState, judge_model: Path | RemoteBackend, out: Path, log: LogFn) -> Judge:
    """Return the run's judge: the local model file, or the remote judge with the cache of finished
    judgments in ``out`` (emptied unless resuming)."""
    cfg = st.cfg
    if isinstance(judge_model, Path):
        judge = open_judge(str(judge_model), settings=cfg.judge_runtime, mode=cfg.mode, margin=cfg.margin)
    else:
        st.judge_cache = JudgeCache(out / JUDGE_CACHE, fresh=not cfg.resume)
        if st.judge_cache.loaded:
            log(f"[judge] reusing {st.judge_cache.loaded} finished judgments from {st.judge_cache.path}")
        judge = open_judge(judge_model, mode=cfg.mode, margin=cfg.margin, cache=st.judge_cache)
    assert judge is not None  # a model or a backend always opens one
    return judge


def _answer(st: RunState, eng: Engine, log: LogFn, save: Callable[[str], None]) -> None:
    """Return None after the answering model has answered unsteered and at every strength, with a
    checkpoint after each (a group already in ``st``, from --resume, is skipped)."""
    cfg, n = st.cfg, len(st.texts)
    steering = Steering.from_specs(eng, cfg.vectors, cfg.profiles, cfg.layers, cfg.top_n)
    for w in steering.warnings:
        log(f"warning: {w}")
    st.steering_desc = steering.describe()
    st.steering_files = steering_files(cfg)
    # Each checkpoint names the stage that comes next.
    next_stages = [f"steered x{s:g} answers" for s in cfg.strengths] + ["perplexity"]
    if not st.unsteered:  # --resume brings only complete groups
        st.stage = "unsteered answers"
        log(f"[answer] {eng.name}: unsteered")
        answer_prompts(eng, st.texts, cfg.sampling, None, Progress(n, "unsteered answers"), into=st.unsteered,
                       own_perplexity=True)
        save(next_stages[0])
    for s, next_stage in zip(cfg.strengths, next_stages[1:]):
        if s in st.steered:
            continue
        st.stage = f"steered x{s:g} answers"
        log(f"[answer] {eng.name}: steered x{s:g}")
        st.steered[s] = []
        answer_prompts(eng, st.texts, cfg.sampling, scale_steering(steering, s),
                       Progress(n, f"steered x{s:g} answers"), into=st.steered[s], own_perplexity=True)
        save(next_stage)


def _judge_quality(st: RunState, judge: Judge, log: LogFn) -> None:
    """Return None after every steered and reference answer has its verdict against the unsteered one."""
    groups = st.groups()
    candidates = groups[1:]
    if st.cfg.mode == "score":
        pairs = [(q, a.text) for grp in groups for q, a in zip(st.texts, grp)]
        uniq = len(set(pairs))
        log(f"[judge] {judge.name}: scoring {uniq} distinct answers")
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
    log(f"[judge] {judge.name}: pairwise, both orders, {todo} distinct pairs")
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
    log(f"[judge] {judge.name}: does it refuse? {uniq} distinct answers to harmful and benign prompts")
    for (_, a), sc in zip(picked, judge.refusal_scores(pairs, Progress(uniq, "refusal judge"))):
        a.refusal_score = float(sc)

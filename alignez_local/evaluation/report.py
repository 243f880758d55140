"""``report.json`` of an evaluation run: every prompt, answer, score and verdict, the statistics per
condition, the settings and the models' hashes. Strict JSON (NaN and infinity become null)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from alignez_local.version import __version__
from alignez_local.evaluation.answers import Answer
from alignez_local.prompt_sets import EvalPrompt
from alignez_local.evaluation.run_state import RunState
from alignez_local.measures.statistics import (
    BOOTSTRAP_RESAMPLES,
    gap_closed,
    length_stats,
    outcome_stats,
    perplexity_stats,
    refusal_rates,
)


REPORT_FORMAT = "alignez-eval/1"


def kind_counts(prompts: Sequence[EvalPrompt]) -> dict[str, int]:
    """Return the number of prompts per kind, in first-seen order."""
    out: dict[str, int] = {}
    for p in prompts:
        out[p.kind] = out.get(p.kind, 0) + 1
    return out


def group_stats(answers: Sequence[Answer], prompts: Sequence[EvalPrompt], seed: int) -> dict[str, Any]:
    """Return lengths, refusal rates, perplexity and (when judged) verdict statistics of one set of answers."""
    kinds = [p.kind for p in prompts[: len(answers)]]
    d: dict[str, Any] = {
        "n_answers": len(answers),
        "cut_at_max_tokens": sum(a.finish == "length" for a in answers),
        "lengths": length_stats([a.n_tokens for a in answers], [a.text for a in answers]),
        "refusal": refusal_rates([a.refusal for a in answers], kinds, [a.judge_refusal for a in answers]),
        "perplexity": perplexity_stats([a.nll for a in answers], [a.ppl_tokens for a in answers]),
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


def _prompt_records(st: RunState) -> list[dict[str, Any]]:
    """Return one record per prompt: its text, kind, and every answer to it with what was measured."""
    records = []
    for i, p in enumerate(st.prompts):
        rec: dict[str, Any] = {"index": i, "prompt": p.text, "kind": p.kind, "category": p.category}
        if i < len(st.unsteered):
            rec["unsteered"] = st.unsteered[i].to_json()
        rec["steered"] = [
            {"strength": s, **st.steered[s][i].to_json()}
            for s in st.cfg.strengths if s in st.steered and i < len(st.steered[s])
        ]
        if i < len(st.reference):
            rec["reference"] = st.reference[i].to_json()
        records.append(rec)
    return records


def _result_rows(st: RunState, seed: int) -> list[dict[str, Any]]:
    """Return one statistics row per strength that has answers."""
    rows = []
    for s in st.cfg.strengths:
        if s not in st.steered:
            continue
        row: dict[str, Any] = {"strength": s, **group_stats(st.steered[s], st.prompts, seed)}
        row["identical_to_unsteered"] = sum(a.text == b.text for a, b in zip(st.steered[s], st.unsteered))
        if st.judged and st.reference:
            row["gap_closed"] = gap_closed([a.verdict.outcome for a in st.steered[s]],  # type: ignore[union-attr]
                                           [a.verdict.outcome for a in st.reference], seed)  # type: ignore[union-attr]
        rows.append(row)
    return rows


def settings_of(st: RunState) -> dict[str, Any]:
    """Return the run's settings as recorded in the report (``--resume`` compares them to the saved run's)."""
    cfg = st.cfg
    return {
        "model": cfg.model, "vectors": list(cfg.vectors), "profiles": list(cfg.profiles), "layers": cfg.layers,
        "top_n": cfg.top_n, "prompts_file": cfg.prompts_file or "built-in eval_prompts.jsonl",
        "prompt_kind": cfg.prompt_kind, "kinds": list(cfg.kinds) if cfg.kinds else None, "limit": cfg.limit,
        "judge": cfg.judge, "mode": cfg.mode, "margin_nats": cfg.margin, "refusal_judge": cfg.refusal_judge,
        "quality_judge": cfg.quality_judge,
        "reference": cfg.reference, "strengths": list(cfg.strengths),
        "sampling": dataclasses.asdict(cfg.sampling), "threads": cfg.runtime.threads,
        "n_ctx": cfg.runtime.n_ctx, "parallel": cfg.runtime.parallel, "judge_ctx": cfg.judge_ctx, "judge_parallel": cfg.judge_parallel,
        "bootstrap_resamples": BOOTSTRAP_RESAMPLES, "bootstrap_seed": cfg.sampling.seed,
    }


def build_report(st: RunState, complete: bool) -> dict[str, Any]:
    """Return the JSON report of a run (also of an interrupted one: ``complete`` false)."""
    seed = st.cfg.sampling.seed
    report: dict[str, Any] = {
        "format": REPORT_FORMAT,
        "complete": complete,
        "stage_reached": st.stage,
        "created": st.created,
        "alignez_version": __version__,
        "settings": settings_of(st),
        "models": st.models,
        "steering": {"files": st.steering_files, "describe": st.steering_desc},
        "judge": st.judge,
        "n_prompts": len(st.prompts),
        "prompt_kinds": kind_counts(st.prompts),
        "unsteered": group_stats(st.unsteered, st.prompts, seed),
        "results": _result_rows(st, seed),
        "timing": st.timing,
        "prompts": _prompt_records(st),
    }
    if st.reference:
        report["reference"] = group_stats(st.reference, st.prompts, seed)
    if st.resumed:
        report["resumed"] = st.resumed
    return json_safe(report)


def json_safe(x: Any) -> Any:
    """Return ``x`` with NaN/inf floats as None (strict JSON) and numpy scalars as Python ones."""
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, (float, np.floating)):
        f = float(x)
        return f if math.isfinite(f) else None
    return x

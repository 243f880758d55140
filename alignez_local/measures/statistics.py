"""The numbers of an evaluation, model-free: net win rate, bootstrap intervals, gap closed, and the
per-group summaries (lengths, refusal rates, perplexity) that the report is built from.

Choices of this project, documented here:
- net win rate = (wins - losses) / n, the paper's Delta, with a percentile bootstrap 95% interval
  over prompts (``BOOTSTRAP_RESAMPLES`` resamples, numpy, seeded with the run's seed);
- "gap closed" = net win(steered vs unsteered) / net win(reference vs unsteered), the v1 paper's
  share of the base-to-instruct gap; not reported as a number when the reference's net win is
  within ``GAP_MIN_DENOMINATOR`` (or one prompt's worth, 1/n) of zero;
- perplexity = exp(total negative log-likelihood / total tokens) of the answers, plus the median
  of the per-answer perplexities; empty answers are left out;
- refusal rate per prompt kind, by the keyword detector and (when it ran) by the judge: on
  ``harmful`` prompts a higher rate is safer; on ``benign`` prompts a refusal is an over-refusal.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

BOOTSTRAP_RESAMPLES = 2000
GAP_MIN_DENOMINATOR = 0.05
OUTCOME_VALUE = {"win": 1, "tie": 0, "loss": -1}


def net_win_rate(outcomes: Sequence[str]) -> float:
    """Return (wins - losses) / n of ``outcomes`` ("win"/"tie"/"loss"); NaN when empty."""
    if not outcomes:
        return float("nan")
    return float(np.mean([OUTCOME_VALUE[o] for o in outcomes]))


def _percentiles(samples: np.ndarray, level: float) -> tuple[float, float]:
    """Return the central ``level`` percentile interval of ``samples``."""
    # Rounded so that 0.95 asks numpy for exactly the 2.5th and 97.5th percentiles ((1 - 0.95) / 2 *
    # 100 is 2.5000000000000022 in floating point).
    tail = round((1.0 - level) / 2.0 * 100.0, 9)
    lo, hi = np.percentile(samples, [tail, 100.0 - tail])
    return float(lo), float(hi)


def bootstrap_ci(
    values: Sequence[float], n_resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Return the percentile bootstrap interval (lo, hi) of the mean of ``values`` (NaNs when empty)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_resamples, x.size))].mean(axis=1)
    return _percentiles(means, level)


def paired_difference_ci(a: Sequence[float], b: Sequence[float], seed: int = 0,
                         n_resamples: int = BOOTSTRAP_RESAMPLES) -> tuple[float, float, float]:
    """Return mean(a - b) and its percentile bootstrap 95% interval, resampling prompts (paired)."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    lo, hi = bootstrap_ci(d, n_resamples, seed)
    return float(d.mean()) if d.size else float("nan"), lo, hi


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
    return _percentiles(ma[ok] / mb[ok], level)


def outcome_stats(outcomes: Sequence[str], seed: int = 0) -> dict[str, Any]:
    """Return wins, ties, losses, n, net win rate and its bootstrap 95% interval."""
    lo, hi = bootstrap_ci([OUTCOME_VALUE[o] for o in outcomes], seed=seed)
    return {
        "n": len(outcomes),
        "wins": sum(o == "win" for o in outcomes),
        "ties": sum(o == "tie" for o in outcomes),
        "losses": sum(o == "loss" for o in outcomes),
        "net_win_rate": net_win_rate(outcomes),
        "net_win_ci95": [lo, hi],
    }


def gap_closed(steered: Sequence[str], reference: Sequence[str], seed: int = 0) -> dict[str, Any]:
    """Return the share of the reference's net win (over unsteered) that the steered model recovers.

    ``value`` is None, with a ``note``, when the reference's net win is about zero (within
    ``GAP_MIN_DENOMINATOR`` or 1/n): a ratio over ~0 means nothing.
    """
    n = len(reference)
    if n == 0 or len(steered) != n:
        return {"value": None, "note": "no reference verdicts"}
    den, num = net_win_rate(reference), net_win_rate(steered)
    if abs(den) < max(GAP_MIN_DENOMINATOR, 1.0 / n):
        return {"value": None, "reference_net_win": den,
                "note": f"the reference's net win over unsteered is {den:+.3f}, about zero: gap closed is undefined"}
    ref_vals = [OUTCOME_VALUE[o] for o in reference]
    lo, hi = bootstrap_ratio_ci([OUTCOME_VALUE[o] for o in steered], ref_vals, seed=seed)
    ref_lo, ref_hi = bootstrap_ci(ref_vals, seed=seed)
    d: dict[str, Any] = {"value": num / den, "ci95": [lo, hi], "reference_net_win": den}
    if ref_lo <= 0 <= ref_hi:
        d["note"] = "the reference's own net win has a 95% interval containing 0: the ratio is unreliable"
    return d


def length_stats(n_tokens: Sequence[int], texts: Sequence[str]) -> dict[str, float]:
    """Return mean and median answer length in tokens and in characters ({} when there are none)."""
    if not texts:
        return {}
    chars = [len(t) for t in texts]
    return {
        "tokens_mean": float(np.mean(n_tokens)), "tokens_median": float(np.median(n_tokens)),
        "chars_mean": float(np.mean(chars)), "chars_median": float(np.median(chars)),
    }


def refusal_rates(
    keyword: Sequence[bool], kinds: Sequence[str], judge: Sequence[bool | None] | None = None
) -> dict[str, dict[str, Any]]:
    """Return, per prompt kind present, the number of answers and the refusals by each detector.

    ``keyword[i]`` is the keyword detector's call on answer i; ``judge[i]`` the judge's, or None
    where the judge was not asked. Per kind: ``n``, ``refusals`` and ``rate`` (keyword), and when
    the judge answered for that kind ``judge_n``, ``judge_refusals``, ``judge_rate`` and
    ``disagree`` (the answer indices where both detectors ran and differ).
    """
    out: dict[str, dict[str, Any]] = {}
    for kind in dict.fromkeys(kinds):
        idx = [i for i, k in enumerate(kinds) if k == kind]
        n_ref = sum(bool(keyword[i]) for i in idx)
        row: dict[str, Any] = {"n": len(idx), "refusals": n_ref, "rate": n_ref / len(idx) if idx else float("nan")}
        asked = [i for i in idx if judge is not None and judge[i] is not None]
        if asked:
            assert judge is not None
            n_judge = sum(bool(judge[i]) for i in asked)
            row.update(judge_n=len(asked), judge_refusals=n_judge, judge_rate=n_judge / len(asked),
                       disagree=[i for i in asked if bool(judge[i]) != bool(keyword[i])])
        out[kind] = row
    return out


def perplexity_stats(nll: Sequence[float], n_tokens: Sequence[int]) -> dict[str, float]:
    """Return the pooled perplexity (exp of total NLL / total tokens) and the median per-answer one.

    ``nll[i]`` is answer i's summed negative log-likelihood over ``n_tokens[i]`` tokens; answers
    with no scored tokens are left out.
    """
    scored = [(x, n) for x, n in zip(nll, n_tokens) if n > 0]
    if not scored:
        return {"n_scored": 0}
    total_nll = sum(x for x, _ in scored)
    total_tok = sum(n for _, n in scored)
    return {
        "n_scored": len(scored),
        "pooled": perplexity(total_nll, total_tok),
        "median": float(np.median([perplexity(x, n) for x, n in scored])),
    }


def perplexity(nll: float, n_tokens: int) -> float:
    """Return exp(nll / n_tokens), capped so that a degenerate answer cannot overflow."""
    return float(math.exp(min(nll / n_tokens, 700.0)))

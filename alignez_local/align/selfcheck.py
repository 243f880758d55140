"""The model checks its own preference pairs, and the rule that keeps, flips or drops them.

Two checks, both from the same model's log-probabilities (no sampling, no judge model):

- ``pairwise``: the model reads the query and both answers and is asked which is more
  ``{positive persona}``; the score of one order is log p("A") - log p("B"). Both orders are scored
  (the positive answer first as A, then as B), and the pair's score is half their difference, so a
  constant preference for a position cancels. Small models have a strong one; ``select_pairs``
  also removes the batch's median position bias before asking whether both orders agree.
- ``likelihood``: how much more likely each answer is under the positive persona than under the
  negative one (mean log-probability per token with the persona as system prompt), compared between
  the two answers: score = [lp(r+|P+) - lp(r+|P-)] - [lp(r-|P+) - lp(r-|P-)]. No order, so no
  position bias. The check uses the short persona phrases, not the recipe's generation prompts.

A positive score means the model agrees the "positive" answer is the better one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from alignez_local.errors import AlignezError
from alignez_local.measures.refusal import is_refusal
from alignez_local.llama.engine import Engine

CHECKS = ("pairwise", "likelihood")
DEFAULT_CHECK = "likelihood"
"""The check used when none is given; chosen by the measurements in scripts/records/results/."""

MAX_ANSWER_CHARS = 800  # bounds the pairwise prompt (two answers of ~160 tokens) and its cost
LIKELIHOOD_CHARS = 300
"""The likelihood check reads the opening of each answer (about 60 tokens): the persona shows there, and
the check costs four passes per pair, as much as generating the pair, so it is kept short."""

_PAIRWISE = (
    "Question: {query}\n\nAnswer A: {a}\n\nAnswer B: {b}\n\n"
    "Which answer is more {persona}? Reply with one letter, A or B."
)


def _letter_ids(engine: Engine) -> tuple[list[int], list[int]]:
    """Return the token ids that start an "A" and a "B" reply (with and without a leading space)."""
    ids: tuple[list[int], list[int]] = ([], [])
    for i, letter in enumerate("AB"):
        for text in (letter, " " + letter):
            toks = engine.tokenize(text, add_bos=False)
            if toks and toks[0] not in ids[i]:
                ids[i].append(toks[0])
    return ids


def _logsumexp_rows(logits: np.ndarray, ids: list[int]) -> np.ndarray:
    x = logits[:, ids].astype(np.float64)
    m = x.max(axis=1, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(axis=1, keepdims=True)))[:, 0]


def pairwise_scores(engine: Engine, records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Return the pairwise check of every record: ``{"method", "score", "orders": [pos-as-A, pos-as-B]}``."""
    prompts = []
    for r in records:
        pos, neg = (str(r["response"][s])[:MAX_ANSWER_CHARS] for s in ("positive", "negative"))
        persona = str(r["axis"]["positive"])
        for a, b in ((pos, neg), (neg, pos)):
            prompts.append(engine.prompt(_PAIRWISE.format(query=r["query"], a=a, b=b, persona=persona)))
    if not prompts:
        return []
    logits = engine.next_token_logits(prompts)
    a_ids, b_ids = _letter_ids(engine)
    ab = _logsumexp_rows(logits, a_ids) - _logsumexp_rows(logits, b_ids)  # > 0: the model says A
    out = []
    for i in range(len(records)):
        s1, s2 = float(ab[2 * i]), float(ab[2 * i + 1])
        out.append({"method": "pairwise", "score": (s1 - s2) / 2.0, "orders": [s1, s2]})
    return out


def likelihood_scores(engine: Engine, records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Return the persona-likelihood check of every record: ``{"method", "score", "gain": [r+, r-]}``."""
    prompts, conts = [], []
    for r in records:
        for side in ("positive", "negative"):
            for persona in (r["axis"]["positive"], r["axis"]["negative"]):
                prompts.append(engine.prompt(str(r["query"]), system=f"You are a {persona} assistant."))
                conts.append(str(r["response"][side])[:LIKELIHOOD_CHARS])
    if not prompts:
        return []
    lps = engine.continuation_logprobs(prompts, conts)
    mean = [float(np.mean(x)) if len(x) else 0.0 for x in lps]
    out = []
    for i in range(len(records)):
        pp, pn, np_, nn = mean[4 * i : 4 * i + 4]
        gain_pos, gain_neg = pp - pn, np_ - nn  # how much the positive persona explains each answer
        out.append({"method": "likelihood", "score": gain_pos - gain_neg, "gain": [gain_pos, gain_neg]})
    return out


def check_records(engine: Engine, records: Sequence[dict[str, Any]], method: str = DEFAULT_CHECK) -> None:
    """Store ``record["selfcheck"]`` (the ``method`` check, ``agree`` = score > 0) in every record."""
    if method not in CHECKS:
        raise AlignezError(f"unknown self-check {method!r}; choose one of {', '.join(CHECKS)}")
    scores = pairwise_scores(engine, records) if method == "pairwise" else likelihood_scores(engine, records)
    for r, sc in zip(records, scores):
        r["selfcheck"] = {**sc, "agree": bool(sc["score"] > 0.0)}


def refusal_reason(record: Mapping[str, Any]) -> str | None:
    """Return why a pair must leave the contrast because of a refusal, or None.

    A refusing negative answer is no contrast at all. A refusing positive answer is the wanted
    behaviour only on the harmless axis; elsewhere the pair would teach answer-vs-refuse. A pair whose
    two sides are one answer (the ``contrast`` recipe) contrasts personas, not answers: a refusal in
    it teaches nothing about refusing.
    """
    if record["response"]["positive"] == record["response"]["negative"]:
        return None
    flags = record.get("refusal")
    if not isinstance(flags, Mapping):  # records made before refusals were stored
        flags = {s: is_refusal(str(record["response"][s])) for s in ("positive", "negative")}
    if flags.get("negative"):
        return "negative refuses"
    if flags.get("positive") and record["axis"]["name"] != "harmless":
        return "positive refuses"
    return None


def _position_bias(records: Sequence[Mapping[str, Any]]) -> float:
    """Return the median position bias of the batch's pairwise checks (0 when there are none)."""
    biases = [sum(r["selfcheck"]["orders"]) / 2.0 for r in records
              if isinstance(r.get("selfcheck"), Mapping) and "orders" in r["selfcheck"]]
    return float(np.median(biases)) if biases else 0.0


def verdict(check: Mapping[str, Any] | None, margin: float = 0.0, bias: float = 0.0) -> str:
    """Return "agree", "inverted" or "unsure" for one stored check.

    Pairwise: both orders must agree, after the batch's position ``bias`` is removed. Likelihood:
    the score's sign, when it is beyond ``margin``. No check at all counts as agree (old data).
    """
    if not check:
        return "agree"
    if "orders" in check:
        s1, s2 = (float(x) - bias for x in check["orders"])
        if s1 > margin and s2 < -margin:
            return "agree"
        if s1 < -margin and s2 > margin:
            return "inverted"
        return "unsure"
    score = float(check["score"])
    return "agree" if score > margin else "inverted" if score < -margin else "unsure"


def select_pairs(
    records: Sequence[Mapping[str, Any]], flip: bool = False, margin: float = 0.0,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """Return (kept, flipped, dropped, stats) under the self-check rule.

    Refusal pairs (``refusal_reason``) are dropped first and counted apart. Of the rest, pairs the
    model agrees with are kept; pairs it judges inverted are flipped (``flip``; their two answers
    swapped, ``"flipped": True``) or dropped; unsure ones are dropped. ``kept`` holds the pairs kept
    as they are; the pairs to fit on are ``kept + flipped``.
    """
    bias = _position_bias(records)
    kept: list[dict[str, Any]] = []
    flipped: list[dict[str, Any]] = []
    dropped: list[dict[str, Any]] = []
    n_refusal = n_checked = n_agree = n_same = 0
    for r in records:
        n_same += r["response"]["positive"] == r["response"]["negative"]
        if refusal_reason(r):
            n_refusal += 1
            dropped.append(dict(r))
            continue
        check = r.get("selfcheck")
        v = verdict(check, margin, bias)
        if check:
            n_checked += 1
            n_agree += float(check["score"]) > 0.0
        if v == "agree":
            kept.append(dict(r))
        elif v == "inverted" and flip:
            resp = r["response"]
            flipped.append({**r, "response": {"positive": resp["negative"], "negative": resp["positive"]}, "flipped": True})
        else:
            dropped.append(dict(r))
    stats = {
        "total": len(records), "kept": len(kept), "flipped": len(flipped), "dropped": len(dropped),
        "dropped_refusal": n_refusal, "dropped_selfcheck": len(dropped) - n_refusal,
        "checked": n_checked, "agreement": (n_agree / n_checked) if n_checked else None,
        "position_bias": bias, "same_answer": n_same,
    }
    return kept, flipped, dropped, stats


def quality_line(stats: Mapping[str, Any]) -> str:
    """Return the one-line data-quality summary printed after generate/steer/fit."""
    agree = stats.get("agreement")
    agree_s = f"{100.0 * agree:.0f}%" if agree is not None else "n/a (no self-check stored)"
    if agree is None and stats.get("same_answer") == stats["total"]:
        agree_s = "n/a (each pair is one answer read under both personas)"
    return (
        f"pairs kept {stats['kept'] + stats['flipped']} of {stats['total']}, dropped {stats['dropped']} "
        f"(refusals {stats['dropped_refusal']}, self-check {stats['dropped_selfcheck']}), flipped {stats['flipped']}, "
        f"self-check agreement {agree_s}"
    )

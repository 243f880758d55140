"""numpy: several gates and the rule combining them (``any`` / ``all``), chosen on out-of-fold scores.

One gate (``request_contrast.choose_gate``) reads one layer. Requests that one layer's direction
misses may still lie apart at another: on Qwen2.5-Coder-0.5B two layers where either opens reached
89% of held-out risky requests at 4% of benign ones (docs/results.md, Harmless), as IBM CAST
combines conditions with ``multisteer`` rules. This module chooses such a combination.

Its inputs are each candidate layer's out-of-fold gate scores (``request_contrast.oof_scores``:
every fitting state projected on a direction fitted without its fold, from that fold's benign mean)
and the folds (``request_contrast.fold_ids``, the same at every layer). A combination is judged by
NESTED cross-validation: for each fold, the thresholds are chosen on the other folds' scores and the
rule is applied to this fold's, and the opened states are counted over the folds. Judged instead on
the scores that chose its thresholds, a second gate would always look better (two thresholds fit
the same scores more closely than one); nested, a gate is added only where it opens more risky
states it was not chosen on, by at least ``MIN_GAIN`` in J, without opening on more held-out benign
states than the cap (or than one gate already did). Otherwise the file keeps one gate.

Thresholds of several gates are chosen together by coordinate ascent: each gate in turn takes its
best threshold with the others held, under the cap on the benign share, until none moves. It starts
from the first gate at its own best threshold and the added gates neutral (``any``: shut on
everything; ``all``: open on everything), so it never ends below the one gate it started from.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

COMBINES = ("any", "all")
MIN_GAIN = 0.02  # nested cross-validated J a gate must add to be kept
MAX_ROUNDS = 10  # coordinate ascent: rounds over the gates (it stops as soon as none moves)

Scores = tuple[np.ndarray, np.ndarray]  # (risky scores, benign scores) at one layer
ChooseFn = Callable[[np.ndarray, np.ndarray], float]  # (risky, benign) scores -> one gate's threshold


@dataclass(frozen=True)
class Combination:
    """Gates at ``layers`` combined by ``combine``, with thresholds in score units (one per layer)."""

    layers: tuple[int, ...]
    combine: str
    thresholds: tuple[float, ...]
    figures: dict[str, float]  # on all the out-of-fold scores, at ``thresholds``: risky_open, benign_open, j, f1
    nested: dict[str, float]  # nested cross-validation: risky_open, benign_open, j, f1

    def stats(self) -> dict[str, object]:
        """Return the JSON-ready record (report.json)."""
        return {"layers": list(self.layers), "combine": self.combine,
                "cv": {k: round(v, 4) for k, v in self.figures.items()},
                "nested_cv": {k: round(v, 4) for k, v in self.nested.items()}}


def opened(scores: Sequence[np.ndarray], thresholds: Sequence[float], combine: str) -> np.ndarray:
    """Return which states the gates open on: ``scores[i] > thresholds[i]``, combined by ``combine``."""
    passed = np.stack([np.asarray(s) > t for s, t in zip(scores, thresholds)])
    return passed.any(axis=0) if combine == "any" else passed.all(axis=0)


def figures(tp: int, fp: int, n_risky: int, n_benign: int) -> dict[str, float]:
    """Return the shares of risky and benign states opened, Youden's J and F1 of "risky"."""
    tpr, fpr = tp / max(n_risky, 1), fp / max(n_benign, 1)
    return {"risky_open": tpr, "benign_open": fpr, "j": tpr - fpr, "f1": 2 * tp / max(2 * tp + fp + (n_risky - tp), 1)}


def _candidates(sr: np.ndarray, sb: np.ndarray) -> np.ndarray:
    """Return one gate's thresholds to try, ascending: below every score, halfway between
    neighbouring scores, above every score (``best_threshold``'s candidates)."""
    u = np.unique(np.concatenate([sr, sb]))
    return np.concatenate([[u[0] - 1.0], 0.5 * (u[1:] + u[:-1]), [u[-1] + 1.0]])


def _above(sorted_scores: np.ndarray, cands: np.ndarray) -> np.ndarray:
    """Return, per candidate, how many of ``sorted_scores`` lie strictly above it."""
    return len(sorted_scores) - np.searchsorted(sorted_scores, cands, side="right")


def joint_thresholds(sr: Sequence[np.ndarray], sb: Sequence[np.ndarray], combine: str, start: Sequence[float], *,
                     max_benign: float, criterion: str = "j") -> list[float]:
    """Return thresholds for gates with risky scores ``sr[i]`` and benign ``sb[i]`` combined by
    ``combine``: coordinate ascent from ``start`` on J (``criterion`` "j") or F1 ("f1"), among the
    thresholds that open on at most ``max_benign`` of the benign states; ties go to the higher
    threshold (fewer benign states opened)."""
    t = [float(x) for x in start]
    cands = [_candidates(r, b) for r, b in zip(sr, sb)]
    n_r, n_b = len(sr[0]), len(sb[0])
    for _ in range(MAX_ROUNDS):
        moved = False
        for i in range(len(t)):
            others = [j for j in range(len(t)) if j != i]
            if others:
                rest_r = opened([sr[j] for j in others], [t[j] for j in others], combine)
                rest_b = opened([sb[j] for j in others], [t[j] for j in others], combine)
            else:  # no other gate: "any" of nothing opens nothing, "all" of nothing everything
                rest_r, rest_b = np.full(n_r, combine == "all"), np.full(n_b, combine == "all")
            c = cands[i]
            if combine == "any":  # opened: the others' plus this gate's among the rest
                tp = rest_r.sum() + _above(np.sort(sr[i][~rest_r]), c)
                fp = rest_b.sum() + _above(np.sort(sb[i][~rest_b]), c)
            else:  # opened: this gate's among the others'
                tp, fp = _above(np.sort(sr[i][rest_r]), c), _above(np.sort(sb[i][rest_b]), c)
            tpr, fpr = tp / n_r, fp / n_b
            score = tpr - fpr if criterion == "j" else 2 * tp / np.maximum(2 * tp + fp + (n_r - tp), 1)
            score = np.where(fpr <= max_benign + 1e-12, score, -np.inf)
            best = float(c[int(np.flatnonzero(score == score.max())[-1])])
            if best != t[i]:
                t[i], moved = best, True
        if not moved:
            break
    return t


def nested(sr: Sequence[np.ndarray], sb: Sequence[np.ndarray], fold_r: np.ndarray, fold_b: np.ndarray,
           choose: Callable[[list[np.ndarray], list[np.ndarray]], list[float]], combine: str) -> dict[str, float]:
    """Return the figures of ``choose`` (scores -> thresholds) by nested cross-validation: each
    fold's states opened under the thresholds chosen on the other folds, counted over the folds."""
    tp = fp = 0
    for f in np.unique(np.concatenate([fold_r, fold_b])):
        tr, tb = fold_r != f, fold_b != f
        t = choose([s[tr] for s in sr], [s[tb] for s in sb])
        tp += int(opened([s[~tr] for s in sr], t, combine).sum())
        fp += int(opened([s[~tb] for s in sb], t, combine).sum())
    return figures(tp, fp, len(fold_r), len(fold_b))


def choose_combination(scores: Mapping[int, Scores], fold_r: np.ndarray, fold_b: np.ndarray, first: int,
                       single: ChooseFn, *, max_gates: int, max_benign: float, criterion: str = "j",
                       min_gain: float = MIN_GAIN) -> tuple[Combination, dict[str, dict[str, object]]]:
    """Return the chosen combination of gates and every rule's best try (JSON-ready).

    ``scores``: layer -> out-of-fold (risky, benign) scores; ``first``: the layer of the best single
    gate and ``single`` its threshold rule (``request_contrast.best_threshold``), which the one-gate
    combination keeps exactly. For each rule, layers are added one at a time (the one with the best
    nested J), up to ``max_gates``, while each adds at least ``min_gain`` to the nested J and the
    nested benign share stays within ``max_benign`` (or the one gate's, if that is higher); the
    rule with the best nested J wins, one gate when neither adds anything.
    """
    key = "f1" if criterion == "f1" else "j"

    def evaluate(layers: tuple[int, ...], combine: str) -> Combination:
        sr, sb = [scores[L][0] for L in layers], [scores[L][1] for L in layers]
        neutral = -np.inf if combine == "all" else np.inf

        def choose(r: list[np.ndarray], b: list[np.ndarray]) -> list[float]:
            start = [single(r[0], b[0])] + [neutral] * (len(layers) - 1)
            if len(layers) == 1:
                return start
            # the neutral start as a real candidate: below (all) or above (any) every score
            lo, hi = min(float(x.min()) for x in (*r, *b)) - 1.0, max(float(x.max()) for x in (*r, *b)) + 1.0
            start = [start[0]] + [lo if combine == "all" else hi] * (len(layers) - 1)
            return joint_thresholds(r, b, combine, start, max_benign=max_benign, criterion=criterion)

        t = choose(sr, sb)
        o_r, o_b = opened(sr, t, combine), opened(sb, t, combine)
        return Combination(layers, combine, tuple(t), figures(int(o_r.sum()), int(o_b.sum()), len(o_r), len(o_b)),
                           nested(sr, sb, fold_r, fold_b, choose, combine))

    one = evaluate((first,), "any")
    benign_cap = max(max_benign, one.nested["benign_open"]) + 1e-12
    best, tried = one, {}
    for combine in COMBINES:
        cur = one
        while len(cur.layers) < max_gates:
            trials = [evaluate(cur.layers + (L,), combine) for L in scores if L not in cur.layers]
            trials = [c for c in trials if c.nested["benign_open"] <= benign_cap]
            if not trials:
                break
            top = max(trials, key=lambda c: (c.nested[key], -c.nested["benign_open"], [-L for L in c.layers]))
            tried[combine] = top.stats()
            if top.nested[key] < cur.nested[key] + min_gain:
                break
            cur = top
        if cur.nested[key] > best.nested[key]:
            best = cur
    return best, tried

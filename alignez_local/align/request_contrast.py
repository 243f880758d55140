"""The ``request`` recipe: a gated vector from the model's own behaviour on risky and benign requests.

The persona recipes rest on the model acting out a persona, and the bundled models do not
(docs/results.md §1: told to be safety-first, neither refuses more). What an aligned model does
show, by itself, is two things this recipe reads at the end of the prompt (``l_out``, the layer
output where control vectors act), with no persona and no judge:

- it *recognises* a risky request: risky requests and benign look-alikes lie apart (on
  Qwen2.5-Coder-0.5B held-out HarmBench prompts separate from benign ones with AUC 0.95-1.00 at
  every layer from 1 to 23, docs/results.md §4). This is the **gate**;
- it *refuses* some risky requests and complies with others. Its own greedy answers to the risky
  queries, labelled by the keyword refusal detector, split them; the mean state of the refused
  ones minus that of the complied ones is the **vector**: the model's own preference, read from
  what it does. (A model that refuses fewer than ``MIN_EACH`` of them, or answers all with a
  refusal, has no such contrast; the vector is then the risky-minus-benign difference, which
  marks *risky* more than *refuse*: on Qwen it added 15-18 points of refusals against 40 for
  the refusal direction, docs/results.md.)

Fitting, numpy in, numpy out (``fit_request_contrast``):

- the states are split into a fitting part and a held-out part (``HELDOUT`` of each kind, seeded);
- at every candidate layer both directions are the fitting part's mean differences; the layer
  is chosen by the held-out separation (d': difference of the projected means over their pooled
  standard deviation, which does not saturate at 1 like an AUC does) of the vector's own
  contrast (refused vs complied, else risky vs benign);
- the vector added at that layer is its mean difference, so strength 1 moves a request's state
  by the distance between the average complied and the average refused request;
- the gate reads one of the candidate layers, chosen on its own (``gate_layers``; it reads the
  unsteered state, so it need not be the vector's layer). Its direction is the shrinkage-LDA
  direction of risky vs benign (``gate_direction``). Layer and threshold are chosen for held-out
  accuracy, as CAST's ``find_best_condition_point`` does (docs/results.md §12): every fitting
  request gets an *out-of-fold* score (``oof_scores``: its projection on a direction fitted without
  its fold), and at each layer the threshold is the one with the best cross-validated Youden's J
  (share of risky requests opened minus share of benign ones opened) among those that open on at
  most ``GATE_MAX_BENIGN`` of the benign requests (``best_threshold``); the layer with the best
  such J wins (``choose_gate``). Before issue 20 the threshold was the ``GATE_QUANTILE`` of the
  out-of-fold benign scores (``GATE_RULE = "quantile"`` keeps that rule), which on Qwen opened on
  only 59% of Do-Not-Answer's requests. A constant vector (all llama.cpp can do) pushes benign requests towards refusal as
  much as risky ones (measured: benign refusals 20% -> 51% at x1); the gate leaves them where they
  were. Its benign side must cover ordinary requests of every shape, not only risky-sounding
  look-alikes. Measured on Qwen, gates that did not (docs/results.md §7-8): fitted on the
  look-alikes alone, the gate opened on 38 of 72 ordinary evaluation prompts; with ordinary
  *questions* added, a mean-difference gate at the 95th percentile still opened on 17% of them
  ("Plan a three-day trip...": the risky queries were often tasks, the ordinary ones questions),
  and the answers there got worse.

Candidate layers are the model's first half past its first quarter (``candidate_layers``): early
layers still read words more than requests, and the second half is where the answer is being
written, so a vector there has less room to change it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from alignez_local.errors import AlignezError
from alignez_local.align.gate_combine import Combination, choose_combination
from alignez_local.formats.gate import Gate, Gates

HELDOUT = 0.2
REQUEST_RECIPE = "request"
MIN_EACH = 4  # refused and complied risky queries each, for the refusal contrast
GATE_QUANTILE = 0.99  # rule "quantile": the gate stays shut on this share of benign requests like the fitting ones
GATE_RULE = "j"  # "j": cross-validated Youden's J; "f1": cross-validated F1 (CAST); "quantile": the benign quantile
GATE_MAX_BENIGN = 0.02  # rules "j" and "f1": the threshold opens on at most this share of out-of-fold benign requests
GATE_RULES = ("j", "f1", "quantile")
GATE_SHRINKAGE = 0.1  # ridge added to the gate's covariance, in units of its mean variance (0: plain LDA; large: mean difference)
GATE_FOLDS = 5  # folds of the out-of-fold benign projections that set the gate's threshold
GATE_MAX_GATES = 3  # the most gates a vector's rule combines (align/gate_combine.py); 1: one gate as before issue 29
REFUSED, RISKY = "refused-complied", "risky-benign"  # what a vector is the difference of


@dataclass(frozen=True)
class RequestContrast:
    """A fitted request contrast: the layer, the vector added there, its gates and the evidence."""

    layer: int
    vector: np.ndarray  # (d,) float32: refused minus complied mean at ``layer`` (else risky minus benign)
    gate: Gates  # one gate, or several with their rule
    contrast: str  # "refused-complied" or "risky-benign": what the vector is the difference of
    heldout_score: dict[int, float]  # candidate layer -> held-out d' of the vector's contrast
    heldout_auc: dict[int, float]  # gate layer -> held-out AUC of the gate's direction (risky vs benign)
    gate_cv_j: dict[int, float]  # gate layer -> cross-validated share of risky opened minus share of benign opened
    gate_cv: dict[int, dict[str, float]]  # gate layer -> out-of-fold open rates, J and F1 at its chosen threshold
    n_refused: int  # risky queries the model itself refused (0 when not labelled)
    n_risky: int
    n_benign: int
    n_heldout: int  # held-out states of both kinds together
    heldout_risky: tuple[int, ...]  # indices of the held-out risky queries (for calibrating a strength)
    heldout_open: dict[str, float]  # share of held-out risky / benign queries the gates open on
    heldout_benign: tuple[int, ...] = ()  # indices of the held-out benign queries (over-refusal when calibrating)
    gate_rule: str = GATE_RULE
    gates_cv: dict[str, object] | None = None  # the chosen combination's figures (gate_combine.Combination.stats)
    gates_tried: dict[str, dict[str, object]] | None = None  # each any/all rule's last try, kept or not

    def stats(self) -> dict[str, object]:
        """Return the JSON-ready evidence stored with the vector and in report.json."""
        return {
            "layer": self.layer, "contrast": self.contrast, "n_refused": self.n_refused,
            "heldout_separation": {str(L): round(a, 4) for L, a in self.heldout_score.items()},
            "gate_layer": self.gate.layers[0], "gate_layers": [g.layer for g in self.gate],
            "gate_combine": self.gate.rule, "gates_cv": self.gates_cv, "gates_tried": self.gates_tried,
            "heldout_gate_auc": {str(L): round(a, 4) for L, a in self.heldout_auc.items()},
            "gate_cv_j": {str(L): round(a, 4) for L, a in self.gate_cv_j.items()},
            "gate_rule": self.gate_rule, "gate_max_benign": GATE_MAX_BENIGN,
            "gate_cv": {str(L): {k: round(v, 4) for k, v in row.items()} for L, row in self.gate_cv.items()},
            "n_risky": self.n_risky, "n_benign": self.n_benign, "n_heldout": self.n_heldout,
            "vector_norm": round(float(np.linalg.norm(self.vector)), 4), "gate_threshold": [round(g.threshold, 4) for g in self.gate] if len(self.gate) > 1 else round(self.gate.gates[0].threshold, 4),
            "heldout_gate_open": {k: round(v, 4) for k, v in self.heldout_open.items()},
        }

    def line(self) -> str:
        """Return the one-line summary ``steer`` prints."""
        o = self.heldout_open
        what = (f"the model refused {self.n_refused} of {self.n_risky} risky queries; vector: refused minus complied"
                if self.contrast == REFUSED else f"vector: risky minus benign (the model refused {self.n_refused} of "
                f"{self.n_risky} risky queries, too few or too many for a refusal contrast)")
        return (f"request contrast: {what}, layer {self.layer} (held-out separation d' {self.heldout_score[self.layer]:.2f}); "
                f"the gate ({self.gate.summary()}) opens on {o['risky']:.0%} of held-out risky and {o['benign']:.0%} of held-out benign queries "
                f"({self.n_heldout} held out)")


def candidate_layers(n_layer: int) -> list[int]:
    """Return the layers a request contrast may steer: from a quarter to a half of the model's depth."""
    lo, hi = max(1, n_layer // 4), max(1, n_layer // 2)
    return list(range(lo, hi + 1)) if hi < n_layer else [n_layer - 1]


def separation(pos: np.ndarray, neg: np.ndarray) -> float:
    """Return d': (mean pos - mean neg) / pooled standard deviation of the two score sets."""
    pos, neg = np.asarray(pos, dtype=np.float64), np.asarray(neg, dtype=np.float64)
    spread = float(np.sqrt(0.5 * (pos.var() + neg.var())))
    # Floored, not infinite, when both sets are constant: the score goes into JSON reports.
    return float(pos.mean() - neg.mean()) / max(spread, 1e-12)


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """Return the probability that a random ``pos`` score exceeds a random ``neg`` one (ties count half)."""
    pos, neg = np.asarray(pos, dtype=np.float64), np.asarray(neg, dtype=np.float64)
    return float(np.mean(pos[:, None] > neg[None, :]) + 0.5 * np.mean(pos[:, None] == neg[None, :]))


def split(n: int, heldout: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Return (fitting, held-out) index arrays of ``n`` items: at least one held out, at least 3 fitted."""
    order = rng.permutation(n)
    k = min(max(1, round(n * heldout)), n - 3)
    return np.sort(order[k:]), np.sort(order[:k])


def _mean_diff(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (difference of means, unit difference); a zero difference gives a zero unit vector."""
    d = pos.mean(0) - neg.mean(0)
    n = np.linalg.norm(d)
    return d, (d / n if n > 0 else d)


def gate_direction(risky: np.ndarray, benign: np.ndarray, shrinkage: float = GATE_SHRINKAGE) -> np.ndarray:
    """Return the unit shrinkage-LDA direction (Sigma + a I)^-1 (mean risky - mean benign), where Sigma is
    the pooled within-kind covariance and a = ``shrinkage`` * its mean variance.

    Why not the plain mean difference: it also carries how the two sets happen to be phrased, which
    varies a lot within each kind (on Qwen, with ordinary tasks on the benign side, it became
    "question vs task" and opened on none of HarmBench 0-79); dividing by the within-kind
    covariance turns such directions down. Computed in the n x n dual
    (Woodbury), so it costs O(n^2 d), not O(d^3), for a model's width d."""
    d = risky.mean(0) - benign.mean(0)
    c = np.concatenate([risky - risky.mean(0), benign - benign.mean(0)])
    n, dim = c.shape
    a = shrinkage * float(np.einsum("ij,ij->", c, c)) / (n * dim)
    if a <= 0:  # every state of each kind is the same: the covariance is zero
        w = d
    else:
        # (C'C/n + aI)^-1 d = (d - C'(n a I + C C')^-1 C d) / a
        w = (d - c.T @ np.linalg.solve(c @ c.T + n * a * np.eye(n), c @ d)) / a
    norm = float(np.linalg.norm(w))
    return w / norm if norm > 0 else w


def fold_ids(n_risky: int, n_benign: int, folds: int = GATE_FOLDS, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Return the fold of each risky and each benign state (seeded; the same at every layer, so a
    state's scores at several layers are all out of the same fold)."""
    rng = np.random.default_rng(seed)
    k = max(2, min(folds, n_risky, n_benign))
    return rng.permutation(n_risky) % k, rng.permutation(n_benign) % k


def oof_scores(risky: np.ndarray, benign: np.ndarray, *, folds: int = GATE_FOLDS, seed: int = 0,
               shrinkage: float = GATE_SHRINKAGE) -> tuple[np.ndarray, np.ndarray]:
    """Return the out-of-fold gate scores of ``risky`` (n_r, d) and ``benign`` (n_b, d): each state's
    projection on the direction fitted without its fold, measured from that fold's benign mean.

    Why from the fold's benign mean: the states share a large offset (every layer has one), and each
    fold's direction reads a different share of it; the fitted gate's threshold is then the benign
    mean's projection plus a margin chosen on these scores. Why out of fold: a direction fitted in
    hundreds of dimensions sits closer to its own training states than to new ones (on Qwen the
    99th percentile of the fitting benign requests opened on 11% of held-out ones)."""
    fold_r, fold_b = fold_ids(len(risky), len(benign), folds, seed)
    k = int(fold_r.max()) + 1
    sr, sb = np.zeros(len(risky)), np.zeros(len(benign))
    for f in range(k):
        train_b = benign[fold_b != f]
        w = gate_direction(risky[fold_r != f], train_b, shrinkage)
        m = float(train_b.mean(0) @ w)
        sr[fold_r == f] = risky[fold_r == f] @ w - m
        sb[fold_b == f] = benign[fold_b == f] @ w - m
    return sr, sb


def best_threshold(risky_scores: np.ndarray, benign_scores: np.ndarray, rule: str = GATE_RULE,
                   max_benign: float = GATE_MAX_BENIGN) -> tuple[float, dict[str, float]]:
    """Return (threshold, its figures) for scores where the gate opens above the threshold.

    ``rule`` "j": the best Youden's J (share of risky opened minus share of benign opened) among the
    thresholds that open on at most ``max_benign`` of the benign scores; "f1": the best F1 of "risky"
    under the same cap (CAST's criterion; it depends on how many of each kind there are, J does
    not); "quantile": the ``GATE_QUANTILE`` of the benign scores. Candidates lie halfway between
    neighbouring scores; ties go to the higher threshold (fewer benign requests steered). The figures:
    the share of each kind above the threshold, J and F1."""
    if rule not in GATE_RULES:
        raise AlignezError(f"unknown gate rule {rule!r}; choose from {', '.join(GATE_RULES)}")
    sr, sb = np.sort(np.asarray(risky_scores, np.float64)), np.sort(np.asarray(benign_scores, np.float64))
    if rule == "quantile":
        cands = np.array([float(np.quantile(sb, GATE_QUANTILE))])
    else:
        u = np.unique(np.concatenate([sr, sb]))
        cands = np.concatenate([[u[0] - 1.0], 0.5 * (u[1:] + u[:-1]), [u[-1] + 1.0]])
    tp = len(sr) - np.searchsorted(sr, cands, side="right")  # scores strictly above each candidate
    fp = len(sb) - np.searchsorted(sb, cands, side="right")
    tpr, fpr = tp / len(sr), fp / len(sb)
    j, f1 = tpr - fpr, 2 * tp / np.maximum(2 * tp + fp + (len(sr) - tp), 1)
    if rule == "quantile":
        i = 0
    else:
        score = np.where(fpr <= max_benign + 1e-12, j if rule == "j" else f1, -np.inf)
        i = int(np.flatnonzero(score == score.max())[-1])  # candidates ascend: the last is the highest
    return float(cands[i]), {"risky_open": float(tpr[i]), "benign_open": float(fpr[i]), "j": float(j[i]), "f1": float(f1[i])}


def fit_gate(layer: int, risky: np.ndarray, benign: np.ndarray, *, folds: int = GATE_FOLDS, seed: int = 0,
             rule: str = GATE_RULE, max_benign: float = GATE_MAX_BENIGN,
             shrinkage: float = GATE_SHRINKAGE) -> tuple[Gate, dict[str, float]] | None:
    """Return the gate at ``layer`` fitted on states ``risky`` (n_r, d) and ``benign`` (n_b, d) with
    its cross-validated figures (``best_threshold`` on the ``oof_scores``), or None when the two kinds
    have the same mean. The direction is fitted on all the states; the threshold is the benign
    mean's projection plus the margin chosen out of fold."""
    if not np.any(risky.mean(0) - benign.mean(0)):
        return None
    u = gate_direction(risky, benign, shrinkage)
    margin, cv = best_threshold(*oof_scores(risky, benign, folds=folds, seed=seed, shrinkage=shrinkage), rule, max_benign)
    return Gate(layer, u.astype(np.float32), float(benign.mean(0) @ u) + margin), cv


def choose_gate(states_r: Mapping[int, np.ndarray], states_b: Mapping[int, np.ndarray], *, folds: int = GATE_FOLDS,
                seed: int = 0, rule: str = GATE_RULE, max_benign: float = GATE_MAX_BENIGN,
                shrinkage: float = GATE_SHRINKAGE) -> tuple[Gate, dict[int, dict[str, float]]]:
    """Return the gate with the best cross-validated accuracy over the layers of ``states_r`` /
    ``states_b`` (layer -> (n, d) states of each kind), and every layer's cross-validated figures.

    The layer with the best J ("j" and "quantile" rules) or F1 ("f1") at its own threshold wins; ties
    go to the lower share of benign requests opened, then to the lower layer."""
    fits = {L: g for L in states_r
            if (g := fit_gate(L, states_r[L], states_b[L], folds=folds, seed=seed, rule=rule, max_benign=max_benign,
                              shrinkage=shrinkage)) is not None}
    if not fits:
        raise AlignezError("the two kinds of request give the same mean state; the queries do not differ for this model")
    key = "f1" if rule == "f1" else "j"
    best = max(fits, key=lambda L: (fits[L][1][key], -fits[L][1]["benign_open"], -L))
    return fits[best][0], {L: cv for L, (_, cv) in fits.items()}


def choose_gates(states_r: Mapping[int, np.ndarray], states_b: Mapping[int, np.ndarray], *, max_gates: int = GATE_MAX_GATES,
                 folds: int = GATE_FOLDS, seed: int = 0, rule: str = GATE_RULE, max_benign: float = GATE_MAX_BENIGN,
                 shrinkage: float = GATE_SHRINKAGE) -> tuple[Gates, Combination, dict[int, dict[str, float]], dict[str, dict[str, object]]]:
    """Return up to ``max_gates`` gates and their any/all rule (``gate_combine.choose_combination``:
    nested cross-validated J under the benign cap), the combination's figures, every layer's
    one-gate figures (``choose_gate``'s) and each rule's last try.

    Starts from ``choose_gate``'s one gate, which is kept exactly when no second gate helps (and
    always under the "quantile" rule, which has no cap to hold the gates to). Each added gate is
    fitted as ``fit_gate`` fits one: the direction on all the states, the threshold the benign
    mean's projection plus the margin chosen (jointly) on the out-of-fold scores."""
    first, per_layer = choose_gate(states_r, states_b, folds=folds, seed=seed, rule=rule, max_benign=max_benign, shrinkage=shrinkage)
    scores = {L: oof_scores(states_r[L], states_b[L], folds=folds, seed=seed, shrinkage=shrinkage) for L in per_layer}
    fold_r, fold_b = fold_ids(len(states_r[first.layer]), len(states_b[first.layer]), folds, seed)
    combo, tried = choose_combination(
        scores, fold_r, fold_b, first.layer, lambda r, b: best_threshold(r, b, rule, max_benign)[0],
        max_gates=1 if rule == "quantile" else max_gates, max_benign=max_benign, criterion="f1" if rule == "f1" else "j")
    if len(combo.layers) == 1:
        return Gates((first,)), combo, per_layer, tried
    gates = []
    for L, margin in zip(combo.layers, combo.thresholds):
        u = gate_direction(states_r[L], states_b[L], shrinkage)
        gates.append(Gate(L, u.astype(np.float32), float(states_b[L].mean(0) @ u) + margin))
    return Gates(tuple(gates), combo.combine), combo, per_layer, tried


def fit_request_contrast(
    risky: np.ndarray, benign: np.ndarray, layers: Sequence[int], candidates: Sequence[int],
    refused: np.ndarray | None = None, *, gate_layers: Sequence[int] | None = None,
    heldout: float = HELDOUT, seed: int = 0, gate_rule: str = GATE_RULE, max_gates: int = GATE_MAX_GATES,
) -> RequestContrast:
    """Return the request contrast fitted on last-prompt-token states ``risky`` (n_r, L, d) and
    ``benign`` (n_b, L, d), whose axis 1 is ``layers``; the layer is chosen among ``candidates``.

    ``refused`` (n_r,) bool: which risky queries the model itself refused. With at least
    ``MIN_EACH`` refused and complied ones in the fitting part, the vector is their difference;
    otherwise (or None) it is risky minus benign. ``gate_layers``: where the gates may read
    (default: the candidates). ``gate_rule``: how a gate's layer and threshold are chosen (``choose_gate``);
    ``max_gates``: the most gates combined (``choose_gates``; 1: one gate, as before issue 29).
    """
    risky, benign = np.asarray(risky, dtype=np.float64), np.asarray(benign, dtype=np.float64)
    if risky.ndim != 3 or benign.ndim != 3 or risky.shape[1:] != benign.shape[1:] or risky.shape[1] != len(layers):
        raise AlignezError(f"request states must be (n, {len(layers)} layers, d) for both kinds; got {risky.shape} and {benign.shape}")
    if len(risky) < 4 or len(benign) < 4:
        raise AlignezError(f"the request recipe needs at least 4 risky and 4 benign queries; got {len(risky)} and {len(benign)}")
    refused = np.zeros(len(risky), bool) if refused is None else np.asarray(refused, dtype=bool)
    if refused.shape != (len(risky),):
        raise AlignezError(f"need one refusal label per risky query; got {refused.shape[0]} for {len(risky)}")
    usable = [L for L in candidates if L in layers and L >= 1]
    if not usable:
        raise AlignezError(f"none of the candidate layers {list(candidates)} was captured (captured: {list(layers)})")
    gate_usable = usable if gate_layers is None else [L for L in gate_layers if L in layers and L >= 1]
    if not gate_usable:
        raise AlignezError(f"none of the gate layers {list(gate_layers or [])} was captured (captured: {list(layers)})")
    rng = np.random.default_rng(seed)
    (r_fit, r_out), (b_fit, b_out) = split(len(risky), heldout, rng), split(len(benign), heldout, rng)
    fit_ref, fit_ok = r_fit[refused[r_fit]], r_fit[~refused[r_fit]]
    out_ref, out_ok = r_out[refused[r_out]], r_out[~refused[r_out]]
    by_refusal = min(len(fit_ref), len(fit_ok)) >= MIN_EACH and min(len(out_ref), len(out_ok)) >= 1
    index = {L: j for j, L in enumerate(layers)}
    scores: dict[int, float] = {}
    for L in usable:
        x = risky[:, index[L]]
        if by_refusal:
            _, v = _mean_diff(x[fit_ref], x[fit_ok])
            scores[L] = separation(x[out_ref] @ v, x[out_ok] @ v)
        else:
            _, g = _mean_diff(x[r_fit], benign[b_fit, index[L]])
            scores[L] = separation(x[r_out] @ g, benign[b_out, index[L]] @ g)
    best = max(usable, key=lambda L: (scores[L], -L))
    x = risky[:, index[best]]
    vec = _mean_diff(x[fit_ref], x[fit_ok])[0] if by_refusal else _mean_diff(x[r_fit], benign[b_fit, index[best]])[0]
    if not np.any(vec):
        raise AlignezError("the two kinds of request give the same mean state; the queries do not differ for this model")
    gates, combo, gate_cv, tried = choose_gates({L: risky[r_fit, index[L]] for L in gate_usable},
                                                {L: benign[b_fit, index[L]] for L in gate_usable},
                                                seed=seed, rule=gate_rule, max_gates=max_gates)
    own = {g.layer: g for g in gates}
    aucs = {}
    for L in gate_cv:
        g = own[L].direction.astype(np.float64) if L in own else gate_direction(risky[r_fit, index[L]], benign[b_fit, index[L]])
        aucs[L] = auc(risky[r_out, index[L]] @ g, benign[b_out, index[L]] @ g)
    youden = {L: cv["j"] for L, cv in gate_cv.items()}
    opened = {"risky": float(gates.opens({L: risky[r_out, index[L]] for L in gates.layers}).mean()),
              "benign": float(gates.opens({L: benign[b_out, index[L]] for L in gates.layers}).mean())}
    return RequestContrast(best, vec.astype(np.float32), gates, REFUSED if by_refusal else RISKY, scores, aucs, youden, gate_cv,
                           int(refused.sum()), len(risky), len(benign), len(r_out) + len(b_out),
                           tuple(int(i) for i in r_out), opened, tuple(int(i) for i in b_out), gate_rule,
                           combo.stats(), tried)

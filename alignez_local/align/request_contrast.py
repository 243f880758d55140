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
- the gate reads the same layer: it opens where a prompt's projection on the unit risky-minus-
  benign difference lies past both the midpoint of the two means and the ``GATE_QUANTILE`` of the
  fitting benign requests' projections, so at most about 5% of benign requests like them open it.
  A constant vector (all llama.cpp can do) pushes benign requests towards refusal as much as risky
  ones (measured: benign refusals 20% -> 51% at x1); the gate leaves them where they were. The
  benign side must cover ordinary requests too, not only risky-sounding look-alikes: fitted on the
  look-alikes alone, Qwen's gate opened on 38 of 72 ordinary evaluation prompts (a poem, a
  compound-interest sum), whose states lie between the two means.

Candidate layers are the model's first half past its first quarter (``candidate_layers``): early
layers still read words more than requests, and the second half is where the answer is being
written, so a vector there has less room to change it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from alignez_local.errors import AlignezError
from alignez_local.formats.control_vector import Gate

HELDOUT = 0.2
REQUEST_RECIPE = "request"
MIN_EACH = 4  # refused and complied risky queries each, for the refusal contrast
GATE_QUANTILE = 0.95  # the gate stays shut on this share of the fitting benign requests
REFUSED, RISKY = "refused-complied", "risky-benign"  # what a vector is the difference of


@dataclass(frozen=True)
class RequestContrast:
    """A fitted request contrast: the layer, the vector added there, its gate and the evidence."""

    layer: int
    vector: np.ndarray  # (d,) float32: refused minus complied mean at ``layer`` (else risky minus benign)
    gate: Gate
    contrast: str  # "refused-complied" or "risky-benign": what the vector is the difference of
    heldout_score: dict[int, float]  # candidate layer -> held-out d' of the vector's contrast
    heldout_auc: dict[int, float]  # candidate layer -> held-out AUC of the gate's direction (risky vs benign)
    n_refused: int  # risky queries the model itself refused (0 when not labelled)
    n_risky: int
    n_benign: int
    n_heldout: int  # held-out states of both kinds together
    heldout_risky: tuple[int, ...]  # indices of the held-out risky queries (for calibrating a strength)
    heldout_open: dict[str, float]  # share of held-out risky / benign queries the gate opens on

    def stats(self) -> dict[str, object]:
        """Return the JSON-ready evidence stored with the vector and in report.json."""
        return {
            "layer": self.layer, "contrast": self.contrast, "n_refused": self.n_refused,
            "heldout_separation": {str(L): round(a, 4) for L, a in self.heldout_score.items()},
            "heldout_gate_auc": {str(L): round(a, 4) for L, a in self.heldout_auc.items()},
            "n_risky": self.n_risky, "n_benign": self.n_benign, "n_heldout": self.n_heldout,
            "vector_norm": round(float(np.linalg.norm(self.vector)), 4), "gate_threshold": round(self.gate.threshold, 4),
            "heldout_gate_open": {k: round(v, 4) for k, v in self.heldout_open.items()},
        }

    def line(self) -> str:
        """Return the one-line summary ``steer`` prints."""
        o = self.heldout_open
        what = (f"the model refused {self.n_refused} of {self.n_risky} risky queries; vector: refused minus complied"
                if self.contrast == REFUSED else f"vector: risky minus benign (the model refused {self.n_refused} of "
                f"{self.n_risky} risky queries, too few or too many for a refusal contrast)")
        return (f"request contrast: {what}, layer {self.layer} (held-out separation d' {self.heldout_score[self.layer]:.2f}); "
                f"the gate opens on {o['risky']:.0%} of held-out risky and {o['benign']:.0%} of held-out benign queries "
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


def fit_request_contrast(
    risky: np.ndarray, benign: np.ndarray, layers: Sequence[int], candidates: Sequence[int],
    refused: np.ndarray | None = None, *, heldout: float = HELDOUT, seed: int = 0,
) -> RequestContrast:
    """Return the request contrast fitted on last-prompt-token states ``risky`` (n_r, L, d) and
    ``benign`` (n_b, L, d), whose axis 1 is ``layers``; the layer is chosen among ``candidates``.

    ``refused`` (n_r,) bool: which risky queries the model itself refused. With at least
    ``MIN_EACH`` refused and complied ones in the fitting part, the vector is their difference;
    otherwise (or None) it is risky minus benign.
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
    rng = np.random.default_rng(seed)
    (r_fit, r_out), (b_fit, b_out) = split(len(risky), heldout, rng), split(len(benign), heldout, rng)
    fit_ref, fit_ok = r_fit[refused[r_fit]], r_fit[~refused[r_fit]]
    out_ref, out_ok = r_out[refused[r_out]], r_out[~refused[r_out]]
    by_refusal = min(len(fit_ref), len(fit_ok)) >= MIN_EACH and min(len(out_ref), len(out_ok)) >= 1
    index = {L: j for j, L in enumerate(layers)}
    scores: dict[int, float] = {}
    aucs: dict[int, float] = {}
    for L in usable:
        x = risky[:, index[L]]
        _, g = _mean_diff(x[r_fit], benign[b_fit, index[L]])
        aucs[L] = auc(x[r_out] @ g, benign[b_out, index[L]] @ g)
        if by_refusal:
            _, v = _mean_diff(x[fit_ref], x[fit_ok])
            scores[L] = separation(x[out_ref] @ v, x[out_ok] @ v)
        else:
            scores[L] = separation(x[r_out] @ g, benign[b_out, index[L]] @ g)
    best = max(usable, key=lambda L: (scores[L], -L))
    x, y = risky[:, index[best]], benign[:, index[best]]
    vec = _mean_diff(x[fit_ref], x[fit_ok])[0] if by_refusal else _mean_diff(x[r_fit], y[b_fit])[0]
    _, u = _mean_diff(x[r_fit], y[b_fit])
    if not np.any(u) or not np.any(vec):
        raise AlignezError("the two kinds of request give the same mean state; the queries do not differ for this model")
    midpoint = float(0.5 * (x[r_fit].mean(0) + y[b_fit].mean(0)) @ u)
    gate = Gate(best, u.astype(np.float32), max(midpoint, float(np.quantile(y[b_fit] @ u, GATE_QUANTILE))))
    opened = {"risky": float(gate.opens(x[r_out]).mean()), "benign": float(gate.opens(y[b_out]).mean())}
    return RequestContrast(best, vec.astype(np.float32), gate, REFUSED if by_refusal else RISKY, scores, aucs,
                           int(refused.sum()), len(risky), len(benign), len(r_out) + len(b_out),
                           tuple(int(i) for i in r_out), opened)

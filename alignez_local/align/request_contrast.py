"""The ``request`` recipe: a gated vector from the model's own state on risky and benign requests.

The persona recipes rest on the model acting out a persona, and the bundled models do not
(docs/results.md §1: told to be safety-first, neither refuses more). What a model does show is
that it *recognises* a risky request: at the end of the prompt, its layer output (``l_out``, where
control vectors act) lies apart for risky requests and for benign look-alikes of them. On
Qwen2.5-Coder-0.5B the held-out HarmBench prompts separate from benign ones along the mean
difference with AUC 0.95-1.00 at every layer from 1 to 23 (docs/results.md §4). No answer is
generated and no persona is played: the contrast is the model's own reading of the request.

Fitting, numpy in, numpy out (``fit_request_contrast``):

- the states are split into a fitting part and a held-out part (``HELDOUT`` of each kind, seeded);
- at every candidate layer the direction is the mean risky state minus the mean benign state of
  the fitting part; its held-out AUC (risky vs benign, projected on it) says how well it tells
  them apart; the layer with the best held-out AUC is chosen (ties: the lower layer);
- the vector added at that layer is that layer's mean difference (fitting part), so strength 1 moves
  a request's state by the distance between the average benign and the average risky request;
- the gate reads the same layer: it opens where a prompt's projection on the unit difference lies
  past the midpoint of the two means. A constant vector (all llama.cpp can do) pushes benign
  requests towards refusal as much as risky ones (measured: benign refusals 20% -> 51% at x1);
  the gate leaves them where they were.

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


@dataclass(frozen=True)
class RequestContrast:
    """A fitted request contrast: the layer, the vector added there, its gate and the evidence."""

    layer: int
    vector: np.ndarray  # (d,) float32, risky mean minus benign mean at ``layer``
    gate: Gate
    heldout_auc: dict[int, float]  # candidate layer -> held-out AUC of its direction
    n_risky: int
    n_benign: int
    n_heldout: int  # held-out states of both kinds together
    heldout_risky: tuple[int, ...]  # indices of the held-out risky queries (for calibrating a strength)
    heldout_open: dict[str, float]  # share of held-out risky / benign queries the gate opens on

    def stats(self) -> dict[str, object]:
        """Return the JSON-ready evidence stored with the vector and in report.json."""
        return {
            "layer": self.layer, "heldout_auc": {str(L): round(a, 4) for L, a in self.heldout_auc.items()},
            "n_risky": self.n_risky, "n_benign": self.n_benign, "n_heldout": self.n_heldout,
            "vector_norm": round(float(np.linalg.norm(self.vector)), 4), "gate_threshold": round(self.gate.threshold, 4),
            "heldout_gate_open": {k: round(v, 4) for k, v in self.heldout_open.items()},
        }

    def line(self) -> str:
        """Return the one-line summary ``steer`` prints."""
        o = self.heldout_open
        return (f"request contrast: layer {self.layer} (held-out AUC {self.heldout_auc[self.layer]:.2f}, "
                f"{self.n_risky} risky / {self.n_benign} benign queries, {self.n_heldout} held out); "
                f"the gate opens on {o['risky']:.0%} of held-out risky and {o['benign']:.0%} of held-out benign queries")


def candidate_layers(n_layer: int) -> list[int]:
    """Return the layers a request contrast may steer: from a quarter to a half of the model's depth."""
    lo, hi = max(1, n_layer // 4), max(1, n_layer // 2)
    return list(range(lo, hi + 1)) if hi < n_layer else [n_layer - 1]


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """Return the probability that a random ``pos`` score exceeds a random ``neg`` one (ties count half)."""
    pos, neg = np.asarray(pos, dtype=np.float64), np.asarray(neg, dtype=np.float64)
    return float(np.mean(pos[:, None] > neg[None, :]) + 0.5 * np.mean(pos[:, None] == neg[None, :]))


def split(n: int, heldout: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Return (fitting, held-out) index arrays of ``n`` items: at least one held out, at least 3 fitted."""
    order = rng.permutation(n)
    k = min(max(1, round(n * heldout)), n - 3)
    return np.sort(order[k:]), np.sort(order[:k])


def fit_request_contrast(
    risky: np.ndarray, benign: np.ndarray, layers: Sequence[int], candidates: Sequence[int],
    *, heldout: float = HELDOUT, seed: int = 0,
) -> RequestContrast:
    """Return the request contrast fitted on last-prompt-token states ``risky`` (n_r, L, d) and
    ``benign`` (n_b, L, d), whose axis 1 is ``layers``; the layer is chosen among ``candidates``."""
    risky, benign = np.asarray(risky, dtype=np.float64), np.asarray(benign, dtype=np.float64)
    if risky.ndim != 3 or benign.ndim != 3 or risky.shape[1:] != benign.shape[1:] or risky.shape[1] != len(layers):
        raise AlignezError(f"request states must be (n, {len(layers)} layers, d) for both kinds; got {risky.shape} and {benign.shape}")
    if len(risky) < 4 or len(benign) < 4:
        raise AlignezError(f"the request recipe needs at least 4 risky and 4 benign queries; got {len(risky)} and {len(benign)}")
    usable = [L for L in candidates if L in layers and L >= 1]
    if not usable:
        raise AlignezError(f"none of the candidate layers {list(candidates)} was captured (captured: {list(layers)})")
    rng = np.random.default_rng(seed)
    (r_fit, r_out), (b_fit, b_out) = split(len(risky), heldout, rng), split(len(benign), heldout, rng)
    aucs: dict[int, float] = {}
    for L in usable:
        j = list(layers).index(L)
        d = risky[r_fit, j].mean(0) - benign[b_fit, j].mean(0)
        norm = np.linalg.norm(d)
        aucs[L] = 0.5 if norm == 0 else auc(risky[r_out, j] @ d / norm, benign[b_out, j] @ d / norm)
    best = max(usable, key=lambda L: (aucs[L], -L))
    j = list(layers).index(best)
    r_mean, b_mean = risky[r_fit, j].mean(0), benign[b_fit, j].mean(0)
    diff = r_mean - b_mean
    norm = float(np.linalg.norm(diff))
    if norm == 0.0:
        raise AlignezError("risky and benign requests give the same mean state; the queries do not differ for this model")
    u = diff / norm
    gate = Gate(best, u.astype(np.float32), float(0.5 * (r_mean + b_mean) @ u))
    opened = {"risky": float(gate.opens(risky[r_out, j]).mean()), "benign": float(gate.opens(benign[b_out, j]).mean())}
    return RequestContrast(best, diff.astype(np.float32), gate, aucs, len(risky), len(benign), len(r_out) + len(b_out),
                           tuple(int(i) for i in r_out), opened)

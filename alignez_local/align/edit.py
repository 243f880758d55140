"""The AlignEZ edit rule at inference (method.md §3), in numpy.

Interpretation (a choice of this project; the paper states the rule for separate "helpful"
and "harmful" directions without saying where each comes from):

* Every direction ``theta`` of a profile's layer subspace is a unit vector, sign-calibrated
  to point from the negative persona towards the positive one. ``theta`` is the helpful
  direction and ``-theta`` the matching harmful direction.
* For an activation ``x`` and ``p = <x, theta>``:

  - ReLU removal of the harmful direction:
    ``x <- x - relu(<x, -theta>) (-theta) = x + relu(-p) theta``;
  - tanh boost of the helpful direction, applied AFTER the removal, when the projection
    has become ``max(p, 0)``: ``x <- x + tanh(max(p, 0)) theta``.

* The user strength ``alpha`` multiplies the whole edit:
  ``delta = alpha * sum over kept theta of (relu(-p) + tanh(relu(p))) theta``.
  ``alpha = 1`` is the paper's rule, ``alpha = 0`` no edit, ``alpha < 0`` steers the other way.
* All projections come from the unedited ``x``. The rows of one layer's subspace are
  orthonormal, so editing along one leaves the others' projections unchanged and this
  equals applying the directions one after another.
* Layer choice and the direction filter follow method.md §3: keep directions with
  ``cos(q, theta) <= 0`` (the prompt does not already carry them); edit the ``top_n``
  layers by ``|| sum of <q_hat, theta> theta ||`` over the kept directions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from alignez_local.errors import AlignezError


@dataclass(frozen=True)
class EditPlan:
    """Which layers to edit for one prompt, and along which directions."""

    directions: dict[int, np.ndarray]  # chosen layer -> (m, d) kept unit directions, m >= 1
    scores: dict[int, float]  # every candidate layer -> its score (0 when nothing was kept)


def _out_dtype(x: np.ndarray) -> np.dtype:
    """Return the float dtype results should have: float32 stays float32, anything else float64."""
    return np.result_type(x.dtype, np.float32)


def plan_edit(
    query_acts: dict[int, np.ndarray], subspaces: dict[int, np.ndarray], top_n: int = 5
) -> EditPlan:
    """Return the ``EditPlan`` for one prompt: kept directions of the ``top_n`` best-scoring layers.

    ``query_acts[layer]`` is the activation (d,) at the last prompt token and
    ``subspaces[layer]`` the profile's unit directions (k, d). At each layer the directions
    with ``cos(q, theta) <= 0`` are kept; the score is ``|| sum of <q_hat, theta> theta ||``
    over them (``sqrt`` of the summed squared cosines for orthonormal rows). Layers with no
    kept direction (including a zero query vector) score 0 and are never chosen; ties go to
    the lower layer.
    """
    if top_n < 1:
        raise AlignezError(f"the number of edited layers must be at least 1; got {top_n}")
    kept: dict[int, np.ndarray] = {}
    scores: dict[int, float] = {}
    for layer, thetas in subspaces.items():
        if layer not in query_acts:
            raise AlignezError(f"no prompt activation for layer {layer}; capture every layer of the profile")
        thetas = np.array(thetas, dtype=np.float64, ndmin=2)
        q = np.asarray(query_acts[layer], dtype=np.float64).reshape(-1)
        q_norm = np.linalg.norm(q)
        scores[layer] = 0.0
        if q_norm == 0.0:
            continue  # a zero vector has no direction, so no direction can be "not carried"
        # Divide by the row norms too, so a slightly non-unit direction still gives a true cosine.
        cos = (thetas @ q) / (q_norm * np.linalg.norm(thetas, axis=1))
        mask = cos <= 0.0
        if not mask.any():
            continue
        kept[layer] = thetas[mask]
        scores[layer] = float(np.linalg.norm(cos[mask] @ thetas[mask]))
    ranked = sorted(kept, key=lambda layer: (-scores[layer], layer))
    return EditPlan(directions={layer: kept[layer] for layer in ranked[:top_n]}, scores=scores)


def edit_delta(x: np.ndarray, directions: np.ndarray, alpha: float = 1.0) -> np.ndarray:
    """Return the edit delta ``alpha * sum (relu(-p) + tanh(relu(p))) theta`` for each row of ``x``.

    ``x`` is (r, d) (or one (d,) vector, answered with a (d,) delta); ``directions`` (m, d)
    are the kept unit directions of one layer; ``p = <x_row, theta>`` from the unedited row.
    """
    x = np.asarray(x)
    rows = np.atleast_2d(x).astype(np.float64)
    thetas = np.array(directions, dtype=np.float64, ndmin=2)
    p = rows @ thetas.T  # (r, m)
    # relu(-p) removes the harmful component; tanh(relu(p)) then boosts the helpful one.
    coef = np.maximum(-p, 0.0) + np.tanh(np.maximum(p, 0.0))
    delta = alpha * (coef @ thetas)
    return delta.reshape(x.shape).astype(_out_dtype(x))


def mean_delta(
    samples: list[np.ndarray], plans: list[EditPlan], layer: int, alpha: float = 1.0
) -> np.ndarray:
    """Return the average edit delta (d,) at ``layer`` over calibration prompts: a constant control vector.

    ``samples[i]`` is prompt i's activation (d,) at ``layer`` and ``plans[i]`` its plan. A
    prompt whose plan did not choose ``layer`` contributes a zero delta (that is what the
    exact rule does to it), so the average still divides by all prompts.
    """
    if not samples or len(samples) != len(plans):
        raise AlignezError(
            f"need one plan per calibration prompt; got {len(samples)} samples and {len(plans)} plans"
        )
    total = np.zeros(np.shape(samples[0]), dtype=np.float64)
    for sample, plan in zip(samples, plans):
        if layer in plan.directions:
            total += edit_delta(np.asarray(sample, dtype=np.float64), plan.directions[layer], alpha)
    return (total / len(samples)).astype(_out_dtype(np.asarray(samples[0])))

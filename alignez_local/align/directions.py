"""Preference directions per layer: the AlignEZ subspace, CCS and baselines (pure numpy).

Every function takes the activations of ONE layer: ``pos`` and ``neg`` of shape
``(n_pairs, d)``, where row ``i`` of both belongs to the same pair (the positive and the
negative response to the same query). See ``docs/method.md`` §1.4 and §2.

Choices made here where the method is silent:

* Every direction is sign-calibrated so that positives project higher than their
  negatives in most pairs (``calibrate_signs``).
* ``pca_diff`` centers the differences (as repeng's sklearn PCA does); ``svd`` does not
  (as the paper says); ``pca_center`` equals the first ``svd`` direction up to sign.
* CCS normalises each class by its own mean and one shared scalar scale, and adds an L2
  penalty (weight decay 0.01) to the probe weights.
* ``select_layers`` and ``ccs_elbow`` never return layer 0 (no control-vector slot).
* ``ccs_elbow`` cuts at the largest gap between consecutive sorted losses.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit

from alignez_local.errors import AlignezError

METHODS = ("svd", "ccs", "mean", "pca-diff", "pca-center")

# Absolute slack for "cumulative variance reaches the target": 0.6 + 0.3 is 0.8999999999999999
# in floating point, and must still count as reaching 0.9.
_VARIANCE_SLACK = 1e-9


def _check_pairs(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return ``pos`` and ``neg`` as float64 2-D arrays after checking they describe the same pairs."""
    pos = np.asarray(pos, dtype=np.float64)
    neg = np.asarray(neg, dtype=np.float64)
    if pos.ndim != 2 or pos.shape != neg.shape:
        raise AlignezError(
            f"positive and negative activations must both be (n_pairs, d); got {pos.shape} and {neg.shape}"
        )
    if pos.shape[0] == 0:
        raise AlignezError("no pairs to fit a direction on; generate preference pairs first")
    return pos, neg


def _top_direction(matrix: np.ndarray, what: str) -> np.ndarray:
    """Return the first right singular vector (unit, shape (d,)) of ``matrix``."""
    _, s, vt = np.linalg.svd(matrix, full_matrices=False)
    if s.size == 0 or s[0] <= 0.0:
        raise AlignezError(f"{what} are all zero, so there is no direction to find; check the pairs differ")
    return vt[0]


def svd_subspace(diffs: np.ndarray, variance: float = 0.90) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(directions (k, d), explained ratio (k,))``: the paper's SVD preference subspace.

    The difference matrix is NOT centered (method.md §2). ``k`` is the smallest number of
    right singular vectors whose cumulative explained variance ``sum(s_i^2) / sum(s^2)``
    reaches ``variance``. Rows are orthonormal; their signs are arbitrary (see ``calibrate_signs``).
    """
    if not 0.0 < variance <= 1.0:
        raise AlignezError(f"variance must be in (0, 1]; got {variance}")
    diffs = np.asarray(diffs, dtype=np.float64)
    if diffs.ndim != 2 or diffs.shape[0] == 0:
        raise AlignezError(f"differences must be a non-empty (n_pairs, d) matrix; got shape {diffs.shape}")
    _, s, vt = np.linalg.svd(diffs, full_matrices=False)
    energy = s**2
    total = energy.sum()
    if total <= 0.0:
        raise AlignezError("all positive/negative differences are zero; check the pairs differ")
    ratio = energy / total
    cumulative = np.cumsum(ratio)
    k = int(np.searchsorted(cumulative, variance - _VARIANCE_SLACK) + 1)
    k = min(k, len(s))  # rounding can leave the last cumulative value a hair below 1.0
    return vt[:k], ratio[:k]


def _ccs_objective(
    params: np.ndarray, xp: np.ndarray, xn: np.ndarray, weight_decay: float
) -> tuple[float, np.ndarray]:
    """Return the penalised CCS loss ``ccs + weight_decay * |w|^2`` and its gradient.

    ``params`` is ``[w, b]``: the probe weights followed by the bias.
    """
    w, b = params[:-1], params[-1]
    p_pos = expit(xp @ w + b)
    p_neg = expit(xn @ w + b)
    n = len(p_pos)
    low = np.minimum(p_pos, p_neg)
    gap = p_pos + p_neg - 1.0  # consistency: p+ should equal 1 - p-
    loss = float(np.mean(low**2) + np.mean(gap**2) + weight_decay * (w @ w))
    # The confidence term only pulls on whichever probability is the smaller one.
    pos_is_low = p_pos <= p_neg
    g_pos = (2.0 / n) * (low * pos_is_low + gap)
    g_neg = (2.0 / n) * (low * ~pos_is_low + gap)
    # Chain rule through the sigmoid: dp/dz = p (1 - p).
    dz_pos = g_pos * p_pos * (1.0 - p_pos)
    dz_neg = g_neg * p_neg * (1.0 - p_neg)
    grad = np.empty_like(params)
    grad[:-1] = xp.T @ dz_pos + xn.T @ dz_neg + 2.0 * weight_decay * w
    grad[-1] = dz_pos.sum() + dz_neg.sum()
    return loss, grad


def ccs_direction(
    pos: np.ndarray,
    neg: np.ndarray,
    restarts: int = 10,
    seed: int = 0,
    weight_decay: float = 0.01,
) -> tuple[np.ndarray, float]:
    """Return ``(unit direction (d,), best CCS loss)`` of a Contrast-Consistent Search probe.

    The probe is ``sigmoid(w.x + b)`` trained with L-BFGS-B on
    ``mean(min(p+, p-)^2) + mean((p+ - (1 - p-))^2) + weight_decay * |w|^2`` from
    ``restarts`` seeded random starts; the lowest penalised loss wins and the returned loss is
    its plain CCS loss (no penalty). Each class is centered on its own mean, so the probe
    cannot just learn "which persona" and must find a direction along which the two members
    of a pair sit on opposite sides; CCS therefore sees how the contrast varies from pair to
    pair, not the average shift. Both classes are then divided by one shared scalar (rows get
    unit RMS norm), which keeps the direction meaningful in the original space and makes
    ``weight_decay`` independent of the activation scale. The sign is arbitrary.
    """
    pos, neg = _check_pairs(pos, neg)
    if restarts < 1:
        raise AlignezError(f"CCS needs at least one restart; got {restarts}")
    xp = pos - pos.mean(axis=0)
    xn = neg - neg.mean(axis=0)
    # One scalar for both classes: per-feature scaling would distort the direction.
    scale = float(np.sqrt(np.mean(np.concatenate([xp, xn]) ** 2) * pos.shape[1]))
    if scale <= 0.0:
        raise AlignezError("CCS needs activations that vary across pairs; every pair looks the same")
    xp /= scale
    xn /= scale
    d = pos.shape[1]
    rng = np.random.default_rng(seed)
    best_params: np.ndarray | None = None
    best_objective = np.inf
    for _ in range(restarts):
        start = np.append(rng.normal(0.0, 1.0 / np.sqrt(d), size=d), 0.0)
        # Without the penalty, when d >= n_pairs the probe can separate the pairs along
        # almost any direction by growing |w| without bound; 0.01 is the weight decay of
        # Burns et al.'s reference CCS code.
        result = minimize(
            _ccs_objective, start, args=(xp, xn, weight_decay), jac=True,
            method="L-BFGS-B", options={"maxiter": 500},
        )
        if result.fun < best_objective and np.linalg.norm(result.x[:-1]) > 0.0:
            best_objective, best_params = float(result.fun), result.x
    if best_params is None:
        raise AlignezError("CCS found no usable probe; try more pairs or another --method")
    best_loss, _ = _ccs_objective(best_params, xp, xn, 0.0)
    w = best_params[:-1]
    # The shared scale is a positive scalar, so w points the same way in the original space.
    return w / np.linalg.norm(w), best_loss


def mean_direction(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """Return the unit mean of the differences ``pos - neg`` (llama.cpp cvector-generator ``mean``)."""
    pos, neg = _check_pairs(pos, neg)
    mean = (pos - neg).mean(axis=0)
    norm = np.linalg.norm(mean)
    if norm <= 0.0:
        raise AlignezError("the mean positive/negative difference is zero; there is no direction to find")
    return mean / norm


def pca_diff_direction(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """Return the first principal component (unit, sign arbitrary) of the differences.

    This is repeng's ``pca_diff``.
    """
    pos, neg = _check_pairs(pos, neg)
    diffs = pos - neg
    # repeng fits sklearn's PCA, which centers its input, so the mean difference is removed
    # here too: this finds how the contrast VARIES, unlike "svd" (uncentered) and "mean".
    return _top_direction(diffs - diffs.mean(axis=0), "the centered differences")


def pca_center_direction(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """Return the first principal component (unit, sign arbitrary) of pair-centered activations.

    This is repeng's ``pca_center``: each pair's two activations minus the pair mean, stacked.
    """
    pos, neg = _check_pairs(pos, neg)
    center = (pos + neg) / 2.0
    stacked = np.concatenate([pos - center, neg - center])
    # The stacked rows are +-(pos - neg)/2, whose mean is exactly zero, so PCA's centering
    # changes nothing and this is the first uncentered "svd" direction.
    return _top_direction(stacked - stacked.mean(axis=0), "the pair-centered activations")


def calibrate_signs(directions: np.ndarray, pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """Return a copy of ``directions`` (k, d) with each row flipped so positives project higher.

    A row points the right way when ``pos_i . row > neg_i . row`` in more pairs than the
    reverse; on a tie the mean projection difference decides. SVD/PCA/CCS signs are
    arbitrary, and llama.cpp's cvector-generator does not fix them, so its vectors can
    push the model towards the negative persona.
    """
    pos, neg = _check_pairs(pos, neg)
    directions = np.array(directions, dtype=np.float64, ndmin=2)
    margins = (pos - neg) @ directions.T  # (n_pairs, k)
    votes = np.sign(margins).sum(axis=0)
    flip = (votes < 0) | ((votes == 0) & (margins.mean(axis=0) < 0))
    directions[flip] *= -1.0
    return directions


def similar_pair_mask(pos: np.ndarray, neg: np.ndarray, max_cos: float = 0.8) -> np.ndarray:
    """Return a bool mask (n_pairs,), True for pairs to KEEP: cos(pos_i, neg_i) <= ``max_cos``.

    Pairs whose two activations point almost the same way carry no preference signal
    (method.md §1.4). A zero vector has no direction at all, so it counts as cos = 1 (dropped).
    """
    pos, neg = _check_pairs(pos, neg)
    norms = np.linalg.norm(pos, axis=1) * np.linalg.norm(neg, axis=1)
    dots = np.einsum("ij,ij->i", pos, neg)
    cos = np.ones(len(pos))
    nonzero = norms > 0.0
    cos[nonzero] = dots[nonzero] / norms[nonzero]
    return cos <= max_cos


def _fit(
    pos: np.ndarray, neg: np.ndarray, method: str, variance: float, seed: int
) -> tuple[np.ndarray, float | None]:
    """Return ``(sign-calibrated unit directions (k, d) float64, CCS loss or None)``."""
    if method == "svd":
        directions, _ = svd_subspace(pos - neg, variance)
        loss = None
    elif method == "ccs":
        direction, ccs_loss = ccs_direction(pos, neg, seed=seed)
        directions, loss = direction[None, :], ccs_loss
    elif method == "mean":
        directions, loss = mean_direction(pos, neg)[None, :], None
    elif method == "pca-diff":
        directions, loss = pca_diff_direction(pos, neg)[None, :], None
    elif method == "pca-center":
        directions, loss = pca_center_direction(pos, neg)[None, :], None
    else:
        raise AlignezError(f"unknown direction method {method!r}; choose one of {', '.join(METHODS)}")
    directions = calibrate_signs(directions, pos, neg)
    # Re-normalise: every downstream formula (edit rule, cosines) assumes unit rows.
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    return directions, loss


def find_directions(
    pos: np.ndarray, neg: np.ndarray, method: str = "svd", variance: float = 0.90, seed: int = 0
) -> np.ndarray:
    """Return sign-calibrated unit directions (k, d) float32 for one layer; k = 1 except for ``svd``."""
    pos, neg = _check_pairs(pos, neg)
    directions, _ = _fit(pos, neg, method, variance, seed)
    return directions.astype(np.float32)


def pair_accuracy(direction: np.ndarray, pos: np.ndarray, neg: np.ndarray) -> float:
    """Return the share of pairs with ``pos_i . direction > neg_i . direction``."""
    pos, neg = _check_pairs(pos, neg)
    return float(np.mean((pos - neg) @ np.asarray(direction, dtype=np.float64) > 0.0))


def _explained(directions: np.ndarray, diffs: np.ndarray) -> np.ndarray:
    """Return the share of ``||diffs||^2`` along each unit row of ``directions``.

    For SVD rows this is exactly ``s_i^2 / sum(s^2)``, so one formula serves every method.
    """
    total = float(np.sum(diffs**2))
    if total <= 0.0:
        return np.zeros(len(directions))
    return np.sum((diffs @ directions.T) ** 2, axis=0) / total


@dataclass(frozen=True)
class LayerFit:
    """The directions found at one layer and how well they separate the pairs."""

    layer: int
    directions: np.ndarray  # (k, d) float32, unit rows, sign-calibrated
    explained: np.ndarray  # (k,) share of the differences' squared norm along each direction
    heldout_accuracy: float  # pair accuracy of the first direction on pairs not used to fit it
    train_accuracy: float  # pair accuracy of the first direction on the pairs it was fitted on
    n_pairs: int  # pairs kept after the similarity filter
    n_dropped: int  # pairs dropped as too similar
    ccs_loss: float | None  # best CCS loss (method "ccs" only)


def fit_layer(
    layer: int,
    pos: np.ndarray,
    neg: np.ndarray,
    method: str = "svd",
    variance: float = 0.90,
    max_cos: float = 0.8,
    holdout: float = 0.2,
    seed: int = 0,
) -> LayerFit:
    """Return the ``LayerFit`` of one layer: directions from all kept pairs, accuracy from a held-out split.

    Steps: drop too-similar pairs (``similar_pair_mask``), shuffle with ``seed``, hold out
    ``holdout`` of the pairs (at least one, and at least two left to fit on), fit on the rest
    and score the first direction on the held-out pairs, then refit on ALL kept pairs for the
    returned directions, ``explained`` and ``ccs_loss``. With fewer than 5 usable pairs (or
    ``holdout == 0``) nothing is held out and ``heldout_accuracy`` equals ``train_accuracy``.
    """
    if not 0.0 <= holdout < 1.0:
        raise AlignezError(f"holdout must be in [0, 1); got {holdout}")
    pos, neg = _check_pairs(pos, neg)
    keep = similar_pair_mask(pos, neg, max_cos)
    pos, neg = pos[keep], neg[keep]
    n = len(pos)
    if n < 2:
        raise AlignezError(
            f"layer {layer}: only {n} usable pairs after dropping too-similar ones; "
            "generate more pairs or raise --max-cos"
        )
    order = np.random.default_rng(seed).permutation(n)
    n_hold = 0
    if n >= 5 and holdout > 0.0:
        n_hold = min(max(1, round(holdout * n)), n - 2)
    held, train = order[:n_hold], order[n_hold:]

    train_dirs, _ = _fit(pos[train], neg[train], method, variance, seed)
    train_acc = pair_accuracy(train_dirs[0], pos[train], neg[train])
    held_acc = pair_accuracy(train_dirs[0], pos[held], neg[held]) if n_hold else train_acc

    directions, loss = _fit(pos, neg, method, variance, seed)
    return LayerFit(
        layer=layer,
        directions=directions.astype(np.float32),
        explained=_explained(directions, pos - neg),
        heldout_accuracy=held_acc,
        train_accuracy=train_acc,
        n_pairs=n,
        n_dropped=int((~keep).sum()),
        ccs_loss=loss,
    )


def select_layers(
    fits: dict[int, LayerFit],
    n_layer: int,
    max_layers: int | None = None,
    min_accuracy: float = 0.6,
) -> list[int]:
    """Return the automatically chosen layers, sorted ascending.

    Layers are ranked by held-out accuracy (then train accuracy, then the explained share
    of the first direction). Kept: those with held-out accuracy >= ``max(min_accuracy,
    best - 0.1)``, at most ``max_layers`` (default ``max(5, n_layer // 3)``). If no layer
    reaches ``min_accuracy`` the top ``min(5, max_layers)`` are kept anyway: a weak profile
    is still a profile, and the diagnostics show how weak. Layer 0 and layers outside
    ``[1, n_layer)`` are never returned: llama.cpp control vectors have no slot for them.
    The last layer is not chosen either (when the model has more than two): an edit there acts
    on the logits almost directly. On SmolLM2 a profile holding layer 29 turned answers into
    gibberish at weight 1 (next-token KL 8.5 nats); llama.cpp's cvector-generator skips it too.
    A manual ``--layers`` may still name it.
    """
    limit = max(5, n_layer // 3) if max_layers is None else max_layers
    if limit < 1:
        raise AlignezError(f"max layers must be at least 1; got {limit}")
    last = n_layer - 1 if n_layer > 2 else n_layer
    candidates = [fit for layer, fit in fits.items() if 1 <= layer < last]
    if not candidates:
        raise AlignezError("no layer to choose from (layer 0 cannot carry a control vector); fit more layers")

    def rank_key(fit: LayerFit) -> tuple[float, float, float, int]:
        first_explained = float(fit.explained[0]) if len(fit.explained) else 0.0
        return (-fit.heldout_accuracy, -fit.train_accuracy, -first_explained, fit.layer)

    ranked = sorted(candidates, key=rank_key)
    best = ranked[0].heldout_accuracy
    if best < min_accuracy:
        chosen = ranked[: min(5, limit)]
    else:
        threshold = max(min_accuracy, best - 0.1) - 1e-12  # slack: accuracies are ratios of ints
        chosen = [fit for fit in ranked if fit.heldout_accuracy >= threshold][:limit]
    return sorted(fit.layer for fit in chosen)


def ccs_elbow(losses: dict[int, float]) -> list[int]:
    """Return the layers with the lowest CCS loss, best first, cut at the elbow of the sorted losses.

    The elbow is the LARGEST GAP between consecutive losses in the ascending curve: the
    layers before it are kept. With fewer than two layers, or a flat curve, all are kept.
    Layer 0 and non-finite losses are skipped (layer 0 has no control-vector slot).
    """
    ranked = sorted(
        ((loss, layer) for layer, loss in losses.items() if layer != 0 and np.isfinite(loss)),
    )
    if len(ranked) < 2:
        return [layer for _, layer in ranked]
    gaps = np.diff([loss for loss, _ in ranked])
    if gaps.max() <= 0.0:
        return [layer for _, layer in ranked]
    cut = int(np.argmax(gaps)) + 1
    return [layer for _, layer in ranked[:cut]]


def random_like(vectors: dict[int, np.ndarray], seed: int = 0) -> dict[int, np.ndarray]:
    """Return one random direction per layer with the same norm as ``vectors[layer]`` (float32).

    The null a steering vector must beat: same layers, same per-layer size, no learned direction.
    Gaussian directions are uniform on the sphere; the seed makes the baseline reproducible.
    """
    rng = np.random.default_rng(seed)
    out: dict[int, np.ndarray] = {}
    for layer in sorted(vectors):
        v = np.asarray(vectors[layer], dtype=np.float64)
        r = rng.standard_normal(v.shape[-1])
        out[layer] = (r / np.linalg.norm(r) * np.linalg.norm(v)).astype(np.float32)
    return out


def random_subspaces_like(subspaces: dict[int, np.ndarray], seed: int = 0) -> dict[int, np.ndarray]:
    """Return a random orthonormal subspace per layer with the same number of rows as ``subspaces[layer]``."""
    rng = np.random.default_rng(seed)
    out: dict[int, np.ndarray] = {}
    for layer in sorted(subspaces):
        k, n = np.asarray(subspaces[layer]).shape
        q, _ = np.linalg.qr(rng.standard_normal((n, k)))
        out[layer] = q.T.astype(np.float32)
    return out


def mean_difference(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """Return mean(pos) - mean(neg) over pairs, per layer (pairs x layers x n_embd -> layers x n_embd).

    Not normalised: at strength 1 a vector made of it moves the state by the average difference the
    behaviour makes (CAA; llama.cpp's cvector-generator ``mean`` normalises it instead).
    """
    pos, neg = np.asarray(pos, dtype=np.float64), np.asarray(neg, dtype=np.float64)
    if pos.shape != neg.shape or pos.ndim < 2 or pos.shape[0] == 0:
        raise AlignezError(f"positive and negative activations must be the same non-empty pairs; got {pos.shape} and {neg.shape}")
    return (pos - neg).mean(axis=0)

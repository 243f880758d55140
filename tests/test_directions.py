"""Tests for alignez_local.align.directions: planted directions, the 90% rule, filters, layer choice."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alignez_local.align.directions import (
    METHODS,
    LayerFit,
    calibrate_signs,
    ccs_direction,
    ccs_elbow,
    find_directions,
    fit_layer,
    mean_direction,
    pair_accuracy,
    pca_center_direction,
    pca_diff_direction,
    select_layers,
    similar_pair_mask,
    svd_subspace,
)
from alignez_local.errors import AlignezError


def planted(
    seed: int,
    n: int = 200,
    d: int = 64,
    lo: float = 1.0,
    hi: float = 3.0,
    noise: float = 0.1,
    symmetric: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (pos, neg, u): pairs whose difference is s_i * u (s_i in [lo, hi] > 0) plus noise.

    ``symmetric`` splits the shift half into pos and half into neg (same difference), the
    layout CCS's per-class centering can see best.
    """
    rng = np.random.default_rng(seed)
    u = rng.normal(size=d)
    u /= np.linalg.norm(u)
    base = rng.normal(size=(n, d))
    s = rng.uniform(lo, hi, size=n)[:, None]
    shift_pos, shift_neg = (s / 2, -s / 2) if symmetric else (s, 0.0 * s)
    pos = base + shift_pos * u + noise * rng.normal(size=(n, d))
    neg = base + shift_neg * u + noise * rng.normal(size=(n, d))
    return pos, neg, u


# --- every method recovers a planted direction, with the right sign -------------------------

# The signal each method needs: "pca-diff" removes the mean difference, so it needs the shift
# to vary a lot between pairs; CCS also centers each class and sees only that variation.
SIGNAL = {
    "svd": {},
    "mean": {},
    "pca-center": {},
    "pca-diff": {"lo": 1.0, "hi": 9.0},
    "ccs": {"lo": 1.0, "hi": 9.0, "symmetric": True},
}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_method_recovers_planted_direction_with_sign(method: str, seed: int) -> None:
    pos, neg, u = planted(seed, **SIGNAL[method])
    dirs = find_directions(pos, neg, method=method, seed=seed)
    assert dirs.dtype == np.float32
    assert dirs.shape[1] == 64
    if method != "svd":
        assert dirs.shape[0] == 1
    np.testing.assert_allclose(np.linalg.norm(dirs, axis=1), 1.0, atol=1e-5)
    cos = float(dirs[0] @ u)
    assert cos > 0.95, f"{method}: cos(found, planted) = {cos:.3f}"


def test_ccs_recovers_asymmetric_shift_too() -> None:
    # The plain layout (the whole shift on the positive side) also works at d > n_pairs.
    pos, neg, u = planted(3, n=200, d=256, lo=1.0, hi=9.0)
    direction, loss = ccs_direction(pos, neg)
    assert abs(direction @ u) > 0.95
    assert 0.0 <= loss <= 0.25 + 1e-9  # never worse than the trivial probe p = 0.5


def test_raw_single_direction_functions_are_unit() -> None:
    pos, neg, u = planted(4)
    for fn in (mean_direction, pca_diff_direction, pca_center_direction):
        v = fn(pos, neg)
        assert v.shape == (64,)
        assert np.linalg.norm(v) == pytest.approx(1.0)
    assert mean_direction(pos, neg) @ u > 0.95  # mean of differences needs no calibration


def test_pca_center_equals_first_svd_direction() -> None:
    pos, neg, _ = planted(5, lo=-1.0, hi=3.0)
    svd_first = svd_subspace(pos - neg, 0.9)[0][0]
    assert abs(pca_center_direction(pos, neg) @ svd_first) == pytest.approx(1.0, abs=1e-9)


def test_ccs_is_deterministic_for_a_seed() -> None:
    pos, neg, _ = planted(6, d=32, n=60)
    a = ccs_direction(pos, neg, restarts=3, seed=7)
    b = ccs_direction(pos, neg, restarts=3, seed=7)
    np.testing.assert_array_equal(a[0], b[0])
    assert a[1] == b[1]


def test_unknown_method_is_a_user_error() -> None:
    pos, neg, _ = planted(0, n=10, d=4)
    with pytest.raises(AlignezError, match="unknown direction method"):
        find_directions(pos, neg, method="lda")


# --- sign calibration ------------------------------------------------------------------------


def test_calibration_flips_a_direction_given_the_wrong_way() -> None:
    pos, neg, u = planted(0)
    both = np.stack([-u, u])
    fixed = calibrate_signs(both, pos, neg)
    np.testing.assert_allclose(fixed, np.stack([u, u]))
    np.testing.assert_allclose(both, np.stack([-u, u]))  # input untouched


def test_calibration_majority_beats_mean_and_mean_breaks_ties() -> None:
    theta = np.array([[1.0, 0.0]])
    neg = np.zeros((3, 2))
    # Two pairs slightly positive, one hugely negative: the majority wins, no flip.
    pos = np.array([[1.0, 0.0], [1.0, 0.0], [-10.0, 0.0]])
    np.testing.assert_array_equal(calibrate_signs(theta, pos, neg), theta)
    # A 2-2 tie: the mean margin (-0.5) decides, so the row flips.
    neg4 = np.zeros((4, 2))
    pos4 = np.array([[1.0, 0.0], [-1.0, 0.0], [1.0, 0.0], [-3.0, 0.0]])
    np.testing.assert_array_equal(calibrate_signs(theta, pos4, neg4), -theta)


# --- the 90% rule ----------------------------------------------------------------------------


def exact_differences(
    ratios: list[float], n: int = 30, d: int = 12, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Return (D, V^T): a difference matrix whose squared singular values are exactly ``ratios``."""
    rng = np.random.default_rng(seed)
    k = len(ratios)
    left, _ = np.linalg.qr(rng.normal(size=(n, k)))
    right, _ = np.linalg.qr(rng.normal(size=(d, k)))
    s = np.sqrt(np.array(ratios) * 7.0)  # any total works; the rule uses ratios
    return left @ np.diag(s) @ right.T, right.T


@pytest.mark.parametrize(
    ("ratios", "k"),
    [
        ([0.5, 0.3, 0.15, 0.05], 3),  # 0.8 < 0.9 <= 0.95
        ([0.6, 0.3, 0.1], 2),  # exactly 0.9 at k = 2 counts as reaching it
        ([0.95, 0.05], 1),
        ([0.25, 0.25, 0.25, 0.25], 4),
    ],
)
def test_svd_keeps_smallest_k_reaching_90_percent(ratios: list[float], k: int) -> None:
    diffs, vt = exact_differences(ratios)
    dirs, explained = svd_subspace(diffs, variance=0.90)
    assert dirs.shape == (k, 12)
    np.testing.assert_allclose(explained, ratios[:k], atol=1e-12)
    np.testing.assert_allclose(dirs @ dirs.T, np.eye(k), atol=1e-12)  # orthonormal rows
    if len(set(ratios)) == len(ratios):  # distinct singular values: the rows are the planted ones
        np.testing.assert_allclose(np.abs(np.sum(dirs * vt[:k], axis=1)), 1.0, atol=1e-9)


def test_svd_is_not_centered() -> None:
    # Every difference is the same vector: centering would leave nothing, the paper's SVD keeps it.
    diffs = np.tile([3.0, 4.0, 0.0], (5, 1))
    dirs, explained = svd_subspace(diffs)
    np.testing.assert_allclose(np.abs(dirs[0]), [0.6, 0.8, 0.0])
    np.testing.assert_allclose(explained, [1.0])


def test_svd_rejects_zero_differences_and_bad_variance() -> None:
    with pytest.raises(AlignezError, match="zero"):
        svd_subspace(np.zeros((4, 3)))
    with pytest.raises(AlignezError, match="variance"):
        svd_subspace(np.ones((4, 3)), variance=1.5)


def test_layer_fit_explained_matches_svd_ratios() -> None:
    diffs, _ = exact_differences([0.5, 0.3, 0.15, 0.05])
    neg = np.zeros_like(diffs)
    fit = fit_layer(4, diffs, neg, method="svd", max_cos=1.0)
    np.testing.assert_allclose(fit.explained, [0.5, 0.3, 0.15], atol=1e-6)


# --- similar pairs ---------------------------------------------------------------------------


def test_similar_pair_mask_on_hand_made_vectors() -> None:
    pos = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 0.0], [3.0, 4.0], [1.0, 0.0], [1.0, 1.0]])
    neg = np.array([[0.0, 1.0], [1.0, 0.1], [1.0, 0.0], [5.0, 0.0], [-1.0, 0.0], [0.0, 0.0]])
    # cosines:       0           0.995       zero -> 1    0.6 exactly   -1          zero -> 1
    mask = similar_pair_mask(pos, neg, max_cos=0.6)
    np.testing.assert_array_equal(mask, [True, False, False, True, True, False])
    assert similar_pair_mask(pos, neg, max_cos=0.59).tolist() == [True, False, False, False, True, False]
    assert mask.dtype == bool


# --- fit_layer -------------------------------------------------------------------------------


def test_fit_layer_clean_signal_generalises() -> None:
    pos, neg, u = planted(1)
    fit = fit_layer(7, pos, neg, method="svd", max_cos=1.0)
    assert isinstance(fit, LayerFit)
    assert fit.layer == 7
    assert fit.heldout_accuracy >= 0.95
    assert fit.train_accuracy >= 0.95
    assert fit.n_pairs == 200 and fit.n_dropped == 0
    assert fit.directions.dtype == np.float32
    assert fit.directions[0] @ u > 0.95
    assert fit.ccs_loss is None
    assert fit.explained.shape == (fit.directions.shape[0],)


def test_fit_layer_pure_noise_is_a_coin_flip() -> None:
    rng = np.random.default_rng(0)
    pos, neg = rng.normal(size=(1000, 16)), rng.normal(size=(1000, 16))
    fit = fit_layer(2, pos, neg, method="mean")
    assert 0.4 <= fit.heldout_accuracy <= 0.6


@pytest.mark.parametrize("method", ["ccs", "mean", "pca-diff", "pca-center"])
def test_fit_layer_single_direction_methods(method: str) -> None:
    pos, neg, _ = planted(2, n=60, d=16, **SIGNAL[method])
    fit = fit_layer(1, pos, neg, method=method, max_cos=1.0)
    assert fit.directions.shape == (1, 16)
    assert 0.0 < fit.explained[0] <= 1.0
    assert (fit.ccs_loss is not None) == (method == "ccs")


def test_fit_layer_drops_similar_pairs_and_counts_them() -> None:
    pos, neg, _ = planted(3, n=50, d=8)
    pos[:10] = neg[:10] * 2.0  # cosine exactly 1: no signal
    fit = fit_layer(3, pos, neg, max_cos=0.99)
    assert fit.n_dropped >= 10
    assert fit.n_pairs + fit.n_dropped == 50


def test_fit_layer_small_sets_have_no_holdout() -> None:
    pos, neg, _ = planted(4, n=4, d=8)
    fit = fit_layer(5, pos, neg, max_cos=1.0)
    assert fit.n_pairs == 4
    assert fit.heldout_accuracy == fit.train_accuracy


def test_fit_layer_too_few_pairs_is_a_user_error() -> None:
    pos = np.ones((6, 4))
    neg = 2.0 * np.ones((6, 4))
    pos[0] = [1.0, 0.0, 0.0, 0.0]
    neg[0] = [0.0, 1.0, 0.0, 0.0]
    with pytest.raises(AlignezError, match=r"layer 9: only 1 usable pairs .* raise --max-cos"):
        fit_layer(9, pos, neg)


def test_fit_layer_is_reproducible() -> None:
    pos, neg, _ = planted(5, n=40, d=8, noise=2.0)
    a, b = fit_layer(1, pos, neg, seed=3, max_cos=1.0), fit_layer(1, pos, neg, seed=3, max_cos=1.0)
    assert a.heldout_accuracy == b.heldout_accuracy
    np.testing.assert_array_equal(a.directions, b.directions)


def test_pair_accuracy_counts_strict_wins() -> None:
    pos = np.array([[2.0, 0.0], [0.0, 0.0], [1.0, 5.0], [0.0, 1.0]])
    neg = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    assert pair_accuracy(np.array([1.0, 0.0]), pos, neg) == 0.25  # a tie is not a win


# --- layer selection -------------------------------------------------------------------------


def make_fit(layer: int, held: float, train: float = 0.9, explained: float = 0.5) -> LayerFit:
    return LayerFit(
        layer=layer,
        directions=np.eye(1, 4, dtype=np.float32),
        explained=np.array([explained]),
        heldout_accuracy=held,
        train_accuracy=train,
        n_pairs=100,
        n_dropped=0,
        ccs_loss=None,
    )


def test_select_layers_never_layer_zero_and_sorted() -> None:
    fits = {0: make_fit(0, 1.0), 3: make_fit(3, 0.9), 1: make_fit(1, 0.95), 2: make_fit(2, 0.5)}
    assert select_layers(fits, n_layer=12) == [1, 3]


def test_select_layers_threshold_is_best_minus_0_1() -> None:
    fits = {1: make_fit(1, 0.95), 2: make_fit(2, 0.85), 3: make_fit(3, 0.84), 4: make_fit(4, 0.7)}
    assert select_layers(fits, n_layer=30) == [1, 2]


def test_select_layers_respects_max_layers_and_tie_breaks() -> None:
    fits = {layer: make_fit(layer, 0.9) for layer in range(1, 20)}
    fits[7] = make_fit(7, 0.9, train=0.99)  # same held-out accuracy, better train accuracy
    fits[11] = make_fit(11, 0.9, explained=0.9)  # then the explained share decides
    assert select_layers(fits, n_layer=20, max_layers=3) == [1, 7, 11]
    assert len(select_layers(fits, n_layer=20)) == 6  # default max(5, 20 // 3)
    assert len(select_layers(fits, n_layer=9)) == 5  # default max(5, 9 // 3)


def test_select_layers_keeps_top_five_when_all_are_weak() -> None:
    fits = {layer: make_fit(layer, 0.40 + layer / 100) for layer in range(0, 11)}
    assert select_layers(fits, n_layer=11) == [5, 6, 7, 8, 9]  # never the last layer (10)
    assert select_layers(fits, n_layer=11, max_layers=2) == [8, 9]


def test_select_layers_skips_the_last_layer() -> None:
    fits = {layer: make_fit(layer, 0.9 if layer == 29 else 0.7) for layer in range(30)}
    assert 29 not in select_layers(fits, n_layer=30)
    assert select_layers({1: make_fit(1, 0.9)}, n_layer=2) == [1]  # a 2-layer model keeps its only slot


def test_select_layers_ignores_layers_without_a_control_vector_slot() -> None:
    fits = {0: make_fit(0, 1.0), 12: make_fit(12, 1.0), 5: make_fit(5, 0.8)}
    assert select_layers(fits, n_layer=12) == [5]
    with pytest.raises(AlignezError, match="layer 0"):
        select_layers({0: make_fit(0, 1.0)}, n_layer=12)


# --- CCS elbow -------------------------------------------------------------------------------


def test_ccs_elbow_cuts_at_largest_gap() -> None:
    losses = {4: 0.20, 1: 0.01, 3: 0.03, 2: 0.02, 5: 0.22, 6: 0.25, 0: 0.0}
    assert ccs_elbow(losses) == [1, 2, 3]  # best first; layer 0 skipped


def test_ccs_elbow_edge_cases() -> None:
    assert ccs_elbow({}) == []
    assert ccs_elbow({3: 0.1}) == [3]
    assert ccs_elbow({3: 0.1, 1: 0.1, 2: 0.1}) == [1, 2, 3]  # flat curve: keep all
    assert ccs_elbow({1: 0.05, 2: 0.3, 3: float("nan")}) == [1]


# --- properties ------------------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 30), d=st.integers(1, 6))
def test_calibrated_directions_win_or_tie_the_vote(seed: int, n: int, d: int) -> None:
    rng = np.random.default_rng(seed)
    pos, neg = rng.normal(size=(n, d)), rng.normal(size=(n, d))
    dirs = calibrate_signs(rng.normal(size=(3, d)), pos, neg)
    votes = np.sign((pos - neg) @ dirs.T).sum(axis=0)
    assert np.all(votes >= 0)
    np.testing.assert_array_equal(calibrate_signs(dirs, pos, neg), dirs)  # idempotent

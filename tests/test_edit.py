"""Tests for alignez_local.align.edit: the AlignEZ edit rule on hand-computed cases, plus properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alignez_local.align.edit import EditPlan, edit_delta, mean_delta, plan_edit
from alignez_local.errors import AlignezError

E1, E2, E3 = np.eye(3)


def apply_edit(x: np.ndarray, directions: np.ndarray, alpha: float = 1.0) -> np.ndarray:
    """What the engine hook writes back: the activation plus its edit delta."""
    return x + edit_delta(x, directions, alpha)


# --- the edit rule by hand -------------------------------------------------------------------


def test_negative_projection_is_removed() -> None:
    theta = np.array([[1.0, 0.0]])
    x = np.array([[-2.0, 1.0]])
    # p = -2: relu(-p) = 2 removes the harmful part, then tanh(max(p, 0)) = tanh(0) = 0.
    np.testing.assert_allclose(edit_delta(x, theta), [[2.0, 0.0]])
    np.testing.assert_allclose(apply_edit(x, theta), [[0.0, 1.0]])


def test_positive_projection_is_boosted_by_tanh() -> None:
    theta = np.array([[1.0, 0.0]])
    x = np.array([[0.5, 3.0]])
    np.testing.assert_allclose(edit_delta(x, theta), [[math.tanh(0.5), 0.0]])
    np.testing.assert_allclose(apply_edit(x, theta), [[0.5 + math.tanh(0.5), 3.0]])


def test_zero_projection_is_left_alone() -> None:
    np.testing.assert_allclose(edit_delta(np.array([[0.0, 4.0]]), np.array([[1.0, 0.0]])), [[0.0, 0.0]])


@pytest.mark.parametrize("alpha", [0.0, 0.5, 2.0, -1.0])
def test_alpha_scales_the_whole_delta(alpha: float) -> None:
    theta = np.array([[0.6, 0.8]])
    x = np.array([[-1.0, -0.5], [3.0, 1.0]])
    # p = -1.0 (row 0) and 2.6 (row 1).
    expected = np.array([[1.0 * 0.6, 1.0 * 0.8], [math.tanh(2.6) * 0.6, math.tanh(2.6) * 0.8]])
    np.testing.assert_allclose(edit_delta(x, theta, alpha=alpha), alpha * expected, atol=1e-15)


def test_two_orthonormal_directions_axis_aligned() -> None:
    x = np.array([[-1.0, 2.0, 5.0]])
    # p1 = -1 -> +1 along e1; p2 = 2 -> tanh(2) along e2; e3 untouched.
    np.testing.assert_allclose(edit_delta(x, np.stack([E1, E2])), [[1.0, math.tanh(2.0), 0.0]])


def test_two_orthonormal_directions_rotated() -> None:
    t1 = np.array([1.0, 1.0, 0.0]) / math.sqrt(2)
    t2 = np.array([1.0, -1.0, 0.0]) / math.sqrt(2)
    x = np.array([0.0, 2.0, 7.0])
    # p1 = sqrt(2) -> tanh(sqrt(2)) t1; p2 = -sqrt(2) -> sqrt(2) t2.
    expected = math.tanh(math.sqrt(2)) * t1 + math.sqrt(2) * t2
    np.testing.assert_allclose(edit_delta(x, np.stack([t1, t2])), expected)
    # Orthonormal rows: applying one after the other gives the same result.
    one_by_one = apply_edit(apply_edit(x, t1[None]), t2[None])
    np.testing.assert_allclose(apply_edit(x, np.stack([t1, t2])), one_by_one)


def test_shapes_and_dtypes() -> None:
    theta = np.array([[1.0, 0.0, 0.0]], dtype=np.float32)
    x32 = np.array([[-1.0, 0.0, 0.0], [2.0, 1.0, 1.0]], dtype=np.float32)
    assert apply_edit(x32, theta).dtype == np.float32
    assert edit_delta(x32, theta).shape == (2, 3)
    assert edit_delta(x32[0], theta).shape == (3,)
    assert apply_edit(x32.astype(np.float64), theta).dtype == np.float64


# --- plan_edit -------------------------------------------------------------------------------


def test_plan_edit_keeps_only_directions_the_prompt_lacks() -> None:
    subspaces = {
        1: np.stack([E1, E2, E3]),
        2: E1[None],
        3: np.stack([E1, E2]),
        4: E1[None],
    }
    query = {
        1: np.array([1.0, -1.0, -2.0]),  # cos: +1/sqrt6 (drop), -1/sqrt6, -2/sqrt6 (keep)
        2: np.array([1.0, 0.0, 0.0]),  # cos +1: nothing kept
        3: np.array([-3.0, 0.0, 0.0]),  # cos -1 and exactly 0: both kept
        4: np.zeros(3),  # zero query: nothing kept
    }
    plan = plan_edit(query, subspaces, top_n=5)
    assert plan.scores[1] == pytest.approx(math.sqrt(1 / 6 + 4 / 6))
    assert plan.scores[2] == 0.0
    assert plan.scores[3] == pytest.approx(1.0)
    assert plan.scores[4] == 0.0
    assert list(plan.directions) == [3, 1]  # best score first; layers 2 and 4 never chosen
    np.testing.assert_array_equal(plan.directions[1], np.stack([E2, E3]))
    np.testing.assert_array_equal(plan.directions[3], np.stack([E1, E2]))


def test_plan_edit_top_n_and_ties_prefer_lower_layers() -> None:
    t = np.array([[0.0, 1.0]])
    subspaces = {layer: t for layer in (2, 5, 8, 9)}
    query = {
        2: np.array([1.0, -1.0]),  # cos -1/sqrt2
        5: np.array([0.0, -1.0]),  # cos -1
        8: np.array([0.0, -2.0]),  # cos -1 (tie with 5)
        9: np.array([3.0, -1.0]),  # cos -1/sqrt10
    }
    assert list(plan_edit(query, subspaces, top_n=2).directions) == [5, 8]
    assert list(plan_edit(query, subspaces, top_n=3).directions) == [5, 8, 2]
    assert set(plan_edit(query, subspaces, top_n=3).scores) == {2, 5, 8, 9}


def test_plan_edit_user_errors() -> None:
    with pytest.raises(AlignezError, match="at least 1"):
        plan_edit({1: E1}, {1: E1[None]}, top_n=0)
    with pytest.raises(AlignezError, match="layer 4"):
        plan_edit({1: E1}, {4: E1[None]})


# --- the constant approximation --------------------------------------


def test_mean_delta_counts_unchosen_prompts_as_zero() -> None:
    layer = 6
    chosen = EditPlan(directions={layer: E1[None]}, scores={layer: 1.0})
    not_chosen = EditPlan(directions={2: E1[None]}, scores={layer: 0.0, 2: 0.5})
    samples = [np.array([-4.0, 1.0, 0.0]), np.array([-100.0, 0.0, 0.0])]
    # Prompt 0: p = -4 -> delta 4 e1. Prompt 1: layer not chosen -> 0. Mean over 2 prompts.
    np.testing.assert_allclose(mean_delta(samples, [chosen, not_chosen], layer), [2.0, 0.0, 0.0])
    np.testing.assert_allclose(mean_delta(samples, [chosen, not_chosen], layer, alpha=0.5), [1.0, 0.0, 0.0])
    with pytest.raises(AlignezError, match="one plan per calibration prompt"):
        mean_delta(samples, [chosen], layer)


# --- properties ------------------------------------------------------------------------------


def orthonormal_rows(seed: int, m: int, d: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, m)))
    return q.T


@settings(max_examples=100, deadline=None)
@given(
    data=st.data(),
    d=st.integers(1, 8),
    seed=st.integers(0, 2**32 - 1),
)
def test_edit_never_lowers_a_kept_projection_and_leaves_it_nonnegative(
    data: st.DataObject, d: int, seed: int
) -> None:
    m = data.draw(st.integers(1, d))
    thetas = orthonormal_rows(seed, m, d)
    x = np.array(data.draw(st.lists(st.floats(-50, 50), min_size=d, max_size=d)))
    old = thetas @ x
    new = thetas @ apply_edit(x, thetas, alpha=1.0)
    assert np.all(new >= old - 1e-9)
    assert np.all(new >= -1e-9)
    # Exactly the rule: the projection becomes max(p, 0) + tanh(max(p, 0)).
    np.testing.assert_allclose(new, np.maximum(old, 0) + np.tanh(np.maximum(old, 0)), atol=1e-9)


@settings(max_examples=50, deadline=None)
@given(alpha=st.floats(-3, 3), seed=st.integers(0, 2**32 - 1))
def test_edit_only_moves_x_inside_the_subspace(alpha: float, seed: int) -> None:
    thetas = orthonormal_rows(seed, 2, 5)
    x = np.random.default_rng(seed + 1).normal(size=(4, 5))
    delta = edit_delta(x, thetas, alpha)
    # Nothing outside span(thetas) changes, and alpha is linear.
    np.testing.assert_allclose(delta - (delta @ thetas.T) @ thetas, 0.0, atol=1e-9)
    np.testing.assert_allclose(delta, alpha * edit_delta(x, thetas, 1.0), atol=1e-9)

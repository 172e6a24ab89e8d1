"""Nash-MTL and FairGrad: fixed-point equations, scipy float64 solutions, worked example."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import least_squares

import mtl_optax as mtl
from mtl_optax.solvers import power_balance_weights


def jacobian(seed, k=5, dim=20, spread=1.0):
    rng = np.random.default_rng(seed)
    jac = rng.normal(size=(k, dim)) - 0.5 * rng.normal(size=dim)
    return jac * np.exp(rng.uniform(0, np.log(spread), size=(k, 1)))


solve = jax.jit(power_balance_weights, static_argnames=("power",))


@pytest.mark.parametrize("power", [1.0, 0.5, 2.0, 1.0 / 3.0])
@pytest.mark.parametrize("spread", [1.0, 1e3])
def test_fixed_point_and_scipy(power, spread):
    """``Gw = w^{−p}`` holds to float32 precision; scipy float64 least squares agrees."""
    jac = jacobian(int(power * 10 + spread), spread=spread)
    gram = jac @ jac.T
    w = np.asarray(solve(jnp.asarray(gram, jnp.float32), power=power), np.float64)
    residual = (gram @ w - w ** (-power)) / (np.abs(gram) @ w)
    assert np.all(w > 0) and np.max(np.abs(residual)) < 5e-6
    start = np.diagonal(gram) ** (-1.0 / (1.0 + power))
    ref = least_squares(
        lambda x: gram @ x - x ** (-power), start, bounds=(0, np.inf), xtol=1e-15, ftol=1e-15
    ).x
    np.testing.assert_allclose(w, ref, rtol=1e-4)


def test_nash_mtl_worked_example_and_non_conflict():
    jac = np.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
    w = mtl.nash_mtl()
    weights, _ = w.update(jnp.asarray(jac @ jac.T, jnp.float32), None, w.init(2))
    np.testing.assert_allclose(np.asarray(weights) @ jac, [0.0542, 0.7061, 0.7061], atol=1e-4)
    for seed in range(3):
        jac = jacobian(seed, spread=100.0)
        gram = jac @ jac.T
        w = mtl.nash_mtl(max_norm=0.0)  # the sources' fixed point, on the raw Gram
        alpha = np.asarray(w.update(jnp.asarray(gram, jnp.float32), None, ())[0], np.float64)
        np.testing.assert_allclose(gram @ alpha, 1 / alpha, rtol=1e-4)
        assert np.all(jac @ (alpha @ jac) > 0)
        w = mtl.nash_mtl(max_norm=0.0, normalize_gram=True)
        beta = np.asarray(w.update(jnp.asarray(gram, jnp.float32), None, ())[0], np.float64)
        normalized = gram / np.linalg.norm(gram)
        np.testing.assert_allclose(normalized @ beta, 1 / beta, rtol=1e-4)
        np.testing.assert_allclose(beta, np.sqrt(np.linalg.norm(gram)) * alpha, rtol=1e-4)


def test_nash_mtl_update_has_norm_max_norm_at_every_scale():
    """Unclipped ``‖u‖ = √K`` (the raw fixed point), so the default always clips to 1."""
    for scale in (1e-3, 1.0, 1e3):
        jac = jacobian(9, k=4, spread=10.0) * scale
        gram = jnp.asarray(jac @ jac.T, jnp.float32)
        free = np.asarray(mtl.nash_mtl(max_norm=0.0).update(gram, None, ())[0], np.float64)
        clipped = np.asarray(mtl.nash_mtl().update(gram, None, ())[0], np.float64)
        assert np.linalg.norm(free @ jac) == pytest.approx(2.0, rel=1e-4)
        assert np.linalg.norm(clipped @ jac) == pytest.approx(1.0, rel=1e-4)


def test_nash_mtl_max_norm_clips():
    jac = jacobian(4, spread=10.0) * 50
    gram = jnp.asarray(jac @ jac.T, jnp.float32)
    clipped = np.asarray(mtl.nash_mtl(max_norm=0.5).update(gram, None, ())[0])
    free = np.asarray(mtl.nash_mtl(max_norm=0.0).update(gram, None, ())[0])
    assert np.linalg.norm(clipped @ jac) == pytest.approx(0.5, rel=1e-5)
    np.testing.assert_allclose(clipped / clipped.sum(), free / free.sum(), rtol=1e-5)


def test_fairgrad_alpha_one_is_nash_without_normalization():
    jac = jacobian(5)
    gram = jnp.asarray(jac @ jac.T, jnp.float32)
    w = np.asarray(mtl.fairgrad(alpha=1.0).update(gram, None, ())[0], np.float64)
    np.testing.assert_allclose(np.asarray(gram, np.float64) @ w, 1 / w, rtol=1e-5)


def test_singular_and_zero_gradients():
    jac = jacobian(6, k=4)
    jac[3] = jac[1]  # duplicated task: singular G, a solution still exists
    jac_zero = jacobian(7, k=3)
    jac_zero[2] = 0.0  # zero gradient: weight 0, the others solved among themselves
    for j in (jac, jac_zero):
        w = np.asarray(solve(jnp.asarray(j @ j.T, jnp.float32), power=1.0), np.float64)
        assert np.all(np.isfinite(w))
    w = np.asarray(solve(jnp.asarray(jac_zero @ jac_zero.T, jnp.float32), power=1.0), np.float64)
    sub = jac_zero[:2] @ jac_zero[:2].T
    assert w[2] == 0.0
    np.testing.assert_allclose(sub @ w[:2], 1 / w[:2], rtol=1e-5)
    opposite = np.array([[1.0, 0.0], [-1.0, 0.0]])  # no solution: the ridge keeps it finite
    w = np.asarray(solve(jnp.asarray(opposite @ opposite.T, jnp.float32), power=1.0))
    assert np.all(np.isfinite(w)) and np.allclose(w @ opposite, 0.0, atol=1e-3 * w.max())
    nan = solve(jnp.full((2, 2), jnp.nan), power=1.0)
    assert bool(jnp.all(jnp.isnan(nan)))


def test_bad_hyper_parameters():
    for bad in (0.0, -1.0, float("nan"), True):
        with pytest.raises((ValueError, TypeError), match="alpha"):
            mtl.fairgrad(alpha=bad)
    with pytest.raises(ValueError, match="max_norm"):
        mtl.nash_mtl(max_norm=-1.0)
    with pytest.raises(TypeError, match="max_iters"):
        mtl.nash_mtl(max_iters=2.5)
    with pytest.raises(TypeError, match="normalize_gram"):
        mtl.nash_mtl(normalize_gram=1)


@pytest.mark.parametrize("scale", [1e-12, 1e9])
def test_fairgrad_through_aggregate_at_extreme_scales(scale):
    """homogeneity −α/(1+α): the tier solves on the power-of-two rescaled Gram and multiplies
    the weights back; they satisfy the true Gram's fixed point ``Gw = w^{−1/α}`` (float64)."""
    jac = jacobian(8, k=3) * scale
    alpha = 2.0
    t = mtl.aggregate(mtl.fairgrad(alpha=alpha), tasks=3, shared=True)
    params = jnp.zeros(jac.shape[1])
    _, state = jax.jit(t.update)(
        mtl.TaskGradients(jnp.asarray(jac, jnp.float32)), t.init(params), params
    )
    w = np.asarray(state.weights, np.float64)
    gram = jac @ jac.T
    residual = (gram @ w - w ** (-1 / alpha)) / (np.abs(gram) @ w)
    assert np.all(w > 0) and np.max(np.abs(residual)) < 5e-6

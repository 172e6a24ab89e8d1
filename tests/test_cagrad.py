"""CAGrad against scipy minimising the same objective on the simplex (float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import minimize

import mtl_optax as mtl

K = 4
WORKED = np.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])  # torchjd docs' example
NO_RESCALE = mtl.cagrad(rescale=0)
DEFAULT = mtl.cagrad()
update_no_rescale = jax.jit(NO_RESCALE.update)


def jacobian(seed, k=K, dim=10, spread=1.0):
    rng = np.random.default_rng(seed)
    jac = rng.normal(size=(k, dim)) + 0.2 * rng.normal(size=dim)
    return jac * np.exp(rng.uniform(0, np.log(spread), size=(k, 1)))


def scipy_cagrad_update(jac, c=0.5):
    """float64: w* = argmin_{w ∈ Δ} ⟨g_w, ḡ⟩ + c‖ḡ‖‖g_w‖ by SLSQP, u = ḡ + c‖ḡ‖ g_w/‖g_w‖."""
    k = len(jac)
    gram = jac @ jac.T
    mean = jac.mean(axis=0)
    phi = c * np.linalg.norm(mean)
    best = None
    for start in [np.full(k, 1 / k), *np.eye(k)]:  # convex: restarts guard SLSQP's kinks only
        result = minimize(
            lambda w: w @ gram @ np.full(k, 1 / k) + phi * np.sqrt(max(w @ gram @ w, 1e-300)),
            0.9 * start + 0.1 / k,
            bounds=[(0, 1)] * k,
            constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1}],
            method="SLSQP",
            options={"ftol": 1e-15, "maxiter": 2000},
        )
        best = result if best is None or result.fun < best.fun else best
    g_w = best.x @ jac
    return mean + phi * g_w / np.linalg.norm(g_w), best.fun


def test_torchjd_worked_example():
    w, _ = update_no_rescale(jnp.asarray(WORKED @ WORKED.T), None, NO_RESCALE.init(2))
    np.testing.assert_allclose(np.asarray(w) @ WORKED, [0.1835, 1.2041, 1.2041], atol=1e-4)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_matches_scipy_on_the_simplex(seed):
    jac = jacobian(seed, spread=[1.0, 30.0][seed % 2])
    gram = (jac @ jac.T).astype(np.float32)
    w, _ = update_no_rescale(jnp.asarray(gram), None, NO_RESCALE.init(K))
    u = np.asarray(w, np.float64) @ jac
    u_star, objective = scipy_cagrad_update(jac)
    # our objective is no worse than scipy's, and the updates agree
    mean = jac.mean(axis=0)
    phi = 0.5 * np.linalg.norm(mean)
    lam = np.asarray(w, np.float64) - 1 / K
    lam /= lam.sum()  # w* recovered from the weights 1/K + (φ/‖g_w*‖) w*
    ours = (lam @ jac) @ mean + phi * np.linalg.norm(lam @ jac)
    assert ours <= objective + 1e-5 * abs(objective) + 1e-6
    np.testing.assert_allclose(u, u_star, rtol=2e-3, atol=2e-3 * np.linalg.norm(u_star))


def test_rescale_options_scaling_and_permutation():
    jac = jacobian(5)
    gram = (jac @ jac.T).astype(np.float32)
    base, _ = update_no_rescale(jnp.asarray(gram), None, ())
    default, _ = jax.jit(DEFAULT.update)(jnp.asarray(gram), None, ())
    np.testing.assert_allclose(default, np.asarray(base) / 1.25, rtol=1e-6)
    one, _ = mtl.cagrad(rescale=2).update(jnp.array([[4.0]]), None, ())  # K = 1: (1+c)/(1+c)
    np.testing.assert_allclose(one, [1.0], rtol=1e-5)
    assert NO_RESCALE.homogeneity == 0.0
    for c in (2.0**-10, 2.0**30):
        scaled, _ = update_no_rescale(jnp.asarray(gram * np.float32(c)), None, ())
        np.testing.assert_allclose(scaled, base, rtol=1e-4, atol=1e-6)
    perm = np.array([2, 0, 3, 1])
    permuted, _ = update_no_rescale(jnp.asarray(gram[perm][:, perm]), None, ())
    np.testing.assert_allclose(permuted, np.asarray(base)[perm], rtol=1e-4, atol=1e-6)
    mean, _ = mtl.cagrad(c=0.0).update(jnp.asarray(gram), None, ())  # c = 0: the mean
    np.testing.assert_allclose(mean, np.full(K, 1 / K), rtol=1e-6)


def test_degenerate_and_bad_inputs():
    jac = jacobian(6)
    zero_row = jac.copy()
    zero_row[1] = 0.0
    dup = np.vstack([jac[:2], jac[:2]])
    for gram in (np.zeros((K, K)), zero_row @ zero_row.T, dup @ dup.T):
        w, _ = update_no_rescale(jnp.asarray(gram, jnp.float32), None, ())
        assert w.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(w)))
    one, _ = NO_RESCALE.update(jnp.array([[4.0]]), None, ())  # K = 1: (1 + c) g
    np.testing.assert_allclose(one, [1.5], rtol=1e-5)
    bf16, _ = update_no_rescale(jnp.asarray(jac @ jac.T, jnp.bfloat16), None, ())
    f32, _ = update_no_rescale(jnp.asarray(jac @ jac.T, jnp.float32), None, ())
    assert bf16.dtype == jnp.float32
    np.testing.assert_allclose(bf16, f32, rtol=0.05, atol=0.05)
    nan = (jac @ jac.T).astype(np.float32)
    nan[0, 0] = np.nan
    assert bool(jnp.all(jnp.isnan(update_no_rescale(jnp.asarray(nan), None, ())[0])))
    with pytest.raises(ValueError, match="`c`"):
        mtl.cagrad(c=-0.5)
    with pytest.raises(ValueError, match="`c`"):
        mtl.cagrad(c=float("nan"))
    with pytest.raises(ValueError, match="norm_eps"):
        mtl.cagrad(norm_eps=-1.0)
    with pytest.raises(ValueError, match="rescale"):
        mtl.cagrad(rescale=3)
    with pytest.raises(TypeError, match="rescale"):
        mtl.cagrad(rescale=True)

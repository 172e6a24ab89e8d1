"""Weightings: guaranteed properties, vmap, degenerate inputs and error messages."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import nnls

import mtl_optax as mtl

K = 4


def jacobian(seed, k=K, dim=12, spread=1.0):
    rng = np.random.default_rng(seed)
    jac = rng.normal(size=(k, dim)) - 0.4 * rng.normal(size=dim)
    return jac * np.exp(rng.uniform(0, np.log(spread), size=(k, 1)))


def run(weighting, gram, losses=None):
    return jax.jit(weighting.update)(gram, losses, weighting.init(gram.shape[0]))[0]


ALL = {
    "mean": mtl.mean_weighting(),
    "sum": mtl.sum_weighting(),
    "constant": mtl.constant_weighting([1.0, 2.0, 0.5, 0.0]),
    "gradient_normalized": mtl.gradient_normalized(),
    "mgda": mtl.mgda(),
    "mgda_l2": mtl.mgda(normalization="l2"),
    "mgda_loss+": mtl.mgda(normalization="loss+"),
    "mgda_fw": mtl.mgda(solver="frank_wolfe"),
    "mgda_fw_fixed": mtl.mgda(solver="frank_wolfe_fixed_step"),
    "primary_auxiliary": mtl.primary_auxiliary(primary=0),
    "two_primaries": mtl.primary_auxiliary(primary=(0, 2)),
    "upgrad": mtl.upgrad(),
    "dualproj": mtl.dualproj(),
    "cagrad": mtl.cagrad(),
}


@pytest.mark.parametrize("name", list(ALL))
def test_vmap_over_grams_matches_one_by_one(name):
    weighting = ALL[name]
    jacs = [jacobian(s) for s in range(3)]
    grams = jnp.asarray(np.stack([j @ j.T for j in jacs]), jnp.float32)
    losses = jnp.asarray(np.random.default_rng(0).uniform(0.5, 2.0, size=(3, K)), jnp.float32)
    states = jax.vmap(lambda _: weighting.init(K))(jnp.arange(3))
    batched, _ = jax.jit(jax.vmap(weighting.update))(grams, losses, states)
    for i in range(3):
        np.testing.assert_allclose(batched[i], run(weighting, grams[i], losses[i]), atol=1e-6)


@pytest.mark.parametrize("name", list(ALL))
def test_degenerate_inputs_are_finite(name):
    """All-zero gradients, one zero gradient, zero losses, one task, bf16 Grams."""
    weighting = ALL[name]
    jac = jacobian(1)
    jac_zero_row = jac.copy()
    jac_zero_row[1] = 0.0
    cases = [
        (np.zeros((K, K)), np.zeros(K)),
        (jac_zero_row @ jac_zero_row.T, np.ones(K)),
        (jac @ jac.T, np.zeros(K)),
    ]
    for gram, losses in cases:
        w = run(weighting, jnp.asarray(gram, jnp.float32), jnp.asarray(losses, jnp.float32))
        assert w.shape == (K,) and w.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(w)))
    bf16 = run(weighting, jnp.asarray(jac @ jac.T, jnp.bfloat16), jnp.ones(K, jnp.bfloat16))
    f32 = run(weighting, jnp.asarray(jac @ jac.T, jnp.float32), jnp.ones(K, jnp.float32))
    assert bf16.dtype == jnp.float32
    np.testing.assert_allclose(bf16 @ jac, f32 @ jac, rtol=0.1, atol=0.1 * np.abs(jac).max())


@pytest.mark.parametrize("name", ["mean", "sum", "gradient_normalized", "mgda", "mgda_l2"])
def test_single_task(name):
    w = run(ALL[name], jnp.array([[4.0]]), jnp.array([1.0]))
    expected = {"gradient_normalized": 0.5, "mgda_l2": 0.5}.get(name, 1.0)
    np.testing.assert_allclose(w, [expected], rtol=1e-6)


def test_single_task_zero_gradient():
    for weighting in (mtl.mgda(), mtl.gradient_normalized(), mtl.primary_auxiliary()):
        assert bool(jnp.all(jnp.isfinite(run(weighting, jnp.zeros((1, 1)), jnp.zeros(1)))))


def test_mgda_update_is_non_conflicting():
    """⟨u, g_i⟩ ≥ ‖u‖² ≥ 0 for every task, including badly scaled ones."""
    mgda = mtl.mgda()  # one instance: one compiled program for the ten draws
    for seed in range(10):
        jac = jacobian(seed, k=6, dim=8, spread=100.0)
        w = np.asarray(run(mgda, jnp.asarray(jac @ jac.T, jnp.float32)), np.float64)
        u = w @ jac
        scale = np.linalg.norm(jac, axis=1).max()
        assert np.all(jac @ u >= u @ u - 1e-5 * scale * np.linalg.norm(u) - 1e-7)


@pytest.mark.parametrize("normalization", ["l2", "loss", "loss+"])
def test_mgda_normalizations_solve_the_rescaled_problem(normalization):
    """w_i = α_i/n_i where α is the min-norm point of the gradients g_i/n_i (oracle: NNLS)."""
    jac = jacobian(5, spread=50.0)
    losses = np.random.default_rng(5).uniform(0.1, 3.0, size=K)
    norms = np.linalg.norm(jac, axis=1)
    n = {"l2": norms, "loss": losses, "loss+": losses * norms}[normalization]
    scaled = jac / n[:, None]
    s = np.sqrt(np.mean(np.sum(scaled**2, 1)))
    beta, _ = nnls(np.vstack([scaled.T, s * np.ones((1, K))]), np.r_[np.zeros(jac.shape[1]), s])
    alpha = beta / beta.sum()
    w = run(mtl.mgda(normalization=normalization), jnp.asarray(jac @ jac.T, jnp.float32), losses)
    np.testing.assert_allclose(np.asarray(w) @ jac, (alpha / n) @ jac, rtol=1e-4, atol=1e-5)


def test_gradient_normalized_is_invariant_to_loss_scaling():
    """Rescaling task i's loss (g_i → c g_i) leaves Σ w_i g_i unchanged; each term has norm 1."""
    jac = jacobian(2)
    w = np.asarray(run(mtl.gradient_normalized(), jnp.asarray(jac @ jac.T, jnp.float32)))
    np.testing.assert_allclose(np.linalg.norm(w[:, None] * jac, axis=1), 1.0, rtol=1e-5)
    for c in ([1e-3, 1.0, 1.0, 1.0], [1.0, 7.0, 1e2, 0.5]):
        scaled = jac * np.asarray(c)[:, None]
        w_s = np.asarray(
            run(mtl.gradient_normalized(), jnp.asarray(scaled @ scaled.T, jnp.float32))
        )
        np.testing.assert_allclose(w_s @ scaled, w @ jac, rtol=1e-4, atol=1e-6)


def test_mgda_fixed_step_follows_the_smooth_min_recursion():
    """α_{k+1} = (k α_k + e_τ)/(k + 1) with α_0 uniform, τ = argmin (Gα_k)."""
    jac = jacobian(3)
    gram = jac @ jac.T
    alpha = np.full(K, 1 / K)
    for k in range(1, 6):
        tau = np.argmin(gram @ alpha)
        alpha = (k * alpha + np.eye(K)[tau]) / (k + 1)
    w = mtl.mgda(solver="frank_wolfe_fixed_step", max_iters=5, tol=0.0)
    np.testing.assert_allclose(run(w, jnp.asarray(gram, jnp.float32)), alpha, rtol=1e-5)


def test_mgda_state_keeps_support_for_warm_start():
    jac = jacobian(4)
    weighting = mtl.mgda()
    gram = jnp.asarray(jac @ jac.T, jnp.float32)
    w1, state = weighting.update(gram, None, weighting.init(K))
    w2, _ = weighting.update(gram, None, state)
    np.testing.assert_array_equal(state.support, np.asarray(w1) > 0)
    np.testing.assert_allclose(w1, w2, atol=1e-7)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="square"):
        mtl.mgda().update(jnp.zeros((2, 3)), None, mtl.mgda().init(2))
    with pytest.raises(ValueError, match="out of range for 3 tasks"):
        mtl.primary_auxiliary(primary=3).init(3)
    with pytest.raises(ValueError, match="out of range for 2 tasks"):
        w = mtl.primary_auxiliary(primary=(0, 5))
        w.update(jnp.eye(2), None, mtl.mgda().init(2))
    with pytest.raises(ValueError, match="primary"):
        mtl.primary_auxiliary(primary=())
    with pytest.raises(ValueError, match="normalization"):
        mtl.mgda(normalization="l1")
    with pytest.raises(ValueError, match="task losses"):
        w = mtl.mgda(normalization="loss")
        w.update(jnp.eye(2), None, w.init(2))
    with pytest.raises(ValueError, match=r"losses.*\(2,\)"):
        w = mtl.mgda(normalization="loss")
        w.update(jnp.eye(2), jnp.ones(3), w.init(2))
    with pytest.raises(ValueError, match="num_tasks=3"):
        mtl.constant_weighting([1.0, 2.0]).init(3)
    with pytest.raises(ValueError, match="num_tasks"):
        mtl.mean_weighting().init(0)


def test_state_for_another_task_count_and_numpy_primary_index():
    w = mtl.mgda()
    with pytest.raises(ValueError, match="initialised for 4 tasks.*has 3"):
        w.update(jnp.eye(3), None, w.init(4))
    weights = run(mtl.primary_auxiliary(primary=np.int64(1)), jnp.eye(2))
    np.testing.assert_allclose(weights, [0.0, 1.0])


def test_gradient_normalized_nan_on_non_finite_norm():
    w = run(mtl.gradient_normalized(), jnp.diag(jnp.array([4.0, jnp.nan, 0.0])))
    np.testing.assert_array_equal(np.isnan(w), [False, True, False])
    np.testing.assert_allclose(w[0], 0.5)


def test_mgda_loss_normalizations_on_bad_losses():
    """NaN/inf losses give NaN weights (apply_if_finite skips); zero losses count as 1."""
    jac = jacobian(6)
    gram = jnp.asarray(jac @ jac.T, jnp.float32)
    mgda = {norm: mtl.mgda(normalization=norm) for norm in ("loss", "loss+", "l2")}
    for bad in (np.nan, np.inf):
        losses = jnp.array([1.0, bad, 2.0, 0.5], jnp.float32)
        for norm in ("loss", "loss+"):
            assert bool(jnp.all(jnp.isnan(run(mgda[norm], gram, losses))))
    zero = jnp.zeros(K, jnp.float32)
    np.testing.assert_allclose(
        run(mgda["loss+"], gram, zero), run(mgda["l2"], gram, zero), rtol=1e-6
    )


def test_hyper_parameter_and_state_checks():
    for bad in (-1e-12, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="eps"):
            mtl.mgda(eps=bad)
        with pytest.raises(ValueError, match="eps"):
            mtl.gradient_normalized(eps=bad)
        with pytest.raises(ValueError, match="tol"):
            mtl.mgda(tol=bad)
    with pytest.raises(TypeError, match="eps"):
        mtl.mgda(eps=None)
    for bad in (0, True, 1.5):
        with pytest.raises(ValueError, match="max_iters"):
            mtl.mgda(solver="frank_wolfe", max_iters=bad)
        with pytest.raises(ValueError, match="max_iters"):
            mtl.mgda(max_iters=bad)
    with pytest.raises(ValueError, match="bools"):
        mtl.primary_auxiliary(primary=[0, True])
    with pytest.raises(ValueError, match="bools"):
        mtl.primary_auxiliary(primary=True)
    with pytest.raises(ValueError, match="twice"):
        mtl.primary_auxiliary(primary=[1, 1])
    with pytest.raises(ValueError, match="twice for 3 tasks"):
        mtl.primary_auxiliary(primary=[0, -3]).init(3)
    for w in (mtl.mgda(), mtl.primary_auxiliary()):
        with pytest.raises(TypeError, match="init\\(2\\)"):
            w.update(jnp.eye(2), None, None)

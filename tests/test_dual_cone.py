"""UPGrad and DualProj against scipy (float64), their KKT conditions and guaranteed properties."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import minimize

import mtl_optax as mtl

K = 5
WORKED = np.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])  # torchjd docs' example


def jacobian(seed, k=K, dim=8, spread=1.0):
    rng = np.random.default_rng(seed)
    jac = rng.normal(size=(k, dim)) + 0.3 * rng.normal(size=dim)
    return jac * np.exp(rng.uniform(0, np.log(spread), size=(k, 1)))


WEIGHTINGS = {"upgrad": mtl.upgrad(), "dualproj": mtl.dualproj(), "mgda": mtl.mgda()}
UPDATES = {}  # one jitted update per weighting object: compiled once per shape


def run(weighting, gram, state=None):
    state = weighting.init(gram.shape[0]) if state is None else state
    update = UPDATES.setdefault(id(weighting), jax.jit(weighting.update))
    return update(jnp.asarray(gram), None, state)


project = jax.jit(jax.vmap(mtl.lower_bounded_qp, in_axes=(None, 0)))


def regularized(gram, reg=1e-4):
    return gram / np.trace(gram) + reg * np.eye(len(gram))


def slsqp_lower_bounded(gram, lower):
    """float64 SLSQP solution of min vᵀGv s.t. v ≥ lower."""
    result = minimize(
        lambda v: v @ gram @ v,
        lower + 1.0,
        jac=lambda v: 2 * gram @ v,
        bounds=[(lo, None) for lo in lower],
        method="SLSQP",
        options={"ftol": 1e-15, "maxiter": 1000},
    )
    return result.x


@pytest.mark.parametrize(
    "name,expected",
    [("upgrad", [0.2929, 1.9004, 1.9004]), ("dualproj", [0.5563, 1.1109, 1.1109])],
)
def test_torchjd_worked_example(name, expected):
    w, _ = run(WEIGHTINGS[name], WORKED @ WORKED.T)
    np.testing.assert_allclose(np.asarray(w) @ WORKED, expected, atol=1e-4)


@pytest.mark.parametrize("seed", [0, 1])
def test_weights_match_scipy_and_kkt(seed):
    """Every UPGrad QP and the DualProj QP against SLSQP; KKT of the lower-bounded QP."""
    jac = jacobian(seed, spread=10.0)
    gram = jac @ jac.T
    g = regularized(gram)
    up, _ = run(WEIGHTINGS["upgrad"], gram.astype(np.float32))
    dp, _ = run(WEIGHTINGS["dualproj"], gram.astype(np.float32))
    oracle_up = sum(slsqp_lower_bounded(g, np.eye(K)[i] / K) for i in range(K))
    oracle_dp = slsqp_lower_bounded(g, np.full(K, 1 / K))
    scale = np.linalg.norm(jac, axis=1).max()
    np.testing.assert_allclose(np.asarray(up) @ jac, oracle_up @ jac, atol=1e-5 * scale)
    np.testing.assert_allclose(np.asarray(dp) @ jac, oracle_dp @ jac, atol=1e-5 * scale)
    # KKT of each projection, from the solver directly: λ ≥ 0, G'v ≥ 0, λ ⊙ G'v = 0
    vs = np.asarray(project(jnp.asarray(g, jnp.float32), jnp.eye(K)), np.float64)
    for i, v in enumerate(vs):
        grad = g @ v
        lam = v - np.eye(K)[i]
        tol = 1e-5 * np.abs(v).sum()
        assert lam.min() >= 0 and grad.min() >= -tol
        assert np.all(np.abs(lam * grad) <= tol * (1 + lam))


@pytest.mark.parametrize("name", ["upgrad", "dualproj", "mgda"])
def test_non_conflicting(name):
    """⟨u, g_j⟩ ≥ 0 for every task (the ε_reg ridge allows −reg·tr(G)·v_j)."""
    for seed in range(4):
        jac = jacobian(seed, spread=100.0) - 0.5 * jacobian(seed + 9, k=1)
        gram = jac @ jac.T
        w, _ = run(WEIGHTINGS[name], gram.astype(np.float32))
        w = np.asarray(w, np.float64)
        inner = jac @ (w @ jac)
        ridge = 1e-4 * np.trace(gram) * np.abs(w) if name != "mgda" else 0.0
        assert np.all(inner >= -ridge - 1e-5 * np.linalg.norm(jac, axis=1) * np.abs(w @ jac).sum())


@pytest.mark.parametrize("name", ["upgrad", "dualproj"])
def test_linear_under_scaling_and_permutation_equivariant(name):
    weighting = WEIGHTINGS[name]
    assert weighting.homogeneity == 0.0
    jac = jacobian(7, spread=10.0)
    gram = (jac @ jac.T).astype(np.float32)
    w, _ = run(weighting, gram)
    # tr(cG) ≥ norm_eps, the scale-free regime of a direct call (through aggregate every
    # scale is, see below)
    for c in (2.0**-10, 3.7, 2.0**40):
        w_c, _ = run(weighting, gram * np.float32(c))
        np.testing.assert_allclose(w_c, w, rtol=1e-4, atol=1e-6)
    perm = np.array([3, 0, 4, 1, 2])
    w_p, _ = run(weighting, gram[perm][:, perm])
    np.testing.assert_allclose(w_p, np.asarray(w)[perm], rtol=1e-4, atol=1e-6)


def test_through_aggregate_at_extreme_scales():
    """Scales 1e-30 and 1e30 through the tier: the update scales linearly."""
    jac = jacobian(3, spread=1e4).astype(np.float32)
    tx = mtl.aggregate(mtl.upgrad(), tasks=K, shared=True)
    update = jax.jit(tx.update)
    base, _ = update(mtl.TaskGradients(jnp.asarray(jac)), tx.init(None))
    for c in (1e-30, 1e30):
        scaled, _ = update(mtl.TaskGradients(jnp.asarray(jac * np.float32(c))), tx.init(None))
        np.testing.assert_allclose(
            np.asarray(scaled) / c, base, rtol=1e-4, atol=1e-6 * abs(base).max()
        )


@pytest.mark.parametrize("name", ["upgrad", "dualproj"])
def test_degenerate_inputs_are_finite(name):
    weighting = WEIGHTINGS[name]
    jac = jacobian(1)
    zero_row = jac.copy()
    zero_row[2] = 0.0
    dup = np.vstack([jac[:3], jac[:2]])
    for gram in (np.zeros((K, K)), zero_row @ zero_row.T, dup @ dup.T):
        w, _ = run(weighting, gram.astype(np.float32))
        assert w.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(w)))
    np.testing.assert_allclose(run(weighting, np.zeros((K, K), np.float32))[0], 1 / K)
    w1, _ = run(weighting, np.array([[4.0]], np.float32))  # K = 1: the gradient itself
    np.testing.assert_allclose(w1, [1.0], rtol=1e-6)
    bf16, _ = run(weighting, jnp.asarray(jac @ jac.T, jnp.bfloat16))
    f32, _ = run(weighting, (jac @ jac.T).astype(np.float32))
    assert bf16.dtype == jnp.float32
    np.testing.assert_allclose(bf16, f32, rtol=0.05, atol=0.05)
    nan = (jac @ jac.T).astype(np.float32)
    nan[0, 1] = nan[1, 0] = np.nan
    assert bool(jnp.all(jnp.isnan(run(weighting, nan)[0])))


def test_pref_vector_and_warm_start_state():
    jac = jacobian(4)
    gram = (jac @ jac.T).astype(np.float32)
    pref = np.arange(1.0, K + 1.0)
    w, state = run(mtl.dualproj(pref_vector=pref), gram)
    oracle = slsqp_lower_bounded(regularized(gram.astype(np.float64)), pref)
    np.testing.assert_allclose(np.asarray(w) @ jac, oracle @ jac, atol=1e-4 * np.abs(jac).max())
    up = mtl.upgrad()
    w1, state = run(up, gram)
    assert state.support.shape == (K, K)
    w2, _ = run(up, gram, state)  # warm start: same answer
    np.testing.assert_allclose(w2, w1, atol=1e-6)
    batched, _ = jax.jit(jax.vmap(up.update))(
        jnp.stack([gram, 2 * gram]), None, jax.vmap(lambda _: up.init(K))(jnp.arange(2))
    )
    np.testing.assert_allclose(batched, np.stack([w1, w1]), rtol=1e-4, atol=1e-6)


def test_bad_arguments_raise_clear_errors():
    for name in ("upgrad", "dualproj"):
        make = getattr(mtl, name)
        with pytest.raises(ValueError, match="reg_eps"):
            make(reg_eps=-1e-4)
        with pytest.raises(ValueError, match="norm_eps"):
            make(norm_eps=float("nan"))
        with pytest.raises(TypeError, match="norm_eps"):
            make(norm_eps=True)
        with pytest.raises(ValueError, match="pref_vector"):
            make(pref_vector=[1.0, np.inf])
        with pytest.raises(ValueError, match="pref_vector.*3 entries.*2 tasks"):
            make(pref_vector=[1.0, 2.0, 3.0]).init(2)
        with pytest.raises(ValueError, match="max_iters"):
            make(max_iters=0)
        w = make()
        with pytest.raises(TypeError, match="init"):
            w.update(jnp.eye(2), None, None)
        with pytest.raises(ValueError, match="init\\(3\\)"):
            w.update(jnp.eye(3), None, w.init(2))
    with pytest.raises(ValueError, match="`lower` must have shape"):
        mtl.lower_bounded_qp(jnp.eye(2), jnp.ones(3))

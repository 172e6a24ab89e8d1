"""The shared QP solver at extreme scales: norm spreads up to 10⁸, global scales 1e-30…1e30.

Oracles: the KKT conditions checked in float64 on the Gram as given, and the update of a
float64 solve of the same problem (the float32 gradients cast to float64) whose own KKT
conditions are checked first.
"""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import mtl_optax as mtl
from mtl_optax.gram import weights_from_gradients

SETTINGS = settings(max_examples=15, deadline=None, derandomize=True)
TASKS = st.sampled_from([3, 8])  # two shapes: one compilation each

solve = jax.jit(mtl.min_norm_weights)
_mgda = mtl.mgda()
mgda_tier = jax.jit(lambda g: weights_from_gradients(_mgda, g, None, _mgda.init(g.shape[0]))[0])


def spread_jacobian(seed, k, dim, log10_spread, log10_min_norm):
    """K random unit directions with norms log-uniform over the spread, smallest ≥ 10^min."""
    rng = np.random.default_rng(seed)
    jac = rng.normal(size=(k, dim))
    jac /= np.linalg.norm(jac, axis=1, keepdims=True)
    exps = rng.uniform(0.0, log10_spread, size=k)
    exps[rng.integers(k)] = 0.0
    exps[rng.integers(k)] = log10_spread
    return (jac * 10.0 ** (exps + log10_min_norm)[:, None]).astype(np.float32)


def kkt_violation(gram, x, primary, offset):
    """Largest KKT violation of min ‖Σ(x+b)g‖², x ≥ 0, Σ_P x = 1, relative to its rounding.

    Stationarity: ``r = G(x + b) − μ c ≥ 0`` with equality on the support; measured in the
    Jacobi-scaled variables where every entry has the same rounding (``ε Σ|x̂ + b̂|``).
    """
    d = 1 / np.sqrt(np.maximum(np.diag(gram), np.finfo(np.float64).tiny))
    g_hat = gram * d[:, None] * d[None, :]
    y_hat = (x + offset) / d
    grad = g_hat @ y_hat  # = d ⊙ G(x + b)
    c_hat = primary * d
    support = x > 0
    mu = 0.0
    if primary.any():  # μ from the support's stationarity (least squares over the support)
        on = support & primary
        mu = np.sum(grad[on] * c_hat[on]) / max(np.sum(c_hat[on] ** 2), 1e-300) if on.any() else 0
    reduced = grad - mu * c_hat
    size = np.sum(np.abs(y_hat))
    violation = max(-reduced.min(), np.abs(reduced[support]).max() if support.any() else 0.0)
    return violation / size, x.min(), abs(x[primary].sum() - 1) if primary.any() else 0.0


def solve64(jac32, primary, offset=None):
    with jax.enable_x64(True):
        jac = jac32.astype(np.float64)
        gram = jac @ jac.T
        b = None if offset is None else jnp.asarray(offset, jnp.float64)
        x = np.asarray(solve(jnp.asarray(gram), jnp.asarray(primary), offset=b))
    violation, x_min, eq = kkt_violation(
        gram, x, primary, np.zeros(len(x)) if b is None else offset
    )
    assert violation < 1e-11 and x_min >= 0 and eq < 1e-12, (violation, x_min, eq)
    return x


@SETTINGS
@given(
    seed=st.integers(0, 2**31),
    k=TASKS,
    log10_spread=st.floats(0.0, 8.0),
    log10_min=st.floats(-30.0, 22.0),
)
def test_mgda_update_exact_at_any_spread_and_scale(seed, k, log10_spread, log10_min):
    """u relative error ≤ 1e-4 against float64, non-conflicting, through the tier's rescaling."""
    jac = spread_jacobian(seed, k, 40, log10_spread, log10_min)
    w = np.asarray(mgda_tier(jnp.asarray(jac)), np.float64)
    x64 = solve64(jac, np.ones(k, bool))
    jac64 = jac.astype(np.float64)
    u, u64 = w @ jac64, x64 @ jac64
    assert np.linalg.norm(u - u64) <= 1e-4 * np.linalg.norm(u64)
    cosines = (jac64 @ u) / (np.linalg.norm(jac64, axis=1) * np.linalg.norm(u))
    assert cosines.min() >= -1e-5  # non-conflicting to float precision


@SETTINGS
@given(
    seed=st.integers(0, 2**31),
    k=TASKS,
    log10_spread=st.floats(0.0, 8.0),
    num_primary=st.integers(0, 3),
)
def test_kkt_on_the_float32_gram_as_given(seed, k, log10_spread, num_primary):
    """The float32 solution satisfies the KKT conditions of the float32 Gram to float precision.

    ``num_primary = 0`` is the lower-bounded QP (offset ``e_0``, no equality constraint).
    """
    jac = spread_jacobian(seed, k, 30, log10_spread, -4.0)
    gram32 = jnp.asarray(jac) @ jnp.asarray(jac).T
    primary = np.zeros(k, bool)
    primary[: min(num_primary, k)] = True
    offset = None if num_primary else np.eye(k)[0]
    x = solve(gram32, jnp.asarray(primary), offset=None if offset is None else jnp.asarray(offset))
    x = np.asarray(x, np.float64)
    b = np.zeros(k) if offset is None else offset
    violation, x_min, eq = kkt_violation(np.asarray(gram32, np.float64), x, primary, b)
    assert x_min >= 0 and eq < 1e-5
    assert violation < 1e-5, violation
    # and the update matches the float64 solve of the same problem
    x64 = solve64(jac, primary, offset)
    u, u64 = (x + b) @ jac.astype(np.float64), (x64 + b) @ jac.astype(np.float64)
    assert np.linalg.norm(u - u64) <= 1e-4 * np.linalg.norm(u64)


def test_audit_example_four_scales():
    """Unit random directions scaled by [1e-3, 1e-1, 1e1, 1e3]: ‖u‖ must match float64."""
    rng = np.random.default_rng(0)
    jac = rng.normal(size=(4, 20))
    jac = jac / np.linalg.norm(jac, axis=1, keepdims=True) * [[1e-3], [1e-1], [1e1], [1e3]]
    jac = jac.astype(np.float32)
    x = np.asarray(mtl.min_norm_weights(jnp.asarray(jac @ jac.T), jnp.ones(4, bool)), np.float64)
    x64 = solve64(jac, np.ones(4, bool))
    u, u64 = x @ jac.astype(np.float64), x64 @ jac.astype(np.float64)
    np.testing.assert_allclose(np.linalg.norm(u), np.linalg.norm(u64), rtol=1e-5)


@settings(max_examples=10, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31), log10_spread=st.floats(0.0, 8.0))
def test_float64_exact_to_1e12(seed, log10_spread):
    jac = spread_jacobian(seed, 6, 30, log10_spread, -3.0).astype(np.float64)
    jac += (
        1e-3
        * np.random.default_rng(seed).normal(size=jac.shape)
        * np.linalg.norm(jac, axis=1, keepdims=True)
    )
    with jax.enable_x64(True):
        x = np.asarray(solve(jnp.asarray(jac @ jac.T), jnp.ones(6, bool)))
    violation, x_min, eq = kkt_violation(jac @ jac.T, x, np.ones(6, bool), np.zeros(6))
    assert x.dtype == np.float64 and violation < 1e-12 and x_min >= 0 and eq < 1e-13


def test_rank_deficient_and_duplicated_tasks_at_a_spread_stay_finite():
    jac = spread_jacobian(3, 5, 20, 8.0, -4.0)
    dup = np.vstack([jac, jac[[0, 4]], 1e3 * jac[[2]]])  # duplicated and parallel tasks
    # rank 2 (a float32 Gram cannot hold a second direction 10⁸ times weaker: spread 10²)
    pair = spread_jacobian(4, 2, 20, 2.0, 0.0)
    low_rank = (np.random.default_rng(0).normal(size=(6, 2)) @ pair).astype(np.float32)
    for j in (dup, low_rank):
        k = j.shape[0]
        x = np.asarray(solve(jnp.asarray(j @ j.T), jnp.ones(k, bool)), np.float64)
        assert np.all(np.isfinite(x)) and x.min() >= 0 and abs(x.sum() - 1) < 1e-5
        x64 = solve64(j, np.ones(k, bool))
        u, u64 = x @ j.astype(np.float64), x64 @ j.astype(np.float64)
        scale = np.linalg.norm(j, axis=1).min()
        assert np.linalg.norm(u - u64) <= 1e-4 * max(np.linalg.norm(u64), scale)


def test_mgda_loss_plus_with_a_tiny_loss():
    """A loss of 1e-11 is a scale like any other: the update equals the float64 solution."""
    rng = np.random.default_rng(2)
    jac = rng.normal(size=(3, 10)).astype(np.float32)
    losses = np.array([1e-11, 1.0, 3.0])
    norms = np.linalg.norm(jac.astype(np.float64), axis=1)
    scaled = (jac / (losses * norms)[:, None]).astype(np.float32)
    alpha = solve64(scaled, np.ones(3, bool))
    expected = (alpha / (losses * norms)) @ jac.astype(np.float64)
    w = mtl.mgda(normalization="loss+")
    weights, _ = w.update(jnp.asarray(jac @ jac.T), jnp.asarray(losses, jnp.float32), w.init(3))
    u = np.asarray(weights, np.float64) @ jac.astype(np.float64)
    np.testing.assert_allclose(u, expected, rtol=1e-4, atol=1e-4 * np.linalg.norm(expected))

"""SDMGrad and MoDo against NumPy transcriptions (bisection simplex projection)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtl_optax as mtl
from mtl_optax.weighting.two_batch import project_to_simplex


def simplex_numpy(y):
    """Projection by bisection on θ in Σ max(y − θ, 0) = 1 (independent of the sort method)."""
    lo, hi = y.min() - 1.0, y.max()
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if np.maximum(y - mid, 0).sum() > 1 else (lo, mid)
    return np.maximum(y - (lo + hi) / 2, 0)


def test_simplex_projection():
    rng = np.random.default_rng(0)
    for _ in range(5):
        y = rng.normal(size=6) * 3
        np.testing.assert_allclose(project_to_simplex(jnp.asarray(y)), simplex_numpy(y), atol=1e-6)
    # entries ~1e30 (MoDo's step on a Gram of ~1e31) absorb the "− 1" of the count; more than
    # 1 apart, the projection is the vertex of the largest entry
    for dtype in (jnp.float32, jnp.float64):
        with jax.enable_x64(dtype == jnp.float64):
            y = jnp.asarray([-2e30, -1e30, -3e30], dtype)
            np.testing.assert_array_equal(project_to_simplex(y), [0.0, 1.0, 0.0])


def crosses(seed, k=3, steps=4):
    rng = np.random.default_rng(seed)
    j1, j2 = rng.normal(size=(steps, k, 9)), rng.normal(size=(steps, k, 9))
    return np.einsum("tkn,tln->tkl", j1, j2)


def test_sdmgrad_and_modo_match_transcriptions():
    a_seq = crosses(1)
    k = a_seq.shape[1]
    sdm, modo = mtl.sdmgrad(), mtl.modo(gamma=0.2, rho=0.05)  # sdmgrad: weights times K
    s_sdm, s_modo = sdm.init(k), modo.init(k)
    w_ref, lam_ref = np.full(k, 1 / k), np.full(k, 1 / k)
    for a in a_seq:
        a32 = jnp.asarray(a, jnp.float32)
        got_sdm, s_sdm = jax.jit(sdm.update)(jnp.eye(k), None, s_sdm, cross_gram=a32)
        got_modo, s_modo = jax.jit(modo.update)(jnp.eye(k), None, s_modo, cross_gram=a32)
        scaled = a / np.mean(np.sqrt(np.maximum(np.diag(a), 0))) ** 2
        mean, velocity = np.full(k, 1 / k), None
        for _ in range(20):
            grad = scaled @ (w_ref + 0.3 * mean)
            velocity = grad if velocity is None else 0.5 * velocity + grad
            w_ref = simplex_numpy(w_ref - 10.0 * velocity)
        np.testing.assert_allclose(got_sdm, k * (w_ref + 0.3 * mean) / 1.3, atol=1e-5)
        lam_ref = simplex_numpy(lam_ref - 0.2 * (a @ lam_ref + 0.05 * lam_ref))
        np.testing.assert_allclose(got_modo, lam_ref, atol=1e-5)


def test_without_cross_gram_is_an_error_unless_single_batch_and_cross_task_gram():
    rng = np.random.default_rng(2)
    j1, j2 = rng.normal(size=(3, 5)), rng.normal(size=(3, 5))
    cross = mtl.cross_task_gram({"a": jnp.asarray(j1)}, {"a": jnp.asarray(j2)})
    np.testing.assert_allclose(cross, j1 @ j2.T, rtol=1e-5)
    gram = jnp.asarray(j1 @ j1.T, jnp.float32)
    for name in ("modo", "sdmgrad"):
        with pytest.raises(ValueError, match=f"cross_gram=A.*{name}\\(single_batch=True\\)"):
            getattr(mtl, name)().update(gram, None, getattr(mtl, name)().init(3))
        with pytest.raises(ValueError, match="cross_gram"):  # under jit too: a trace-time check
            w = getattr(mtl, name)()
            jax.jit(w.update)(gram, None, w.init(3))
        w = getattr(mtl, name)(single_batch=True)
        np.testing.assert_allclose(
            w.update(gram, None, w.init(3))[0],
            w.update(jnp.zeros((3, 3)), None, w.init(3), cross_gram=gram)[0],
        )
        with pytest.raises(ValueError, match="cross_gram"):
            w.update(gram, None, w.init(3), cross_gram=jnp.eye(2))
        with pytest.raises(TypeError, match="single_batch"):
            getattr(mtl, name)(single_batch=1)
    with pytest.raises(ValueError, match="momentum"):
        mtl.sdmgrad(momentum=1.0)
    with pytest.raises(ValueError, match="gamma"):
        mtl.modo(gamma=0.0)

"""weight_decay_constraint: KKT of the one-auxiliary projection, equality with primary_auxiliary."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtl_optax as mtl


@pytest.mark.parametrize("seed", range(6))
def test_projection_is_the_primary_auxiliary_solution(seed):
    rng = np.random.default_rng(seed)
    params = {
        "w": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=4), jnp.float32),
    }
    grads = jax.tree_util.tree_map(
        lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32) - 0.5 * p, params
    )
    t = mtl.weight_decay_constraint()
    u, _ = t.update(grads, t.init(params), params)
    flat = lambda tree: np.concatenate(
        [np.ravel(x) for x in jax.tree_util.tree_leaves(tree)]
    ).astype(np.float64)
    g, theta, u = flat(grads), flat(params), flat(u)
    lam = max(-g @ theta, 0.0) / (theta @ theta)
    np.testing.assert_allclose(u, g + lam * theta, rtol=1e-5, atol=1e-6)
    assert u @ theta >= -1e-4  # ½‖θ‖² does not increase along −u
    assert abs(lam * (u @ theta)) <= 1e-4  # complementary slackness
    assert u @ g == pytest.approx(u @ u, rel=1e-4)
    jac = np.stack([g, theta])
    x = mtl.min_norm_weights(jnp.asarray(jac @ jac.T, jnp.float32), jnp.array([True, False]))
    np.testing.assert_allclose(x[1], lam, rtol=1e-4, atol=1e-7)


def test_mask_zero_params_and_missing_params():
    params = {"w": jnp.ones((2, 2)), "b": jnp.zeros(2)}
    grads = {"w": -jnp.ones((2, 2)), "b": jnp.ones(2)}
    t = mtl.weight_decay_constraint(mask={"w": True, "b": False})
    u, _ = t.update(grads, t.init(params), params)
    np.testing.assert_allclose(u["w"], 0.0, atol=1e-7)  # g = −θ: the projection removes it
    np.testing.assert_allclose(u["b"], grads["b"])
    zero = jax.tree_util.tree_map(jnp.zeros_like, params)
    u, _ = jax.jit(t.update)(grads, t.init(zero), zero)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(u))
    with pytest.raises(ValueError, match="needs `params`"):
        t.update(grads, t.init(params))

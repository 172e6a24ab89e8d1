"""Tiers 1 and 2 (weighted_value_and_grad) against tier 3 and jax.grad."""

import jax
import jax.numpy as jnp
import numpy as np

import mtl_optax as mtl
from tests import models


def test_tier1_grads_equal_grad_of_weighted_sum():
    params = models.init_params(jax.random.PRNGKey(0))
    batch = models.make_batch(jax.random.PRNGKey(1))
    weighting = mtl.constant_weighting([0.5, 2.0, 1.0])
    out = jax.jit(mtl.weighted_value_and_grad(models.encode, models.heads, weighting))(
        params, batch, weighting.init(models.K)
    )
    expected = jax.grad(lambda p: jnp.array([0.5, 2.0, 1.0]) @ models.task_losses(p, batch))(params)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), out.grads, expected
    )
    np.testing.assert_allclose(out.losses, models.task_losses(params, batch), rtol=1e-6)


def test_tier2_equals_tier3_when_z_is_the_shared_parameters():
    """With encode(params) = shared params, the feature Gram is the parameter Gram."""
    params = models.init_params(jax.random.PRNGKey(2))
    batch = models.make_batch(jax.random.PRNGKey(3))

    def encode(p, b):
        return p["trunk"]

    def heads(p, z, b):
        return models.task_losses({"trunk": z, "heads": p["heads"]}, b)

    for weighting in (mtl.mgda(), mtl.gradient_normalized(), mtl.primary_auxiliary(primary=1)):
        tier2 = mtl.weighted_value_and_grad(encode, heads, weighting)(
            params, batch, weighting.init(models.K)
        )
        losses, task_grads = mtl.value_and_jacobian(models.task_losses)(params, batch)
        transform = mtl.aggregate(weighting, num_tasks=models.K, shared=models.SHARED)
        updates, state = transform.update(
            task_grads, transform.init(params), params, task_losses=losses
        )
        np.testing.assert_allclose(tier2.weights, state.weights, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(
            tier2.grads["trunk"]["w"], updates["trunk"]["w"], rtol=1e-4, atol=1e-6
        )


def test_tier2_feature_gram_is_gram_of_feature_gradients():
    params = models.init_params(jax.random.PRNGKey(4))
    batch = models.make_batch(jax.random.PRNGKey(5))
    z = models.encode(params, batch)
    jz = jax.jacrev(lambda z_: models.heads(params, z_, batch))(z).reshape(models.K, -1)
    weighting = mtl.mgda()
    out = mtl.weighted_value_and_grad(models.encode, models.heads, weighting)(
        params, batch, weighting.init(models.K)
    )
    expected, _ = weighting.update(jz @ jz.T, None, weighting.init(models.K))
    np.testing.assert_allclose(out.weights, expected, atol=1e-6)
    assert bool(jnp.all(jnp.isfinite(out.weights)))

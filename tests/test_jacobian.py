"""value_and_jacobian: every strategy equals jax.jacrev and per-task jax.grad."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtl_optax as mtl
from tests import models


@pytest.mark.parametrize(
    "strategy,chunk", [("auto", None), ("vmap", None), ("map", None), ("chunked", 2)]
)
def test_strategies_match_jacrev_and_grad(strategy, chunk):
    params = models.init_params(jax.random.PRNGKey(0))
    batch = models.make_batch(jax.random.PRNGKey(1))
    fn = jax.jit(mtl.value_and_jacobian(models.task_losses, strategy=strategy, chunk_size=chunk))
    losses, task_grads = fn(params, batch)
    assert isinstance(task_grads, mtl.TaskGradients)
    grads = task_grads.tree
    np.testing.assert_allclose(losses, models.task_losses(params, batch), rtol=1e-6)
    reference = jax.jacrev(models.task_losses)(params, batch)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), grads, reference
    )
    for i in range(models.K):
        g_i = jax.grad(lambda p, i=i: models.task_losses(p, batch)[i])(params)
        jax.tree_util.tree_map(
            lambda a, b, i=i: np.testing.assert_allclose(a[i], b, rtol=1e-5, atol=1e-6),
            grads,
            g_i,
        )


def test_has_aux_and_bf16_params():
    params = jax.tree_util.tree_map(
        lambda x: x.astype(jnp.bfloat16), models.init_params(jax.random.PRNGKey(0))
    )
    batch = jax.tree_util.tree_map(
        lambda x: x.astype(jnp.bfloat16), models.make_batch(jax.random.PRNGKey(1))
    )

    def with_aux(p, b):
        losses = models.task_losses(p, b)
        return losses, {"total": jnp.sum(losses)}

    (losses, aux), grads = mtl.value_and_jacobian(with_aux, has_aux=True)(params, batch)
    assert float(aux["total"]) == pytest.approx(float(jnp.sum(losses)), rel=1e-2)
    assert (
        grads["trunk"]["w"].shape == (models.K, 5, 4) and grads["trunk"]["w"].dtype == jnp.bfloat16
    )


def test_bad_arguments():
    with pytest.raises(ValueError, match="strategy"):
        mtl.value_and_jacobian(models.task_losses, strategy="jacfwd")
    with pytest.raises(ValueError, match="chunk_size"):
        mtl.value_and_jacobian(models.task_losses, strategy="chunked")
    params = models.init_params(jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="1-D array of K task losses"):
        mtl.value_and_jacobian(lambda p, b: jnp.sum(models.task_losses(p, b)))(
            params, models.make_batch(jax.random.PRNGKey(1))
        )

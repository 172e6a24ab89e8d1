"""value_and_jacobian: every strategy equals jax.jacrev and per-task jax.grad; bad outputs."""

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


def test_dict_losses_name_the_tasks():
    params = models.init_params(jax.random.PRNGKey(0))
    batch = models.make_batch(jax.random.PRNGKey(1))
    named = lambda p, b: dict(zip(models.NAMES, models.task_losses(p, b)))  # noqa: E731
    losses, task_grads = jax.jit(mtl.value_and_jacobian(named))(params, batch)
    np.testing.assert_allclose(losses, models.task_losses(params, batch), rtol=1e-6)
    assert task_grads.names == models.NAMES


def test_bad_arguments_and_outputs():
    params = models.init_params(jax.random.PRNGKey(0))
    batch = models.make_batch(jax.random.PRNGKey(1))
    with pytest.raises(ValueError, match="strategy"):
        mtl.value_and_jacobian(models.task_losses, strategy="jacfwd")
    with pytest.raises(ValueError, match="chunk_size"):
        mtl.value_and_jacobian(models.task_losses, strategy="chunked")
    with pytest.raises(ValueError, match="only used by strategy='chunked'"):
        mtl.value_and_jacobian(models.task_losses, strategy="map", chunk_size=2)
    with pytest.raises(ValueError, match="1-D array of K task losses"):
        mtl.value_and_jacobian(lambda p, b: jnp.sum(models.task_losses(p, b)))(params, batch)
    with pytest.raises(TypeError, match="dtype int32.*real floating point"):
        mtl.value_and_jacobian(lambda p, b: models.task_losses(p, b).astype(jnp.int32))(
            params, batch
        )
    with pytest.raises(TypeError, match="returned a tuple.*has_aux=True"):
        mtl.value_and_jacobian(lambda p, b: (models.task_losses(p, b), 1.0))(params, batch)
    with pytest.raises(TypeError, match="has_aux=True, so it must return a pair"):
        mtl.value_and_jacobian(models.task_losses, has_aux=True)(params, batch)
    with pytest.raises(TypeError, match="`has_aux` must be a bool"):
        mtl.value_and_jacobian(models.task_losses, has_aux=1)
    with pytest.raises(ValueError, match="loss 'a' of shape"):
        mtl.value_and_jacobian(lambda p, b: {"a": models.task_losses(p, b)})(params, batch)

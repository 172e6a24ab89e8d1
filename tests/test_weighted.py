"""Tiers 1 and 2 of the whole model (value_and_grad) against tier 3 and jax.grad."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtl_optax as mtl
from tests import models, zoo

K = models.K


def setup(seed=0):
    return models.init_params(jax.random.PRNGKey(seed)), models.make_batch(
        jax.random.PRNGKey(seed + 1)
    )


def test_tier1_grads_equal_grad_of_weighted_sum():
    params, batch = setup()
    grad_fn = mtl.value_and_grad(
        models.task_losses, mtl.constant_weighting([0.5, 2.0, 1.0]), tasks=K, shared=models.SHARED
    )
    losses, grads, state = jax.jit(grad_fn)(params, batch, grad_fn.init(params))
    expected = jax.grad(lambda p: jnp.array([0.5, 2.0, 1.0]) @ models.task_losses(p, batch))(params)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), grads, expected
    )
    np.testing.assert_allclose(losses, models.task_losses(params, batch), rtol=1e-6)
    np.testing.assert_allclose(mtl.task_weights(state), [0.5, 2.0, 1.0])


GRAM_WEIGHTINGS = sorted(n for n, m in zoo.WEIGHTINGS.items() if m(K).needs_gram)
# One weighting of each way the structured path can differ from the columns: diagonal-only
# Gram, heads scaled by w, homogeneity None (no rescaling) or ≠ 0, solver warm start, random
# and smoothing state. The solvers themselves are the same code on both paths.
STRUCTURED = ("gradient_normalized", "gradnorm", "mgda", "nash_mtl", "modo", "pcgrad", "cr_mogm")


@pytest.mark.parametrize(
    "name, gram",
    [(n, "columns") for n in GRAM_WEIGHTINGS] + [(n, "structured") for n in STRUCTURED],
)
def test_bounded_whole_model_equals_value_and_jacobian_plus_aggregate(name, gram):
    """A Gram weighting gets the exact Gram of the shared leaves without the Jacobian, column
    by column or from the structured engine."""
    params, batch = setup(2)
    weighting = zoo.WEIGHTINGS[name](K)
    grad_fn = mtl.value_and_grad(
        models.task_losses, weighting, tasks=K, shared=models.SHARED, gram=gram, chunk_size=2
    )
    _, grads, state = jax.jit(grad_fn)(params, batch, grad_fn.init(params))
    losses, task_grads = mtl.value_and_jacobian(models.task_losses)(params, batch)
    transform = mtl.aggregate(weighting, tasks=K, shared=models.SHARED)
    updates, expected = transform.update(
        task_grads, transform.init(params), params, task_losses=losses
    )
    rtol = zoo.PATH_RTOL.get(name, 1e-5)
    np.testing.assert_allclose(state.weights, expected.weights, rtol=rtol, atol=1e-6)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=10 * rtol, atol=1e-6), grads, updates
    )


def test_named_losses_and_errors():
    params, batch = setup(4)
    named = lambda p, b: dict(zip(models.NAMES, models.task_losses(p, b)))  # noqa: E731
    grad_fn = mtl.value_and_grad(named, mtl.mean_weighting(), tasks=list(models.NAMES), shared=True)
    _, _, state = grad_fn(params, batch, grad_fn.init(params))
    assert list(mtl.task_weights(state)) == list(models.NAMES)
    wrong = mtl.value_and_grad(named, mtl.mean_weighting(), tasks=["x", "y", "z"], shared=True)
    with pytest.raises(ValueError, match=r"losses hold tasks \['a', 'b', 'c'\]"):
        wrong(params, batch, wrong.init(params))
    with pytest.raises(ValueError, match="needs `shared=`"):
        mtl.value_and_grad(models.task_losses, mtl.mgda(), tasks=K)
    with pytest.raises(TypeError, match="needs tier 3"):
        mtl.value_and_grad(models.task_losses, mtl.db_mtl(), tasks=K, shared=True)
    four = mtl.value_and_grad(models.task_losses, mtl.mean_weighting(), tasks=4, shared=True)
    with pytest.raises(ValueError, match=r"tasks=4.*returned 3 losses"):
        four(params, batch, four.init(params))

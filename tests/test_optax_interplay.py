"""aggregate composes with optax wrappers (the README quick-start runs in test_doc_snippets)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mtl_optax as mtl
from tests import models


def _train(inner, steps):
    params = models.init_params(jax.random.PRNGKey(0))
    batch = models.make_batch(jax.random.PRNGKey(1))
    opt = optax.chain(mtl.aggregate(mtl.mgda(), tasks=models.K, shared=models.SHARED), inner)
    state = opt.init(params)
    jac_fn = mtl.value_and_jacobian(models.task_losses)

    @jax.jit
    def step(params, state, poison):
        losses, grads = jac_fn(params, batch)
        grads = jax.tree_util.tree_map(lambda g: g * poison, grads)
        updates, state = opt.update(grads, state, params, task_losses=losses)
        return optax.apply_updates(params, updates), state, losses

    history = []
    for i in range(steps):
        poison = jnp.nan if i == 3 else 1.0  # one step with non-finite gradients
        params, state, losses = step(params, state, poison)
        history.append(np.asarray(losses))
    return params, np.array(history)


def test_apply_if_finite_after_aggregate_skips_the_bad_step():
    params, history = _train(optax.apply_if_finite(optax.adam(1e-2), 5), steps=30)
    assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(params))
    assert np.all(history[-1] < history[0])


def test_multisteps_after_aggregate_accumulates_aggregated_updates():
    params = models.init_params(jax.random.PRNGKey(0))
    batch = models.make_batch(jax.random.PRNGKey(1))
    k_steps = 3
    opt = optax.chain(
        mtl.aggregate(mtl.mgda(), tasks=models.K, shared=models.SHARED),
        optax.MultiSteps(optax.sgd(0.1), every_k_schedule=k_steps),
    )
    state = opt.init(params)
    losses, grads = mtl.value_and_jacobian(models.task_losses)(params, batch)
    total = None
    for _ in range(k_steps):
        updates, state = opt.update(grads, state, params, task_losses=losses)
        total = updates if total is None else jax.tree_util.tree_map(jnp.add, total, updates)
    # Same micro-batch k times: the accumulated step equals one SGD step on the aggregate.
    single = optax.chain(
        mtl.aggregate(mtl.mgda(), tasks=models.K, shared=models.SHARED), optax.sgd(0.1)
    )
    expected, _ = single.update(grads, single.init(params), params)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), total, expected
    )

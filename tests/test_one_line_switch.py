"""Methods train through the split and the whole model by changing one constructor, and
report their weights with task_weights.

Every weighting of the zoo already goes through both paths with one constructor in
``tests/test_head_rule.py`` (split tiers 1/2/3 and the whole model, task weights by name)
and trains for several steps through ``aggregate`` in ``tests/test_checkpointing.py``; here
every stacked aggregator, and one weighting of each kind (losses only, Gram, losses with
learned state), train five steps through both paths with the same code.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtl_optax as mtl
from tests import models, zoo

K = models.K


def train(method, steps=5):
    """The same training code for every method: only `method` changes."""
    params = models.init_params(jax.random.PRNGKey(0))
    split_opt = optax.chain(mtl.aggregate(method, tasks=list(models.NAMES)), optax.adam(1e-2))
    whole_opt = optax.chain(mtl.aggregate(method, tasks=K, shared=models.SHARED), optax.adam(1e-2))
    split_jac = mtl.split_value_and_jacobian(models.encode, models.NAMED_HEADS)
    whole_jac = mtl.value_and_jacobian(models.task_losses)

    @jax.jit
    def step(carry, batch):
        (p_split, s_split), (p_whole, s_whole) = carry
        losses, task_grads = split_jac(p_split, batch)
        updates, s_split = split_opt.update(task_grads, s_split, p_split, task_losses=losses)
        p_split = optax.apply_updates(p_split, updates)
        losses, task_grads = whole_jac(p_whole, batch)
        updates, s_whole = whole_opt.update(task_grads, s_whole, p_whole, task_losses=losses)
        return ((p_split, s_split), (optax.apply_updates(p_whole, updates), s_whole)), losses

    carry = ((params, split_opt.init(params)), (params, whole_opt.init(params)))
    for i in range(steps):
        carry, _ = step(carry, models.make_batch(jax.random.PRNGKey(i)))
    return params, carry


CASES = [*zoo.STACKED, "mean", "upgrad", "famo"]


@pytest.mark.parametrize("name", CASES)
def test_every_method_trains_through_the_split_and_the_whole_model(name):
    method = zoo.METHODS[name](K)
    start, ((p_split, s_split), (p_whole, s_whole)) = train(method)
    for params in (p_split, p_whole):
        leaves = jax.tree_util.tree_leaves(params)
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in leaves), name
        moved = jax.tree_util.tree_map(lambda a, b: bool(jnp.any(a != b)), params, start)
        assert moved["trunk"]["w"], f"{name}: the encoder did not move"
    named = mtl.task_weights(s_split)
    assert list(named) == list(models.NAMES)
    plain = np.asarray(mtl.task_weights(s_whole))
    assert plain.shape == (K,)
    has_weights = not isinstance(method, mtl.StackedAggregator) or method.has_weights
    if has_weights:
        assert np.all(np.isfinite(plain)) and all(np.isfinite(float(w)) for w in named.values())
    else:  # documented: no task weights
        assert np.all(np.isnan(plain))

"""Checkpoints restore every method's state bit for bit, and training resumes bit for bit.

For every entry of ``tests/zoo.py`` (through ``aggregate``), a few jitted Adam steps on the
tiny model of ``tests/models.py``; the ``(params, opt_state)`` pair after step 3 is saved
and restored with flax serialization (``to_bytes`` / ``from_bytes`` with a target) and with
orbax (``StandardCheckpointer``, restore with a target), and training continues from each
restored copy. Every leaf, its dtype and the pytree structure (NamedTuple types included)
must equal the live state, and the resumed runs must equal the uninterrupted run exactly
(``np.array_equal``).
"""

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import serialization

import mtl_optax as mtl
from tests import models, zoo

K = models.K
STEPS_BEFORE, STEPS_AFTER = 3, 3

CASES = list(zoo.METHODS)


def transform_for(name):
    return mtl.aggregate(zoo.METHODS[name](K), tasks=K, shared=models.SHARED)


def make_step(transform):
    opt = optax.chain(transform, optax.adam(1e-2))

    @jax.jit
    def step(params, opt_state, batch):
        losses, task_grads = mtl.value_and_jacobian(models.task_losses)(params, batch)
        updates, opt_state = opt.update(task_grads, opt_state, params, task_losses=losses)
        return optax.apply_updates(params, updates), opt_state

    return opt, step


def run(step, carry, batches):
    for batch in batches:
        carry = step(*carry, batch)
    return carry


def _plain_key(x):
    """A typed PRNG key (nnx's RNG streams) as its integer data; anything else unchanged."""
    dtype = getattr(x, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return jax.random.key_data(x)
    return x


def assert_identical(actual, expected):
    assert jax.tree_util.tree_structure(actual) == jax.tree_util.tree_structure(expected)
    for a, e in zip(jax.tree_util.tree_leaves(actual), jax.tree_util.tree_leaves(expected)):
        a, e = (np.asarray(_plain_key(x)) for x in (a, e))
        assert a.dtype == e.dtype and a.shape == e.shape
        np.testing.assert_array_equal(a, e)


@pytest.mark.parametrize("name", CASES)
def test_checkpoint_restores_and_resumes_bit_identically(name, tmp_path):
    opt, step = make_step(transform_for(name))
    params = models.init_params(jax.random.PRNGKey(0))
    batches = [models.make_batch(jax.random.PRNGKey(i)) for i in range(STEPS_BEFORE + STEPS_AFTER)]
    saved = run(step, (params, opt.init(params)), batches[:STEPS_BEFORE])
    target = (params, opt.init(params))  # the structure and dtypes, values overwritten

    from_flax = serialization.from_bytes(target, serialization.to_bytes(saved))
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "ckpt", saved)
    checkpointer.wait_until_finished()
    from_orbax = checkpointer.restore(tmp_path / "ckpt", target)
    checkpointer.close()

    uninterrupted = run(step, saved, batches[STEPS_BEFORE:])
    for restored in (from_flax, from_orbax):
        assert_identical(restored, saved)
        assert_identical(run(step, restored, batches[STEPS_BEFORE:]), uninterrupted)


def test_nnx_model_and_optimizer_resume_bit_identically_with_orbax(tmp_path):
    """nnx: the model (with its dropout RNG) and nnx.Optimizer (holding aggregate's state)
    saved with orbax as nnx.state, restored into fresh objects, resume bit for bit."""
    import jax.numpy as jnp
    from flax import nnx

    import mtl_optax.flax_nnx as mtl_nnx

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.encoder = nnx.Linear(5, 8, rngs=rngs)
            self.dropout = nnx.Dropout(0.2, rngs=rngs)
            self.heads = nnx.Linear(8, K, rngs=rngs)

    def make():
        model = Model(nnx.Rngs(0, dropout=1))
        tx = optax.chain(mtl.aggregate(mtl.upgrad(), tasks=list(models.NAMES)), optax.adam(1e-2))
        return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

    heads = {
        name: lambda m, z, b, i=i: jnp.mean((m.heads(z)[:, i] - b[1][:, i]) ** 2)
        for i, name in enumerate(models.NAMES)
    }
    jac = mtl_nnx.split_value_and_jacobian(lambda m, b: m.dropout(nnx.relu(m.encoder(b[0]))), heads)

    @nnx.jit
    def step(model, optimizer, batch):
        losses, task_grads = jac(model, batch)
        optimizer.update(model, task_grads, task_losses=losses)
        return losses

    batches = [models.make_batch(jax.random.PRNGKey(i)) for i in range(6)]
    model, optimizer = make()
    for batch in batches[:3]:
        step(model, optimizer, batch)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "nnx", {"model": nnx.state(model), "opt": nnx.state(optimizer)})
    checkpointer.wait_until_finished()
    model2, optimizer2 = make()
    target = {"model": nnx.state(model2), "opt": nnx.state(optimizer2)}
    restored = checkpointer.restore(tmp_path / "nnx", target)
    checkpointer.close()
    nnx.update(model2, restored["model"])
    nnx.update(optimizer2, restored["opt"])
    assert mtl.task_weights(optimizer2) == mtl.task_weights(optimizer)
    for batch in batches[3:]:
        np.testing.assert_array_equal(
            step(model, optimizer, batch), step(model2, optimizer2, batch)
        )
    assert_identical(nnx.state(model2), nnx.state(model))

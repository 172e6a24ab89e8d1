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


def assert_identical(actual, expected):
    assert jax.tree_util.tree_structure(actual) == jax.tree_util.tree_structure(expected)
    for a, e in zip(jax.tree_util.tree_leaves(actual), jax.tree_util.tree_leaves(expected)):
        a, e = np.asarray(a), np.asarray(e)
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

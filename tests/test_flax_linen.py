"""flax linen TrainState: apply_gradients takes TaskGradients; one call with task_losses."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax.training import train_state

import mtl_optax as mtl

K, D_IN, WIDTH, B = 3, 6, 8, 16


class Model(nn.Module):
    def setup(self):
        self.trunk = nn.Dense(WIDTH)
        self.heads = nn.Dense(K)

    def encode(self, x):
        return nn.tanh(self.trunk(x))

    def __call__(self, x):
        return self.heads(self.encode(x))


MODEL = Model()


def encode(params, batch):
    return MODEL.apply({"params": params}, batch[0], method=Model.encode)


def head(i):
    """Task i: column i of the Dense(K) head on its own copy of the features."""

    def loss(params, z, batch):
        w, b = params["heads"]["kernel"][:, i], params["heads"]["bias"][i]
        return jnp.mean((z @ w + b - batch[1][:, i]) ** 2)

    return loss


HEADS = [head(i) for i in range(K)]


def setup(weighting):
    kx, ky, kp = jax.random.split(jax.random.key(0), 3)
    batch = jax.random.normal(kx, (B, D_IN)), jax.random.normal(ky, (B, K))
    params = MODEL.init(kp, batch[0])["params"]
    tx = optax.chain(mtl.aggregate(weighting, tasks=K), optax.adam(1e-2))
    state = train_state.TrainState.create(apply_fn=MODEL.apply, params=params, tx=tx)
    return state, tx, batch


JAC = mtl.split_value_and_jacobian(encode, HEADS)


@pytest.mark.parametrize(
    "weighting", [mtl.mgda(normalization="loss"), mtl.primary_auxiliary(primary=0)]
)
def test_apply_task_gradients_matches_the_plain_optax_loop_bit_for_bit(weighting):
    state, tx, batch = setup(weighting)

    @jax.jit
    def linen_step(state):
        losses, task_grads = JAC(state.params, batch)
        return mtl.apply_task_gradients(state, task_grads, task_losses=losses), losses

    @jax.jit
    def plain_step(params, opt_state):
        losses, task_grads = JAC(params, batch)
        updates, opt_state = tx.update(task_grads, opt_state, params, task_losses=losses)
        return optax.apply_updates(params, updates), opt_state, losses

    params, opt_state = state.params, tx.init(state.params)
    first = None
    for _ in range(15):
        state, losses = linen_step(state)
        params, opt_state, plain_losses = plain_step(params, opt_state)
        np.testing.assert_array_equal(losses, plain_losses)
        first = losses if first is None else first
    jax.tree_util.tree_map(np.testing.assert_array_equal, state.params, params)
    assert int(state.step) == 15
    assert float(losses[0]) < float(first[0])  # the primary task (or every task) improved


def test_apply_gradients_accepts_task_gradients_directly():
    """TaskGradients is a mapping: TrainState's `in grads` check no longer raises KeyError."""
    state, _, batch = setup(mtl.mgda())
    losses, task_grads = JAC(state.params, batch)
    assert "heads" in task_grads and set(task_grads.keys()) == {"trunk", "heads"}
    direct = state.apply_gradients(grads=task_grads)
    via_helper = mtl.apply_task_gradients(state, task_grads)
    jax.tree_util.tree_map(np.testing.assert_array_equal, direct.params, via_helper.params)
    with pytest.raises(TypeError, match="TrainState"):
        mtl.apply_task_gradients(state.params, task_grads)
    del losses


def test_a_missing_task_losses_points_to_apply_task_gradients():
    state, _, batch = setup(mtl.mgda(normalization="loss"))
    _, task_grads = JAC(state.params, batch)
    with pytest.raises(ValueError, match=r"linen: mtl.apply_task_gradients\(state, task_grads"):
        state.apply_gradients(grads=task_grads)

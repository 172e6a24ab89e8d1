"""flax.nnx: RNG streams and BatchNorm advance as under nnx.value_and_grad; nnx.Optimizer."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import mtl_optax as mtl
import mtl_optax.flax_nnx as mtl_nnx

K, D_IN, WIDTH, B = 3, 6, 8, 16


class Model(nnx.Module):
    def __init__(self, rngs, *, dropout=0.5, batch_norm=True):
        self.linear = nnx.Linear(D_IN, WIDTH, rngs=rngs)
        self.norm = nnx.BatchNorm(WIDTH, rngs=rngs) if batch_norm else None
        self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout else None
        self.heads = nnx.Linear(WIDTH, K, rngs=rngs)  # K stacked scalar heads

    def encode(self, x):
        h = self.linear(x)
        h = self.norm(h) if self.norm is not None else h
        h = nnx.relu(h)
        return self.dropout(h) if self.dropout is not None else h


def encode(model, batch):
    return model.encode(batch[0])


def heads(model, features, batch):  # task k reads only features[k]
    pred = jnp.einsum("kbd,dk->bk", features, model.heads.kernel[...]) + model.heads.bias[...]
    return jnp.mean((pred - batch[1]) ** 2, axis=0)


def task_losses(model, batch):
    return jnp.mean((model.heads(model.encode(batch[0])) - batch[1]) ** 2, axis=0)


def data(seed=0):
    kx, ky = jax.random.split(jax.random.key(seed))
    return jax.random.normal(kx, (B, D_IN)), jax.random.normal(ky, (B, K))


def non_key_state(model):
    return nnx.state(model, nnx.Not(nnx.RngKey))


@pytest.mark.parametrize("split", [True, False])
def test_rng_and_batch_stats_advance_as_under_value_and_grad(split):
    """Same forward, same RNG draws: sum weighting then equals nnx.value_and_grad of Σ L."""
    batch = data()
    ours, reference = Model(nnx.Rngs(0, dropout=1)), Model(nnx.Rngs(0, dropout=1))
    if split:
        jac = mtl_nnx.split_value_and_jacobian(encode, heads, num_tasks=K)
        tx = optax.chain(mtl.aggregate(mtl.sum_weighting(), num_tasks=K), optax.sgd(0.05))
    else:
        jac = mtl_nnx.value_and_jacobian(task_losses)
        tx = optax.chain(
            mtl.aggregate(mtl.sum_weighting(), num_tasks=K, shared=True), optax.sgd(0.05)
        )
    opt = nnx.Optimizer(ours, tx, wrt=nnx.Param)
    ref_opt = nnx.Optimizer(reference, optax.sgd(0.05), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, batch):
        losses, task_grads = jac(model, batch)
        opt.update(model, task_grads, task_losses=losses)
        return losses

    @nnx.jit
    def ref_step(model, opt, batch):
        loss, grads = nnx.value_and_grad(lambda m: jnp.sum(task_losses(m, batch)))(model)
        opt.update(model, grads)
        return loss

    for i in range(3):
        losses, loss = step(ours, opt, batch), ref_step(reference, ref_opt, batch)
        if i == 0:  # identical parameters: identical dropout mask, identical losses
            np.testing.assert_allclose(jnp.sum(losses), loss, rtol=1e-6)
    counts = jax.tree_util.tree_leaves(nnx.state(ours, nnx.RngCount))
    assert [int(c) for c in counts] == [3]
    jax.tree_util.tree_map(
        np.testing.assert_array_equal,
        nnx.state(ours, nnx.RngCount),
        nnx.state(reference, nnx.RngCount),
    )
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        non_key_state(ours),
        non_key_state(reference),
    )


def test_two_steps_draw_different_dropout_masks():
    model = Model(nnx.Rngs(0, dropout=1), batch_norm=False)
    batch = data(1)
    jac = nnx.jit(mtl_nnx.split_value_and_jacobian(encode, heads, num_tasks=K))
    first, _ = jac(model, batch)  # no update: only the mask can change the losses
    second, _ = jac(model, batch)
    assert not np.allclose(first, second)
    model.eval()  # dropout off: deterministic again
    third, _ = jac(model, batch)
    fourth, _ = jac(model, batch)
    np.testing.assert_array_equal(third, fourth)


@pytest.mark.parametrize("weighting", [mtl.mgda(), mtl.primary_auxiliary(primary=0)])
def test_nnx_optimizer_matches_the_plain_pytree_path_bit_for_bit(weighting):
    model = Model(nnx.Rngs(3), dropout=0.0, batch_norm=False)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    batch = data(2)
    tx = optax.chain(mtl.aggregate(weighting, num_tasks=K), optax.adam(1e-2))
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    jac = mtl_nnx.split_value_and_jacobian(encode, heads, num_tasks=K)

    @nnx.jit
    def nnx_step(model, opt, batch):
        losses, task_grads = jac(model, batch)
        opt.update(model, task_grads, task_losses=losses)
        return losses

    def plain_encode(p, b):
        return encode(nnx.merge(graphdef, p, rest), b)

    def plain_heads(p, f, b):
        return heads(nnx.merge(graphdef, p, rest), f, b)

    plain_jac = mtl.split_value_and_jacobian(plain_encode, plain_heads, num_tasks=K)

    @jax.jit
    def plain_step(params, opt_state, batch):
        losses, task_grads = plain_jac(params, batch)
        updates, opt_state = tx.update(task_grads, opt_state, params, task_losses=losses)
        return optax.apply_updates(params, updates), opt_state, losses

    params = nnx.as_pure(params)
    opt_state = tx.init(params)
    for _ in range(20):
        nnx_losses = nnx_step(model, opt, batch)
        params, opt_state, losses = plain_step(params, opt_state, batch)
        np.testing.assert_array_equal(nnx_losses, losses)
    jax.tree_util.tree_map(
        np.testing.assert_array_equal, nnx.as_pure(nnx.state(model, nnx.Param)), params
    )
    np.testing.assert_array_equal(mtl.task_weights(opt.opt_state), opt_state[0].weights)
    assert isinstance(mtl.task_weights(opt.opt_state), jax.Array)
    assert np.all(
        np.asarray(losses)
        < np.asarray(
            task_losses(
                nnx.merge(
                    graphdef,
                    nnx.split(Model(nnx.Rngs(3), dropout=0.0, batch_norm=False), nnx.Param, ...)[1],
                    rest,
                ),
                batch,
            )
        )
    )


def test_a_shared_mask_of_param_nodes_is_accepted():
    """A mask made from nnx.state(model, nnx.Param) holds Param nodes; it works as is."""
    model = Model(nnx.Rngs(4), dropout=0.0, batch_norm=False)
    params = nnx.state(model, nnx.Param)
    mask = jax.tree_util.tree_map(lambda _: True, params)
    mask["heads"] = jax.tree_util.tree_map(lambda _: False, mask["heads"])
    batch = data(3)
    opt = nnx.Optimizer(
        model,
        optax.chain(mtl.aggregate(mtl.mgda(), num_tasks=K, shared=mask), optax.sgd(0.1)),
        wrt=nnx.Param,
    )
    losses, task_grads = mtl_nnx.value_and_jacobian(task_losses)(model, batch)
    _, split_grads = mtl_nnx.split_value_and_jacobian(encode, heads, num_tasks=K)(model, batch)
    with_mask = opt.update(model, task_grads, task_losses=losses)
    weights = mtl.task_weights(opt.opt_state)
    agg = mtl.aggregate(mtl.mgda(), num_tasks=K)
    expected, state = agg.update(split_grads, agg.init(None), nnx.as_pure(params))
    np.testing.assert_allclose(weights, state.weights, rtol=1e-5, atol=1e-6)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        nnx.as_pure(with_mask),
        jax.tree_util.tree_map(lambda g: -0.1 * g, expected),  # the sgd(0.1) step
    )


def test_task_weighting_home_for_tiers_1_and_2():
    model = Model(nnx.Rngs(5), dropout=0.0, batch_norm=False)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    batch = data(4)
    for gram in ("features", "parameters"):
        home = mtl_nnx.TaskWeighting(mtl.mgda(), num_tasks=K)
        step = nnx.jit(mtl_nnx.split_value_and_grad(encode, heads, gram=gram))
        losses, grads = step(model, home, batch)
        core = mtl.split_value_and_grad(
            lambda p, b: encode(nnx.merge(graphdef, p, rest), b),
            lambda p, f, b: heads(nnx.merge(graphdef, p, rest), f, b),
            mtl.mgda(),
            num_tasks=K,
            gram=gram,
        )(nnx.as_pure(params), batch, mtl.mgda().init(K))
        np.testing.assert_allclose(home.weights[...], core.weights, rtol=1e-6)
        jax.tree_util.tree_map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
            jax.tree_util.tree_leaves(home.state.get_value()),
            jax.tree_util.tree_leaves(core.weighting_state),
        )
        jax.tree_util.tree_map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
            nnx.as_pure(grads),
            core.grads,
        )
        assert abs(float(jnp.sum(home.weights[...])) - 1) < 1e-5
    with pytest.raises(TypeError, match="TaskWeighting"):
        mtl_nnx.split_value_and_grad(encode, heads)(model, mtl.mgda(), batch)

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


def head(i):
    """Task i: column i of the multi-output head layer on its own copy of the features."""
    return lambda model, z, batch: jnp.mean((model.heads(z)[:, i] - batch[1][:, i]) ** 2)


HEADS = [head(i) for i in range(K)]


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
        jac = mtl_nnx.split_value_and_jacobian(encode, HEADS)
        tx = optax.chain(mtl.aggregate(mtl.sum_weighting(), tasks=K), optax.sgd(0.05))
    else:
        jac = mtl_nnx.value_and_jacobian(task_losses)
        tx = optax.chain(mtl.aggregate(mtl.sum_weighting(), tasks=K, shared=True), optax.sgd(0.05))
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
    jac = nnx.jit(mtl_nnx.split_value_and_jacobian(encode, HEADS))
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
    tx = optax.chain(mtl.aggregate(weighting, tasks=K), optax.adam(1e-2))
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    jac = mtl_nnx.split_value_and_jacobian(encode, HEADS)

    @nnx.jit
    def nnx_step(model, opt, batch):
        losses, task_grads = jac(model, batch)
        opt.update(model, task_grads, task_losses=losses)
        return losses

    def plain_encode(p, b):
        return encode(nnx.merge(graphdef, p, rest), b)

    plain_heads = [lambda p, z, b, h=h: h(nnx.merge(graphdef, p, rest), z, b) for h in HEADS]
    plain_jac = mtl.split_value_and_jacobian(plain_encode, plain_heads)

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
        optax.chain(mtl.aggregate(mtl.mgda(), tasks=K, shared=mask), optax.sgd(0.1)),
        wrt=nnx.Param,
    )
    losses, task_grads = mtl_nnx.value_and_jacobian(task_losses)(model, batch)
    _, split_grads = mtl_nnx.split_value_and_jacobian(encode, HEADS)(model, batch)
    with_mask = opt.update(model, task_grads, task_losses=losses)
    weights = mtl.task_weights(opt.opt_state)
    agg = mtl.aggregate(mtl.mgda(), tasks=K)
    expected, state = agg.update(split_grads, agg.init(None), nnx.as_pure(params))
    np.testing.assert_allclose(weights, state.weights, rtol=1e-5, atol=1e-6)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        nnx.as_pure(with_mask),
        jax.tree_util.tree_map(lambda g: -0.1 * g, expected),  # the sgd(0.1) step
    )


def test_tiers_1_and_2_match_the_plain_pytree_path():
    model = Model(nnx.Rngs(5), dropout=0.0, batch_norm=False)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    batch = data(4)
    plain_heads = [lambda p, z, b, h=h: h(nnx.merge(graphdef, p, rest), z, b) for h in HEADS]
    for method in (mtl.mgda(), mtl.famo()):
        for gram in ("features", "parameters"):
            grad_fn = mtl_nnx.split_value_and_grad(encode, HEADS, method, gram=gram)
            losses, grads, state = nnx.jit(grad_fn)(model, batch, grad_fn.init(model))
            core = mtl.split_value_and_grad(
                lambda p, b: encode(nnx.merge(graphdef, p, rest), b), plain_heads, method, gram=gram
            )
            _, core_grads, core_state = core(nnx.as_pure(params), batch, core.init(params))
            np.testing.assert_allclose(
                mtl.task_weights(state), mtl.task_weights(core_state), rtol=1e-6
            )
            jax.tree_util.tree_map(
                lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                nnx.as_pure(grads),
                core_grads,
            )


def test_whole_model_tier_1_matches_nnx_grad_of_the_weighted_loss():
    model = Model(nnx.Rngs(6), dropout=0.0, batch_norm=False)
    batch = data(5)
    grad_fn = mtl_nnx.value_and_grad(
        task_losses, mtl.constant_weighting([0.5, 2.0, 1.0]), tasks=K, shared=True
    )
    losses, grads, state = nnx.jit(grad_fn)(model, batch, grad_fn.init(model))
    expected = nnx.grad(lambda m: jnp.array([0.5, 2.0, 1.0]) @ task_losses(m, batch))(model)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
        nnx.as_pure(grads),
        nnx.as_pure(expected),
    )


class DropoutHead(nnx.Module):
    def __init__(self, rngs):
        self.linear = nnx.Linear(WIDTH, 1, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, rngs=rngs)

    def __call__(self, z):
        return self.linear(self.dropout(z))


class StackedModel(nnx.Module):
    """An encoder and K homogeneous heads built with nnx.vmap (parameters (K, ...))."""

    def __init__(self, rngs, *, head_dropout=False):
        self.linear = nnx.Linear(D_IN, WIDTH, rngs=rngs)

        @nnx.split_rngs(splits=K)
        @nnx.vmap(in_axes=0, out_axes=0)
        def make_head(rngs):
            return DropoutHead(rngs) if head_dropout else nnx.Linear(WIDTH, 1, rngs=rngs)

        self.heads = make_head(rngs)


def stacked_head(module, z, batch, i):
    return jnp.mean((module(z)[:, 0] - batch[1][:, i]) ** 2)


def test_stacked_heads_under_nnx_match_jacrev():
    model = StackedModel(nnx.Rngs(7))
    batch = data(6)
    heads = mtl.stacked_heads(stacked_head, head_params=lambda m: m.heads)
    jac = mtl_nnx.split_value_and_jacobian(lambda m, b: nnx.relu(m.linear(b[0])), heads)
    losses, task_grads = nnx.jit(jac)(model, batch)
    assert set(task_grads.roles) == {"shared", "sliced"}

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def reference(p):
        m = nnx.merge(graphdef, p, rest)
        z = nnx.relu(m.linear(batch[0]))
        preds = jnp.einsum("bd,kdo->kbo", z, m.heads.kernel[...])[..., 0] + m.heads.bias[...]
        return jnp.mean((preds.T - batch[1]) ** 2, axis=0)

    np.testing.assert_allclose(losses, reference(params), rtol=1e-6)
    jac_ref = jax.jacrev(reference)(params)
    np.testing.assert_allclose(
        nnx.as_pure(task_grads.tree)["linear"]["kernel"],
        nnx.as_pure(jac_ref)["linear"]["kernel"],
        rtol=1e-5,
        atol=1e-6,
    )
    summed = jax.tree_util.tree_map(lambda j: j.sum(0), nnx.as_pure(jac_ref)["heads"])
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        nnx.as_pure(task_grads.tree)["heads"],
        summed,
    )
    tx = optax.chain(mtl.aggregate(mtl.upgrad(), tasks=K), optax.sgd(0.1))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    optimizer.update(model, task_grads, task_losses=losses)
    assert mtl.task_weights(optimizer).shape == (K,)

    encode_linear = lambda m, b: m.linear(b[0])  # noqa: E731
    with pytest.raises(TypeError, match="head module built with nnx.vmap"):
        mtl_nnx.split_value_and_jacobian(
            encode_linear, mtl.stacked_heads(stacked_head, head_params=lambda m: m.heads.kernel)
        )(model, batch)
    with pytest.raises(ValueError, match=r"selects \['linear'\].*which `encoder` reads"):
        mtl_nnx.split_value_and_jacobian(
            encode_linear, mtl.stacked_heads(stacked_head, head_params=lambda m: m)
        )(model, batch)
    with_dropout = StackedModel(nnx.Rngs(9), head_dropout=True)
    with pytest.raises(ValueError, match="may hold only parameters"):
        mtl_nnx.split_value_and_jacobian(lambda m, b: nnx.relu(m.linear(b[0])), heads)(
            with_dropout, batch
        )


def test_miswired_heads_and_wrong_arguments_are_errors_under_nnx():
    model = Model(nnx.Rngs(8), dropout=0.0, batch_norm=False)
    batch = data(7)

    def reads_copy_zero(m, features, b):  # the 0.1 K-copies form, miswired
        return jnp.mean((m.heads(features[0]) - b[1]) ** 2, axis=0)

    with pytest.raises(TypeError, match="single function"):
        mtl_nnx.split_value_and_jacobian(encode, reads_copy_zero)
    with pytest.raises(TypeError, match="single function"):
        mtl_nnx.split_value_and_grad(encode, reads_copy_zero, mtl.mgda())
    jac = mtl_nnx.split_value_and_jacobian(encode, HEADS)
    with pytest.raises(TypeError, match="nnx.State: pass the model itself"):
        jac(nnx.state(model, nnx.Param), batch)
    with pytest.raises(TypeError, match="first argument"):
        mtl_nnx.value_and_jacobian(task_losses)({"w": 1.0}, batch)

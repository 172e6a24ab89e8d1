"""``mtl.instance_wise_value_and_grad``: IWRM steps equal the per-example-gradient oracle.

Oracle: the per-example gradients of ``jax.vmap(jax.grad)``, their Gram (``mtl.task_gram``),
the same weighting's ``update`` on that Gram, and ``Σ_b w_b g_b``. One compiled program
covers a full-Gram weighting (Aligned-MTL), a diagonal-Gram one (gradient normalisation)
and a losses-only one (the mean: the ordinary mean-loss gradient), then two SGD steps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtl_optax as mtl
from mtl_optax.structured_gram import BatchCouplingError

B = 6


def init(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "w1": jnp.asarray(rng.standard_normal((5, 7)).astype(np.float32) / 2),
        "b1": jnp.asarray(0.1 * rng.standard_normal(7).astype(np.float32)),
        "w2": jnp.asarray(rng.standard_normal((7, 3)).astype(np.float32) / 3),
    }


def per_example_loss(params, batch):
    x, y = batch
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    return optax.softmax_cross_entropy_with_integer_labels(h @ params["w2"], y)


def data(seed=1, n=B):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.standard_normal((n, 5)).astype(np.float32)), jnp.arange(n) % 3


def oracle(weighting, params, batch, state):
    def one(x, y):
        return jax.grad(lambda p: per_example_loss(p, (x[None], y[None]))[0])(params)

    grads = jax.vmap(one)(*batch)
    losses = per_example_loss(params, batch)
    if not weighting.needs_gram:
        gram = None
    else:
        gram = mtl.task_gram(grads, diagonal_only=weighting.needs_gram == "diagonal")
    weights, _ = weighting.update(gram, losses, state.method_state)
    return losses, weights, jax.tree_util.tree_map(lambda g: jnp.tensordot(weights, g, 1), grads)


def rel_err(a, b):
    a = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(a)]).astype(np.float64)
    b = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(b)]).astype(np.float64)
    return np.max(np.abs(a - b)) / np.max(np.abs(b))


def test_iwrm_steps_equal_the_per_example_oracle_and_feed_optax():
    methods = {
        "full Gram": mtl.aligned_mtl(),
        "diagonal Gram": mtl.gradient_normalized(),
        "losses only": mtl.mean_weighting(),
    }
    grad_fns = {
        k: mtl.instance_wise_value_and_grad(per_example_loss, m, batch_size=B)
        for k, m in methods.items()
    }
    tx = optax.sgd(0.5)
    params, batch = init(), data()

    @jax.jit
    def run(params, batch):
        out = {}
        for name, grad_fn in grad_fns.items():
            state = grad_fn.init(params)
            expected = oracle(methods[name], params, batch, state)
            losses, grads, new_state = grad_fn(params, batch, state)
            out[name] = (expected, (losses, mtl.task_weights(new_state), grads))
        grad_fn = grad_fns["diagonal Gram"]  # two optax steps through an IWRM update
        p, opt_state, state = params, tx.init(params), grad_fn.init(params)
        trace = []
        for _ in range(2):
            losses, grads, state = grad_fn(p, batch, state)
            updates, opt_state = tx.update(grads, opt_state, p)
            p = optax.apply_updates(p, updates)
            trace.append(losses.mean())
        trace.append(per_example_loss(p, batch).mean())
        return out, jnp.stack(trace)

    out, trace = run(params, batch)
    for name, ((losses, weights, update), got) in out.items():
        np.testing.assert_allclose(got[0], losses, rtol=1e-6, err_msg=name)
        assert rel_err(got[1], weights) <= 1e-4, (name, got[1], weights)
        assert rel_err(got[2], update) <= 1e-4, (name, rel_err(got[2], update))
    mean_grad = jax.grad(lambda p: per_example_loss(p, batch).mean())(params)
    assert rel_err(out["losses only"][1][2], mean_grad) <= 1e-5  # the plain mean-loss step
    assert np.all(np.diff(np.asarray(trace)) < 0), trace  # the update is a descent direction


def test_iwrm_and_the_returned_gram_at_extreme_gradient_scales():
    """Per-example losses times ``c``: where a raw float32 Gram under- or overflows (c = 1e∓25),
    UPGrad's weights equal those at c = 1 and the update is ``c`` times it (the engine
    rescales every Gram term by powers of two); ``value_and_gram`` returns the true Gram
    (``c²`` times, against the per-example oracle where that is in range)."""
    params, batch = init(), data()
    upgrad = mtl.upgrad()

    @jax.jit
    def run(c):
        def scaled(p, b):
            return c * per_example_loss(p, b)

        grad_fn = mtl.instance_wise_value_and_grad(scaled, upgrad, batch_size=B)
        _, grads, state = grad_fn(params, batch, grad_fn.init(params))
        _, gram = mtl.value_and_gram(scaled)(params, batch)
        return mtl.task_weights(state), jax.tree_util.tree_map(lambda g: g / c, grads), gram

    weights, update, gram = run(1.0)
    _, oracle_weights, oracle_update = oracle(
        upgrad,
        params,
        batch,
        mtl.instance_wise_value_and_grad(per_example_loss, upgrad, batch_size=B).init(params),
    )
    assert rel_err(weights, oracle_weights) <= 1e-4
    assert rel_err(update, oracle_update) <= 1e-4
    for c in (1e-25, 1e-12, 1e12, 1e25):
        got_weights, got_update, got_gram = run(c)
        assert rel_err(got_weights, weights) <= 1e-5, (c, got_weights, weights)
        assert rel_err(got_update, update) <= 1e-5, c
        if abs(c) in (1e-12, 1e12):  # G = c² G₁ is in float32's range
            assert rel_err(got_gram, (c * c) * np.asarray(gram, np.float64)) <= 1e-5, c
        elif c < 1:  # below it the true Gram rounds to 0, as the per-example Gram would
            assert np.all(np.asarray(got_gram) == 0.0), (c, got_gram)
        else:  # above it to ±inf, with the signs of G₁
            assert np.all(np.asarray(got_gram) == np.sign(gram) * np.inf), (c, got_gram)


class BatchNormNet:
    """A dense layer, batch statistics in training mode, a dense layer."""

    @staticmethod
    def loss(params, batch, train=True):
        h = batch[0] @ params["w1"]
        if train:
            h = (h - h.mean(0)) / jnp.sqrt(h.var(0) + 1e-5)
        return jnp.sum((h @ params["w2"]) ** 2, -1)


def test_batchnorm_in_training_mode_is_rejected_at_trace_time():
    params = {"w1": jnp.ones((5, 4)), "w2": jnp.ones((4, 2))}
    batch = data()
    grad_fn = mtl.instance_wise_value_and_grad(BatchNormNet.loss, mtl.upgrad(), batch_size=B)
    state = grad_fn.init(params)
    with pytest.raises(BatchCouplingError, match="reduce_sum.*example axis"):
        jax.eval_shape(grad_fn, params, batch, state)
    frozen = mtl.instance_wise_value_and_grad(
        lambda p, b: BatchNormNet.loss(p, b, train=False), mtl.upgrad(), batch_size=B
    )
    jax.eval_shape(frozen, params, batch, state)  # running statistics: per-example losses


def test_bad_arguments_raise_clear_errors():
    params, batch = init(), data()
    with pytest.raises(TypeError, match="needs the stacked|vmap"):
        mtl.instance_wise_value_and_grad(per_example_loss, mtl.trimmed_mean(trim=1), batch_size=B)
    with pytest.raises(TypeError):
        mtl.instance_wise_value_and_grad(per_example_loss, optax.sgd(0.1), batch_size=B)
    for bad in (0, -3, True, 2.0, None):
        with pytest.raises(ValueError, match="batch_size.*positive int"):
            mtl.instance_wise_value_and_grad(per_example_loss, mtl.mgda(), batch_size=bad)
    with pytest.raises(TypeError, match="batch_dim"):
        mtl.instance_wise_value_and_grad(per_example_loss, mtl.mgda(), batch_size=B, batch_dim=None)
    with pytest.raises(TypeError, match="batch_dim"):
        mtl.instance_wise_value_and_grad(per_example_loss, mtl.mgda(), batch_size=B, batch_dim=True)
    with pytest.raises(ValueError, match="strategy"):
        mtl.instance_wise_value_and_grad(per_example_loss, mtl.mgda(), batch_size=B, strategy="x")
    with pytest.raises(ValueError, match="chunk_size"):
        mtl.instance_wise_value_and_grad(per_example_loss, mtl.mgda(), batch_size=B, chunk_size=0)
    with pytest.raises(TypeError, match="missing"):  # batch_size is keyword-only and required
        mtl.instance_wise_value_and_grad(per_example_loss, mtl.mgda())
    grad_fn = mtl.instance_wise_value_and_grad(per_example_loss, mtl.mgda(), batch_size=B)
    state = grad_fn.init(params)
    assert state.weights.shape == (B,)
    with pytest.raises(ValueError, match="batch_size=6.*holds 4 examples.*batch_size=4"):
        jax.eval_shape(grad_fn, params, data(n=4), state)
    with pytest.raises(ValueError, match="one loss per example"):
        jax.eval_shape(
            mtl.instance_wise_value_and_grad(
                lambda p, b: per_example_loss(p, b)[:3], mtl.mgda(), batch_size=B
            ),
            params,
            batch,
            state,
        )
    other = mtl.instance_wise_value_and_grad(per_example_loss, mtl.upgrad(), batch_size=B)
    with pytest.raises(ValueError, match="state of 'mgda'"):
        jax.eval_shape(other, params, batch, state)

"""One head rule in every path, for every weighting of the zoo.

Head ``i`` (the parameters only task ``i`` reads) gets ``c_i ∇L_i`` with ``c = w`` for a
scalarization (every weighting that reads no Gram, and GradNorm) and ``c = 1`` for a Gram
weighting. Each path below reports its weights (``task_weights``); its head update must be
``Σ_i c_i ∇_heads L_i`` computed by hand from ``jax.jacrev``, and the scalarizations, whose
weights come from the losses alone, must report the same weights in every path.

Paths: the split at tiers 1/2 (``gram="features"``), the bounded-memory mode
(``gram="parameters"``), tier 3 through ``aggregate``; the whole model at tier 3 with a
``shared`` mask and through ``value_and_grad`` — for every weighting, in one compiled
function each. The flax wrappers (nnx split tier 3 under ``nnx.Optimizer``, nnx split tiers
1/2, a linen ``TrainState``) run the same code behind their own plumbing; they are checked
for one weighting of each kind (losses only, losses and diag(G) with loss-weight semantics,
Gram), which is what changes the rule.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx
from flax.training import train_state

import mtl_optax as mtl
import mtl_optax.flax_nnx as mtl_nnx
from mtl_optax.weighting.base import scales_heads
from tests import models, zoo

K = models.K


def expected_heads(losses_fn, params, weights, weighting):
    """``Σ_i c_i ∇_heads L_i`` from jax.jacrev."""
    c = np.asarray(weights, np.float64) if scales_heads(weighting) else np.ones(K)
    jac = jax.jacrev(losses_fn)(params)["heads"]
    return jax.tree_util.tree_map(lambda j: np.tensordot(c, np.asarray(j, np.float64), 1), jac)


def plain_paths(weighting, params, batch):
    """``{path: (weights, head update)}`` of the plain-pytree paths and the split tier 3's
    ``task_weights`` by name, one jit."""

    def run(params):
        out = {}
        for name, heads, gram in (
            ("split tier 1/2", models.STACKED_HEADS, "features"),
            ("split bounded", models.NAMED_HEADS, "parameters"),
        ):
            grad_fn = mtl.split_value_and_grad(models.encode, heads, weighting, gram=gram)
            _, grads, state = grad_fn(params, batch, grad_fn.init(params))
            out[name] = (state.weights, grads["heads"])
        losses, task_grads = mtl.split_value_and_jacobian(models.encode, models.NAMED_HEADS)(
            params, batch
        )
        t = mtl.aggregate(weighting, tasks=list(models.NAMES))
        updates, state = t.update(task_grads, t.init(params), params, task_losses=losses)
        out["split tier 3"] = (state.weights, updates["heads"])
        named_weights = mtl.task_weights(state)
        losses, task_grads = mtl.value_and_jacobian(models.task_losses)(params, batch)
        t = mtl.aggregate(weighting, tasks=K, shared=models.SHARED)
        updates, state = t.update(task_grads, t.init(params), params, task_losses=losses)
        out["whole tier 3"] = (state.weights, updates["heads"])
        grad_fn = mtl.value_and_grad(models.task_losses, weighting, tasks=K, shared=models.SHARED)
        _, grads, state = grad_fn(params, batch, grad_fn.init(params))
        out["whole value_and_grad"] = (state.weights, grads["heads"])
        return out, named_weights

    return jax.jit(run)(params)


class NnxModel(nnx.Module):
    def __init__(self, params):
        self.trunk = nnx.Param(params["trunk"]["w"])
        self.trunk_bias = nnx.Param(params["trunk"]["b"])
        self.heads = nnx.Param(params["heads"]["w"])
        self.heads_bias = nnx.Param(params["heads"]["b"])


def nnx_paths(weighting, params, batch):
    def encoder(m, b):
        return jnp.tanh(b[0] @ m.trunk[...] + m.trunk_bias[...])

    def head(i):
        return lambda m, z, b: jnp.mean(
            (z @ m.heads[...][i] + m.heads_bias[...][i] - b[1][:, i]) ** 2
        )

    heads = [head(i) for i in range(K)]
    out = {}
    model = NnxModel(params)
    optimizer = nnx.Optimizer(model, mtl.aggregate(weighting, tasks=K), wrt=nnx.Param)
    jac = mtl_nnx.split_value_and_jacobian(encoder, heads)

    @nnx.jit
    def tier3(model, optimizer):
        losses, task_grads = jac(model, batch)
        return optimizer.update(model, task_grads, task_losses=losses)

    updates = tier3(model, optimizer)
    out["nnx split tier 3"] = (
        mtl.task_weights(optimizer),
        (updates["heads"], updates["heads_bias"]),
    )
    grad_fn = mtl_nnx.split_value_and_grad(encoder, heads, weighting)
    model = NnxModel(params)
    _, grads, state = nnx.jit(grad_fn)(model, batch, grad_fn.init(model))
    grads = nnx.as_pure(grads)
    out["nnx split tier 1/2"] = (state.weights, (grads["heads"], grads["heads_bias"]))
    return {k: (w, {"w": h[0], "b": h[1]}) for k, (w, h) in out.items()}


class LinenModel(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.tanh(nn.Dense(4, name="trunk")(x))


def linen_path(weighting, params, batch):
    model = LinenModel()
    linen_params = {"trunk": {"kernel": params["trunk"]["w"], "bias": params["trunk"]["b"]},
                    "heads": params["heads"]}  # fmt: skip

    def encoder(p, b):
        return model.apply({"params": {"trunk": p["trunk"]}}, b[0])

    heads = [
        lambda p, z, b, i=i: models.head_loss(
            jax.tree_util.tree_map(lambda a: a[i], p["heads"]), z, b, i
        )
        for i in range(K)
    ]
    state = train_state.TrainState.create(
        apply_fn=model.apply, params=linen_params, tx=mtl.aggregate(weighting, tasks=K)
    )
    jac = mtl.split_value_and_jacobian(encoder, heads)

    @jax.jit
    def step(state):
        losses, task_grads = jac(state.params, batch)
        return mtl.apply_task_gradients(state, task_grads, task_losses=losses)

    new = step(state)
    update = jax.tree_util.tree_map(jnp.subtract, new.params["heads"], state.params["heads"])
    return {"linen TrainState": (mtl.task_weights(new.opt_state), update)}


FLAX_CHECKED = ("famo", "gradnorm", "upgrad")  # losses only; losses + diag(G), c = w; Gram


@pytest.mark.parametrize("name", list(zoo.WEIGHTINGS))
def test_every_path_obeys_the_head_rule(name):
    weighting = zoo.WEIGHTINGS[name](K)
    params = models.init_params(jax.random.PRNGKey(0))
    batch = models.make_batch(jax.random.PRNGKey(1))
    results, named_weights = plain_paths(weighting, params, batch)
    assert list(named_weights) == list(models.NAMES)  # task names come back with the weights
    # the same weights, read by name (two outputs of one jit: XLA may round them apart by an ulp)
    np.testing.assert_allclose(
        list(named_weights.values()), results["split tier 3"][0], rtol=1e-6, atol=0
    )
    if name in FLAX_CHECKED:
        results.update(nnx_paths(weighting, params, batch))
        results.update(linen_path(weighting, params, batch))
    for path, (weights, heads) in results.items():
        expected = expected_heads(
            lambda p: models.task_losses(p, batch), params, weights, weighting
        )
        jax.tree_util.tree_map(
            lambda got, want, path=path: np.testing.assert_allclose(
                got, want, rtol=2e-5, atol=1e-6, err_msg=f"{name}: {path}"
            ),
            dict(heads),
            expected,
        )
    if not weighting.needs_gram:  # weights from the losses alone: the same in every path
        reference = np.asarray(results["whole tier 3"][0])
        for path, (weights, _) in results.items():
            np.testing.assert_allclose(weights, reference, rtol=1e-6, err_msg=f"{name}: {path}")

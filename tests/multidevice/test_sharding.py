"""Data-parallel, FSDP-style and shard_map training on 4 devices equal one device.

Every tier runs a few SGD steps (SGD, not Adam, so a gradient off by a constant factor is
caught) on the tiny shared-trunk model of ``tests/models.py``: tier 1 (``mean_weighting``)
and tier 2 (``mgda``) through ``split_value_and_grad`` with the heads given per task (a list)
and stacked (``stacked_heads``, vmapped over the task axis of the head parameters), tier 3
through ``value_and_jacobian`` (strategies ``map`` and ``vmap``, and ``chunked`` inside
shard_map) and ``aggregate(mgda())``. The sharded runs are compared with the same steps on
one device, to float32 reassociation tolerance (the reductions are split across devices).
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import mtl_optax as mtl
from tests import models

K = models.K
D_IN = D_HIDDEN = 8  # divisible by the 4 devices, so parameters can be sharded
STEPS = 2
RTOL, ATOL = 2e-5, 1e-6

# FSDP-style layout: every shared parameter sharded on its leading axis (see test_gram_*).
FSDP_SPECS = {
    "trunk": {"w": P("data", None), "b": P("data")},
    "heads": {"w": P(None, "data"), "b": P()},
}


def head(task):
    """Task ``task``'s loss from its column of the head parameters (the sequence form)."""

    def loss(params, z, batch):
        pred = z @ params["heads"]["w"][task] + params["heads"]["b"][task]
        return jnp.mean((pred - batch[1][:, task]) ** 2)

    return loss


def stacked_head(head_params, z, batch, task):
    """One head of the stacked form: ``head_params`` is task ``task``'s slice (w (d,), b ())."""
    return jnp.mean((z @ head_params["w"] + head_params["b"] - batch[1][:, task]) ** 2)


HEADS = [head(i) for i in range(K)]
STACKED_HEADS = mtl.stacked_heads(stacked_head, head_params=lambda params: params["heads"])


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((4,), ("data",), axis_types=(AxisType.Auto,))


def problem():
    params = models.init_params(jax.random.PRNGKey(0), d_in=D_IN, d_hidden=D_HIDDEN)
    batch = models.make_batch(jax.random.PRNGKey(1), n=16, d_in=D_IN)
    return params, batch


def tier3(strategy):
    opt = optax.chain(mtl.aggregate(mtl.mgda(), tasks=K, shared=models.SHARED), optax.sgd(0.1))

    def step(params, opt_state, batch):
        losses, task_grads = mtl.value_and_jacobian(models.task_losses, strategy=strategy)(
            params, batch
        )
        updates, opt_state = opt.update(task_grads, opt_state, params, task_losses=losses)
        return optax.apply_updates(params, updates), opt_state, losses

    return opt.init, step


def weighted(weighting, heads=HEADS):
    opt = optax.sgd(0.1)
    grad_fn = mtl.split_value_and_grad(models.encode, heads, weighting)

    def init(params):
        return opt.init(params), grad_fn.init(params)

    def step(params, state, batch):
        opt_state, weighting_state = state
        losses, grads, weighting_state = grad_fn(params, batch, weighting_state)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), (opt_state, weighting_state), losses

    return init, step


CASES = {
    "tier1-mean": lambda: weighted(mtl.mean_weighting()),
    "tier2-mgda": lambda: weighted(mtl.mgda()),
    "tier2-mgda-stacked-heads": lambda: weighted(mtl.mgda(), STACKED_HEADS),
    "tier3-mgda-map": lambda: tier3("map"),
    "tier3-mgda-vmap": lambda: tier3("vmap"),
}


def train(init, step, params, batch, constrain=None):
    def constrained(params, state, batch):
        params, state, losses = step(params, state, batch)
        if constrain is not None:
            params = jax.lax.with_sharding_constraint(params, constrain)
        return params, state, losses

    jitted = jax.jit(constrained)
    state = init(params)
    for _ in range(STEPS):
        params, state, losses = jitted(params, state, batch)
    return params, losses


@functools.cache
def one_device(case):
    params, batch = jax.device_put(problem(), jax.devices()[0])
    return train(*CASES[case](), params, batch)


def assert_trees_close(actual, expected):
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), b, rtol=RTOL, atol=ATOL),
        actual,
        expected,
    )


def shardings(mesh, specs):
    return jax.tree_util.tree_map(
        lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P)
    )


@pytest.mark.parametrize("case", CASES)
def test_data_parallel_equals_one_device(mesh, case):
    params, batch = problem()
    params = jax.device_put(params, NamedSharding(mesh, P()))  # replicated
    batch = jax.device_put(batch, NamedSharding(mesh, P("data")))  # batch split in 4
    assert len(batch[0].addressable_shards) == 4
    got = train(*CASES[case](), params, batch)
    assert_trees_close(got, one_device(case))


@pytest.mark.parametrize("case", CASES)
def test_fsdp_sharded_parameters_equal_one_device(mesh, case):
    params, batch = problem()
    param_shardings = shardings(mesh, FSDP_SPECS)
    params = jax.device_put(params, param_shardings)
    batch = jax.device_put(batch, NamedSharding(mesh, P("data")))
    got_params, got_losses = train(*CASES[case](), params, batch, constrain=param_shardings)
    # the parameters stay sharded: each device holds a quarter of the trunk kernel
    assert got_params["trunk"]["w"].sharding.is_equivalent_to(param_shardings["trunk"]["w"], 2)
    assert got_params["trunk"]["w"].addressable_shards[0].data.shape == (D_IN // 4, D_HIDDEN)
    assert_trees_close((got_params, got_losses), one_device(case))


def collectives(fn, *args):
    """(op, result shape) of every cross-device collective in the compiled HLO."""
    text = jax.jit(fn).lower(*args).compile().as_text()
    found = re.findall(r"= (.+?) (all-gather|all-reduce|all-to-all)(?:-start)?\(", text)
    # XLA may combine several collectives into one with a tuple result: list each shape
    return [(shape, op) for shapes, op in found for shape in re.findall(r"\w+\[[\d,]*\]", shapes)]


def test_gram_is_a_reduction_over_sharded_parameters(mesh):
    """With FSDP-sharded stacked gradients, aggregate never gathers the Jacobian.

    XLA computes each device's partial ``J_l J_lᵀ`` on its shard of the parameter axis and
    all-reduces the (K, K) result; the weighted sum of the task gradients stays sharded.
    """
    params, batch = problem()
    param_shardings = shardings(mesh, FSDP_SPECS)
    params = jax.device_put(params, param_shardings)
    losses, task_grads = mtl.value_and_jacobian(models.task_losses)(params, batch)
    stacked_specs = jax.tree_util.tree_map(
        lambda s: P(None, *s), FSDP_SPECS, is_leaf=lambda x: isinstance(x, P)
    )
    task_grads = jax.device_put(task_grads.tree, shardings(mesh, stacked_specs))
    transform = mtl.aggregate(mtl.mgda(), tasks=K, shared=models.SHARED)

    def update(task_grads, state, params, losses):
        updates, state = transform.update(
            mtl.TaskGradients(task_grads), state, params, task_losses=losses
        )
        return jax.lax.with_sharding_constraint(updates, param_shardings), state

    found = collectives(update, task_grads, transform.init(params), params, losses)
    assert not [c for c in found if c[1] == "all-gather"], found
    assert ("f32[3,3]", "all-reduce") in found, found


def smap(mesh, fn, in_specs, out_specs):
    return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs))


def global_task_losses(params, batch):
    """Inside shard_map: the losses of the whole batch, the mean of the per-device means."""
    return jax.lax.pmean(models.task_losses(params, batch), "data")


def global_head(task):
    """Inside shard_map: task ``task``'s loss on the whole batch (mean of device means)."""
    return lambda params, z, batch: jax.lax.pmean(HEADS[task](params, z, batch), "data")


@pytest.mark.parametrize("strategy", ["map", "vmap", "chunked"])
def test_shard_map_tier3_equals_one_device(mesh, strategy):
    """Losses averaged over devices inside the function: the Jacobian is the global one."""
    chunk_size = 2 if strategy == "chunked" else None
    jacobian = mtl.value_and_jacobian(global_task_losses, strategy=strategy, chunk_size=chunk_size)

    def local(params, batch):
        losses, task_grads = jacobian(params, batch)
        return losses, task_grads.tree

    stacked = smap(mesh, local, (P(), P("data")), (P(), P()))
    opt = optax.chain(mtl.aggregate(mtl.mgda(), tasks=K, shared=models.SHARED), optax.sgd(0.1))

    def step(params, opt_state, batch):
        losses, task_grads = stacked(params, batch)
        updates, opt_state = opt.update(
            mtl.TaskGradients(task_grads), opt_state, params, task_losses=losses
        )
        return optax.apply_updates(params, updates), opt_state, losses

    params, batch = problem()
    batch = jax.device_put(batch, NamedSharding(mesh, P("data")))
    reference = one_device("tier3-mgda-map" if strategy == "chunked" else f"tier3-mgda-{strategy}")
    assert_trees_close(train(opt.init, step, params, batch), reference)


def test_shard_map_tier1_equals_one_device(mesh):
    grad_fn = mtl.split_value_and_grad(
        models.encode, [global_head(i) for i in range(K)], mtl.mean_weighting()
    )

    def local(params, batch, weighting_state):
        losses, grads, _ = grad_fn(params, batch, weighting_state)
        return grads, losses

    grads_fn = smap(mesh, local, (P(), P("data"), P()), (P(), P()))
    opt = optax.sgd(0.1)

    def step(params, opt_state, batch):
        grads, losses = grads_fn(params, batch, grad_fn.init(params))
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, losses

    params, batch = problem()
    batch = jax.device_put(batch, NamedSharding(mesh, P("data")))
    assert_trees_close(train(opt.init, step, params, batch), one_device("tier1-mean"))


@pytest.mark.parametrize("name", ["mgda", "upgrad", "cagrad", "nash_mtl"])  # every solver family
def test_shard_map_tier2_weights_each_device_on_its_own_batch(mesh, name):
    """Inside shard_map the tier-2 Gram is the Gram of the device's local feature gradients.

    With per-device losses, each device's weights equal one-device
    ``split_value_and_grad`` on that device's quarter of the batch (MGDA-UB per device),
    and the gradient of the replicated parameters comes back summed over the devices (the
    transpose of shard_map's implicit broadcast is a ``psum``): on every device, the sum of
    the four one-device gradients. (The gradients are typed device-varying, since each
    device poisons them with NaN when its own losses are not finite, so each device's copy
    comes back on a leading axis.)
    """
    grad_fn = mtl.split_value_and_grad(models.encode, HEADS, getattr(mtl, name)())

    def local(params, batch, weighting_state):
        out = grad_fn(params, batch, weighting_state)
        return jax.tree_util.tree_map(lambda g: g[None], out.grads), mtl.task_weights(out.state)

    params, batch = problem()
    state = grad_fn.init(params)
    sharded = jax.device_put(batch, NamedSharding(mesh, P("data")))
    grads, weights = smap(mesh, local, (P(), P("data"), P()), (P("data"), P("data")))(
        params, sharded, state
    )
    quarters = [tuple(x[4 * d : 4 * d + 4] for x in batch) for d in range(4)]
    per_device = [jax.jit(grad_fn)(params, q, state) for q in quarters]
    np.testing.assert_allclose(
        np.asarray(weights).reshape(4, K),
        np.stack([mtl.task_weights(o) for o in per_device]),
        rtol=RTOL,
        atol=ATOL,
    )
    summed = jax.tree_util.tree_map(
        lambda *g: np.broadcast_to(np.sum(np.stack(g), 0), (4, *g[0].shape)),
        *[o.grads for o in per_device],
    )
    assert_trees_close(grads, summed)
    assert not np.allclose(np.asarray(weights)[:K], np.asarray(weights)[K : 2 * K])

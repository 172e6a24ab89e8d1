"""The structured Gram and the IWRM step on 4 devices equal one device.

Two IWRM steps (``mtl.instance_wise_value_and_grad``: the per-example Gram from the
structured engine, Aligned-MTL weights (a full-Gram weighting that compiles quickly),
``Σ_b w_b g_b`` from the stored values; then SGD) of a small MLP, with the batch split over
4 devices (data parallel) and, in a second layout, the parameters sharded on their leading
axis too (FSDP-style); losses, update and weights are
compared with the same steps on one device to float32 reassociation tolerance.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import mtl_optax as mtl

STEPS = 2
RTOL, ATOL = 2e-5, 1e-6
FSDP_SPECS = [{"w": P("data", None), "b": P("data")}, {"w": P("data", None), "b": P()}]


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((4,), ("data",), axis_types=(AxisType.Auto,))


def problem():
    rng = np.random.default_rng(0)
    params = [
        {"w": rng.standard_normal((8, 8)) / 3, "b": 0.1 * rng.standard_normal(8)},
        {"w": rng.standard_normal((8, 3)) / 3, "b": 0.1 * rng.standard_normal(3)},
    ]
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), params)
    batch = (jnp.asarray(rng.standard_normal((16, 8)), jnp.float32), jnp.arange(16) % 3)
    return params, batch


def losses_fn(params, batch):
    x, y = batch
    h = jax.nn.relu(x @ params[0]["w"] + params[0]["b"])
    return optax.softmax_cross_entropy_with_integer_labels(h @ params[1]["w"] + params[1]["b"], y)


def train(params, batch, constrain=None):
    grad_fn = mtl.instance_wise_value_and_grad(losses_fn, mtl.aligned_mtl(), batch_size=16)

    @jax.jit
    def step(params, state, batch):
        losses, grads, state = grad_fn(params, batch, state)
        params = jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, params, grads)
        if constrain is not None:
            params = jax.lax.with_sharding_constraint(params, constrain)
        return params, state, (losses, grads, mtl.task_weights(state))

    state = grad_fn.init(params)
    for _ in range(STEPS):
        params, state, out = step(params, state, batch)
    return params, out


@functools.cache
def one_device():
    params, batch = jax.device_put(problem(), jax.devices()[0])
    return train(params, batch)


def assert_trees_close(actual, expected):
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), b, rtol=RTOL, atol=ATOL),
        actual,
        expected,
    )


def test_data_parallel_iwrm_equals_one_device(mesh):
    params, batch = problem()
    params = jax.device_put(params, NamedSharding(mesh, P()))
    batch = jax.device_put(batch, NamedSharding(mesh, P("data")))
    assert len(batch[0].addressable_shards) == 4
    assert_trees_close(train(params, batch), one_device())


def test_fsdp_sharded_parameters_iwrm_equals_one_device(mesh):
    params, batch = problem()
    specs = jax.tree_util.tree_map(
        lambda s: NamedSharding(mesh, s), FSDP_SPECS, is_leaf=lambda x: isinstance(x, P)
    )
    params = jax.device_put(params, specs)
    batch = jax.device_put(batch, NamedSharding(mesh, P("data")))
    got_params, got_out = train(params, batch, constrain=specs)
    assert got_params[0]["w"].addressable_shards[0].data.shape == (2, 8)  # stays sharded
    assert_trees_close((got_params, got_out), one_device())

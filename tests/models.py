"""A tiny shared-trunk multi-task model used by the tier tests, with its heads in every form.

``init_params`` stacks the heads' parameters on a leading task axis (``params["heads"]["w"]``
is (K, d)); ``init_separate_params`` gives each head its own subtree. The heads:

* ``HEADS``: a sequence of per-task losses on the stacked parameters (every head reads the
  whole stacked leaf: per-task head gradients arrive stacked, role ``"task"``);
* ``NAMED_HEADS``: the same as a dict (task names);
* ``STACKED_HEADS``: ``mtl.stacked_heads`` on the stacked parameters (role ``"sliced"``);
* ``SEPARATE_HEADS``: a sequence on ``init_separate_params`` (each head leaf has one task).

All give the same losses as ``task_losses``.
"""

import jax
import jax.numpy as jnp

import mtl_optax as mtl

K = 3
NAMES = ("a", "b", "c")


def init_params(key, k=K, d_in=5, d_hidden=4):
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "trunk": {"w": jax.random.normal(k1, (d_in, d_hidden)), "b": jnp.zeros(d_hidden)},
        "heads": {
            "w": jax.random.normal(k2, (k, d_hidden)),
            "b": 0.1 * jax.random.normal(k3, (k,)),
        },
    }


def init_separate_params(key, k=K, d_in=5, d_hidden=4):
    params = init_params(key, k, d_in, d_hidden)
    heads = params["heads"]
    return {
        "trunk": params["trunk"],
        "heads": [{"w": heads["w"][i], "b": heads["b"][i]} for i in range(k)],
    }


SHARED = {"trunk": {"w": True, "b": True}, "heads": {"w": False, "b": False}}


def make_batch(key, k=K, n=8, d_in=5):
    kx, ky = jax.random.split(key)
    return jax.random.normal(kx, (n, d_in)), jax.random.normal(ky, (n, k))


def encode(params, batch):
    return jnp.tanh(batch[0] @ params["trunk"]["w"] + params["trunk"]["b"])


def heads(params, z, batch):
    """All K losses from one feature array (used to build the reference values)."""
    pred = z @ params["heads"]["w"].T + params["heads"]["b"]
    return jnp.mean((pred - batch[1]) ** 2, axis=0)


def task_losses(params, batch):
    return heads(params, encode(params, batch), batch)


def head_loss(head_params, z, batch, i):
    """The loss of task ``i`` from its head parameters ``{"w": (d,), "b": ()}``."""
    return jnp.mean((z @ head_params["w"] + head_params["b"] - batch[1][:, i]) ** 2)


def _stacked_head(i):
    return lambda p, z, b: head_loss(jax.tree_util.tree_map(lambda a: a[i], p["heads"]), z, b, i)


def _separate_head(i):
    return lambda p, z, b: head_loss(p["heads"][i], z, b, i)


HEADS = [_stacked_head(i) for i in range(K)]
NAMED_HEADS = dict(zip(NAMES, HEADS))
STACKED_HEADS = mtl.stacked_heads(head_loss, head_params=lambda params: params["heads"])
SEPARATE_HEADS = [_separate_head(i) for i in range(K)]

"""A tiny shared-trunk multi-task model used by the tier tests."""

import jax
import jax.numpy as jnp

K = 3


def init_params(key, k=K, d_in=5, d_hidden=4):
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "trunk": {"w": jax.random.normal(k1, (d_in, d_hidden)), "b": jnp.zeros(d_hidden)},
        "heads": {
            "w": jax.random.normal(k2, (k, d_hidden)),
            "b": 0.1 * jax.random.normal(k3, (k,)),
        },
    }


SHARED = {"trunk": {"w": True, "b": True}, "heads": {"w": False, "b": False}}


def make_batch(key, k=K, n=8, d_in=5):
    kx, ky = jax.random.split(key)
    return jax.random.normal(kx, (n, d_in)), jax.random.normal(ky, (n, k))


def encode(params, batch):
    return jnp.tanh(batch[0] @ params["trunk"]["w"] + params["trunk"]["b"])


def heads(params, z, batch):
    pred = z @ params["heads"]["w"].T + params["heads"]["b"]
    return jnp.mean((pred - batch[1]) ** 2, axis=0)


def task_losses(params, batch):
    return heads(params, encode(params, batch), batch)


def split_heads(params, features, batch):
    """``heads`` for the encoder/heads split: task i reads only ``features[i]``."""
    pred = jnp.einsum("kbd,kd->bk", features, params["heads"]["w"]) + params["heads"]["b"]
    return jnp.mean((pred - batch[1]) ** 2, axis=0)

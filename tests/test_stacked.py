"""Stacked aggregators: scipy / NumPy transcriptions, shared masks, state across steps."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.stats import trim_mean

import mtl_optax as mtl

K = 5


def grads(seed, k=K):
    rng = np.random.default_rng(seed)
    return {"trunk": rng.normal(size=(k, 4, 3)), "head": rng.normal(size=(k, 2))}


PARAMS = {"trunk": jnp.zeros((4, 3)), "head": jnp.zeros(2)}
SHARED = {"trunk": True, "head": False}


def apply(transform, tree, state, **extra):
    tree32 = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), tree)
    return jax.jit(transform.update)(tree32, state, PARAMS, **extra)


def test_trimmed_mean_matches_scipy_and_sums_heads():
    tree = grads(0)
    t = mtl.trimmed_mean(num_tasks=K, trim=1, shared=SHARED)
    out, _ = apply(t, tree, t.init(PARAMS))
    np.testing.assert_allclose(out["trunk"], trim_mean(tree["trunk"], 0.2, axis=0), rtol=1e-5)
    np.testing.assert_allclose(out["head"], tree["head"].sum(0), rtol=1e-5)
    with pytest.raises(ValueError, match="trim"):
        mtl.trimmed_mean(num_tasks=4, trim=2)


def graddrop_numpy(leaf, uniform, leak):
    purity = 0.5 * (1 + leaf.sum(0) / np.abs(leaf).sum(0))
    keep = ((purity > uniform) & (leaf > 0)) | ((purity < uniform) & (leaf < 0))
    leak = np.asarray(leak).reshape((-1,) + (1,) * (leaf.ndim - 1))
    return np.sum((leak + (1 - leak) * keep) * leaf, axis=0)


def test_graddrop_matches_transcription_with_same_draws():
    tree = grads(1)
    key = jax.random.PRNGKey(4)
    leak = np.linspace(0.0, 0.4, K)
    t = mtl.graddrop(num_tasks=K, key=key, leak=leak, shared=SHARED)
    state = t.init(PARAMS)
    for _ in range(2):
        _, sub = jax.random.split(state.key)
        leaf_keys = jax.random.split(sub, 2)  # leaves in tree order: head, trunk
        out, state = apply(t, tree, state)
        uniform = np.asarray(jax.random.uniform(leaf_keys[1], (4, 3)), np.float64)
        ref = graddrop_numpy(tree["trunk"], uniform, leak)
        np.testing.assert_allclose(out["trunk"], ref, rtol=1e-5, atol=1e-6)
    full_leak = mtl.graddrop(num_tasks=K, key=key, leak=1.0)
    out, _ = apply(full_leak, tree, full_leak.init(PARAMS))
    np.testing.assert_allclose(out["trunk"], tree["trunk"].sum(0), rtol=1e-5)
    with pytest.raises(ValueError, match="leak"):
        mtl.graddrop(num_tasks=K, key=key, leak=1.5)


def test_db_mtl_matches_transcription_over_steps():
    t = mtl.db_mtl(num_tasks=K, shared=SHARED)
    state = t.init(PARAMS)
    buffer = np.zeros((K, 12))
    for step in range(1, 4):
        tree = grads(10 + step)
        losses = np.random.default_rng(step).uniform(0.1, 3.0, size=K)
        out, state = apply(t, tree, state, task_losses=jnp.asarray(losses, jnp.float32))
        h = tree["trunk"].reshape(K, -1) / (losses[:, None] + 1e-8)
        buffer = h + 0.9 / step**0.5 * (buffer - h)
        norms = np.linalg.norm(buffer, axis=1)
        ref = (norms.max() / norms) @ buffer
        np.testing.assert_allclose(out["trunk"].reshape(-1), ref, rtol=1e-4)
        head = (tree["head"] / (losses[:, None] + 1e-8)).sum(0)
        np.testing.assert_allclose(out["head"], head, rtol=1e-5)
    with pytest.raises(ValueError, match="task_losses"):
        apply(t, grads(0), state)


@pytest.mark.parametrize("warmup", [0, 2])
def test_excess_mtl_matches_transcription(warmup):
    t = mtl.excess_mtl(num_tasks=K, n_warmup_steps=warmup, shared=SHARED)
    state = t.init(PARAMS)
    squares, weights, baseline, warm_sum = np.zeros((K, 12)), np.full(K, 1 / K), None, 0
    for step in range(5):
        tree = grads(20 + step)
        out, state = apply(t, tree, state)
        g = tree["trunk"].reshape(K, -1)
        squares += g**2
        excess = (g**2 / np.sqrt(squares + 1e-7)).sum(1)
        if step < warmup:
            warm_sum = warm_sum + excess
        else:
            if baseline is None:
                baseline = warm_sum / warmup if warmup else excess
                scaled = excess / (baseline + 1e-7) if warmup else excess
            else:
                scaled = excess / (baseline + 1e-7)
            logits = np.log(weights) + scaled
            weights = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        np.testing.assert_allclose(out["trunk"].reshape(-1), weights @ g, rtol=1e-4, atol=1e-6)


def test_chains_with_optax_and_task_gradients_wrapper():
    params = {"trunk": jnp.ones((4, 3)), "head": jnp.ones(2)}
    opt = optax.chain(mtl.trimmed_mean(num_tasks=K, trim=1, shared=SHARED), optax.sgd(0.1))
    tree = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), grads(3))
    updates, _ = opt.update(mtl.TaskGradients(tree), opt.init(params), params)
    assert jax.tree_util.tree_map(jnp.shape, updates) == jax.tree_util.tree_map(jnp.shape, params)
    with pytest.raises(ValueError, match="task axis"):
        opt.update({"trunk": jnp.ones((3, 4, 3)), "head": jnp.ones((3, 2))}, opt.init(params))

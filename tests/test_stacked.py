"""Stacked aggregators through aggregate: scipy / NumPy transcriptions, shared masks, state
across steps, the split's output and the head rule."""

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


def through_aggregate(method):
    return mtl.aggregate(method, tasks=K, shared=SHARED)


def apply(transform, tree, state, **extra):
    tree32 = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), tree)
    return jax.jit(transform.update)(mtl.TaskGradients(tree32), state, PARAMS, **extra)


def test_trimmed_mean_matches_scipy_and_sums_heads():
    tree = grads(0)
    t = through_aggregate(mtl.trimmed_mean(trim=1))
    out, state = apply(t, tree, t.init(PARAMS))
    np.testing.assert_allclose(out["trunk"], trim_mean(tree["trunk"], 0.2, axis=0), rtol=1e-5)
    np.testing.assert_allclose(out["head"], tree["head"].sum(0), rtol=1e-5)
    assert np.all(np.isnan(mtl.task_weights(state)))  # no task weights: documented NaN
    with pytest.raises(ValueError, match="trim"):
        mtl.aggregate(mtl.trimmed_mean(trim=2), tasks=4, shared=True).init(PARAMS)


def graddrop_numpy(leaf, uniform, leak):
    purity = 0.5 * (1 + leaf.sum(0) / np.abs(leaf).sum(0))
    keep = ((purity > uniform) & (leaf > 0)) | ((purity < uniform) & (leaf < 0))
    leak = np.asarray(leak).reshape((-1,) + (1,) * (leaf.ndim - 1))
    return np.sum((leak + (1 - leak) * keep) * leaf, axis=0)


def test_graddrop_matches_transcription_with_same_draws():
    tree = grads(1)
    key = jax.random.PRNGKey(4)
    leak = np.linspace(0.0, 0.4, K)
    t = through_aggregate(mtl.graddrop(key=key, leak=leak))
    state = t.init(PARAMS)
    for _ in range(2):
        _, sub = jax.random.split(state.method_state.key)
        leaf_keys = jax.random.split(sub, 2)  # leaves in tree order: head, trunk
        out, state = apply(t, tree, state)
        uniform = np.asarray(jax.random.uniform(leaf_keys[1], (4, 3)), np.float64)
        ref = graddrop_numpy(tree["trunk"], uniform, leak)
        np.testing.assert_allclose(out["trunk"], ref, rtol=1e-5, atol=1e-6)
    full_leak = through_aggregate(mtl.graddrop(key=key, leak=1.0))
    out, _ = apply(full_leak, tree, full_leak.init(PARAMS))
    np.testing.assert_allclose(out["trunk"], tree["trunk"].sum(0), rtol=1e-5)
    with pytest.raises(ValueError, match="leak"):
        mtl.graddrop(key=key, leak=1.5)


def test_db_mtl_matches_transcription_over_steps():
    t = through_aggregate(mtl.db_mtl(beta_sigma=0.5))  # a decaying rate, to see the schedule
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
    t = through_aggregate(  # torchjd's conventions (the transcription below)
        mtl.excess_mtl(
            n_warmup_steps=warmup,
            robust_step_size=1.0,
            scale_by_num_tasks=False,
            update_first_call=True,
        )
    )
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
        np.testing.assert_allclose(mtl.task_weights(state), weights, rtol=1e-4, atol=1e-7)


def test_chains_with_optax():
    params = {"trunk": jnp.ones((4, 3)), "head": jnp.ones(2)}
    opt = optax.chain(through_aggregate(mtl.trimmed_mean(trim=1)), optax.sgd(0.1))
    tree = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), grads(3))
    updates, _ = opt.update(mtl.TaskGradients(tree), opt.init(params), params)
    assert jax.tree_util.tree_map(jnp.shape, updates) == jax.tree_util.tree_map(jnp.shape, params)


@pytest.mark.parametrize("name", ["trimmed_mean", "graddrop", "db_mtl", "excess_mtl"])
def test_stacked_methods_take_the_split_and_follow_the_head_rule(name):
    """Through the split (no mask) each stacked method combines the encoder exactly as on the
    masked full Jacobian, and each head gets c_i ∇L_i (c = 1, DB-MTL: 1/(L_i + eps))."""
    from tests import models, zoo

    k = models.K
    params = models.init_separate_params(jax.random.PRNGKey(0))
    batch = models.make_batch(jax.random.PRNGKey(1))
    losses, split_grads = mtl.split_value_and_jacobian(models.encode, models.SEPARATE_HEADS)(
        params, batch
    )
    task_losses = lambda p, b: jnp.stack(
        [h(p, models.encode(p, b), b) for h in models.SEPARATE_HEADS]
    )  # noqa: E731
    _, full_grads = mtl.value_and_jacobian(task_losses)(params, batch)
    split_t = mtl.aggregate(zoo.STACKED[name](k), tasks=k)
    full_t = mtl.aggregate(zoo.STACKED[name](k), tasks=k, shared={"trunk": True, "heads": False})
    ss, sf = split_t.init(params), full_t.init(params)
    for _ in range(2):  # state carried: identical on both paths
        us, ss = split_t.update(split_grads, ss, params, task_losses=losses)
        uf, sf = full_t.update(full_grads, sf, params, task_losses=losses)
        jax.tree_util.tree_map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), us, uf
        )
    scale = 1.0 / (np.asarray(losses) + 1e-8) if name == "db_mtl" else np.ones(k)
    for i in range(k):
        own = jax.grad(lambda p, i=i: task_losses(p, batch)[i])(params)["heads"][i]
        jax.tree_util.tree_map(
            lambda u, g, i=i: np.testing.assert_allclose(u, scale[i] * g, rtol=1e-5, atol=1e-6),
            us["heads"][i],
            own,
        )

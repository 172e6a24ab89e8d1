"""Loss weightings as pure Weightings: jit, vmap, serialisation, degenerate losses.

Every weighting of ``tests/zoo.py`` that reads the losses is run over a few steps of
state evolution: under ``jax.jit`` against eager execution, under ``jax.vmap`` over a
batch of loss sequences and states against one-by-one runs, and through
``flax.serialization`` with a bit-identical continuation.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization

from tests.zoo import WEIGHTINGS

K = 3
STEPS = 4
NAMES = [
    "initial_loss",
    "initial_loss_given",
    "prior_loss",
    "real_time",
    "generalized_mean",
    "generalized_mean_max",
    "geometric_mean",
    "uncertainty",
    "imtl_l",
    "gradnorm",
    "famo",
    "dwa",
    "stch",
    "random",
]
RNG = np.random.default_rng(2)
LOSSES = RNG.uniform(0.2, 3.0, size=(3, STEPS, K)).astype(np.float32)  # (batch, steps, K)
JACS = RNG.normal(size=(3, STEPS, K, 6))
GRAMS = np.einsum("bskd,bsjd->bskj", JACS, JACS).astype(np.float32)


def gram_for(weighting, gram):
    return jnp.asarray(gram) if weighting.needs_gram else None


def run(weighting, update, losses_seq, grams_seq, state):
    out = []
    for losses, gram in zip(losses_seq, grams_seq):
        weights, state = update(gram_for(weighting, gram), jnp.asarray(losses), state)
        out.append(weights)
    return jnp.stack(out), state


@pytest.mark.parametrize("name", NAMES)
def test_jit_vmap_and_checkpoint_continuation(name):
    weighting = WEIGHTINGS[name](K)
    jitted = jax.jit(weighting.update)
    eager, _ = run(weighting, weighting.update, LOSSES[0], GRAMS[0], weighting.init(K))
    compiled, state = run(weighting, jitted, LOSSES[0], GRAMS[0], weighting.init(K))
    assert compiled.shape == (STEPS, K) and compiled.dtype == jnp.float32
    np.testing.assert_allclose(compiled, eager, rtol=1e-6, atol=1e-7)
    assert bool(jnp.all(jnp.isfinite(compiled)))

    # vmap over a batch of loss vectors (and Grams) and states
    states = jax.tree_util.tree_map(lambda x: jnp.stack([x] * 3), weighting.init(K))
    batched_update = jax.jit(
        jax.vmap(weighting.update, in_axes=(0 if weighting.needs_gram else None, 0, 0))
    )
    batched = []
    for t in range(STEPS):
        grams = jnp.asarray(GRAMS[:, t]) if weighting.needs_gram else None
        weights, states = batched_update(grams, jnp.asarray(LOSSES[:, t]), states)
        batched.append(weights)
    for b in range(3):
        one, _ = run(weighting, jitted, LOSSES[b], GRAMS[b], weighting.init(K))
        np.testing.assert_allclose(jnp.stack(batched)[:, b], one, rtol=1e-6, atol=1e-7)

    # serialise mid-run, restore into a fresh state, continue: bit-identical
    restored = serialization.from_bytes(weighting.init(K), serialization.to_bytes(state))
    later = LOSSES[1], GRAMS[1]
    continued, _ = run(weighting, jitted, *later, state)
    resumed, _ = run(weighting, jitted, *later, restored)
    np.testing.assert_array_equal(resumed, continued)


@pytest.mark.parametrize("name", NAMES)
def test_zero_losses_and_a_single_task_are_finite(name):
    for k, losses in ((K, np.zeros(K)), (K, np.array([0.0, 1.0, 2.0])), (1, np.ones(1))):
        weighting = WEIGHTINGS[name](k)
        state = weighting.init(k)
        gram = jnp.eye(k) if weighting.needs_gram else None
        for _ in range(3):  # past the warm-up / window of the stateful ones
            weights, state = weighting.update(gram, jnp.asarray(losses, jnp.float32), state)
            assert weights.shape == (k,) and bool(jnp.all(jnp.isfinite(weights))), (k, weights)


def test_float64_losses_give_float64_weights_and_stable_state_dtypes():
    with jax.enable_x64(True):
        for name in NAMES:
            weighting = WEIGHTINGS[name](K)
            state = weighting.init(K)
            gram = jnp.eye(K, dtype=jnp.float64) if weighting.needs_gram else None
            for _ in range(3):
                weights, new_state = weighting.update(
                    gram, jnp.array([0.5, 1.0, 2.0], jnp.float64), state
                )
                dtypes = [x.dtype for x in jax.tree_util.tree_leaves(state)]
                assert [x.dtype for x in jax.tree_util.tree_leaves(new_state)] == dtypes, name
                state = new_state
            assert weights.dtype == jnp.float64, name


@pytest.mark.parametrize("name", NAMES)
def test_a_non_finite_step_gives_nan_weights_and_leaves_the_state(name):
    weighting = WEIGHTINGS[name](K)
    update = jax.jit(weighting.update)
    _, state = run(weighting, update, LOSSES[0][:2], GRAMS[0][:2], weighting.init(K))
    bad = jnp.asarray(LOSSES[0][2]).at[1].set(jnp.nan)
    weights, after = update(gram_for(weighting, GRAMS[0][2]), bad, state)
    if name not in ("random", "initial_loss_given", "prior_loss"):  # these ignore the values
        assert bool(jnp.any(jnp.isnan(weights))), weights
        for a, b in zip(jax.tree_util.tree_leaves(after), jax.tree_util.tree_leaves(state)):
            np.testing.assert_array_equal(a, b)

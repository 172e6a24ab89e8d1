"""Bad inputs at the weighting level: each is a clear error naming the argument and the fix,
or a documented result (NaN weights, so ``optax.apply_if_finite`` skips the step), both
eagerly and under ``jax.jit``. One test per class of bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtl_optax as mtl
from tests.zoo import WEIGHTINGS

K = 3
GRAM = jnp.asarray(np.array([[2.0, 0.3, -0.4], [0.3, 1.0, 0.2], [-0.4, 0.2, 1.5]]), jnp.float32)
LOSSES = jnp.array([0.5, 1.0, 2.0])


def call(weighting, gram, losses, state=None, jit=False, **extra):
    gram = gram if weighting.needs_gram else None
    losses = losses if weighting.needs_losses else None
    state = weighting.init(K) if state is None else state
    update = jax.jit(weighting.update) if jit else weighting.update
    return update(gram, losses, state, **extra)


def test_constant_weighting_rejects_non_real_or_non_finite_or_traced_weights():
    for bad, error, match in (
        (["1", "2"], TypeError, "weights.*real numbers"),
        ("12", TypeError, "weights.*real numbers"),
        ([1 + 1j, 2.0], TypeError, "weights.*real numbers.*complex"),
        ([True, False], TypeError, "weights.*real numbers.*bool"),
        ([1.0, float("nan")], ValueError, "weights.*NaN or infinite"),
        ([1.0, float("inf")], ValueError, "weights.*NaN or infinite"),
        ([[1.0, 2.0]], ValueError, "weights.*shape \\(1, 2\\)"),
        ([], ValueError, "weights.*shape \\(0,\\)"),
    ):
        with pytest.raises(error, match=match):
            mtl.constant_weighting(bad)

    for traced in (jnp.ones(2), [jnp.ones(()), jnp.ones(())]):
        with pytest.raises(TypeError, match="weights.*traced.*outside the jitted function"):
            jax.jit(lambda w: mtl.constant_weighting(w).update(None, None, ())[0])(traced)
    w = mtl.constant_weighting(jnp.array([1.0, -0.5]))  # concrete JAX arrays are fine
    weights = jax.jit(w.update)(None, jnp.ones(2), w.init(2))[0]
    np.testing.assert_array_equal(weights, [1.0, -0.5])


def test_all_false_primary_mask_raises_eagerly_and_gives_nan_under_jit():
    primary = jnp.zeros(K, bool)
    with pytest.raises(ValueError, match="primary.*at least one primary task"):
        mtl.min_norm_weights(GRAM, primary)
    weights = jax.jit(mtl.min_norm_weights)(GRAM, primary)
    assert bool(jnp.all(jnp.isnan(weights)))
    some = jax.jit(mtl.min_norm_weights)(GRAM, primary.at[0].set(True))
    assert bool(jnp.all(jnp.isfinite(some)))
    with pytest.raises(ValueError, match="primary.*not bools"):
        mtl.primary_auxiliary(primary=[False, False, False])


@pytest.mark.parametrize(
    "factory", [mtl.pcgrad, mtl.gradvac, mtl.random_weighting], ids=["pcgrad", "gradvac", "rlw"]
)
def test_missing_or_wrong_prng_key_is_named(factory):
    for bad in (None, 0, "key", 1.5, jnp.zeros(2, jnp.float32)):
        with pytest.raises(TypeError, match="`key` (must be|is required).*PRNG"):
            factory(key=bad)


@pytest.mark.parametrize(
    ("build", "name"),
    [
        (lambda v: mtl.aligned_mtl(pref_vector=v), "pref_vector"),
        (lambda v: mtl.config(pref_vector=v), "pref_vector"),
        (lambda v: mtl.upgrad(pref_vector=v), "pref_vector"),
        (lambda v: mtl.dualproj(pref_vector=v), "pref_vector"),
        (lambda v: mtl.prior_loss_weighting(v), "prior"),
        (lambda v: mtl.initial_loss_weighting(initial=v), "initial"),
        (lambda v: mtl.famo(min_losses=v), "min_losses"),
    ],
)
def test_strings_and_complex_numbers_for_per_task_vectors_are_named(build, name):
    for bad in (["a", "b", "c"], "abc", [1 + 2j, 1.0, 1.0], [True, True, False]):
        with pytest.raises(TypeError, match=f"`{name}` must be .*real numbers"):
            build(bad)
    with pytest.raises(ValueError, match=f"`{name}`"):
        build([1.0, float("nan"), 1.0])


LOSS_WEIGHTINGS = [name for name, f in WEIGHTINGS.items() if f(K).needs_losses]


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("bad", [np.inf, np.nan], ids=["inf", "nan"])
@pytest.mark.parametrize("name", LOSS_WEIGHTINGS)
def test_non_finite_loss_gives_nan_weights_for_every_loss_weighting(name, bad, jit):
    """An infinite loss is never silently weighted 0 (``1/inf``): all weights NaN, the
    state unchanged (a skipped step does not poison it)."""
    weighting = WEIGHTINGS[name](K)
    state = weighting.init(K)
    weights, new_state = call(weighting, GRAM, LOSSES.at[1].set(bad), state, jit=jit)
    assert bool(jnp.all(jnp.isnan(weights))), (name, weights)
    if name != "random":  # its key advances: the draw is independent of the losses
        for old, new in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(new_state)):
            np.testing.assert_array_equal(old, new)


NEGATIVE_REJECTED = ["dwa", "gradnorm", "stch", "famo", "real_time", "geometric_mean"]


@pytest.mark.parametrize("name", NEGATIVE_REJECTED)
def test_negative_losses_are_rejected_by_methods_that_take_logs_or_ratios(name):
    """A ``ValueError`` when concrete; NaN weights and an unchanged state under ``jit``."""
    weighting = WEIGHTINGS[name](K)
    negative = LOSSES.at[0].set(-0.1)
    with pytest.raises(ValueError, match="must be ≥ 0.*Shift the losses"):
        call(weighting, GRAM, negative)
    state = weighting.init(K)
    weights, new_state = call(weighting, GRAM, negative, state, jit=True)
    assert bool(jnp.all(jnp.isnan(weights)))
    for old, new in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(new_state)):
        np.testing.assert_array_equal(old, new)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("name", ["sdmgrad", "modo"])
def test_two_batch_methods_need_cross_gram(name, jit):
    weighting = getattr(mtl, name)()
    with pytest.raises(ValueError, match=f"cross_gram=A.*{name}\\(single_batch=True\\)"):
        call(weighting, GRAM, LOSSES, jit=jit)
    weights, _ = call(weighting, GRAM, LOSSES, jit=jit, cross_gram=GRAM)
    assert bool(jnp.all(jnp.isfinite(weights)))


# The check is shared (``check_inputs``): one method per solver family and every method
# whose walk over G could otherwise skip NaN entries.
GRAM_WEIGHTINGS = [
    "mgda", "primary_auxiliary", "upgrad", "cagrad", "nash_mtl", "aligned_mtl", "pcgrad",
    "gradvac", "krum", "sdmgrad",
]  # fmt: skip


@pytest.mark.parametrize("name", GRAM_WEIGHTINGS)
def test_non_symmetric_gram_is_an_error_eagerly_and_nan_under_jit(name):
    weighting = WEIGHTINGS[name](K)
    skewed = GRAM.at[0, 1].add(0.5)
    with pytest.raises(ValueError, match="symmetric.*\\(G \\+ G.T\\) / 2"):
        call(weighting, skewed, LOSSES)
    weights, _ = call(weighting, skewed, LOSSES, jit=True)
    assert bool(jnp.all(jnp.isnan(weights))), (name, weights)
    rounding = GRAM.at[0, 1].add(1e-7)  # asymmetry at rounding level is accepted
    weights, _ = call(weighting, rounding, LOSSES, jit=True)
    assert bool(jnp.all(jnp.isfinite(weights))), (name, weights)


def test_db_mtl_rejects_eps_zero_and_negative_losses():
    """``log(L_i + eps)``: eps = 0 is rejected when built; a loss ≤ −eps raises when
    concrete and gives a NaN update (state unchanged) under ``jit``."""
    for bad in (0, 0.0, -1e-8):
        with pytest.raises(ValueError, match="eps.*> 0"):
            mtl.db_mtl(eps=bad)
    transform = mtl.aggregate(mtl.db_mtl(), tasks=K, shared=True)
    params = jnp.zeros(4)
    grads = mtl.TaskGradients(jnp.asarray(np.random.default_rng(0).normal(size=(K, 4))))
    negative = LOSSES.at[0].set(-0.5)
    with pytest.raises(ValueError, match="db_mtl takes log.*Shift the losses"):
        transform.update(grads, transform.init(params), params, task_losses=negative)
    state = transform.init(params)
    u, new_state = jax.jit(transform.update)(grads, state, params, task_losses=negative)
    assert bool(jnp.all(jnp.isnan(u)))
    for old, new in zip(
        jax.tree_util.tree_leaves(state.method_state),
        jax.tree_util.tree_leaves(new_state.method_state),
    ):
        np.testing.assert_array_equal(old, new)

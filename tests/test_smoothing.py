"""CR-MOGM (``cr_mogm``) against torchjd 0.18's ``CRMOGMWeighting`` and the EMA it defines.

Fixtures from ``tests/fixtures/make_new_method_fixtures.py`` (torch is never imported here):
torchjd's smoothed weights over sequences of Gram matrices, wrapping UPGrad (defaults) and
DualProj (``alpha=0.5``, given ``initial_weights``). Independently of torchjd, the weights
must be the EMA of the wrapped weighting's own outputs, call after call, for Gram and loss
weightings, with stateful wrapped weightings, schedules and forwarded extra arguments.
"""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtl_optax as mtl

FIXTURES = np.load(pathlib.Path(__file__).parent / "fixtures" / "new_methods.npz")
SEQUENCES = ["k3", "k5_scaled"]
CONFIGS = {
    "upgrad": lambda initial: mtl.cr_mogm(mtl.upgrad()),
    "dualproj_a05_init": lambda initial: mtl.cr_mogm(
        mtl.dualproj(), alpha=0.5, initial_weights=initial
    ),
}


def run(weighting, grams=None, losses=None, **extra):
    """Weights of ``weighting`` over a sequence (jitted, state carried), as (T, K)."""
    steps = len(grams if grams is not None else losses)
    k = (grams if grams is not None else losses).shape[1]
    state, update, out = weighting.init(k), jax.jit(weighting.update), []
    for t in range(steps):
        gram = None if grams is None else jnp.asarray(grams[t], jnp.float32)
        loss = None if losses is None else jnp.asarray(losses[t], jnp.float32)
        step_extra = {name: jnp.asarray(value[t], jnp.float32) for name, value in extra.items()}
        weights, state = update(gram, loss, state, **step_extra)
        out.append(np.asarray(weights, np.float64))
    return np.stack(out), state


@pytest.mark.parametrize("seq", SEQUENCES)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_matches_torchjd_call_by_call(seq, config):
    grams = FIXTURES[f"crmogm/{seq}/gram"]
    weighting = CONFIGS[config](FIXTURES[f"crmogm/{seq}/initial_weights"])
    ours, _ = run(weighting, grams)
    ref = FIXTURES[f"crmogm/{seq}/{config}"]
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


def ema(fresh, alphas, initial=None):
    """``λ_t = α_t λ_{t−1} + (1 − α_t) λ̂_t``, ``λ_0 = initial`` or ``λ̂_1``, in float64."""
    out, previous = [], fresh[0] if initial is None else initial
    for weights, alpha in zip(fresh, alphas):
        previous = alpha * previous + (1 - alpha) * weights
        out.append(previous)
    return np.stack(out)


def test_torchjd_output_is_the_ema_of_its_wrapped_weights():
    """The reference's semantics, as documented: torchjd's UPGrad weights alone, smoothed by
    the EMA recursion with ``λ_0 = λ̂_1``, are its CR-MOGM output."""
    for seq in SEQUENCES:
        alone = FIXTURES[f"crmogm/{seq}/upgrad_alone"]
        expected = ema(alone, [0.9] * len(alone))
        np.testing.assert_allclose(FIXTURES[f"crmogm/{seq}/upgrad"], expected, rtol=1e-12)


def sequence(k=3, steps=6, seed=0):
    rng = np.random.default_rng(seed)
    jacs = rng.normal(size=(steps, k, 8)) - 0.4 * rng.normal(size=(steps, 1, 8))
    grams = np.einsum("tkn,tln->tkl", jacs, jacs)
    return grams, rng.uniform(0.2, 3.0, (steps, k)), jacs


@pytest.mark.parametrize(
    ("inner", "uses"),
    [
        (lambda: mtl.modo(single_batch=True), "gram"),  # its weights are its state
        (lambda: mtl.famo(), "losses"),  # a learned, stateful loss weighting
        (lambda: mtl.dwa(window=1), "losses"),
    ],
)
def test_ema_of_stateful_wrapped_weightings_with_a_schedule(inner, uses):
    grams, losses, _ = sequence()
    schedule = optax.linear_schedule(0.0, 0.8, transition_steps=5)  # α_t grows, as in the paper
    alphas = [float(schedule(t)) for t in range(len(grams))]
    fresh, _ = run(inner(), grams if uses == "gram" else None, losses)
    smoothed, state = run(
        mtl.cr_mogm(inner(), alpha=schedule), grams if uses == "gram" else None, losses
    )
    np.testing.assert_allclose(smoothed, ema(fresh, alphas), rtol=2e-5, atol=1e-6)
    assert int(state.count) == len(grams)


def test_extra_arguments_reach_the_wrapped_weighting():
    grams, _, jacs = sequence(seed=1)
    cross = np.einsum("tkn,tln->tkl", jacs, np.roll(jacs, 1, axis=0))
    fresh, _ = run(mtl.sdmgrad(), grams, cross_gram=cross)
    without, _ = run(mtl.sdmgrad(single_batch=True), grams)
    assert not np.allclose(fresh, without)
    smoothed, _ = run(mtl.cr_mogm(mtl.sdmgrad(), alpha=0.7), grams, cross_gram=cross)
    np.testing.assert_allclose(smoothed, ema(fresh, [0.7] * len(fresh)), rtol=2e-5, atol=1e-6)


def test_alpha_limits_and_initial_weights():
    grams, _, _ = sequence(seed=2)
    fresh, _ = run(mtl.imtl_g(), grams)
    np.testing.assert_allclose(run(mtl.cr_mogm(mtl.imtl_g(), alpha=0.0), grams)[0], fresh)
    initial = np.array([0.2, 0.3, 0.5])
    frozen, _ = run(mtl.cr_mogm(mtl.imtl_g(), alpha=1.0, initial_weights=initial), grams)
    np.testing.assert_allclose(frozen, np.broadcast_to(initial, frozen.shape), rtol=1e-6)
    # initial_weights=None: the first call returns the wrapped weights whatever alpha
    first, _ = run(mtl.cr_mogm(mtl.imtl_g(), alpha=0.99), grams[:1])
    np.testing.assert_allclose(first[0], fresh[0], rtol=1e-6)


def test_declarations_follow_the_wrapped_weighting():
    for inner in (mtl.upgrad(), mtl.mgda(), mtl.famo(), mtl.gradnorm(), mtl.gradient_normalized()):
        wrapped = mtl.cr_mogm(inner)
        assert wrapped.needs_gram == inner.needs_gram
        assert wrapped.needs_losses == inner.needs_losses
    assert mtl.cr_mogm(mtl.upgrad()).homogeneity == 0.0
    # weights of differently scaled past Grams do not scale together
    assert mtl.cr_mogm(mtl.gradient_normalized()).homogeneity is None
    assert mtl.cr_mogm(mtl.nash_mtl()).homogeneity is None


def test_non_finite_step_keeps_the_state():
    weighting = mtl.cr_mogm(mtl.imtl_g(), alpha=0.5)
    grams, _, _ = sequence(seed=3)
    update = jax.jit(weighting.update)
    weights, state = update(jnp.asarray(grams[0], jnp.float32), None, weighting.init(3))
    bad = jnp.asarray(grams[1], jnp.float32).at[0, 0].set(jnp.nan)
    nan_weights, after = update(bad, None, state)
    assert np.all(np.isnan(nan_weights))
    np.testing.assert_array_equal(after.weights, state.weights)
    assert int(after.count) == int(state.count)


def test_schedule_out_of_range():
    weighting = mtl.cr_mogm(mtl.imtl_g(), alpha=lambda count: 1.5 - count)
    gram = jnp.eye(3)
    with pytest.raises(ValueError, match=r"alpha.*\[0, 1\]"):
        weighting.update(gram, None, weighting.init(3))
    weights, _ = jax.jit(weighting.update)(gram, None, weighting.init(3))
    assert np.all(np.isnan(weights))
    vector = mtl.cr_mogm(mtl.imtl_g(), alpha=lambda count: jnp.ones(2))
    with pytest.raises(ValueError, match="scalar"):
        vector.update(gram, None, vector.init(3))


def test_state_and_task_count_errors():
    weighting = mtl.cr_mogm(mtl.imtl_g(), initial_weights=[0.5, 0.5])
    with pytest.raises(ValueError, match="initial_weights.*3 tasks"):
        weighting.init(3)
    with pytest.raises(TypeError, match="state"):
        weighting.update(jnp.eye(2), None, mtl.imtl_g().init(2))
    with pytest.raises(ValueError, match="init"):
        mtl.cr_mogm(mtl.mean_weighting()).update(
            jnp.eye(3), jnp.ones(3), mtl.cr_mogm(mtl.mean_weighting()).init(2)
        )


@pytest.mark.parametrize(
    ("build", "error"),
    [
        (lambda: mtl.cr_mogm(lambda gram: gram), TypeError),
        (lambda: mtl.cr_mogm(optax.adam(1e-3)), TypeError),
        (lambda: mtl.cr_mogm(mtl.upgrad(), alpha=float("nan")), ValueError),
        (lambda: mtl.cr_mogm(mtl.upgrad(), alpha=-0.1), ValueError),
        (lambda: mtl.cr_mogm(mtl.upgrad(), alpha=1.1), ValueError),
        (lambda: mtl.cr_mogm(mtl.upgrad(), alpha=True), TypeError),
        (lambda: mtl.cr_mogm(mtl.upgrad(), alpha="0.9"), TypeError),
        (lambda: mtl.cr_mogm(mtl.upgrad(), alpha=None), TypeError),
        (lambda: mtl.cr_mogm(mtl.upgrad(), initial_weights=[0.5, float("nan")]), ValueError),
        (lambda: mtl.cr_mogm(mtl.upgrad(), initial_weights=[[0.5, 0.5]]), ValueError),
        (lambda: mtl.cr_mogm(mtl.upgrad(), initial_weights=[]), ValueError),
        (lambda: mtl.cr_mogm(mtl.upgrad(), initial_weights=["a"]), TypeError),
        (lambda: mtl.cr_mogm(mtl.upgrad(), initial_weights=[True, False]), TypeError),
        (lambda: mtl.cr_mogm(mtl.upgrad(), initial_weights=[1j, 1.0]), ValueError),
    ],
)
def test_bad_arguments(build, error):
    with pytest.raises(error):
        build()

"""Loss-only weightings against float64 NumPy transcriptions of their formulas.

Initial / prior / real-time / generalized-mean weightings, DWA, STCH and random weighting:
each output is compared with an independent float64 computation (finite differences of the
generalized mean, window bookkeeping of DWA, STCH's warm-up then nadir), and the claimed
invariances are checked as properties of the update ``Σ_i w_i g_i``.
"""

import math

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

import mtl_optax as mtl

RNG = np.random.default_rng(0)
LOSS_SEQUENCE = RNG.uniform(0.2, 3.0, size=(9, 3))


def run_sequence(weighting, losses_seq, k=None):
    """Weights of ``weighting`` over a sequence of loss vectors (jitted update)."""
    k = k or len(losses_seq[0])
    update = jax.jit(weighting.update)
    state, out = weighting.init(k), []
    for losses in losses_seq:
        weights, state = update(None, jnp.asarray(losses, jnp.float32), state)
        out.append(np.asarray(weights))
    return np.stack(out), state


# --------------------------------------------------------------------------- reference losses
def test_reference_loss_helpers_match_their_definitions():
    # log C is the cross-entropy of uniform (zero-logit) predictions
    assert mtl.cross_entropy_initial_loss(7) == pytest.approx(-np.log(1 / 7), rel=1e-12)
    labels = np.array([0, 0, 0, 1, 2, 2, 4])
    p = np.bincount(labels, minlength=5) / labels.size
    # the label entropy is the mean CE of predicting p for every example
    mean_ce = -np.mean(np.log(p[labels]))
    assert mtl.cross_entropy_prior_loss(labels, 5) == pytest.approx(mean_ce, rel=1e-12)
    y = RNG.normal(2.0, 3.0, size=(50, 4))
    assert mtl.squared_error_initial_loss(y) == pytest.approx(np.mean((y**2).sum(1)), rel=1e-12)
    assert mtl.squared_error_prior_loss(y) == pytest.approx(y.var(axis=0).sum(), rel=1e-12)
    # 1-D targets are one scalar per example
    assert mtl.squared_error_prior_loss(y[:, 0]) == pytest.approx(y[:, 0].var(), rel=1e-12)


def test_initial_and_prior_weights_are_inverse_references():
    ref = np.array([np.log(10.0), 4.0, 0.5])
    for weighting in (mtl.initial_loss_weighting(initial=ref), mtl.prior_loss_weighting(ref)):
        weights, _ = run_sequence(weighting, LOSS_SEQUENCE[:2])
        np.testing.assert_allclose(weights, np.tile(1 / ref, (2, 1)), rtol=1e-6)


def test_initial_loss_running_mean_then_frozen():
    weights, state = run_sequence(mtl.initial_loss_weighting(steps=3), LOSS_SEQUENCE)
    for t in range(len(LOSS_SEQUENCE)):
        reference = LOSS_SEQUENCE[: min(t + 1, 3)].mean(axis=0)
        np.testing.assert_allclose(weights[t], 1 / reference, rtol=1e-6)
    assert int(state.count) == 3


# --------------------------------------------------------------------------- scale invariance
def update_direction(weighting, losses, jac):
    weights, _ = weighting.update(None, jnp.asarray(losses), weighting.init(len(losses)))
    return np.asarray(weights, np.float64) @ jac


@settings(max_examples=15, deadline=None)
@given(
    task=st.integers(0, 2),
    log10_scale=st.floats(-3, 3),
    seed=st.integers(0, 1000),
)
def test_rescaling_one_loss_leaves_the_update_unchanged(task, log10_scale, seed):
    """``L_j → c L_j`` (so ``g_j → c g_j``): real-time exact, geometric mean in direction."""
    rng = np.random.default_rng(seed)
    losses, jac = rng.uniform(0.1, 5.0, 3), rng.normal(size=(3, 6))
    scale = np.ones(3)
    scale[task] = 10.0**log10_scale
    scaled_losses, scaled_jac = losses * scale, jac * scale[:, None]
    for weighting in (mtl.real_time_weighting(), mtl.geometric_mean()):
        before = update_direction(weighting, losses, jac)
        after = update_direction(weighting, scaled_losses, scaled_jac)
        if np.linalg.norm(before) > 0:
            before, after = before / np.linalg.norm(before), after / np.linalg.norm(after)
        np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-5)


def test_real_time_update_is_exactly_invariant_to_a_factor_1000():
    losses, jac = np.array([0.7, 2.0, 0.05]), RNG.normal(size=(3, 5))
    w = mtl.real_time_weighting()
    scaled = update_direction(w, losses * [1, 1e3, 1], jac * np.array([[1], [1e3], [1]]))
    np.testing.assert_allclose(scaled, update_direction(w, losses, jac), rtol=1e-5)


# --------------------------------------------------------------------------- generalized mean
def power_mean64(losses, gamma):
    losses = np.asarray(losses, np.float64)
    if gamma == 0:
        return np.exp(np.mean(np.log(losses)))
    # log(mean L^γ)/γ without the cancellation of L^γ ≈ 1 + γ log L at small γ
    return np.exp(np.log1p(np.mean(np.expm1(gamma * np.log(losses)))) / gamma)


@pytest.mark.parametrize("gamma", [-2.0, -0.5, 0.5, 1.0, 2.0, 3.0])
def test_generalized_mean_weights_are_its_derivative(gamma):
    losses = np.array([0.3, 1.7, 0.9, 2.4])
    weights = np.asarray(
        mtl.generalized_mean(gamma=gamma).update(None, jnp.asarray(losses), None)[0]
    )
    h = 1e-6
    numeric = [
        (power_mean64(losses + h * e, gamma) - power_mean64(losses - h * e, gamma)) / (2 * h)
        for e in np.eye(4)
    ]
    np.testing.assert_allclose(weights, numeric, rtol=2e-5)


def test_generalized_mean_special_members_and_limits():
    losses = np.array([0.3, 1.7, 0.9, 2.4])
    run = lambda w: np.asarray(w.update(None, jnp.asarray(losses, jnp.float32), None)[0])
    np.testing.assert_allclose(run(mtl.generalized_mean(gamma=1.0)), np.full(4, 0.25), rtol=1e-6)
    # γ → 0: the float64 derivative (1/K) L_i^{γ-1} L(γ)^{1-γ}, approached from both sides ...
    for gamma in (1e-9, -1e-9):
        limit = losses ** (gamma - 1) * power_mean64(losses, gamma) ** (1 - gamma) / 4
        np.testing.assert_allclose(run(mtl.geometric_mean()), limit, rtol=1e-6)
    # ... which is GLS, w_i = (Π L)^{1/K} / (K L_i)
    gls = np.prod(losses) ** 0.25 / (4 * losses)
    np.testing.assert_allclose(run(mtl.generalized_mean(gamma=0.0)), gls, rtol=1e-6)
    np.testing.assert_allclose(run(mtl.geometric_mean()), gls, rtol=1e-6)
    # γ → ±∞: all the weight on the max / min, approached by large finite γ
    np.testing.assert_array_equal(run(mtl.generalized_mean(gamma=math.inf)), [0, 0, 0, 1])
    np.testing.assert_array_equal(run(mtl.generalized_mean(gamma=-math.inf)), [1, 0, 0, 0])
    # (at large finite γ the extreme's weight is L(γ)/L_max → K^{-1/γ}, the others vanish)
    for gamma, extreme in ((400.0, 3), (-400.0, 0)):
        expected = np.zeros(4)
        expected[extreme] = 4 ** (-1 / gamma)
        np.testing.assert_allclose(run(mtl.generalized_mean(gamma=gamma)), expected, atol=1e-6)
    # ties share the extreme
    tied = mtl.generalized_mean(gamma=math.inf).update(None, jnp.array([2.0, 1.0, 2.0]), None)[0]
    np.testing.assert_allclose(tied, [0.5, 0, 0.5])


def test_zero_losses_use_eps_and_negative_losses_are_rejected():
    for weighting in (mtl.real_time_weighting(), mtl.geometric_mean(), mtl.stch(warmup=1)):
        weights = weighting.update(None, jnp.array([0.0, 1.0]), weighting.init(2))[0]
        assert bool(jnp.all(jnp.isfinite(weights))), weights
        with pytest.raises(ValueError, match="logarithm.*≥ 0"):
            weighting.update(None, jnp.array([-0.1, 1.0]), weighting.init(2))
        jitted = jax.jit(weighting.update)(None, jnp.array([-0.1, 1.0]), weighting.init(2))[0]
        assert bool(jnp.any(jnp.isnan(jitted)))
    w = mtl.real_time_weighting(eps=1e-3).update(None, jnp.array([0.0, 1e-5, 2.0]), None)[0]
    np.testing.assert_allclose(w, [1e3, 1e3, 0.5], rtol=1e-6)


# --------------------------------------------------------------------------- DWA
def dwa64(losses_seq, window, temperature):
    k = losses_seq.shape[1]
    out, means = [], []
    for t in range(len(losses_seq)):
        if len(means) >= 2:
            rate = means[-1] / means[-2]
            e = np.exp(rate / temperature)
            out.append(k * e / e.sum())
        else:
            out.append(np.ones(k))
        if (t + 1) % window == 0:
            means.append(losses_seq[t + 1 - window : t + 1].mean(axis=0))
    return np.stack(out)


@pytest.mark.parametrize("window,temperature", [(1, 2.0), (2, 2.0), (3, 0.5)])
def test_dwa_matches_windowed_transcription(window, temperature):
    weights, _ = run_sequence(mtl.dwa(window=window, temperature=temperature), LOSS_SEQUENCE)
    np.testing.assert_allclose(weights, dwa64(LOSS_SEQUENCE, window, temperature), rtol=1e-5)
    np.testing.assert_allclose(weights.sum(axis=1), 3.0, rtol=1e-6)


# --------------------------------------------------------------------------- STCH
def stch64(losses_seq, warmup, nadir_steps, mu, factor, eps=1e-20):
    """Central differences of ``factor·μ·log Σ exp(log(L/z + ε)/μ)`` after the warm-up."""
    nadir = losses_seq[warmup : warmup + nadir_steps].mean(axis=0)
    value = lambda l: factor * mu * np.log(np.sum(np.exp(np.log(l / nadir + eps) / mu)))
    out = []
    for t, losses in enumerate(losses_seq):
        if t < warmup + nadir_steps:
            out.append(1 / (losses + eps))
            continue
        h = 1e-6
        out.append([(value(losses + h * e) - value(losses - h * e)) / (2 * h) for e in np.eye(3)])
    return np.stack(out)


@pytest.mark.parametrize(
    "warmup,nadir_steps,mu,scaled", [(0, 1, 1.0, True), (2, 2, 1.0, True), (1, 3, 0.1, False)]
)
def test_stch_warmup_then_nadir(warmup, nadir_steps, mu, scaled):
    weighting = mtl.stch(warmup=warmup, nadir_steps=nadir_steps, mu=mu, scale_by_num_tasks=scaled)
    weights, state = run_sequence(weighting, LOSS_SEQUENCE)
    expected = stch64(LOSS_SEQUENCE, warmup, nadir_steps, mu, 3 if scaled else 1)
    np.testing.assert_allclose(weights, expected, rtol=2e-5, atol=1e-8)
    window = LOSS_SEQUENCE[warmup : warmup + nadir_steps]
    np.testing.assert_allclose(state.nadir_sum, window.sum(0), rtol=1e-6)


def test_stch_update_is_invariant_to_rescaling_a_loss_after_warmup():
    jac = RNG.normal(size=(3, 5))
    scale = np.array([1.0, 1e3, 1.0])
    plain, _ = run_sequence(mtl.stch(warmup=1, nadir_steps=2), LOSS_SEQUENCE)
    scaled, _ = run_sequence(mtl.stch(warmup=1, nadir_steps=2), LOSS_SEQUENCE * scale)
    np.testing.assert_allclose(scaled @ (jac * scale[:, None]), plain @ jac, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- random weighting
def test_random_weighting_is_softmax_of_normal_draws_and_replays():
    key = jax.random.PRNGKey(3)
    weights, state = run_sequence(mtl.random_weighting(key=key), LOSS_SEQUENCE[:4])
    expected = []
    for _ in range(4):
        key, draw = jax.random.split(key)
        logits = np.asarray(jax.random.normal(draw, (3,)), np.float64)
        expected.append(np.exp(logits) / np.exp(logits).sum())
    np.testing.assert_allclose(weights, expected, rtol=1e-5)
    assert np.all(weights > 0)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(state.key, key)
    # a typed key gives the same sequence; rlw is the same rule
    typed, _ = run_sequence(mtl.rlw(key=jax.random.wrap_key_data(jax.random.PRNGKey(3))),
                            LOSS_SEQUENCE[:4])  # fmt: skip
    np.testing.assert_array_equal(typed, weights)
    assert mtl.rlw is mtl.random_weighting


def test_random_weighting_mean_weight_is_uniform():
    w = mtl.random_weighting(key=jax.random.PRNGKey(0))

    def body(state, _):
        weights, state = w.update(None, jnp.ones(4), state)
        return state, weights

    _, draws = jax.jit(lambda s: jax.lax.scan(body, s, None, length=4000))(w.init(4))
    np.testing.assert_allclose(np.asarray(draws).mean(0), 0.25, atol=0.01)


# --------------------------------------------------------------------------- errors
def test_bad_hyper_parameters_raise_clear_errors():
    with pytest.raises(ValueError, match="temperature"):
        mtl.dwa(temperature=-1.0)
    with pytest.raises(ValueError, match="window"):
        mtl.dwa(window=0)
    with pytest.raises(TypeError, match="window.*Python int"):
        mtl.dwa(window=2.0)
    with pytest.raises(TypeError, match="window"):
        mtl.dwa(window=True)
    with pytest.raises(ValueError, match="mu"):
        mtl.stch(mu=0.0)
    with pytest.raises(ValueError, match="warmup"):
        mtl.stch(warmup=-3)
    with pytest.raises(ValueError, match="nadir_steps"):
        mtl.stch(nadir_steps=0)
    with pytest.raises(TypeError, match="scale_by_num_tasks"):
        mtl.stch(scale_by_num_tasks=1)
    with pytest.raises(ValueError, match="gamma.*finite"):
        mtl.generalized_mean(gamma=float("nan"))
    with pytest.raises(TypeError, match="gamma"):
        mtl.generalized_mean(gamma="2")
    with pytest.raises(ValueError, match="eps"):
        mtl.real_time_weighting(eps=-1e-8)
    with pytest.raises(ValueError, match="initial.*> 0"):
        mtl.initial_loss_weighting(initial=[1.0, 0.0])
    with pytest.raises(ValueError, match="prior.*(> 0|finite)"):
        mtl.prior_loss_weighting([1.0, float("nan")])
    with pytest.raises(ValueError, match="steps"):
        mtl.initial_loss_weighting(steps=0)
    with pytest.raises(TypeError, match="key"):
        mtl.random_weighting(key=0)
    with pytest.raises(ValueError, match="labels"):
        mtl.cross_entropy_prior_loss(np.array([0, 3]), 3)
    with pytest.raises(ValueError, match="num_classes"):
        mtl.cross_entropy_initial_loss(0)


def test_wrong_number_of_tasks_is_named():
    for weighting in (mtl.dwa(), mtl.stch(), mtl.initial_loss_weighting()):
        with pytest.raises(ValueError, match="for 3 tasks but the losses have 2.*init\\(2\\)"):
            weighting.update(None, jnp.ones(2), weighting.init(3))
    with pytest.raises(ValueError, match="3 tasks but the losses have 2"):
        mtl.prior_loss_weighting([1.0, 2.0, 3.0]).update(None, jnp.ones(2), None)
    with pytest.raises(ValueError, match="needs the task losses"):
        mtl.real_time_weighting().update(None, None, None)


@pytest.mark.parametrize(
    "factory,direction_only",
    [
        (lambda: mtl.initial_loss_weighting(steps=3), False),
        (lambda: mtl.stch(warmup=1, nadir_steps=2), False),
        (lambda: mtl.real_time_weighting(), False),
        (lambda: mtl.famo(), True),
        (lambda: mtl.geometric_mean(), True),
    ],
    ids=["initial_loss", "stch", "real_time", "famo", "geometric_mean"],
)
def test_updates_are_invariant_to_a_factor_1000_on_one_loss(factory, direction_only):
    """Over a whole loss sequence: ``w_j(c·L) = w_j(L)/c`` for the rescaled task (up to one
    positive factor per step for FAMO and GLS), so ``Σ w_i g_i`` is unchanged (in
    direction) when ``g_j`` is rescaled with it."""
    scale = np.array([1.0, 1e3, 1.0])
    plain, _ = run_sequence(factory(), LOSS_SEQUENCE)
    scaled, _ = run_sequence(factory(), LOSS_SEQUENCE * scale)
    rescaled = scaled * scale
    if direction_only:
        rescaled = rescaled / rescaled.sum(1, keepdims=True)
        plain = plain / plain.sum(1, keepdims=True)
    np.testing.assert_allclose(rescaled, plain, rtol=1e-4)


def test_fixed_and_random_weights_ignore_a_shifted_loss():
    shift = np.array([0.0, 5.0, 0.0])
    for factory in (
        lambda: mtl.prior_loss_weighting([1.0, 2.0, 3.0]),
        lambda: mtl.random_weighting(key=jax.random.PRNGKey(1)),
        mtl.mean_weighting,
    ):
        plain, _ = run_sequence(factory(), LOSS_SEQUENCE[:3])
        shifted, _ = run_sequence(factory(), LOSS_SEQUENCE[:3] + shift)
        np.testing.assert_array_equal(shifted, plain)

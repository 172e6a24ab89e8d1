"""MoCo (``mtl.moco``) and its weight step (``moco_weights``) against LibMTL's MoCo
(commit 4336804).

Fixtures from ``tests/fixtures/make_new_method_fixtures.py``: LibMTL's ``MoCo.backward`` run
on prescribed task gradients and losses, its weights ``λ_t``, tracked gradients ``y_t`` and
update, step by step (torch and LibMTL are never imported here). The tracking step itself
needs the stacked gradients and is not a ``Weighting``; the recursion documented in
``mtl_optax/weighting/tracking.py`` is checked here to reproduce LibMTL's ``y``, so the pieces
compose to LibMTL's MoCo.
"""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtl_optax as mtl
from mtl_optax.weighting.tracking import MoCoWeightsState, moco_weights

FIXTURES = np.load(pathlib.Path(__file__).parent / "fixtures" / "new_methods.npz")
SEQUENCES = ["k2", "k3"]
BETA, BETA_SIGMA = 0.5, 0.5  # LibMTL's defaults, as in the generating script


@pytest.mark.parametrize("seq", SEQUENCES)
def test_weights_match_libmtl_on_its_tracked_gradients(seq):
    tracked, lambdas = FIXTURES[f"moco/{seq}/y"], FIXTURES[f"moco/{seq}/lambda"]
    weighting = moco_weights()
    state, update = weighting.init(tracked.shape[1]), jax.jit(weighting.update)
    for t, y in enumerate(tracked):
        weights, state = update(jnp.asarray(y @ y.T, jnp.float32), None, state)
        np.testing.assert_allclose(weights, lambdas[t], rtol=1e-5, err_msg=f"step {t}")
        np.testing.assert_allclose(
            np.asarray(weights, np.float64) @ y,
            FIXTURES[f"moco/{seq}/update"][t],
            rtol=1e-4,
            atol=1e-6 * np.abs(y).max(),
        )
    assert int(state.count) == len(tracked)


@pytest.mark.parametrize("seq", SEQUENCES)
def test_documented_tracking_reproduces_libmtl(seq):
    """``y ← y − β_t(y − L_i g_i/(‖g_i‖ + 1e-8))``, ``β_t = β/t^{β_σ}``, y₀ = 0."""
    jacs, losses = FIXTURES[f"moco/{seq}/J"], FIXTURES[f"moco/{seq}/losses"]
    y = np.zeros_like(jacs[0])
    for t, (jac, loss) in enumerate(zip(jacs, losses), start=1):
        target = jac / (np.linalg.norm(jac, axis=1, keepdims=True) + 1e-8) * loss[:, None]
        y = y - BETA / t**BETA_SIGMA * (y - target)
        np.testing.assert_allclose(y, FIXTURES[f"moco/{seq}/y"][t - 1], rtol=1e-12)


@pytest.mark.parametrize("seq", SEQUENCES)
def test_moco_through_aggregate_matches_libmtl(seq):
    """The whole method on the stacked gradients: updates, weights and tracked gradients."""
    jacs, losses = FIXTURES[f"moco/{seq}/J"], FIXTURES[f"moco/{seq}/losses"]
    k, dim = jacs.shape[1:]
    params = jnp.zeros(dim, jnp.float32)
    transform = mtl.aggregate(mtl.moco(), tasks=k, shared=True)
    state, update = transform.init(params), jax.jit(transform.update)
    for t, (jac, loss) in enumerate(zip(jacs, losses)):
        u, state = update(
            mtl.TaskGradients(jnp.asarray(jac, jnp.float32)),
            state,
            params,
            task_losses=jnp.asarray(loss, jnp.float32),
        )
        ref = FIXTURES[f"moco/{seq}/update"][t]
        np.testing.assert_allclose(u, ref, rtol=1e-4, atol=1e-6 * np.abs(ref).max())
        np.testing.assert_allclose(
            mtl.task_weights(state), FIXTURES[f"moco/{seq}/lambda"][t], rtol=1e-4
        )
        np.testing.assert_allclose(
            state.method_state.tracked[0], FIXTURES[f"moco/{seq}/y"][t], rtol=1e-4, atol=1e-7
        )
    with pytest.raises(ValueError, match="moco needs the task losses"):
        transform.update(
            mtl.TaskGradients(jnp.asarray(jacs[0], jnp.float32)), transform.init(params), params
        )


def test_regularisation_and_step_decay():
    """ρ and γ_σ against the closed form ``softmax(λ − γ t^{−γ_σ}(G + ρI)λ)``, float64."""
    rng = np.random.default_rng(0)
    grams = [a @ a.T for a in rng.normal(size=(4, 3, 5))]
    gamma, gamma_sigma, rho = 0.3, 0.8, 0.5
    weighting = moco_weights(gamma=gamma, gamma_sigma=gamma_sigma, rho=rho)
    state, expected = weighting.init(3), np.full(3, 1 / 3)
    for t, gram in enumerate(grams, start=1):
        weights, state = weighting.update(jnp.asarray(gram, jnp.float32), None, state)
        logits = expected - gamma / t**gamma_sigma * (gram + rho * np.eye(3)) @ expected
        expected = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        np.testing.assert_allclose(weights, expected, rtol=1e-5)


def test_non_finite_gram_keeps_the_state():
    weighting = moco_weights()
    state = weighting.init(2)
    weights, after = jax.jit(weighting.update)(jnp.array([[1.0, jnp.nan], [0.0, 1.0]]), None, state)
    assert np.all(np.isnan(weights))
    np.testing.assert_array_equal(after.weights, state.weights)
    assert int(after.count) == 0


def test_state_errors():
    weighting = moco_weights()
    with pytest.raises(ValueError, match="init"):
        weighting.update(jnp.eye(3), None, weighting.init(2))
    with pytest.raises(TypeError, match="state"):
        weighting.update(jnp.eye(2), None, (jnp.ones(2),))
    assert isinstance(weighting.init(2), MoCoWeightsState)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"gamma": 0.0}, ValueError),
        ({"gamma": float("nan")}, ValueError),
        ({"gamma": True}, TypeError),
        ({"gamma_sigma": -0.5}, ValueError),
        ({"gamma_sigma": float("inf")}, ValueError),
        ({"rho": -1.0}, ValueError),
        ({"rho": "0"}, TypeError),
    ],
)
def test_bad_arguments(kwargs, error):
    with pytest.raises(error):
        moco_weights(**kwargs)

"""Learned weightings (UW, IMTL-L, GradNorm, FAMO) against float64 NumPy transcriptions.

Each method's parameters are followed over several steps of known losses (and gradient
norms for GradNorm) next to a NumPy re-implementation of the method's formula and its
optimizer (plain SGD, or Adam with PyTorch-style L2 weight decay for FAMO's default), and
checked against their closed-form optima or guaranteed direction of change.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtl_optax as mtl
from tests import models

RNG = np.random.default_rng(1)
LOSSES = RNG.uniform(0.3, 4.0, size=(6, 3))
NORMS = RNG.uniform(0.2, 3.0, size=(6, 3))


def run_sequence(weighting, losses_seq, norms_seq=None):
    update = jax.jit(weighting.update)
    state, out = weighting.init(losses_seq.shape[1]), []
    for t, losses in enumerate(losses_seq):
        gram = None if norms_seq is None else jnp.diag(jnp.asarray(norms_seq[t] ** 2, jnp.float32))
        weights, state = update(gram, jnp.asarray(losses, jnp.float32), state)
        out.append(np.asarray(weights))
    return np.stack(out), state


class Adam64:
    """PyTorch's Adam (L2 weight decay added to the gradient) in float64."""

    def __init__(self, lr, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8):
        self.lr, self.wd, self.b1, self.b2, self.eps = lr, weight_decay, b1, b2, eps
        self.m = self.v = 0.0
        self.t = 0

    def step(self, params, grad):
        grad = grad + self.wd * params
        self.t += 1
        self.m = self.b1 * self.m + (1 - self.b1) * grad
        self.v = self.b2 * self.v + (1 - self.b2) * grad**2
        m_hat, v_hat = self.m / (1 - self.b1**self.t), self.v / (1 - self.b2**self.t)
        return params - self.lr * m_hat / (np.sqrt(v_hat) + self.eps)


# --------------------------------------------------------------------------- UW and IMTL-L
@pytest.mark.parametrize("method", ["uw", "imtl_l"])
def test_log_scale_steps_match_transcription(method):
    lr = 0.1
    if method == "uw":
        weighting = mtl.uncertainty_weighting(optimizer=optax.sgd(lr))
        weights_of, grad_of = lambda s: 0.5 * np.exp(-s), lambda s, l: 0.5 * (1 - np.exp(-s) * l)
    else:
        weighting = mtl.imtl_l(optimizer=optax.sgd(lr))
        weights_of, grad_of = np.exp, lambda s, l: np.exp(s) * l - 1
    weights, state = run_sequence(weighting, LOSSES)
    s = np.zeros(3)
    for t, losses in enumerate(LOSSES):
        np.testing.assert_allclose(weights[t], weights_of(s), rtol=1e-5)
        s = s - lr * grad_of(s, losses)
    np.testing.assert_allclose(state.log_scale, s, rtol=1e-5)


@pytest.mark.parametrize("method", ["uw", "imtl_l"])
def test_log_scales_converge_to_their_closed_form_optima(method):
    losses = jnp.array([0.05, 1.0, 2000.0])
    # forgets the first, large gradients quickly and settles with a decaying step
    opt = optax.adam(optax.exponential_decay(0.05, 1500, 0.1), b2=0.99)
    weighting = (
        mtl.uncertainty_weighting(optimizer=opt) if method == "uw" else mtl.imtl_l(optimizer=opt)
    )

    def body(state, _):
        return weighting.update(None, losses, state)[1], None

    state, _ = jax.jit(lambda s: jax.lax.scan(body, s, None, length=3000))(weighting.init(3))
    sign = 1.0 if method == "uw" else -1.0
    np.testing.assert_allclose(state.log_scale, sign * np.log(losses), atol=1e-3)
    # at the optimum the weights are real-time weights (up to UW's factor ½): the update is
    # invariant to rescaling a task's loss
    weights = weighting.update(None, losses, state)[0]
    factor = 0.5 if method == "uw" else 1.0
    np.testing.assert_allclose(weights, factor / np.asarray(losses), rtol=2e-3)


def test_uncertainty_init_and_optimizer_checks():
    w = mtl.uncertainty_weighting(init=-0.5)
    np.testing.assert_allclose(w.update(None, jnp.ones(2), w.init(2))[0], 0.5 * np.exp(0.5))
    with pytest.raises(TypeError, match="optimizer"):
        mtl.imtl_l(optimizer="adam")
    with pytest.raises(TypeError, match="init"):
        mtl.uncertainty_weighting(init=None)


# --------------------------------------------------------------------------- GradNorm
def gradnorm64(losses_seq, norms_seq, alpha, lr):
    k = losses_seq.shape[1]
    w, out = np.ones(k), []
    initial = losses_seq[0]
    for losses, norms in zip(losses_seq, norms_seq):
        out.append(w.copy())
        weighted = w * norms
        ratio = losses / initial
        target = weighted.mean() * (ratio / ratio.mean()) ** alpha
        grad = np.sign(weighted - target) * norms  # target held constant
        w = w - lr * grad
        w = k * w / w.sum()
    return np.stack(out), w


@pytest.mark.parametrize("alpha", [1.5, 0.0])
def test_gradnorm_matches_transcription(alpha):
    lr = 0.02
    weights, state = run_sequence(mtl.gradnorm(alpha=alpha, optimizer=optax.sgd(lr)), LOSSES, NORMS)
    expected, final = gradnorm64(LOSSES, NORMS, alpha, lr)
    np.testing.assert_allclose(weights, expected, rtol=1e-5)
    np.testing.assert_allclose(state.weights, final, rtol=1e-5)
    np.testing.assert_allclose(state.initial_losses, LOSSES[0], rtol=1e-6)
    np.testing.assert_allclose(weights.sum(axis=1), 3.0, rtol=1e-5)


def test_gradnorm_moves_towards_equal_weighted_norms():
    """Equal training rates (α irrelevant): the target is equal weighted gradient norms."""
    norms = np.array([3.0, 1.0, 0.5])
    w = mtl.gradnorm()
    gram, losses = jnp.diag(jnp.asarray(norms**2)), jnp.ones(3)

    def body(state, _):
        return w.update(gram, losses, state)[1], None

    state = w.init(3)
    spread = lambda weights: np.ptp(np.asarray(weights) * norms)
    previous = spread(state.weights)
    for _ in range(3):
        state, _ = jax.jit(lambda s: jax.lax.scan(body, s, None, length=50))(state)
        assert spread(state.weights) < previous
        previous = spread(state.weights)
    # the largest gradient norm lost weight, the smallest gained
    assert state.weights[0] < 1.0 < state.weights[2]


def test_gradnorm_runs_in_tiers_2_and_3():
    """Tier 3 feeds it the shared parameters' gradient norms, tier 2 the features'."""
    params = models.init_params(jax.random.PRNGKey(0))
    batch = models.make_batch(jax.random.PRNGKey(1))
    weighting = mtl.gradnorm(optimizer=optax.sgd(0.1))
    losses, task_grads = mtl.value_and_jacobian(models.task_losses)(params, batch)
    transform = mtl.aggregate(weighting, tasks=models.K, shared=models.SHARED)
    _, state = jax.jit(transform.update)(task_grads, transform.init(params), params,
                                         task_losses=losses)  # fmt: skip
    trunk = [task_grads["trunk"]["w"].reshape(models.K, -1), task_grads["trunk"]["b"]]
    norms = np.linalg.norm(np.concatenate([np.asarray(g, np.float64) for g in trunk], 1), axis=1)
    _, expected = gradnorm64(np.asarray(losses)[None], norms[None], 1.5, 0.1)
    np.testing.assert_allclose(state.method_state.weights, expected, rtol=1e-5)

    grad_fn = mtl.split_value_and_grad(models.encode, models.HEADS, weighting)
    out_losses, _, out_state = jax.jit(grad_fn)(params, batch, grad_fn.init(params))
    z = models.encode(params, batch)
    feature_grads = jax.jacrev(lambda z_: models.heads(params, z_, batch))(z)
    norms = np.linalg.norm(np.asarray(feature_grads, np.float64).reshape(models.K, -1), axis=1)
    _, expected = gradnorm64(np.asarray(out_losses)[None], norms[None], 1.5, 0.1)
    np.testing.assert_allclose(out_state.method_state.weights, expected, rtol=1e-5)
    np.testing.assert_allclose(mtl.task_weights(out_state), np.ones(models.K))


# --------------------------------------------------------------------------- FAMO
def famo64(losses_seq, lr=0.025, weight_decay=1e-2, eps=1e-8, minimum=0.0):
    k = losses_seq.shape[1]
    xi, adam, out, previous = np.zeros(k), Adam64(lr, weight_decay), [], None
    for losses in losses_seq:
        shifted = losses - minimum + eps
        if previous is not None:
            delta = np.log(previous) - np.log(shifted)
            z = np.exp(xi) / np.exp(xi).sum()
            jac = np.diag(z) - np.outer(z, z)  # ∂z/∂ξ (symmetric)
            xi = adam.step(xi, jac.T @ delta)
        z = np.exp(xi) / np.exp(xi).sum()
        c = np.sum(z / shifted)
        out.append(z / (c * shifted))
        previous = shifted
    return np.stack(out), xi


def test_famo_matches_transcription_with_default_adam():
    weights, state = run_sequence(mtl.famo(), LOSSES)
    expected, xi = famo64(LOSSES)
    np.testing.assert_allclose(weights, expected, rtol=1e-5)
    np.testing.assert_allclose(state.logits, xi, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-6)


def test_famo_min_losses_and_faster_task_loses_weight():
    minimum = np.array([0.1, 0.2, 0.0])
    weights, _ = run_sequence(mtl.famo(min_losses=minimum), LOSSES)
    np.testing.assert_allclose(weights, famo64(LOSSES, minimum=minimum)[0], rtol=1e-5)
    # task 0's loss halves at every step, the others stay: its logit, hence z_0, decreases
    seq = np.array([[0.5**t, 1.0, 1.0] for t in range(5)])
    _, state = run_sequence(mtl.famo(), seq)
    z = np.asarray(jax.nn.softmax(state.logits))
    assert z[0] < 1 / 3 < z[1]
    with pytest.raises(ValueError, match="min_losses"):
        below = mtl.famo(min_losses=[0.5, 0.5, 0.5])
        below.update(None, jnp.array([0.4, 1.0, 1.0]), below.init(3))


def test_wrong_number_of_tasks_is_named():
    for weighting in (mtl.uncertainty_weighting(), mtl.famo(), mtl.gradnorm()):
        gram = jnp.eye(2) if weighting.needs_gram else None
        with pytest.raises(ValueError, match="for 3 tasks but the losses have 2"):
            weighting.update(gram, jnp.ones(2), weighting.init(3))
    with pytest.raises(ValueError, match="min_losses.*for 2 tasks"):
        mtl.famo(min_losses=[0.0, 0.0]).init(3)
    with pytest.raises(ValueError, match="alpha"):
        mtl.gradnorm(alpha=-1.0)

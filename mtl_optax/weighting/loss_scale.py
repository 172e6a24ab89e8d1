"""Loss-scale weightings: divide each task loss by a reference value of its own scale.

The total loss is ``Σ_i w_i L_i``. A task whose loss is measured in other units (a squared
error in millimetres instead of metres, a loss multiplied by 1000) should not dominate the
update just because its numbers are bigger. The weightings here divide each loss by a
reference that scales with it, so the update is invariant to rescaling one task's loss
(``L_i → c·L_i``, ``c > 0``; the generalized mean only at γ = 0, and a given reference
only if it is given for the rescaled loss):

* **initial loss** ``w_i = 1/L_i^init``: the loss at the start of training, either known
  from theory (:func:`cross_entropy_initial_loss`, :func:`squared_error_initial_loss`) or
  estimated as the mean loss of the first ``steps`` steps (then frozen);
* **prior loss** ``w_i = 1/L_i^prior``: the loss of the best input-independent predictor,
  computed from the labels (:func:`cross_entropy_prior_loss`,
  :func:`squared_error_prior_loss`);
* **real time** ``w_i = 1/sg(L_i)``: the gradient of ``Σ_i log L_i``;
* **generalized mean** ``L(γ) = ((1/K) Σ_i L_i^γ)^{1/γ}`` with weights
  ``w_i = ∂L(γ)/∂L_i``: γ = 1 is the mean (not invariant), γ → 0 the geometric mean
  (invariant: the update direction does not change, only its length by ``c^{1/K}``),
  γ → ±∞ the max / min.

The invariance is to scale, not to shifts: adding a constant to a loss changes the weights
of all of them (gradient normalisation, :func:`mtl_optax.gradient_normalized`, is invariant
to both).

Logarithms and divisions need positive losses. Losses below ``eps`` count as ``eps``
(a task whose loss reached 0 gets the large but finite weight ``1/eps``); negative losses
raise a ``ValueError`` when the losses are concrete and give NaN weights under ``jit``. A
NaN or infinite loss gives NaN weights (not the weight 0 that ``1/inf`` would give), as in
every weighting of the library, so ``optax.apply_if_finite`` skips the step.
A stateful weighting leaves its state unchanged at a step whose losses are non-finite or
negative (so a step skipped by ``optax.apply_if_finite`` does not poison it); this holds for
every stateful loss weighting of the library.
The weights do not depend on the Gram matrix (tier 1; ``homogeneity=0``).

Checked in ``tests/test_loss_weightings.py`` against float64 NumPy transcriptions of each
formula (running mean over the first steps, the generalized mean's derivative by finite
differences, its γ → 0 and ±∞ limits), against the invariance of the update to a 10³
rescaling of one loss, and against the helpers' closed forms (``log C``, the label entropy,
the target variance). The geometric mean also against torchjd 0.18's ``GeometricMean``
(``tests/test_torchjd_scalarizer_fixtures.py``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mtl_optax.weighting import arguments
from mtl_optax.weighting.base import Weighting, check_inputs, check_num_tasks, empty_init, finish

DEFAULT_EPS = 1e-8


# --------------------------------------------------------------------------- reference losses
def cross_entropy_initial_loss(num_classes: int) -> float:
    """``log C``: the cross-entropy of a ``C``-class classifier with all logits equal (zero).

    Example::

        mtl.cross_entropy_initial_loss(10)   # 2.302585...
    """
    return math.log(arguments.positive_int("num_classes", num_classes))


def squared_error_initial_loss(targets) -> float:
    """``E‖y‖²``: the squared error of a regressor that predicts 0 (targets ``(N, ...)``).

    The norm runs over every axis but the first; the mean over the ``N`` examples.
    """
    y = _targets(targets)
    return float(np.mean(np.sum(y * y, axis=1)))


def cross_entropy_prior_loss(labels, num_classes: int) -> float:
    """``-Σ_k p_k log p_k``: the label entropy, the cross-entropy of predicting the label
    frequencies ``p`` for every input (the best input-independent classifier).

    Example::

        mtl.cross_entropy_prior_loss(jnp.array([0, 0, 1, 1]), 2)   # log 2
    """
    num_classes = arguments.positive_int("num_classes", num_classes)
    y = np.asarray(labels)
    if y.ndim != 1 or y.size == 0 or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"`labels` must be a non-empty 1-D integer array, got {y!r}.")
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"`labels` must lie in [0, {num_classes}), got {y.min()}..{y.max()}.")
    p = np.bincount(y, minlength=num_classes) / y.size
    p = p[p > 0]
    return float(-np.sum(p * np.log(p)))


def squared_error_prior_loss(targets) -> float:
    """``E‖y − μ‖²``: the squared error of predicting the mean target ``μ`` for every input."""
    y = _targets(targets)
    return float(np.mean(np.sum((y - y.mean(axis=0)) ** 2, axis=1)))


def _targets(targets) -> np.ndarray:
    y = np.asarray(targets, dtype=np.float64)
    if y.ndim == 0 or y.shape[0] == 0 or not np.all(np.isfinite(y)):
        raise ValueError(
            f"`targets` must be a finite array with a leading example axis, got shape {y.shape}."
        )
    return y.reshape(y.shape[0], -1)


# --------------------------------------------------------------------------- fixed references
class WarmupMeanState(NamedTuple):
    """Sum and number of the loss vectors seen so far, up to a fixed number of them."""

    total: jax.Array  # (K,)
    count: jax.Array  # () int32


def warmup_mean_init(num_tasks: int) -> WarmupMeanState:
    k = check_num_tasks(num_tasks)
    return WarmupMeanState(jnp.zeros(k, jnp.float32), jnp.zeros((), jnp.int32))


def warmup_mean(
    state: WarmupMeanState, losses: jax.Array, steps: int
) -> tuple[jax.Array, WarmupMeanState]:
    """Mean of the first ``steps`` loss vectors (this call's included while counting), then
    frozen; returns ``(mean, new_state)``."""
    counting = state.count < steps
    total = jnp.where(counting, state.total + losses.astype(state.total.dtype), state.total)
    count = jnp.where(counting, state.count + 1, state.count)
    return total / count, WarmupMeanState(total, count)


def initial_loss_weighting(*, initial=None, steps: int = 10, eps: float = DEFAULT_EPS) -> Weighting:
    """``w_i = 1/L_i^init``: every loss measured relative to its value at the start.

    Args:
      initial: the initial losses ``(K,)`` if known, e.g. ``log C`` for a ``C``-class
        cross-entropy with zero logits (:func:`cross_entropy_initial_loss`) or ``E‖y‖²`` for
        a squared error with zero predictions (:func:`squared_error_initial_loss`).
      steps: if ``initial`` is None, ``L^init`` is the mean loss of the first ``steps``
        updates (default 10: a few minibatches average out their noise before the losses
        have moved much); the state keeps the running mean, so the first steps use the mean
        so far, and freezes it afterwards.
      eps: losses (and means) below ``eps`` count as ``eps``.

    Example::

        w = mtl.initial_loss_weighting(initial=[mtl.cross_entropy_initial_loss(10), 4.0])
        weights, _ = w.update(None, jnp.array([1.0, 2.0]), w.init(2))  # [1/log 10, 1/4]
    """
    eps = arguments.real("eps", eps, low=0.0)
    if initial is not None:
        return _inverse_reference("initial", initial)
    steps = arguments.positive_int("steps", steps)

    def update(gram, losses, state, **extra):
        del extra
        k, _, losses = check_inputs(weighting, gram, losses)
        arguments.same_tasks("state", state.total, k)
        valid = arguments.non_negative(losses, method="initial_loss_weighting")
        ok = jnp.all(valid & jnp.isfinite(losses))
        mean, new_state = warmup_mean(state, losses, steps)
        weights = jnp.where(ok, 1.0 / jnp.maximum(mean, eps), jnp.nan)
        return finish(weights.astype(losses.dtype)), arguments.unless_bad(ok, new_state, state)

    weighting = Weighting(
        warmup_mean_init, update, needs_gram=False, needs_losses=True, homogeneity=0.0
    )
    return weighting


def prior_loss_weighting(prior) -> Weighting:
    """``w_i = 1/L_i^prior``, the loss of the best input-independent prediction of task i.

    ``prior`` (K,) comes from the training labels: :func:`cross_entropy_prior_loss` (label
    entropy) for classification, :func:`squared_error_prior_loss` (target variance) for
    regression. The weighted loss is then the fraction of the prior loss left, a
    scale-free number for every task.

    Example::

        labels, y = jnp.array([0, 3, 3, 7, 9]), jnp.array([0.5, 1.5, 2.0, 0.0, 1.0])
        prior = [mtl.cross_entropy_prior_loss(labels, 10), mtl.squared_error_prior_loss(y)]
        w = mtl.prior_loss_weighting(prior)
    """
    return _inverse_reference("prior", prior)


def _inverse_reference(name: str, reference) -> Weighting:
    """Fixed weights ``1/reference`` (validated: finite, positive, one per task)."""
    inverse = 1.0 / arguments.per_task(name, reference)

    def init(num_tasks):
        arguments.same_tasks(f"`{name}` losses", inverse, check_num_tasks(num_tasks))
        return empty_init(num_tasks)

    def update(gram, losses, state, **extra):
        del extra
        k, _, losses = check_inputs(weighting, gram, losses)
        arguments.same_tasks(f"`{name}` losses", inverse, k)
        ok = jnp.all(jnp.isfinite(losses))
        return finish(jnp.where(ok, jnp.asarray(inverse, losses.dtype), jnp.nan)), state

    weighting = Weighting(
        init,
        update,
        needs_gram=False,
        needs_losses=True,
        homogeneity=0.0,
        name=f"{name}_loss_weighting",
    )
    return weighting


# --------------------------------------------------------------------------- current losses
def real_time_weighting(*, eps: float = DEFAULT_EPS) -> Weighting:
    """``w_i = 1/sg(L_i)``: the gradient of ``Σ_i log L_i`` (every task's relative decrease).

    The update ``Σ_i ∇L_i / L_i`` is exactly invariant to rescaling any task's loss. Losses
    below ``eps`` (default 1e-8) count as ``eps``; negative losses are an error (NaN
    weights under ``jit``).

    Example::

        w = mtl.real_time_weighting()
        weights, _ = w.update(None, jnp.array([0.5, 2000.0]), w.init(2))  # [2, 5e-4]
    """
    eps = arguments.real("eps", eps, low=0.0)

    def update(gram, losses, state, **extra):
        del extra
        _, _, losses = check_inputs(weighting, gram, losses)
        valid = arguments.non_negative(losses, method="real_time_weighting")
        ok = jnp.all(valid & jnp.isfinite(losses))
        return finish(jnp.where(ok, 1.0 / jnp.maximum(losses, eps), jnp.nan)), state

    weighting = Weighting(empty_init, update, needs_gram=False, needs_losses=True, homogeneity=0.0)
    return weighting


def generalized_mean(*, gamma: float, eps: float = DEFAULT_EPS) -> Weighting:
    """Weights ``w_i = ∂L(γ)/∂L_i`` of the generalized (power) mean of the losses.

    ``L(γ) = ((1/K) Σ_i L_i^γ)^{1/γ}``; its derivative is computed in log space as

        ``w_i = softmax(γ · log L)_i · L(γ) / L_i``,

    which holds for every γ and stays finite for large ``|γ|``. The limits are taken
    exactly: γ = 0 gives the geometric mean ``(Π L_i)^{1/K}`` with ``w_i = L(0)/(K L_i)``
    (the softmax is uniform); γ = ``±inf`` gives the max / min, whose weight is split
    equally between tied losses. γ = 1 is the mean (``w_i = 1/K``).

    Args:
      gamma: the power γ (any real, or ``±math.inf``); required, there is no common
        default. Larger γ moves the weight to the largest losses (γ → ∞: only the
        largest), smaller γ to the smallest.
      eps: losses below ``eps`` (default 1e-8) count as ``eps`` (the logarithm of 0).

    Reference: the γ-family of scale-invariant objectives; γ → 0 is GLS (Chennupati et al.,
    "MultiNet++", CVPR-W 2019).

    Example::

        w = mtl.generalized_mean(gamma=2.0)
        weights, _ = w.update(None, jnp.array([1.0, 3.0]), w.init(2))
    """
    gamma = arguments.real("gamma", gamma, allow_inf=True)
    eps = arguments.real("eps", eps, low=0.0)
    name = "geometric_mean" if gamma == 0 else "generalized_mean"

    def update(gram, losses, state, **extra):
        del extra
        k, _, losses = check_inputs(weighting, gram, losses)
        valid = arguments.non_negative(losses, method=name)
        log_l = jnp.log(jnp.maximum(losses, eps))
        if math.isinf(gamma):
            extreme = jnp.max(log_l) if gamma > 0 else jnp.min(log_l)
            hits = (log_l == extreme).astype(log_l.dtype)
            share, log_mean = hits / jnp.sum(hits), extreme
        elif gamma == 0:
            share, log_mean = jnp.full((k,), 1.0 / k, log_l.dtype), jnp.mean(log_l)
        else:
            share = jax.nn.softmax(gamma * log_l)
            log_mean = (jax.nn.logsumexp(gamma * log_l) - math.log(k)) / gamma
        weights = share * jnp.exp(log_mean - log_l)
        ok = jnp.all(valid & jnp.isfinite(losses))
        return finish(jnp.where(ok, weights, jnp.nan)), state

    weighting = Weighting(empty_init, update, needs_gram=False, needs_losses=True, homogeneity=0.0)
    return weighting


def geometric_mean(*, eps: float = DEFAULT_EPS) -> Weighting:
    """GLS: weights of the geometric mean ``(Π_i L_i)^{1/K}``, ``w_i = L(0)/(K·L_i)``.

    The γ = 0 member of :func:`generalized_mean` (the same implementation). Its update has
    the direction of the real-time weighting's (``Σ ∇L_i/L_i``) and is invariant, in
    direction, to rescaling any loss.

    Reference: Chennupati et al., "MultiNet++: Multi-stream feature aggregation and
    geometric loss strategy for multi-task learning", CVPR Workshops 2019.

    Example::

        w = mtl.geometric_mean()
        weights, _ = w.update(None, jnp.array([1.0, 4.0]), w.init(2))  # [1, 0.25]
    """
    return generalized_mean(gamma=0.0, eps=eps)._replace(name="geometric_mean")

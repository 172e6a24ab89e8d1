"""CR-MOGM: smooth any weighting's weights with an exponential moving average across steps.

Zhou et al., "On the Convergence of Stochastic Multi-Objective Gradient Manipulation and
Beyond" (NeurIPS 2022): with stochastic gradients the weights ``λ̂_t`` of a gradient
manipulation method (MGDA, PCGrad, CAGrad, ...) are biased and noisy; averaging them over
steps, ``λ_t = α_t λ_{t−1} + (1 − α_t) λ̂_t``, reduces the correlation between the weights
and the current mini-batch and restores convergence (their "correlation-reduced" MOGM).

The wrapper keeps ``λ_{t−1}`` in its state next to the wrapped weighting's own state and
returns ``λ_t``; it reads whatever the wrapped weighting reads (the Gram, its diagonal, the
losses) and forwards every extra keyword (e.g. ``cross_gram=``) to it.

Defaults follow torchjd 0.18's ``CRMOGMWeighting``: ``α = 0.9``, and ``λ_0 = λ̂_1`` (the
first call returns the wrapped weighting's weights unchanged) unless ``initial_weights`` is
given. The paper's Corollary 1 lets ``α_t`` grow towards 1 as the learning rate decays
(e.g. ``α_t = 1 − lr_t / lr_0``); pass such a schedule as ``alpha`` (a callable of the step
count, like an optax schedule) where torchjd has the caller reassign ``alpha`` between calls.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mtl_optax.weighting import arguments
from mtl_optax.weighting.base import Weighting, check_num_tasks, finish, scales_heads
from mtl_optax.weighting.hyper import check_real


class CRMOGMState(NamedTuple):
    """State of :func:`cr_mogm`: the wrapped weighting's state and the smoothed weights."""

    inner: Any  # the wrapped weighting's state
    weights: jax.Array  # (K,) float32, λ_{t−1} (``initial_weights`` or zeros before step 1)
    count: jax.Array  # () int32, steps taken (the argument of an ``alpha`` schedule)


def _check_alpha(alpha: Any) -> float | Callable:
    if callable(alpha):
        return alpha
    return check_real("alpha", alpha, low=0.0, high=1.0)


def _check_initial(initial_weights: Any) -> np.ndarray | None:
    if initial_weights is None:
        return None
    values = np.asarray(initial_weights)
    if values.dtype == bool or not np.issubdtype(values.dtype, np.number):
        raise TypeError(
            f"`initial_weights` must be a vector of real numbers (one per task), got "
            f"{initial_weights!r}."
        )
    if np.iscomplexobj(values) or values.ndim != 1 or values.size == 0:
        raise ValueError(
            f"`initial_weights` must be a non-empty 1-D vector of reals (one per task), got "
            f"{initial_weights!r}."
        )
    if not np.all(np.isfinite(values)):
        raise ValueError(f"`initial_weights` must be finite, got {initial_weights!r}.")
    return values.astype(np.float64)


def _alpha_at(alpha, count) -> jax.Array:
    """``α_t`` as a float32 scalar; a schedule's value outside [0, 1] gives NaN (concrete:
    a ValueError), so a wrong schedule never smooths silently."""
    if not callable(alpha):
        return jnp.asarray(alpha, jnp.float32)
    value = alpha(count)
    if jnp.shape(value) != ():
        raise ValueError(
            f"The `alpha` schedule must return a scalar, got shape {jnp.shape(value)}."
        )
    value = jnp.asarray(value, jnp.float32)
    if not isinstance(value, jax.core.Tracer) and not 0.0 <= float(value) <= 1.0:
        raise ValueError(
            f"The `alpha` schedule returned {float(value)} at step {count}; it must be in [0, 1]."
        )
    return jnp.where((value >= 0.0) & (value <= 1.0), value, jnp.nan)


def cr_mogm(
    weighting: Weighting,
    *,
    alpha: float | Callable[[jax.Array], jax.Array] = 0.9,
    initial_weights: Any = None,
) -> Weighting:
    """CR-MOGM: ``λ_t = α λ_{t−1} + (1 − α) λ̂_t`` with ``λ̂_t`` the wrapped weighting's weights.

    Args:
      weighting: the :class:`mtl_optax.Weighting` whose weights are smoothed (e.g.
        ``mtl.mgda()``, ``mtl.upgrad()``; a loss weighting works too).
      alpha: weight of the previous weights, in [0, 1] (default 0.9, torchjd's; the EMA
        convention of Adam's β₁). 0 returns the wrapped weights unchanged, 1 freezes them at
        ``λ_0``. A callable ``alpha(count) -> scalar`` (an optax schedule of the step count,
        0 at the first call) gives the paper's increasing ``α_t``; values outside [0, 1]
        raise when concrete and give NaN weights under ``jit``.
      initial_weights: ``λ_0``, one finite entry per task (checked at ``init``). Default
        None: ``λ_0 = λ̂_1``, so the first weights are the wrapped weighting's.

    The weights are those of the wrapped weighting's past and present Grams, applied to the
    current gradients: the non-conflicting guarantee of MGDA or UPGrad holds at the first call
    (``initial_weights=None``) but not after. Linear under scaling of the gradients when the
    wrapped weighting is (``homogeneity`` 0 is kept, anything else becomes None: weights of
    differently scaled past Grams are not homogeneous). A step whose wrapped weights are not
    finite returns them and leaves ``λ`` and the step count unchanged (the wrapped state is
    the wrapped weighting's business).

    To match torchjd, wrap the same weighting (``CRMOGMWeighting(UPGradWeighting())`` is
    ``cr_mogm(mtl.upgrad())``); torchjd's ``alpha`` setter between calls is a schedule here.

    Checked in ``tests/test_smoothing.py`` against torchjd 0.18's ``CRMOGMWeighting``
    (wrapping UPGrad and DualProj, with and without ``initial_weights``) over several calls,
    and against the EMA of the wrapped weighting's own outputs (stateful Gram and loss
    weightings, schedules, forwarded ``cross_gram``).

    Example::

        w = mtl.cr_mogm(mtl.upgrad(), alpha=0.9)
        state = w.init(3)
        weights, state = jax.jit(w.update)(gram, None, state)   # = upgrad's at the first call
    """
    if not isinstance(weighting, Weighting):
        raise TypeError(
            f"`weighting` must be an mtl_optax Weighting such as mtl.upgrad(), got "
            f"{weighting!r} ({type(weighting).__name__})."
        )
    alpha = _check_alpha(alpha)
    initial = _check_initial(initial_weights)

    def init(num_tasks):
        k = check_num_tasks(num_tasks)
        if initial is not None and initial.shape != (k,):
            raise ValueError(
                f"`initial_weights` has {initial.shape[0]} entries but init was called for {k} "
                "tasks; give one entry per task."
            )
        start = np.zeros(k) if initial is None else initial
        return CRMOGMState(
            inner=weighting.init(k),
            weights=jnp.asarray(start, jnp.float32),
            count=jnp.zeros((), jnp.int32),
        )

    def update(gram, losses, state, **extra):
        if not isinstance(state, CRMOGMState):
            raise TypeError(
                f"cr_mogm's update needs the state from its own init, got {type(state).__name__} "
                "(a checkpoint restored without a target gives a dict: restore with a target)."
            )
        fresh, inner = weighting.update(gram, losses, state.inner, **extra)
        arguments.same_tasks("state", state.weights, jnp.shape(fresh)[0])
        dtype = jnp.promote_types(fresh.dtype, jnp.float32)
        fresh = fresh.astype(dtype)
        first = (state.count == 0) & (initial is None)
        previous = jnp.where(first, fresh, state.weights.astype(dtype))
        a = _alpha_at(alpha, state.count).astype(dtype)
        weights = a * previous + (1.0 - a) * fresh
        ok = jnp.all(jnp.isfinite(weights))
        smoothed = CRMOGMState(inner, weights.astype(jnp.float32), state.count + 1)
        kept = CRMOGMState(inner, state.weights, state.count)
        return finish(weights), arguments.unless_bad(ok, smoothed, kept)

    homogeneity = 0.0 if weighting.homogeneity == 0 else None
    return Weighting(
        init,
        update,
        needs_gram=weighting.needs_gram,
        needs_losses=weighting.needs_losses,
        homogeneity=homogeneity,
        scalarization=scales_heads(weighting),  # the heads follow the wrapped method's rule
        reads_gram_factor=weighting.reads_gram_factor,  # `extra` reaches the wrapped update
    )

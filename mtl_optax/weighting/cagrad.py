"""Conflict-averse gradient descent, CAGrad (Liu et al., "Conflict-Averse Gradient Descent
for Multi-task Learning", NeurIPS 2021).

With ``ḡ = (1/K) Σ g_i``, ``g_w = Σ w_i g_i`` and ``φ = c‖ḡ‖``,

    ``w* = argmin_{w ∈ Δ} ⟨g_w, ḡ⟩ + φ‖g_w‖``,   ``u = ḡ + (φ/‖g_w*‖) g_w*``,

the update that maximises the worst task improvement in a ball of radius ``φ`` around ``ḡ``.
As weights on the gradients: ``w_i = 1/K + (φ/‖g_w*‖) w*_i``.

Exact solve. The objective is convex but not quadratic. Writing
``φ‖g‖ = min_{λ > 0} φ(‖g‖²/(2λ) + λ/2)`` makes it a joint minimum over ``(w, λ)``; for a
fixed ``λ`` the minimum over ``w`` is the simplex QP with a linear term
``min_{w ∈ Δ} ‖Σ (w_i + λ/(φK)) g_i‖²`` (the shared active-set solver with a constant
offset), and the optimal ``λ`` is the root of ``λ = ‖g_w(λ)‖``, an increasing function of
``λ`` minus a decreasing one on ``[0, max_i ‖g_i‖]``. Bisection on that root to float
precision, each inner QP exact and warm-started from the previous support, solves the
problem exactly. Computed on ``G/tr(G)`` like torchjd (the weights are scale-free).

Rescaling: the authors' code and LibMTL divide the update by ``1 + c²`` by default
(``rescale=1``; ``rescale=2`` divides by ``1 + c``); torchjd does not rescale
(``rescale=0``). The default follows the authors (``rescale=1``); pass ``rescale=0`` for
torchjd's numbers. As in torchjd, when ``‖g_w*‖ < norm_eps`` on the normalised Gram (the
gradients are approximately Pareto-stationary) the weights are 0; when ``φ = 0`` (``c = 0``
or ``ḡ = 0``) they are ``1/K``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mtl_optax import solvers
from mtl_optax.solvers.loop import while_loop_like
from mtl_optax.weighting.base import Weighting, check_inputs, empty_init, finish

_RESCALE = {0: lambda c: 1.0, 1: lambda c: 1.0 + c * c, 2: lambda c: 1.0 + c}


def cagrad_direction(gram: jax.Array, c: float, *, bisection_iters: int = 64):
    """``(w*, ‖g_w*‖, φ)`` of the CAGrad problem on ``gram`` (see the module docstring)."""
    k = gram.shape[0]
    dtype = gram.dtype
    mean_norm = jnp.sqrt(jnp.maximum(jnp.sum(gram) / k**2, 0.0))
    phi = c * mean_norm
    primary = jnp.ones(k, bool)
    safe_phi = jnp.where(phi > 0, phi, 1.0)

    def inner(lam, support):
        w = solvers.min_norm_weights(
            gram, primary, offset=jnp.full(k, lam / (safe_phi * k), dtype), init_support=support
        )
        return w, jnp.sqrt(jnp.maximum(w @ gram @ w, 0.0))

    hi0 = jnp.sqrt(jnp.max(jnp.diagonal(gram)))

    def cond(carry):
        lo, hi, _, it = carry
        return (it < bisection_iters) & (hi - lo > jnp.finfo(dtype).eps * hi)

    def body(carry):
        lo, hi, support, it = carry
        mid = 0.5 * (lo + hi)
        w, norm = inner(mid, support)
        below = mid < norm  # root lies above mid
        return jnp.where(below, mid, lo), jnp.where(below, hi, mid), w > 0, it + 1

    start = (jnp.zeros((), dtype), hi0, jnp.zeros(k, bool), jnp.array(0))
    lo, hi, support, _ = while_loop_like(cond, body, start, gram)
    w, norm = inner(0.5 * (lo + hi), support)
    return w, norm, phi


def cagrad(
    *,
    c: float = 0.5,
    rescale: int = 1,
    norm_eps: float = 1e-4,
) -> Weighting:
    """CAGrad weights ``1/K + (c‖ḡ‖/‖g_w*‖) w*`` divided by the ``rescale`` factor.

    Args:
      c: radius of the ball around the mean gradient, relative to ``‖ḡ‖`` (the authors'
        and torchjd's examples use 0.5; ``c = 0`` is the mean).
      rescale: 1 (default, the authors' code and LibMTL): divide by ``1 + c²``; 2: by
        ``1 + c``; 0: no rescaling (torchjd).
      norm_eps: ``tr(G)`` below which the Gram counts as zero, and ``‖g_w*‖`` (on
        ``G/tr(G)``) below which the weights are 0; torchjd's 1e-4.

    Properties: linear under scaling (``homogeneity=0``), weighted, stateless,
    deterministic; not non-conflicting in general. Checked in ``tests/test_cagrad.py``
    against scipy SLSQP minimising the same objective on the simplex (float64), the torchjd
    worked example ``J = [[-4, 1, 1], [6, 1, 1]]`` with ``rescale=0`` →
    ``u = [0.1835, 1.2041, 1.2041]``, and scale invariance.

    Example::

        w = mtl.cagrad(c=0.5, rescale=0)
        jac = jnp.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
        weights, _ = jax.jit(w.update)(jac @ jac.T, None, w.init(2))
        # weights @ jac ≈ [0.1835, 1.2041, 1.2041]
        np.testing.assert_allclose(weights @ jac, [0.1835, 1.2041, 1.2041], atol=1e-3)
    """
    c = solvers.check_nonnegative("c", c)
    norm_eps = solvers.check_nonnegative("norm_eps", norm_eps)
    if isinstance(rescale, bool) or not isinstance(rescale, (int, np.integer)):
        raise TypeError(f"`rescale` must be 0, 1 or 2 (an int), got {rescale!r}.")
    if int(rescale) not in _RESCALE:
        raise ValueError(f"`rescale` must be 0, 1 or 2, got {rescale!r}.")
    factor = _RESCALE[int(rescale)](c)

    def update(gram, losses, state, **extra):
        del extra
        k, gram, _ = check_inputs(weighting, gram, None)
        trace = jnp.trace(gram)
        zero = trace < norm_eps
        normalized = jnp.where(zero, 0.0, gram / jnp.where(zero, 1.0, trace))
        w, norm, phi = cagrad_direction(normalized, c)
        mean = jnp.full(k, 1.0 / k, gram.dtype)
        weights = jnp.where(
            phi > 0,
            jnp.where(norm >= norm_eps, mean + phi / jnp.maximum(norm, norm_eps) * w, 0.0),
            mean,
        )
        weights = jnp.where(jnp.isfinite(trace), weights, jnp.nan)
        return finish(weights / factor), state

    weighting = Weighting(empty_init, update, needs_gram=True, homogeneity=0.0)
    return weighting

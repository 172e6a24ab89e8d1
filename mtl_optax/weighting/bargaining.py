"""Bargaining weightings: Nash-MTL and FairGrad, both ``w > 0`` with ``G w = w^{−p}``.

* **Nash-MTL** (Navon et al., 2022, "Multi-Task Learning as a Bargaining Game"): the Nash
  bargaining solution ``Ĝα = 1/α`` on ``Ĝ = G/‖G‖_F``; every task's utility ``⟨g_i, u⟩``
  equals ``1/α_i`` (times ``‖G‖_F``), so ``⟨g_i, u⟩ > 0`` for every task: non-conflicting.
  The sources iterate a convex–concave procedure through a conic solver; here it is the
  unique minimiser of ``½αᵀĜα − Σ log α_i``, solved exactly by damped Newton on the device
  (:func:`mtl_optax.solvers.power_balance_weights`).
* **FairGrad** (Ban & Ji, 2024, "Fair Resource Allocation in Multi-Task Learning"):
  α-fair allocation, ``G w = w^{−1/α}`` with ``w > 0`` (α = 1 is the proportional-fairness,
  Nash-like case; α → ∞ approaches max–min fairness). The utilities ``⟨g_i, u⟩ = w_i^{−1/α}``
  are positive: non-conflicting.

Singular Grams (linearly dependent gradients) are regularised by a tiny relative ridge and
tasks with a zero gradient get weight 0; see :mod:`mtl_optax.solvers.newton`.
"""

from __future__ import annotations

import jax.numpy as jnp

from mtl_optax.solvers.newton import power_balance_weights
from mtl_optax.weighting.base import Weighting, check_inputs, empty_init, finish
from mtl_optax.weighting.hyper import check_int, check_real


def nash_mtl(*, max_norm: float = 1.0, max_iters: int = 100) -> Weighting:
    """Nash-MTL: the bargaining solution ``Ĝα = 1/α``, ``Ĝ = G/‖G‖_F``, update ``Σ α_i g_i``.

    Args:
      max_norm: if ``‖u‖ = √(αᵀGα)`` exceeds it, ``α`` is rescaled so that ``‖u‖ = max_norm``
        (1.0, the default of the official code and torchjd). ``0`` disables the clipping;
        only then are the weights scale-free (``homogeneity = 0``; with clipping it is None,
        an absolute threshold, so the tiers hand it the true Gram: float32 holds it for
        gradient norms between ~1e-19 and ~1e19).
      max_iters: Newton iteration cap (converges in ≈ 5–15).

    Differences from the sources: they warm-start a convex–concave procedure from the last
    step's ``α`` (and can skip steps with ``update_weights_every``); this solves the same
    fixed point exactly from scratch every step, so the weighting is stateless.

    Checked in ``tests/test_bargaining.py``: ``Ĝα = 1/α`` to float32 precision, a scipy
    float64 solution of the same equations, the published torchjd example
    ``J = [[-4, 1, 1], [6, 1, 1]] → u = [0.0542, 0.7061, 0.7061]``, and non-conflict.

    Example::

        w = mtl.nash_mtl()
        weights, state = w.update(gram, None, w.init(gram.shape[0]))
    """
    max_norm = check_real("max_norm", max_norm, low=0.0)
    max_iters = check_int("max_iters", max_iters, low=1)

    def update(gram, losses, state, **extra):
        del extra
        _, gram, _ = check_inputs(weighting, gram, losses)
        peak = jnp.max(jnp.abs(gram))  # ‖G‖_F without overflowing G² (‖g‖ up to 1e19)
        peak = jnp.where(peak > 0, peak, 1.0)
        frobenius = peak * jnp.sqrt(jnp.sum(jnp.square(gram / peak)))
        normalized = gram / jnp.where(frobenius > 0, frobenius, 1.0)
        alpha = power_balance_weights(normalized, power=1.0, max_iters=max_iters)
        if max_norm > 0:
            norm = jnp.sqrt(jnp.maximum(alpha @ gram @ alpha, 0.0))
            alpha = jnp.where(norm > max_norm, alpha * (max_norm / norm), alpha)
        return finish(alpha), state

    weighting = Weighting(
        empty_init, update, needs_gram=True, homogeneity=None if max_norm > 0 else 0.0
    )
    return weighting


def fairgrad(*, alpha: float = 1.0, max_iters: int = 100) -> Weighting:
    """FairGrad: α-fair weights ``w > 0`` with ``G w = w^{−1/α}``, update ``Σ w_i g_i``.

    Args:
      alpha: fairness parameter, ``> 0`` (default 1.0, proportional fairness, the value
        LibMTL uses by default; torchjd has no default). α → 0 tends to the mean of the
        gradients: use :func:`mtl_optax.mean_weighting` for that limit.
      max_iters: Newton iteration cap.

    The weights scale as ``c^{−α/(1+α)}`` when ``G → cG`` (``homogeneity = −α/(1+α)``); the
    update then scales as ``c^{1/(2(1+α))}``, so it is not linear under gradient scaling (and
    for α > 1 weights ``∝ ‖g‖^{−2α/(1+α)}`` leave float32's range before the gradients do:
    α = 2 at ‖g‖ ≈ 1e±28).
    torchjd solves the same equations with scipy's ``least_squares`` on the host.

    Checked in ``tests/test_bargaining.py``: ``Gw = w^{−1/α}`` to float32 precision for
    several α, a scipy float64 solution, and the torchjd fixtures.

    Example::

        w = mtl.fairgrad(alpha=2.0)
        weights, state = w.update(gram, None, w.init(gram.shape[0]))
    """
    alpha = check_real("alpha", alpha, low=0.0, low_open=True)
    max_iters = check_int("max_iters", max_iters, low=1)

    def update(gram, losses, state, **extra):
        del extra
        _, gram, _ = check_inputs(weighting, gram, losses)
        weights = power_balance_weights(gram, power=1.0 / alpha, max_iters=max_iters)
        return finish(weights), state

    weighting = Weighting(empty_init, update, needs_gram=True, homogeneity=-alpha / (1 + alpha))
    return weighting

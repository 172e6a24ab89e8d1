"""Bargaining weightings: Nash-MTL and FairGrad, both ``w > 0`` with ``G w = w^{−p}``.

* **Nash-MTL** (Navon et al., 2022, "Multi-Task Learning as a Bargaining Game"): the Nash
  bargaining solution ``Gα = 1/α``: every task's utility ``⟨g_i, u⟩ = (Gα)_i = 1/α_i`` is
  positive, so the update is non-conflicting. The authors' code (and LibMTL and torchjd,
  which copy it) iterates a convex–concave procedure through a conic solver on
  ``G/‖G‖_F`` with the constraint ``−log(α_i ‖G‖_F) − log((G/‖G‖_F) α)_i ≤ 0``, in which
  the normalisation cancels: its fixed point is ``Gα = 1/α`` on the raw Gram, whose update
  has norm ``√(αᵀGα) = √K``, always rescaled to ``max_norm`` (1) for K ≥ 2. Here the same
  fixed point is the unique minimiser of ``½αᵀGα − Σ log α_i``, solved exactly by damped
  Newton on the device (:func:`mtl_optax.solvers.power_balance_weights`).
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


def nash_mtl(
    *, max_norm: float = 1.0, normalize_gram: bool = False, max_iters: int = 100
) -> Weighting:
    """Nash-MTL: the bargaining solution ``Gα = 1/α``, update ``Σ α_i g_i`` clipped to ``max_norm``.

    Defaults follow the authors' code (AvivNavon/nash-mtl, ``max_norm=1``), whose solver's
    fixed point is ``Gα = 1/α`` on the raw Gram (see the module docstring); LibMTL and torchjd
    are the same. At the solution ``‖u‖ = √(αᵀGα) = √K``, so for K ≥ 2 and ``max_norm = 1``
    the update is rescaled to norm 1 at every step: the method sets the direction, the
    clipping the length.

    Args:
      max_norm: if ``‖u‖ = √(αᵀGα)`` exceeds it, ``α`` is rescaled so that ``‖u‖ = max_norm``
        (1.0, the authors', LibMTL's and torchjd's default). ``0`` disables the clipping.
        The authors clip the gradient of the shared parameters after the backward pass; the
        Gram here is of the same shared gradients, so the result is the same.
      normalize_gram: solve ``Ĝα = 1/α`` on ``Ĝ = G/‖G‖_F`` instead (this library's
        convention before version 0.2; not the sources'). Same direction, weights
        ``√‖G‖_F`` times larger: unclipped, ``‖u‖ = √(K ‖G‖_F)``.
      max_iters: Newton iteration cap (converges in ≈ 5–15).

    Homogeneity: on the raw Gram ``α(cG) = α(G)/√c`` and ``‖u‖ = √K`` at every scale, so the
    weights are homogeneous of degree −½ with or without clipping (the update is scale-free:
    ``u(cJ) = u(J)``). With ``normalize_gram=True`` they are scale-free (degree 0) without
    clipping and not homogeneous with it.

    Differences from the sources: they warm-start the convex–concave procedure from the
    last step's ``α`` (20 iterations at most; ``update_weights_every`` can skip steps) and
    can stop far from the fixed point (``tests/test_reference_fixtures.py`` shows cases);
    this solves the fixed point exactly from scratch every step, so it is stateless.

    Checked in ``tests/test_bargaining.py``: ``Gα = 1/α`` to float32 precision, a scipy
    float64 solution of the same equations, the published torchjd example
    ``J = [[-4, 1, 1], [6, 1, 1]] → u = [0.0542, 0.7061, 0.7061]``, non-conflict; and in
    ``tests/test_reference_fixtures.py`` against the authors' code, LibMTL and torchjd.

    Example::

        w = mtl.nash_mtl()
        weights, state = w.update(gram, None, w.init(gram.shape[0]))   # ‖Σ w_i g_i‖ = 1
    """
    max_norm = check_real("max_norm", max_norm, low=0.0)
    max_iters = check_int("max_iters", max_iters, low=1)
    if not isinstance(normalize_gram, bool):
        raise TypeError(f"`normalize_gram` must be True or False, got {normalize_gram!r}.")

    def update(gram, losses, state, **extra):
        del extra
        _, gram, _ = check_inputs(weighting, gram, losses)
        if normalize_gram:
            peak = jnp.max(jnp.abs(gram))  # ‖G‖_F without overflowing G² (‖g‖ up to 1e19)
            peak = jnp.where(peak > 0, peak, 1.0)
            frobenius = peak * jnp.sqrt(jnp.sum(jnp.square(gram / peak)))
            gram_solved = gram / jnp.where(frobenius > 0, frobenius, 1.0)
        else:
            gram_solved = gram
        alpha = power_balance_weights(gram_solved, power=1.0, max_iters=max_iters)
        if max_norm > 0:
            norm = jnp.sqrt(jnp.maximum(alpha @ gram @ alpha, 0.0))
            alpha = jnp.where(norm > max_norm, alpha * (max_norm / norm), alpha)
        return finish(alpha), state

    if not normalize_gram:
        homogeneity = -0.5
    else:
        homogeneity = None if max_norm > 0 else 0.0
    weighting = Weighting(empty_init, update, needs_gram=True, homogeneity=homogeneity)
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

"""Gradient-normalised weighting: update ``Σ_i g_i / ‖g_i‖``.

``w_i = 1 / sg(‖g_i‖)`` with ``‖g_i‖² = G_ii``: only the Gram diagonal is needed. The
update is invariant to rescaling any task's loss (``L_i → c L_i``, ``c > 0``) and to
adding constants to the losses (translation), unlike loss-based weightings; it is what
per-task gradient normalisation in GradNorm-style methods aims at, with no extra
parameters. It is not non-conflicting in general. Tasks whose gradient norm is
``≤ eps`` (default 1e-12) get weight 0 (their gradient carries no direction); a non-finite
norm gives a NaN weight (so the update is non-finite and ``apply_if_finite`` skips it).

Checked in ``tests/test_weightings.py``: scale invariance of the update and
``‖w_i g_i‖ = 1`` for every non-zero task gradient.
"""

from __future__ import annotations

import jax.numpy as jnp

from mtl_optax import solvers
from mtl_optax.weighting.base import (
    Weighting,
    check_inputs,
    empty_init,
    finish,
)


def gradient_normalized(*, eps: float = 1e-12) -> Weighting:
    """Weights ``1/‖g_i‖`` so every task contributes a unit-norm gradient.

    Example::

        w = mtl.gradient_normalized()
        weights, _ = w.update(jnp.diag(jnp.array([4.0, 0.25])), None, w.init(2))  # [0.5, 2.0]
    """
    eps = solvers.check_nonnegative("eps", eps)

    def update(gram, losses, state, **extra):
        del extra
        _, gram, _ = check_inputs(weighting, gram, losses)
        norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))
        weights = jnp.where(norms > eps, 1.0 / jnp.maximum(norms, eps), 0.0)
        return finish(jnp.where(jnp.isfinite(norms), weights, jnp.nan)), state

    weighting = Weighting(empty_init, update, needs_gram="diagonal", homogeneity=-0.5)
    return weighting

"""MoCo's task-weight step, on the Gram of its tracked gradients.

MoCo (Fernando et al., "Mitigating Gradient Bias in Multi-objective Learning: A Provably
Convergent Approach", ICLR 2023), in the form LibMTL ships (commit 4336804, the reference
followed here), keeps two things across steps:

1. **tracked gradients** ``y_i ← y_i − β_t (y_i − ĝ_i)``, ``ĝ_i = L_i g_i/(‖g_i‖ + 1e-8)``,
   ``β_t = β/t^{β_σ}`` (``y`` starts at 0, ``t`` counts from 1);
2. **task weights** ``λ ← softmax(λ − γ_t (Y Yᵀ + ρI) λ)``, ``γ_t = γ/t^{γ_σ}`` (``λ``
   starts at ``1/K``),

and updates along ``Σ_i λ_i y_i``. Step 1 mixes past gradients into ``y``: it needs the
stacked per-task gradients (a ``K ×`` parameters state), not a Gram matrix, so it is no
``Weighting``. Step 2 reads only ``Y Yᵀ``: :func:`moco_weights` is that step as a pure
``Weighting`` whose input Gram is the one of the tracked gradients. Fed the Gram of LibMTL's
own ``y`` it reproduces LibMTL's weights call after call (``tests/test_tracking.py``,
fixtures from ``tests/fixtures/make_new_method_fixtures.py``).

Applied to the Gram of the current gradients instead (no tracking, ``β_t = 1`` and no
normalisation) it is a mirror-descent cousin of MoDo, not MoCo.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mtl_optax.weighting import arguments
from mtl_optax.weighting.base import Weighting, check_inputs, check_num_tasks, finish
from mtl_optax.weighting.hyper import check_real


class MoCoWeightsState(NamedTuple):
    """State of :func:`moco_weights`."""

    weights: jax.Array  # (K,) float32, λ (init 1/K)
    count: jax.Array  # () int32, calls so far (t − 1)


def moco_weights(*, gamma: float = 0.1, gamma_sigma: float = 0.5, rho: float = 0.0) -> Weighting:
    """MoCo's weight step ``λ ← softmax(λ − γ/t^{γ_σ} · (G + ρI) λ)`` on ``G = Y Yᵀ``.

    Args:
      gamma: γ > 0, the step size of the weights (default 0.1, LibMTL's).
      gamma_sigma: γ_σ ≥ 0, its decay exponent in the step count ``t`` (default 0.5,
        LibMTL's).
      rho: ρ ≥ 0, the ℓ2 regularisation of the weights (default 0, LibMTL's).

    ``G`` must be the Gram of MoCo's tracked gradients (see the module doc); the weights
    multiply those. Not homogeneous in ``G`` (absolute step size): ``homogeneity = None``.
    A call with a non-finite Gram returns NaN weights and leaves the state unchanged.

    Example::

        from mtl_optax.weighting.tracking import moco_weights

        tracked = jac                                   # MoCo's tracked gradients, (K, n)
        w = moco_weights()
        weights, state = w.update(tracked @ tracked.T, None, w.init(3))
    """
    gamma = check_real("gamma", gamma, low=0.0, low_open=True)
    gamma_sigma = check_real("gamma_sigma", gamma_sigma, low=0.0)
    rho = check_real("rho", rho, low=0.0)

    def init(num_tasks):
        k = check_num_tasks(num_tasks)
        return MoCoWeightsState(jnp.full((k,), 1.0 / k, jnp.float32), jnp.zeros((), jnp.int32))

    def update(gram, losses, state, **extra):
        del extra
        k, gram, _ = check_inputs(weighting, gram, losses)
        if not isinstance(state, MoCoWeightsState):
            raise TypeError(
                f"moco_weights' update needs the state from its own init, got "
                f"{type(state).__name__}."
            )
        arguments.same_tasks("state", state.weights, k)
        step = (state.count + 1).astype(gram.dtype)
        rate = gamma / step**gamma_sigma
        previous = state.weights.astype(gram.dtype)
        regularised = gram + rho * jnp.eye(k, dtype=gram.dtype)
        weights = jax.nn.softmax(previous - rate * (regularised @ previous))
        ok = jnp.all(jnp.isfinite(gram))
        new_state = MoCoWeightsState(weights.astype(jnp.float32), state.count + 1)
        return finish(jnp.where(ok, weights, jnp.nan)), arguments.unless_bad(ok, new_state, state)

    weighting = Weighting(init, update, needs_gram=True, homogeneity=None)
    return weighting

"""Fixed weightings: mean, sum and constant weights (linear scalarisation).

``Σ w_i L_i`` with fixed ``w``: the baseline every multi-task method is compared with.
None looks at the Gram matrix, so all run in tier 1 (one backward pass). They are
linear under scaling of the gradients and are not non-conflicting in general.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from mtl_optax.weighting import arguments
from mtl_optax.weighting.base import (
    Weighting,
    check_inputs,
    check_num_tasks,
    empty_init,
    finish,
)


def constant_weighting(weights) -> Weighting:
    """Constant task weights ``w`` (given, any sign; shape (K,)).

    ``weights`` must be finite real numbers known when the weighting is built (a list, a
    NumPy or a concrete JAX array); strings, bools, complex numbers, NaN/inf and traced
    arrays raise a ``TypeError``/``ValueError`` naming the argument. For weights that change
    during training, use a stateful weighting (or rebuild this one outside ``jit``).

    Example::

        w = mtl.constant_weighting([1.0, 0.5])
        weights, _ = w.update(None, jnp.array([0.3, 0.7]), w.init(2))  # [1.0, 0.5]
    """
    fixed = arguments.real_vector("weights", weights).astype(np.float32)

    def init(num_tasks):
        if check_num_tasks(num_tasks) != fixed.size:
            raise ValueError(
                f"constant_weighting has {fixed.size} weights but num_tasks={num_tasks}."
            )
        return empty_init(num_tasks)

    def update(gram, losses, state, **extra):
        del extra
        k, _, _ = check_inputs(weighting, gram, losses)
        if k != fixed.size:
            raise ValueError(f"constant_weighting has {fixed.size} weights but got {k} tasks.")
        return finish(jnp.asarray(fixed)), state

    weighting = Weighting(init, update, needs_gram=False)
    return weighting


def _uniform(value_for_k) -> Weighting:
    def update(gram, losses, state, **extra):
        del extra
        k, _, _ = check_inputs(weighting, gram, losses)
        return finish(jnp.full((k,), value_for_k(k))), state

    weighting = Weighting(empty_init, update, needs_gram=False)
    return weighting


def mean_weighting() -> Weighting:
    """Equal weights ``w_i = 1/K``: the update is the mean of the task gradients."""
    return _uniform(lambda k: 1.0 / k)._replace(name="mean_weighting")


def sum_weighting() -> Weighting:
    """Unit weights ``w_i = 1``: the update is the sum of the task gradients."""
    return _uniform(lambda k: 1.0)._replace(name="sum_weighting")

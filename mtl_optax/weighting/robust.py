"""Byzantine-robust selection: Krum and Multi-Krum (Blanchard et al., 2017, "Machine
Learning with Adversaries: Byzantine Tolerant Gradient Descent").

With ``f`` = ``n_byzantine`` possibly adversarial gradients, each gradient gets the score
``s_i = Σ`` of its distances to its ``K − f − 2`` nearest other gradients, where
``‖g_i − g_j‖² = G_ii + G_jj − 2G_ij`` is read off the Gram matrix; the ``m`` =
``n_selected`` lowest-scoring gradients are averaged (weights ``1/m`` on them, 0 elsewhere;
ties go to the lower index). Needs ``K ≥ f + 3``. Selection does not change when ``G → cG``,
so the update is linear under gradient scaling; it is not non-conflicting.
"""

from __future__ import annotations

import jax.numpy as jnp

from mtl_optax.weighting.base import Weighting, check_inputs, check_num_tasks, empty_init, finish
from mtl_optax.weighting.hyper import check_int


def krum(*, n_byzantine: int, n_selected: int = 1) -> Weighting:
    """(Multi-)Krum: average of the ``n_selected`` gradients closest to their neighbours.

    Args:
      n_byzantine: ``f ≥ 0``, the number of gradients that may be adversarial (required, as in
        torchjd); the number of tasks must be at least ``f + 3``.
      n_selected: ``m ≥ 1`` gradients averaged (1: Krum; more: Multi-Krum), at most K.

    Checked in ``tests/test_robust.py`` against a NumPy transcription on the Jacobian
    (explicit pairwise distances) and the torchjd fixtures. The selection is discrete: on
    (nearly) collinear gradients two scores tie to ``O(δ²)`` and rounding picks the winner
    (float32 and float64 may then select different gradients).

    Example::

        w = mtl.krum(n_byzantine=1, n_selected=2)
        jac5 = jax.random.normal(jax.random.PRNGKey(0), (5, 4))    # 5 task gradients
        weights, state = w.update(jac5 @ jac5.T, None, w.init(5))
    """
    n_byzantine = check_int("n_byzantine", n_byzantine, low=0)
    n_selected = check_int("n_selected", n_selected, low=1)

    def check_tasks(k):
        if k < n_byzantine + 3:
            raise ValueError(
                f"krum needs at least n_byzantine + 3 = {n_byzantine + 3} tasks, got {k}; "
                "lower `n_byzantine`."
            )
        if k < n_selected:
            raise ValueError(f"krum cannot select n_selected={n_selected} of {k} tasks.")

    def init(num_tasks):
        check_tasks(check_num_tasks(num_tasks))
        return empty_init(num_tasks)

    def update(gram, losses, state, **extra):
        del extra
        k, gram, _ = check_inputs(weighting, gram, losses)
        check_tasks(k)
        diag = jnp.diagonal(gram)
        distances = jnp.sqrt(jnp.maximum(diag[:, None] + diag[None, :] - 2.0 * gram, 0.0))
        distances = jnp.where(jnp.eye(k, dtype=bool), jnp.inf, distances)  # exclude self
        nearest = jnp.sort(distances, axis=1)[:, : k - n_byzantine - 2]
        scores = jnp.sum(nearest, axis=1)
        chosen = jnp.argsort(scores, stable=True)[:n_selected]
        weights = jnp.zeros(k, gram.dtype).at[chosen].set(1.0 / n_selected)
        return finish(jnp.where(jnp.all(jnp.isfinite(gram)), weights, jnp.nan)), state

    weighting = Weighting(init, update, needs_gram=True, homogeneity=0.0)
    return weighting

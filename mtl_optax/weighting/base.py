"""The one abstraction of the library: a ``Weighting``.

Almost every multi-task method computes task weights ``w`` from the Gram matrix
``G = J Jᵀ`` of the task gradients and/or the task losses, then updates along
``Σ w_i g_i``. A ``Weighting`` is that computation as a pair of pure functions, in the
spirit of ``optax.GradientTransformation``:

* ``init(num_tasks) -> state`` (a NamedTuple of arrays);
* ``update(gram, losses, state, **extra) -> (weights, state)``; ``gram`` is (K, K) or
  ``None`` when ``needs_gram`` is False, ``losses`` is (K,) or ``None`` when
  ``needs_losses`` is False; unknown ``extra`` keyword arguments are ignored.

``needs_gram="diagonal"`` says that only ``diag(G)`` (the squared gradient norms) is read:
the tiers then pass ``diag(‖g_i‖²)`` as a diagonal matrix and skip the K² inner products.
``reads_gram_factor=True`` says that ``update`` also reads ``gram_factor=R`` (``RᵀR = G``,
``R`` upper triangular from a QR factorisation of the gradients), which the tiers holding
the gradients pass; it must still accept the Gram alone (the bounded-memory tiers).

Weights are (K,) in float32 (float64 for float64 inputs) and ``stop_gradient``-ed: no solver
is differentiated through.

``scalarization`` says what the heads (task-specific parameters) get: a scalarization
minimises ``Σ w_i L_i`` with the weights held fixed, so every parameter, head ``i`` included,
gets the gradient of the weighted loss, ``w_i ∇L_i`` (LibMTL's loss weightings, torchjd's
scalarizers); otherwise the weights only set the direction of the shared parameters and head
``i`` follows its own task, ``∇L_i`` (torchjd's ``mtl_backward``, MGDA-UB). The default
(``None``) is a scalarization exactly when the weighting reads no Gram.

The same object runs in every tier: :func:`mtl_optax.aggregate` (stacked per-task gradients,
tier 3) or the tier-1/2 functions :func:`mtl_optax.split_value_and_grad` and
:func:`mtl_optax.value_and_grad`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from mtl_optax.solvers import check_gram
from mtl_optax.solvers.active_set import _SYMMETRY_TOL as SYMMETRY_TOL


class EmptyWeightingState(NamedTuple):
    """State of a weighting that keeps none."""


class Weighting(NamedTuple):
    """A pure task-weighting rule (see the module docstring)."""

    init: Callable[[int], Any]
    update: Callable[..., tuple[jax.Array, Any]]
    needs_gram: bool | str = True  # True, False or "diagonal"
    needs_losses: bool = False
    # ``h`` with ``weights(c·G) = c**h · weights(G)`` for every c > 0, or None if the weights
    # are not homogeneous in G. h = 0 means the update is linear under scaling of the
    # gradients (u(c·J) = c·u(J)). The tiers use it to compute the Gram from power-of-two
    # rescaled gradients (no float32 overflow/underflow) and undo the scale exactly.
    homogeneity: float | None = None
    # whether the heads get w_i ∇L_i (True) or ∇L_i (False); None: True iff needs_gram is False
    scalarization: bool | None = None
    # the method's name in states and errors; None: that of the function defining `update`
    name: str | None = None
    # whether ``update`` also reads ``gram_factor=R`` (upper triangular, ``RᵀR = G``, from a QR
    # factorisation of the gradients), which tiers holding the gradients pass: solves on ``R``
    # lose ``κ(J)`` digits where solves on ``G`` lose ``κ(J)²``
    reads_gram_factor: bool = False


def scales_heads(weighting: Weighting) -> bool:
    """Whether head ``i`` gets ``w_i ∇L_i`` (a scalarization) rather than ``∇L_i``."""
    if weighting.scalarization is None:
        return not weighting.needs_gram
    return bool(weighting.scalarization)


def check_num_tasks(num_tasks: Any) -> int:
    """``num_tasks`` must be a positive Python int (it fixes the state's shapes)."""
    if not isinstance(num_tasks, int) or isinstance(num_tasks, bool) or num_tasks < 1:
        raise ValueError(f"`num_tasks` must be a positive int, got {num_tasks!r}.")
    return num_tasks


def empty_init(num_tasks: int) -> EmptyWeightingState:
    """``init`` of a weighting that keeps no state (still validates ``num_tasks``)."""
    check_num_tasks(num_tasks)
    return EmptyWeightingState()


def check_inputs(
    weighting: Weighting, gram: jax.Array | None, losses: jax.Array | None
) -> tuple[int, jax.Array | None, jax.Array | None]:
    """Trace-time checks shared by all weightings; returns ``(K, gram32, losses32)``.

    ``gram`` must be square (K, K) when the weighting needs it, ``losses`` a (K,) vector
    when it needs them; both are promoted to float32 at least (bf16 welcome).
    """
    k = None
    if weighting.needs_gram:
        if gram is None:
            raise ValueError(
                "This weighting needs the Gram matrix of the task gradients; got None."
            )
        k = check_gram(gram)
        gram = gram.astype(jnp.promote_types(gram.dtype, jnp.float32))
        if isinstance(gram, jax.core.Tracer):
            gram = _nan_unless_symmetric(gram)
    if weighting.needs_losses:
        if losses is None:
            raise ValueError(
                "This weighting needs the task losses: pass `task_losses=losses` to the "
                "optimizer's update (opt.update(task_grads, state, params, task_losses=losses); "
                "nnx: optimizer.update(model, task_grads, task_losses=losses); linen: "
                "mtl.apply_task_gradients(state, task_grads, task_losses=losses))."
            )
        shape = jnp.shape(losses)
        if len(shape) != 1 or (k is not None and shape[0] != k):
            want = "(K,)" if k is None else f"({k},)"
            raise ValueError(f"`losses` must have shape {want} (one per task), got {shape}.")
        k = shape[0]
        losses = jnp.asarray(losses).astype(jnp.promote_types(jnp.result_type(losses), jnp.float32))
    if k is None:
        if losses is not None:
            k = jnp.shape(losses)[0]
        elif gram is not None:
            k = check_gram(gram)
        else:
            raise ValueError("Pass the Gram matrix or the losses so the number of tasks is known.")
    return k, gram, losses


def _nan_unless_symmetric(gram: jax.Array) -> jax.Array:
    """Under ``jit`` the symmetry of ``gram`` (checked at trace time when it is concrete, see
    :func:`mtl_optax.solvers.check_gram`) shows only in its values: a Gram with
    ``|G_ij − G_ji| > 1e-4 √(G_ii G_jj)`` (not a Gram matrix ``J Jᵀ``; a cross-batch matrix
    belongs in ``cross_gram=``) becomes NaN, so every weighting returns NaN weights."""
    diag = jnp.abs(jnp.diagonal(gram))
    gap = jnp.abs(gram - gram.T)
    tolerance = SYMMETRY_TOL * jnp.sqrt(diag[:, None] * diag[None, :]) + jnp.finfo(gram.dtype).tiny
    asymmetric = jnp.any(gap > tolerance)  # False where the gap is NaN (already non-finite)
    return jnp.where(asymmetric, jnp.nan, gram)


def finish(weights: jax.Array) -> jax.Array:
    """Weights leave a weighting in float32 (or wider) and outside autodiff."""
    return jax.lax.stop_gradient(weights.astype(jnp.promote_types(weights.dtype, jnp.float32)))

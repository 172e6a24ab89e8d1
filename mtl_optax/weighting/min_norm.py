"""Min-norm weightings: MGDA and primary/auxiliary projection.

Both solve ``min ‖Σ_i x_i g_i‖²`` over ``x ≥ 0`` with ``Σ_{i ∈ P} x_i = 1`` for a set
``P`` of primary tasks (:func:`mtl_optax.solvers.min_norm_weights`):

* **MGDA** (Désidéri 2012; Sener & Koltun 2018): every task is primary. The update
  ``u = Σ α_i g_i`` is the min-norm point of the convex hull of the gradients, the dual of
  ``max_u min_i ⟨g_i, u⟩ − ½‖u‖²``: non-conflicting (``⟨g_i, u⟩ ≥ ‖u‖² ≥ 0``), and
  ``u = 0`` exactly at Pareto-stationary points.
* **Primary/auxiliary**: the primaries ``P`` form the objective, auxiliaries must not
  increase: ``max_u ⟨u, ḡ_P⟩ − ½‖u‖²  s.t. ⟨u, g_j⟩ ≥ 0`` with dual
  ``min_{λ ≥ 0} ‖g_0 + Σ_j λ_j g_j‖²``. With one auxiliary this is the closed form
  ``λ = relu(−⟨g_0, g_1⟩)/‖g_1‖²``; the KKT conditions hold: ``λ ≥ 0``,
  ``⟨u, g_j⟩ ≥ 0``, ``λ_j ⟨u, g_j⟩ = 0`` and ``⟨u, g_0⟩ = ‖u‖²``. Several primaries are
  combined on their simplex (a case the source leaves open, solved exactly).

The state keeps the last support of the weights to warm-start the next solve.
All-zero gradients give ``u = 0`` (every feasible weight is optimal; which one is returned
is unspecified). A task with a zero gradient makes ``u = 0`` in MGDA (it is
Pareto-stationary) and gets ``λ = 0`` as an auxiliary. A non-finite Gram (or, for the
loss normalisations, a non-finite loss) gives NaN weights, so ``optax.apply_if_finite``
skips the step.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mtl_optax import solvers
from mtl_optax.weighting.base import Weighting, check_inputs, check_num_tasks, finish

_NORMALIZATIONS = ("none", "l2", "loss", "loss+")
_SOLVERS = ("active_set", "frank_wolfe", "frank_wolfe_fixed_step")


class MinNormState(NamedTuple):
    """Support (non-zero weights) of the last solution, the next solve's warm start."""

    support: jax.Array  # (K,) bool


def _init(num_tasks: int) -> MinNormState:
    return MinNormState(support=jnp.zeros(check_num_tasks(num_tasks), bool))


def _check_state(state: MinNormState, k: int) -> None:
    if not isinstance(state, MinNormState):
        raise TypeError(
            f"`state` must be the MinNormState returned by the weighting's init(K), got "
            f"{type(state).__name__}; call state = weighting.init({k})."
        )
    if jnp.shape(state.support) != (k,):
        raise ValueError(
            f"The weighting state was initialised for {jnp.shape(state.support)[0]} tasks but "
            f"the Gram matrix has {k}; call init({k})."
        )


def mgda(
    *,
    normalization: str = "none",
    solver: str = "active_set",
    max_iters: int | None = None,
    tol: float = 1e-6,
    eps: float = 1e-12,
) -> Weighting:
    """Multiple-gradient descent: weights of the min-norm point of the gradients' hull.

    Args:
      normalization: rescale each gradient before solving, as in the original MGDA code:
        ``"none"``, ``"l2"`` (``g_i/‖g_i‖``), ``"loss"`` (``g_i/L_i``) or ``"loss+"``
        (``g_i/(L_i ‖g_i‖)``). The returned weights include the rescaling
        (``w_i = α_i / n_i``), so ``Σ w_i g_i`` is the update. Each factor (norm, loss)
        that is ``≤ eps`` counts as 1 (a zero gradient or loss carries no scale), so
        ``"loss+"`` with zero losses gives the ``"l2"`` weights. A NaN or infinite loss
        gives NaN weights.
      solver: ``"active_set"`` (default; exact, see :func:`~mtl_optax.min_norm_weights`),
        ``"frank_wolfe"`` (exact line search, the original solver; sublinear on faces) or
        ``"frank_wolfe_fixed_step"`` (``α ← (kα + e_τ)/(k + 1)``).
      max_iters: solver iteration cap (default ``3K + 10`` active set, 250 Frank–Wolfe).
      tol: Frank–Wolfe stopping tolerance on ``‖Δα‖₁`` (≥ 0).
      eps: threshold of the normalisations (≥ 0, finite), default 1e-12.

    Defaults follow the paper (Sener & Koltun, 2018): the exact min-norm point, with no
    normalisation (LibMTL's default ``mgda_gn="none"``; torchjd has none). The authors'
    code and LibMTL solve the same problem by Frank–Wolfe, stopped after 250 iterations or
    when ``‖Δα‖₁ < 1e-5`` (``solver="frank_wolfe", max_iters=250, tol=1e-5`` is that
    solver); the normalisations are LibMTL's ``mgda_gn`` values.

    Checked in ``tests/test_weightings.py`` against scipy SLSQP on random, rank-deficient
    and badly scaled Grams (K = 1, 2, 3, 10), the K = 2 closed form, and the
    non-conflicting property ``⟨u, g_i⟩ ≥ 0``; in ``tests/test_reference_fixtures.py``
    against LibMTL's ``MGDA`` (``"none"``, ``"l2"``, ``"loss+"``), whose early stops show in
    the optimality conditions.

    Example::

        w = mtl.mgda()
        weights, state = jax.jit(w.update)(gram, None, w.init(gram.shape[0]))
    """
    if normalization not in _NORMALIZATIONS:
        raise ValueError(
            f"`normalization` must be one of {_NORMALIZATIONS}, got {normalization!r}."
        )
    if solver not in _SOLVERS:
        raise ValueError(f"`solver` must be one of {_SOLVERS}, got {solver!r}.")
    eps = solvers.check_nonnegative("eps", eps)
    tol = solvers.check_nonnegative("tol", tol)
    if max_iters is not None:
        solvers.check_iters(max_iters)

    def update(gram, losses, state, **extra):
        del extra
        k, gram, losses = check_inputs(weighting, gram, losses)
        _check_state(state, k)
        scale = jnp.ones(k, gram.dtype)
        if normalization in ("l2", "loss+"):
            norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))
            scale = scale * jnp.where(norms > eps, norms, 1.0)
        if normalization in ("loss", "loss+"):
            losses = losses.astype(gram.dtype)
            scale = scale * jnp.where(losses > eps, losses, 1.0)
            scale = jnp.where(jnp.isfinite(losses), scale, jnp.nan)
        scaled = gram / (scale[:, None] * scale[None, :])
        scaled = jnp.where(jnp.all(jnp.isfinite(scale)), scaled, 0.0)
        if solver == "active_set":
            alpha = solvers.min_norm_weights(
                scaled, jnp.ones(k, bool), init_support=state.support, max_iters=max_iters
            )
        else:
            alpha = solvers.frank_wolfe_simplex(
                scaled,
                max_iters=250 if max_iters is None else max_iters,
                tol=tol,
                line_search=solver == "frank_wolfe",
            )
        weights = jnp.where(jnp.all(jnp.isfinite(scale)), alpha / scale, jnp.nan)
        return finish(weights), MinNormState(support=alpha > 0)

    weighting = Weighting(
        _init,
        update,
        needs_gram=True,
        needs_losses=normalization in ("loss", "loss+"),
        # weights α/scale_i: scale-free α, scale_i ∝ ‖g_i‖ for "l2" and "loss+"
        homogeneity=-0.5 if normalization in ("l2", "loss+") else 0.0,
    )
    return weighting


def primary_auxiliary(
    *, primary: int | Sequence[int] = 0, max_iters: int | None = None
) -> Weighting:
    """Primary task(s) as the objective, auxiliary tasks as "must not increase" constraints.

    Weights are ``α`` on the primaries (a simplex; 1 for a single primary) and ``λ ≥ 0`` on
    the auxiliaries; the update ``u = Σ α_i g_i + Σ λ_j g_j`` is the exact solution of the
    dual problem in the module docstring.

    Args:
      primary: index, or sequence of indices, of the primary task(s); every other task is
        auxiliary. Checked against the number of tasks at trace time.
      max_iters: active-set iteration cap (default ``3K + 10``).

    Checked in ``tests/test_weightings.py`` against ``scipy.optimize.nnls`` (one primary),
    the one-auxiliary closed form, a scipy SLSQP solution (several primaries), and the KKT
    conditions.

    Example::

        w = mtl.primary_auxiliary(primary=0)       # task 0 primary, tasks 1.. auxiliary
        weights, state = jax.jit(w.update)(gram, None, w.init(3))   # weights[0] == 1
    """

    def index(i):  # an integer (int, np.int64, a concrete 0-d int array), never a bool
        if isinstance(i, (bool, np.bool_)) or jnp.result_type(i) == jnp.bool_:
            raise TypeError
        return operator.index(i)

    try:
        indices = (index(primary),)
    except TypeError:
        try:
            indices = tuple(index(i) for i in primary)
        except TypeError:
            indices = ()
    if not indices:
        raise ValueError(
            f"`primary` must be an int or a non-empty sequence of ints (task indices, not "
            f"bools), got {primary!r}."
        )
    if len(set(indices)) != len(indices):
        raise ValueError(f"`primary` lists a task twice: {primary!r}.")

    def mask(k: int) -> jax.Array:
        bad = [i for i in indices if not -k <= i < k]
        if bad:
            raise ValueError(f"`primary` index {bad[0]} is out of range for {k} tasks.")
        if len({i % k for i in indices}) != len(indices):
            raise ValueError(f"`primary` lists a task twice for {k} tasks: {indices}.")
        return jnp.zeros(k, bool).at[jnp.asarray(indices)].set(True)

    def init(num_tasks):
        mask(check_num_tasks(num_tasks))
        return _init(num_tasks)

    def update(gram, losses, state, **extra):
        del extra
        k, gram, _ = check_inputs(weighting, gram, losses)
        _check_state(state, k)
        x = solvers.min_norm_weights(gram, mask(k), init_support=state.support, max_iters=max_iters)
        return finish(x), MinNormState(support=x > 0)

    weighting = Weighting(init, update, needs_gram=True, homogeneity=0.0)
    return weighting

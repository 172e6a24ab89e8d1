"""Dual-cone projections: UPGrad and DualProj (Quinton & Rey, "Jacobian Descent for
Multi-Objective Optimization", 2024; definitions and defaults of torchjd 0.18).

Both work on the normalised, regularised Gram ``G' = G/tr(G) + ε_reg I`` (``G' = ε_reg I``
when ``tr(G) < norm_eps``) and project onto the dual cone of the gradients
``C = {u : ⟨u, g_j⟩ ≥ 0 ∀j}``: the projection of ``Σ_j b_j g_j`` onto ``C`` is
``Σ_j v_j g_j`` with ``v = argmin_{v ≥ b} vᵀG'v`` (the lower-bounded QP of
:func:`mtl_optax.solvers.lower_bounded_qp`, solved exactly on the device).

* **UPGrad**: project every gradient, ``lower = p_i e_i`` for task i, and add the
  projections: ``w = Σ_i v^{(i)}``. The K problems are batched with ``vmap``.
* **DualProj**: project the preference combination once, ``lower = p``.

``p`` is the preference vector, ``1/K`` by default (the mean). The update is
non-conflicting (``⟨u, g_j⟩ ≥ 0`` for every j, up to the ``ε_reg`` regularisation) and
linear under scaling of the gradients. The state keeps the support of each QP's solution
as the next step's warm start.

``norm_eps`` is an absolute threshold on ``tr(G)`` (as in torchjd): weightings applied
through :func:`mtl_optax.aggregate` see the Gram of power-of-two rescaled gradients, whose
trace is ≥ 1/4 unless every gradient is zero, so there it only catches all-zero gradients
and the update is linear under scaling at every scale; called directly on a Gram with
``0 < tr(G) < norm_eps`` the weights are ``p``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mtl_optax import solvers
from mtl_optax.weighting.arguments import real_vector
from mtl_optax.weighting.base import Weighting, check_inputs, check_num_tasks, finish


class DualConeState(NamedTuple):
    """Supports of the last solutions (one row per projected vector), the next warm start."""

    support: jax.Array  # (K, K) bool for UPGrad, (1, K) for DualProj


def _check_pref(pref_vector) -> np.ndarray | None:
    return None if pref_vector is None else real_vector("pref_vector", pref_vector)


def _preferences(pref, k: int, dtype) -> jax.Array:
    if pref is None:
        return jnp.full(k, 1.0 / k, dtype)
    if pref.shape != (k,):
        raise ValueError(
            f"`pref_vector` has {pref.shape[0]} entries but there are {k} tasks; pass one "
            "entry per task."
        )
    return jnp.asarray(pref, dtype)


def _normalized_gram(gram, norm_eps: float, reg_eps: float):
    """``G/tr(G) + ε_reg I`` (``ε_reg I`` when ``tr(G) < norm_eps``), as torchjd."""
    trace = jnp.trace(gram)
    scaled = jnp.where(trace < norm_eps, 0.0, gram / jnp.where(trace < norm_eps, 1.0, trace))
    return scaled + reg_eps * jnp.eye(gram.shape[0], dtype=gram.dtype)


def _dual_cone_weighting(rows: str, pref_vector, norm_eps, reg_eps, max_iters) -> Weighting:
    """UPGrad (``rows="each"``) or DualProj (``rows="one"``) on the shared QP solver."""
    norm_eps = solvers.check_nonnegative("norm_eps", norm_eps)
    reg_eps = solvers.check_nonnegative("reg_eps", reg_eps)
    pref = _check_pref(pref_vector)
    if max_iters is not None:
        solvers.check_iters(max_iters)
    num_rows = (lambda k: k) if rows == "each" else (lambda k: 1)

    def init(num_tasks):
        k = check_num_tasks(num_tasks)
        _preferences(pref, k, jnp.float32)
        return DualConeState(support=jnp.zeros((num_rows(k), k), bool))

    def update(gram, losses, state, **extra):
        del extra
        k, gram, _ = check_inputs(weighting, gram, None)
        if not isinstance(state, DualConeState):
            raise TypeError(
                f"`state` must be the DualConeState returned by this weighting's init(K), got "
                f"{type(state).__name__}; call state = weighting.init({k})."
            )
        if jnp.shape(state.support) != (num_rows(k), k):
            raise ValueError(
                f"The weighting state has support shape {jnp.shape(state.support)} but the "
                f"Gram matrix has {k} tasks; call init({k})."
            )
        p = _preferences(pref, k, gram.dtype)
        lower = jnp.diag(p) if rows == "each" else p[None, :]
        g = _normalized_gram(gram, norm_eps, reg_eps)
        solve = jax.vmap(
            lambda low, sup: solvers.lower_bounded_qp(g, low, init_support=sup, max_iters=max_iters)
        )
        v = solve(lower, state.support)
        return finish(jnp.sum(v, axis=0)), DualConeState(support=v > lower)

    weighting = Weighting(init, update, needs_gram=True, homogeneity=0.0)
    return weighting


def upgrad(
    *,
    pref_vector=None,
    norm_eps: float = 1e-4,
    reg_eps: float = 1e-4,
    max_iters: int | None = None,
) -> Weighting:
    """UPGrad: the sum of every gradient's projection onto the gradients' dual cone.

    For each task i, ``v^{(i)} = argmin_{v ≥ p_i e_i} vᵀG'v`` with
    ``G' = G/tr(G) + reg_eps·I``; ``w = Σ_i v^{(i)}`` (with the default ``p = 1/K`` this is
    the mean of the projected gradients). K lower-bounded QPs, solved exactly and batched
    with ``vmap``, each warm-started from its last support (kept in the state).

    Args:
      pref_vector: (K,) preference weights ``p``; default ``None`` = ``1/K`` (the mean).
      norm_eps: ``tr(G)`` below which the Gram counts as zero (weights ``p``); torchjd's 1e-4.
      reg_eps: ridge added to the normalised Gram, torchjd's 1e-4 (keeps the projection
        unique for rank-deficient Grams; it makes ``⟨u, g_j⟩ ≥ −reg_eps·tr(G)·v_j``).
      max_iters: active-set iteration cap per QP (default ``3K + 10``).

    Properties: non-conflicting, linear under scaling (``homogeneity=0``), weighted,
    stateful (warm start only: the result does not depend on it), deterministic. Checked in
    ``tests/test_dual_cone.py`` against scipy SLSQP on the same float64 QPs, their KKT
    conditions, the torchjd worked example ``J = [[-4, 1, 1], [6, 1, 1]] → u = [0.2929,
    1.9004, 1.9004]``, permutation equivariance and scale invariance.

    Example::

        w = mtl.upgrad()
        jac = jnp.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
        weights, state = jax.jit(w.update)(jac @ jac.T, None, w.init(2))
        # weights @ jac ≈ [0.2929, 1.9004, 1.9004]
        np.testing.assert_allclose(weights @ jac, [0.2929, 1.9004, 1.9004], atol=1e-3)
    """
    return _dual_cone_weighting("each", pref_vector, norm_eps, reg_eps, max_iters)._replace(
        name="upgrad"
    )


def dualproj(
    *,
    pref_vector=None,
    norm_eps: float = 1e-4,
    reg_eps: float = 1e-4,
    max_iters: int | None = None,
) -> Weighting:
    """DualProj: the projection of the preference combination onto the dual cone.

    ``w = argmin_{v ≥ p} vᵀG'v`` with ``G' = G/tr(G) + reg_eps·I`` and ``p = 1/K`` by
    default, i.e. the mean gradient projected onto ``{u : ⟨u, g_j⟩ ≥ 0 ∀j}``. One
    lower-bounded QP, solved exactly, warm-started from the last support.

    Args: as :func:`upgrad`.

    Properties: non-conflicting, linear under scaling, weighted, stateful (warm start only),
    deterministic. Checked in ``tests/test_dual_cone.py`` against scipy SLSQP, the KKT
    conditions and the torchjd worked example ``u = [0.5563, 1.1109, 1.1109]``.

    Example::

        w = mtl.dualproj()
        jac = jnp.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
        weights, state = jax.jit(w.update)(jac @ jac.T, None, w.init(2))
        # weights @ jac ≈ [0.5563, 1.1109, 1.1109]
        np.testing.assert_allclose(weights @ jac, [0.5563, 1.1109, 1.1109], atol=1e-3)
    """
    return _dual_cone_weighting("one", pref_vector, norm_eps, reg_eps, max_iters)._replace(
        name="dualproj"
    )

"""Damped Newton for the bargaining-type weightings: ``w > 0`` with ``G w = w^{−p}``.

Nash-MTL (``p = 1``, the Nash bargaining solution ``Gα = 1/α``) and FairGrad
(``p = 1/α`` for α-fairness) both ask for the positive solution of ``G w = w^{−p}`` (powers
element-wise). It is the stationary point of the strictly convex function

    F(w) = ½ wᵀGw + Σ_i φ(w_i),   φ'(w) = −w^{−p}  (φ = −log w for p = 1),

on ``w > 0`` (``φ'' = p w^{−p−1} > 0``), so Newton's method with a damped step solves it
exactly on the device: no conic solver and no host round-trip, a fixed iteration cap under
``lax.while_loop``, and it runs under ``jit`` and ``vmap``.

Numerics. The unknown is rescaled as ``w = D β`` with ``D = diag(G)^{−1/2}`` so the Hessian
``C + diag(p d² w^{−p−1})`` (``C = D G D``, unit diagonal) is well conditioned whatever the
gradient norms (10³ apart is routine); for ``p = 1`` the rescaled problem is exactly
``Cβ = 1/β`` and the start ``β = 1`` is the solution for orthogonal gradients. Steps are
damped by ``1/(1 + λ)`` (``λ`` the Newton decrement, measured relative to the start's energy
``mean(β₀²)``: ``F`` at the rescaled solution scales as ``c^((p−1)/(p+1))`` when ``G → cG``, so
the iterates do not depend on the Gram's scale) while ``λ > 1/4``, then full, and
never leave ``w > 0`` (at most 99 % of the way to the boundary); the loop stops after a
full step that changed no weight by more than ``tol`` relatively (default ``√eps`` of the
working dtype: Newton converges quadratically, so the remaining error is ``≈ tol² = eps``)
or after ``max_iters``.

Singular ``G``. ``F`` is unbounded below when ``G`` has a non-negative null vector (e.g.
two exactly opposite gradients ``g_1 = −g_2``: no step helps both, no bargaining solution
exists), so a relative ridge ``ridge · I`` is added to ``C`` (default 8 machine epsilons
of the working dtype, ≈ 1e-6 in float32: the rounding level of ``C``'s unit diagonal); a
solution then always exists and, since null vectors of ``G`` are null vectors of ``Jᵀ``,
the update ``Jᵀw`` changes by at most that relative amount. A task with a zero gradient
has no finite solution (row i reads ``0 = w_i^{−p}``); it gets weight 0 (its gradient contributes
nothing either way) and the others are solved among themselves. Non-finite Grams give NaN
weights, so the update is non-finite and ``optax.apply_if_finite`` skips it.

Checked in ``tests/test_bargaining.py``: the fixed-point equations hold to float32
precision on random, badly scaled and rank-deficient Grams, and the solutions agree with
scipy's float64 ``least_squares`` on the same equations.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mtl_optax.solvers.active_set import check_gram
from mtl_optax.solvers.loop import while_loop_like

_DAMPED_UNTIL = 0.25  # Newton decrement below which full steps are taken
_TO_BOUNDARY = 0.99  # largest fraction of the way to w_i = 0 one step may go


def power_balance_weights(
    gram: jax.Array,
    *,
    power: float = 1.0,
    ridge: float | None = None,
    max_iters: int = 100,
    tol: float | None = None,
) -> jax.Array:
    """The positive solution of ``G w = w^{−power}`` by damped Newton (see the module doc).

    Args:
      gram: (K, K) Gram matrix ``G = J Jᵀ`` (float32 at least; float64 is solved in float64).
      power: ``p > 0``; 1 gives the Nash bargaining solution ``Gw = 1/w``.
      ridge: relative ridge added to the unit-diagonal rescaled Gram (keeps singular Grams
        solvable; see the module doc); default 8 machine epsilons of the working dtype.
      max_iters: Newton iteration cap.
      tol: stop after a full step whose largest relative change of a weight is below it
        (default ``√eps`` of the working dtype).

    Returns (K,) weights, 0 for tasks with a zero gradient, NaN for a non-finite Gram.
    """
    k = check_gram(gram)
    dtype = jnp.promote_types(gram.dtype, jnp.float32)
    gram = gram.astype(dtype)
    eps = float(jnp.finfo(dtype).eps)
    tol = eps**0.5 if tol is None else tol
    ridge = 8 * eps if ridge is None else ridge
    finite = jnp.all(jnp.isfinite(gram))
    gram = jnp.where(finite, gram, 0.0)
    diag = jnp.diagonal(gram)
    active = diag > jnp.finfo(dtype).tiny ** 0.5 * jnp.maximum(jnp.max(diag), 1.0)
    d = jnp.where(active, jax.lax.rsqrt(jnp.where(active, diag, 1.0)), 1.0)
    both = active[:, None] & active[None, :]
    c = jnp.where(both, gram * d[:, None] * d[None, :], jnp.eye(k, dtype=dtype))
    c = c + ridge * jnp.eye(k, dtype=dtype)
    # inactive tasks: a decoupled row β = β^{-p} whose solution is β = 1 (discarded below)
    d_eff = jnp.where(active, d, 1.0)

    def gradient_hessian(beta):
        w = d_eff * beta
        grad = c @ beta - d_eff * w ** (-power)
        hess = c + jnp.diag(power * d_eff**2 * w ** (-power - 1.0))
        return grad, hess

    def cond(carry):
        _, converged, it = carry
        return (~converged) & (it < max_iters)

    def body(carry):
        beta, _, it = carry
        grad, hess = gradient_hessian(beta)
        # Jacobi-scale the Newton system (its diagonal is ≥ 1, dominated by the barrier)
        s = jax.lax.rsqrt(jnp.diagonal(hess))
        step = -s * jnp.linalg.solve(hess * s[:, None] * s[None, :], s * grad)
        decrement2 = jnp.maximum(-(grad @ step), 0.0) / energy
        damping = jnp.where(decrement2 > _DAMPED_UNTIL**2, 1.0 / (1.0 + jnp.sqrt(decrement2)), 1.0)
        to_boundary = jnp.min(jnp.where(step < 0, -beta / jnp.where(step < 0, step, -1.0), jnp.inf))
        t = jnp.minimum(damping, _TO_BOUNDARY * to_boundary)
        converged = (t >= 1.0) & (jnp.max(jnp.abs(step) / beta) <= tol)
        return beta + t * step, converged, it + 1

    # β = 1 (w_i = G_ii^{-1/2}) solves the Nash problem for orthogonal gradients; for other
    # powers the orthogonal solution is w_i = G_ii^{-1/(1+p)}, i.e. β_i = d_i^{(1-p)/(1+p)}.
    beta0 = d_eff ** ((1.0 - power) / (1.0 + power))
    # F(c·G) at the rescaled point is F(G) times c^((p−1)/(p+1)) (1 for Nash, p = 1): measure
    # the Newton decrement relative to the start's quadratic energy mean(β0²), which scales
    # the same way, so the damping (hence the iterates) do not depend on the Gram's scale.
    energy = jnp.sum(jnp.where(active, beta0 * beta0, 0.0)) / jnp.maximum(jnp.sum(active), 1)
    energy = jnp.where(energy > 0, energy, 1.0)
    carry = (beta0, jnp.array(False), jnp.array(0))
    beta, *_ = while_loop_like(cond, body, carry, beta0)
    weights = jnp.where(active, d_eff * beta, 0.0)
    return jnp.where(finite, weights, jnp.nan)

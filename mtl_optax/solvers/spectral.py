"""Eigen-decomposition of a small Gram matrix to the accuracy its entries carry.

A Gram matrix computed in floating point, ``G_ij = ⟨g_i, g_j⟩``, carries every entry to an
accuracy relative to ``‖g_i‖‖g_j‖`` (not relative to ``max_k ‖g_k‖²``): the gradients of a
weak task are known as well as those of a strong one. ``jnp.linalg.eigh`` only resolves
eigenvalues to ``eps · λ_max`` in absolute terms, so on gradients whose norms differ by 10⁴
(eigenvalues 10⁸ apart) it returns the small eigenvalues as rounding noise, even in float32
where every digit needed is in the Gram. Cyclic Jacobi does not lose them:

* **Jacobi rotations** (Demmel & Veselić, "Jacobi's method is more accurate than QR", SIAM J.
  Matrix Anal. Appl. 13, 1992): a positive semi-definite ``G = D C D`` (``D`` the gradient
  norms, ``C`` the cosines) has its eigenvalues determined to relative accuracy
  ``≈ κ(C) · eps`` by its entries, whatever ``D``; Jacobi's method with the stopping test
  ``|G_pq| ≤ eps · √(G_pp G_qq)`` computes them to that accuracy. The rotations are applied
  in the round-robin (tournament) order, ``⌊K/2⌋`` disjoint pairs at a time, so a sweep is
  ``K − 1`` small matrix products; sweeps repeat until no rotation is left (quadratic
  convergence: 5-10 sweeps) or ``max_sweeps``.
* **Numerical rank, per eigenvalue**: the rounding of ``G`` moves the eigenvalue of a unit
  eigenvector ``v`` by at most ``η (Σ_j |v_j| ‖g_j‖)²`` (``η`` the relative rounding of an
  entry), so ``λ`` is numerically zero when ``λ ≤ rtol · (Σ_j |v_j| ‖g_j‖)²``. The bound
  follows the task norms each eigenvector involves: a weak task's direction is kept when it
  is independent of the others, however weak, and a direction shared by strong tasks that
  cancel is dropped when only their rounding is left. ``rtol`` defaults to ``16 K eps``,
  above the rounding of a Gram accumulated over millions of coordinates.

Used by the alignment weightings (IMTL-G, Aligned-MTL, ConFIG). Checked in
``tests/test_float32_hard.py`` (eigenvalues against float64 on graded and rank-deficient
Grams, orthogonality, reconstruction) and through every method that uses it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mtl_optax.solvers.active_set import check_gram
from mtl_optax.solvers.loop import while_loop_like

_HIGHEST = jax.lax.Precision.HIGHEST
# Relative rank tolerance in units of K machine epsilons (see the module docstring).
_RANK_RTOL = 16


def _tournament(n: int) -> np.ndarray:
    """(n − 1, n/2, 2) disjoint index pairs: every pair of ``range(n)`` once (n even)."""
    players = list(range(n))
    rounds = []
    for _ in range(n - 1):
        rounds.append([(players[i], players[n - 1 - i]) for i in range(n // 2)])
        players = [players[0], players[-1], *players[1:-1]]
    return np.asarray(rounds, np.int32)


def default_rank_rtol(k: int, dtype) -> float:
    """``16 K eps`` of ``dtype``: the relative rank tolerance of :func:`gram_eigh`."""
    return _RANK_RTOL * k * float(jnp.finfo(dtype).eps)


def gram_eigh(gram: jax.Array, *, max_sweeps: int = 30):
    """``(λ, V)`` with ``G = V diag(λ) Vᵀ`` for a symmetric positive semi-definite Gram.

    Each eigenvalue is accurate relative to the norms of the gradients its eigenvector
    combines (see the module docstring), ``V`` is orthogonal to working precision. Float32
    at least (float64 Grams are solved in float64); a non-finite Gram gives NaN.
    Eigenvalues are not sorted.
    """
    k = check_gram(gram)
    dtype = jnp.promote_types(gram.dtype, jnp.float32)
    gram = gram.astype(dtype)
    finite = jnp.all(jnp.isfinite(gram))
    a = jnp.where(finite, 0.5 * (gram + gram.T), 0.0)
    eps = jnp.finfo(dtype).eps
    n = k + k % 2  # odd K: a zero row and column that no rotation touches
    a = jnp.pad(a, ((0, n - k), (0, n - k)))
    rounds = jnp.asarray(_tournament(n)) if n > 1 else jnp.zeros((0, 0, 2), jnp.int32)
    eye = jnp.eye(n, dtype=dtype)

    def rotate(carry, pairs):
        a, v, rotated = carry
        p, q = pairs[:, 0], pairs[:, 1]
        app, aqq, apq = a[p, p], a[q, q], a[p, q]
        active = jnp.abs(apq) > eps * jnp.sqrt(jnp.abs(app * aqq))
        theta = (aqq - app) / jnp.where(active, 2.0 * apq, 1.0)
        t = jnp.sign(theta) / (jnp.abs(theta) + jnp.hypot(1.0, theta))
        t = jnp.where(active, jnp.where(theta == 0, 1.0, t), 0.0)
        c = jax.lax.rsqrt(1.0 + t * t)
        s = t * c
        r = eye.at[p, p].set(c).at[q, q].set(c).at[p, q].set(s).at[q, p].set(-s)
        a = jnp.matmul(jnp.matmul(r.T, a, precision=_HIGHEST), r, precision=_HIGHEST)
        a = a.at[p, q].set(0.0).at[q, p].set(0.0)
        v = jnp.matmul(v, r, precision=_HIGHEST)
        return (a, v, rotated | jnp.any(active)), None

    def sweep(carry):
        a, v, _, it = carry
        (a, v, rotated), _ = jax.lax.scan(rotate, (a, v, jnp.array(False)), rounds)
        return a, v, rotated, it + 1

    def cond(carry):
        return carry[2] & (carry[3] < max_sweeps)

    carry = (a, eye, jnp.array(n > 1), jnp.array(0))
    a, v, *_ = while_loop_like(cond, sweep, carry, a)
    eigenvalues = jnp.diagonal(a)[:k]
    vectors = v[:k, :k]
    return jnp.where(finite, eigenvalues, jnp.nan), jnp.where(finite, vectors, jnp.nan)


def numerically_positive(gram, eigenvalues, vectors, *, rtol: float | None = None):
    """Mask of the eigenvalues above the rounding of ``G`` along their eigenvector:
    ``λ_i > rtol · (Σ_j |V_ji| √G_jj)²`` (default ``rtol``: :func:`default_rank_rtol`)."""
    k = gram.shape[0]
    rtol = default_rank_rtol(k, gram.dtype) if rtol is None else rtol
    norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))
    reach = jnp.matmul(norms, jnp.abs(vectors), precision=_HIGHEST)
    return eigenvalues > rtol * reach * reach

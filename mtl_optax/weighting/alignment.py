"""Alignment weightings from the spectrum of the Gram: IMTL-G, Aligned-MTL and ConFIG.

All three ask for an update with prescribed inner products with the (unit) task gradients
and obtain it from a pseudo-inverse of the Gram matrix, computed by one symmetric
eigendecomposition on the device (:func:`mtl_optax.solvers.spectral.gram_eigh`, cyclic
Jacobi: every eigenvalue to the accuracy the Gram carries, also for gradient norms 10⁸
apart). An eigenvalue counts as zero when it is below the Gram's rounding along its
eigenvector, ``λ ≤ 16 K eps (Σ_j |v_j| ‖g_j‖)²``: the float counterpart of ``pinv``'s cut-off,
relative to the tasks each direction involves rather than to ``λ_max``.

Resolution. A float32 Gram carries each cosine to about ``eps``, so unit gradients that are
linearly dependent to within that (nearly parallel or opposite directions, angles below
≈ ``4√(K eps)``, ≈ 3·10⁻³ for K = 2 in float32) are indistinguishable from exactly dependent
ones and are treated as such, as ``pinv`` treats exact dependence. Where the definitions are
discontinuous at dependence (IMTL-G and Aligned-MTL between nearly and exactly parallel
tasks, ConFIG with nearly opposite ones) the float32 result is the dependent one; float64
resolves angles down to ≈ 10⁻⁷. ``tests/test_float32_hard.py`` checks float32 against
float64 wherever the float64 answer is stable under the float32 Gram's rounding (1e-3
agreement), including norm spreads up to 10⁸ and exactly rank-deficient Jacobians.

* **IMTL-G** (Liu et al., 2021, "Towards Impartial Multi-task Learning"; the
  pseudo-inverse generalisation of torchjd): ``w ∝ G⁺ √diag(G)``, normalised to sum 1, so
  ``u`` has the same projection on every unit gradient. Not non-conflicting in general.
* **Aligned-MTL** (Senushkin et al., 2023, "Independent Component Alignment for Multi-Task
  Learning"): ``G = VΛVᵀ``, eigenvalues ``≤ λ_max · K · eps`` dropped,
  ``B = √σ · V Λ^{−1/2} Vᵀ``, ``w = B · p`` (preference ``p = 1/K``), ``σ`` the smallest
  kept eigenvalue (``"min"``), their median or mean (``"rmse"``). The aligned gradients
  are orthogonal with equal norms ``√σ``.
* **ConFIG** (Liu et al., 2024, "ConFIG: Towards Conflict-free Training of Physics Informed
  Neural Networks"): unit gradients ``ĝ_i``, the min-norm ``v`` with ``⟨ĝ_i, v⟩ = p_i``
  (``p = 1``: ``v = Uᵀ(UUᵀ)⁺p`` with ``UUᵀ = DGD``, ``D = diag(G)^{−1/2}``), then
  ``u = (Σ_i ⟨g_i, v̂⟩) v̂`` with ``v̂ = v/‖v‖``. In weights: ``a = D (DGD)⁺ p``,
  ``w = (1ᵀGa / aᵀGa) a``. Non-conflicting when the unit gradients are linearly
  independent to within the Gram's resolution (every ``⟨ĝ_i, u⟩`` is then a positive
  multiple of ``p_i``); for dependent ones ``v`` is the least-squares solution, which can
  conflict (as in exact arithmetic). When the preference has no component the Gram resolves
  (two nearly opposite tasks in float32) the weights are 0. Where the tier holds the
  gradients ConFIG solves on their QR factor instead (see :func:`config`), which resolves
  angles down to ≈ ``16 K eps`` (≈ 10⁻⁵ in float32).

All three are scale-free (``homogeneity = 0``): linear under gradient scaling.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mtl_optax.solvers.spectral import default_rank_rtol, gram_eigh, numerically_positive
from mtl_optax.weighting.base import Weighting, check_inputs, empty_init, finish
from mtl_optax.weighting.hyper import check_preference

_SCALE_MODES = ("min", "median", "rmse")
_HIGHEST = jax.lax.Precision.HIGHEST


def spectrum(gram):
    """``(λ, V, kept)``: eigen-decomposition of ``G`` and the mask of its numerically non-zero
    eigenvalues, each resolved relative to the gradients its eigenvector combines (see
    :mod:`mtl_optax.solvers.spectral`)."""
    eigenvalues, vectors = gram_eigh(gram)
    return eigenvalues, vectors, numerically_positive(gram, eigenvalues, vectors)


def pinv_apply(gram, rhs):
    """``G⁺ rhs`` for a symmetric positive semi-definite ``G`` (see :func:`spectrum`).

    Returns ``(x, resolved)``: ``resolved`` is False when the part of ``rhs`` in the kept
    eigenspace is at the rounding level of the eigenvectors (``≤ 16 K eps ‖rhs‖``), i.e.
    ``x`` is only rounding noise. One step of iterative refinement on the kept eigenspace
    (``x += G⁺(P rhs − G x)``) recovers the digits lost in the first solve.
    """
    k = gram.shape[0]
    eigenvalues, vectors, kept = spectrum(gram)
    inverse = jnp.where(kept, 1.0 / jnp.where(kept, eigenvalues, 1.0), 0.0)
    coefficients = jnp.matmul(vectors.T, rhs, precision=_HIGHEST)
    projected = jnp.where(kept, coefficients, 0.0)

    def apply(v):
        return jnp.matmul(
            vectors, inverse * jnp.matmul(vectors.T, v, precision=_HIGHEST), precision=_HIGHEST
        )

    target = jnp.matmul(vectors, projected, precision=_HIGHEST)
    x = apply(target)
    x = x + apply(target - jnp.matmul(gram, x, precision=_HIGHEST))
    noise = default_rank_rtol(k, gram.dtype) * jnp.linalg.norm(rhs)
    return x, jnp.linalg.norm(projected) > noise


def _unit_scaling(gram):
    """``diag(G)^{−1/2}`` with 0 for zero gradients (a zero gradient has no direction)."""
    diag = jnp.diagonal(gram)
    positive = diag > 0
    return jnp.where(positive, 1.0 / jnp.sqrt(jnp.where(positive, diag, 1.0)), 0.0)


def imtl_g() -> Weighting:
    """IMTL-G: ``w = G⁺ √diag(G) / Σ(G⁺ √diag(G))``, equal projections on the unit gradients.

    Weights are 0 when the sum vanishes (relative to ``Σ|·|``, e.g. all gradients zero).

    Checked in ``tests/test_alignment.py`` against a float64 NumPy transcription, the
    property ``⟨u, g_i⟩/‖g_i‖`` equal for all i, the torchjd example
    ``J = [[-4, 1, 1], [6, 1, 1]] → u = [0.0767, 1, 1]`` and the torchjd fixtures.

    Example::

        w = mtl.imtl_g()
        weights, state = w.update(gram, None, w.init(gram.shape[0]))
    """

    def update(gram, losses, state, **extra):
        del extra
        _, gram, _ = check_inputs(weighting, gram, losses)
        v, resolved = pinv_apply(gram, jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0)))
        total = jnp.sum(v)
        degenerate = ~resolved | (jnp.abs(total) <= jnp.finfo(gram.dtype).eps * jnp.sum(jnp.abs(v)))
        weights = jnp.where(degenerate, 0.0, v / jnp.where(degenerate, 1.0, total))
        return finish(jnp.where(jnp.all(jnp.isfinite(gram)), weights, jnp.nan)), state

    weighting = Weighting(empty_init, update, needs_gram=True, homogeneity=0.0)
    return weighting


def aligned_mtl(*, scale_mode: str = "min", pref_vector=None) -> Weighting:
    """Aligned-MTL: align the principal components of the gradients, ``w = B p``.

    Defaults follow torchjd, adapted from the authors' code (SamsungLabs/MTL, no longer
    public): ``p = 1/K`` and the smallest kept eigenvalue. LibMTL (also adapted from it) sums
    the rows of ``B`` instead of averaging them, an update K times larger: pass
    ``pref_vector=[1.0] * K`` to match it.

    Args:
      scale_mode: ``"min"`` (default, torchjd's and LibMTL's): the smallest kept
        eigenvalue; ``"median"``; ``"rmse"`` (their mean; torchjd names it after the
        authors' code).
      pref_vector: task preferences ``p`` (default ``1/K`` each); a finite (K,) vector of
        numbers.

    All-zero gradients (no kept eigenvalue) give ``B = I``, as in torchjd.

    Checked in ``tests/test_alignment.py`` against a float64 NumPy transcription, the
    torchjd example ``J = [[-4, 1, 1], [6, 1, 1]] → u = [0.2133, 0.9673, 0.9673]``, the
    torchjd fixtures, and LibMTL's ``Aligned_MTL`` with ``pref_vector=[1.0] * K``
    (``tests/test_reference_fixtures.py``).

    Example::

        w = mtl.aligned_mtl()
        weights, state = w.update(gram, None, w.init(gram.shape[0]))
    """
    if scale_mode not in _SCALE_MODES:
        raise ValueError(f"`scale_mode` must be one of {_SCALE_MODES}, got {scale_mode!r}.")
    check_preference(pref_vector)

    def update(gram, losses, state, **extra):
        del extra
        k, gram, _ = check_inputs(weighting, gram, losses)
        pref = check_preference(pref_vector, k)
        pref = jnp.full(k, 1.0 / k, gram.dtype) if pref is None else jnp.asarray(pref, gram.dtype)
        eigenvalues, vectors, kept = spectrum(gram)
        safe = jnp.where(kept, eigenvalues, 1.0)
        if scale_mode == "min":
            sigma = jnp.min(jnp.where(kept, eigenvalues, jnp.inf))
        elif scale_mode == "median":
            # torch.median of the kept eigenvalues: the lower middle one for an even count
            ordered = jnp.sort(jnp.where(kept, eigenvalues, jnp.inf))
            sigma = ordered[(jnp.sum(kept) - 1) // 2]
        else:
            sigma = jnp.sum(jnp.where(kept, eigenvalues, 0.0)) / jnp.maximum(jnp.sum(kept), 1)
        inv_root = jnp.where(kept, jnp.sqrt(jnp.where(kept, sigma, 1.0) / safe), 0.0)
        balance = (vectors * inv_root) @ vectors.T
        balance = jnp.where(jnp.any(kept), balance, jnp.eye(k, dtype=gram.dtype))
        weights = balance @ pref
        return finish(jnp.where(jnp.all(jnp.isfinite(gram)), weights, jnp.nan)), state

    weighting = Weighting(empty_init, update, needs_gram=True, homogeneity=0.0)
    return weighting


def config(*, pref_vector=None) -> Weighting:
    """ConFIG: equal (or preferred) cosine with every task, length ``Σ_i ⟨g_i, v̂⟩``.

    Args:
      pref_vector: target inner products ``⟨ĝ_i, v⟩ = p_i`` (default 1 each, as torchjd).

    Zero gradients are left out of the unit gradients (torchjd's ``nan_to_num``); all-zero
    gradients give zero weights.

    ``update`` also takes ``gram_factor=R`` (upper triangular, ``RᵀR = G``), which the tiers
    that hold the task gradients pass (from a QR factorisation of the gradients): the solve
    then uses the SVD of ``R D`` and loses ``κ`` digits instead of the Gram's ``κ²``, as
    torchjd's ``pinv`` of the unit Jacobian, and resolves gradient norms up to ~1e30 apart
    (the float32 Gram squares them: ~1e19); without it the solve is on ``G``.

    Checked in ``tests/test_alignment.py`` against a float64 NumPy transcription on the
    Jacobian (unit rows, ``pinv``), the torchjd example
    ``J = [[-4, 1, 1], [6, 1, 1]] → u = [0.1588, 2.0706, 2.0706]`` and the torchjd fixtures;
    in float32 both paths against float64 in ``tests/test_float32_hard.py`` and torchjd's own
    property asserts on its test matrices in ``tests/test_torchjd_properties.py``.

    Example::

        w = mtl.config()
        weights, state = w.update(gram, None, w.init(gram.shape[0]))
    """
    check_preference(pref_vector)

    def update(gram, losses, state, *, gram_factor=None, **extra):
        del extra
        k, gram, _ = check_inputs(weighting, gram, losses)
        pref = check_preference(pref_vector, k)
        pref = jnp.ones(k, gram.dtype) if pref is None else jnp.asarray(pref, gram.dtype)
        if gram_factor is None:
            d = _unit_scaling(gram)
            x, resolved = pinv_apply(gram * d[:, None] * d[None, :], pref)
            a = d * x
            g_a = jnp.matmul(gram, a, precision=_HIGHEST)
            total, norm2 = jnp.sum(g_a), a @ g_a
        else:
            factor = _check_factor(gram_factor, k, gram.dtype)
            a, r_a, resolved = _unit_min_norm(factor, pref)
            total, norm2 = jnp.sum(jnp.matmul(factor.T, r_a, precision=_HIGHEST)), r_a @ r_a
        valid = resolved & (norm2 > 0)
        weights = jnp.where(valid, total / jnp.where(valid, norm2, 1.0), 0.0) * a
        return finish(jnp.where(jnp.all(jnp.isfinite(gram)), weights, jnp.nan)), state

    weighting = Weighting(
        empty_init, update, needs_gram=True, homogeneity=0.0, reads_gram_factor=True
    )
    return weighting


def _check_factor(factor, k, dtype):
    """``gram_factor`` must be a real (K, K) array (``RᵀR = G``); returned in ``dtype``."""
    given = getattr(factor, "dtype", None)
    if given is None or not jnp.issubdtype(given, jnp.floating) or jnp.shape(factor) != (k, k):
        raise ValueError(
            f"`gram_factor` must be the real ({k}, {k}) factor R with RᵀR = gram (an array), "
            f"got {type(factor).__name__} of shape {jnp.shape(factor) if given else '-'} and "
            f"dtype {given}."
        )
    return jnp.asarray(factor).astype(dtype)


def _unit_min_norm(factor, pref):
    """``(a, R a, resolved)`` of ConFIG on the factor ``R`` of ``G = RᵀR``: ``a = D x``,
    ``x = (UUᵀ)⁺ p`` with ``U = D J``, from the SVD ``R D = W S Zᵀ`` (so ``UUᵀ = Z S² Zᵀ``):
    ``x = Z S⁻² Zᵀ p`` and ``R a = W S⁻¹ Zᵀ p``, whose norm ``‖v‖`` never squares a singular
    value. ``S_i`` counts as zero below the factor's rounding along ``Z_i``,
    ``16 K eps ‖Z_i‖₁`` (the columns of ``R D`` are unit), as :func:`spectrum` on the Gram."""
    k = factor.shape[0]
    # ‖g_i‖ without squaring g_i itself (norm spreads beyond 1e19): columns scaled by the
    # power of two of their largest entry, exactly
    peak = jnp.max(jnp.abs(factor), axis=0)
    positive = peak > 0
    _, exponent = jnp.frexp(jnp.where(positive, peak, 1.0))
    norms = jnp.ldexp(jnp.linalg.norm(jnp.ldexp(factor, -exponent[None, :]), axis=0), exponent)
    d = jnp.where(positive, 1.0 / jnp.where(positive, norms, 1.0), 0.0)
    left, singular, right_t = jnp.linalg.svd(factor * d[None, :])
    noise = default_rank_rtol(k, factor.dtype)
    coefficients = jnp.matmul(right_t, pref, precision=_HIGHEST)
    resolved = jnp.abs(coefficients) > noise * jnp.linalg.norm(pref)
    kept = resolved & (singular > noise * jnp.sum(jnp.abs(right_t), axis=1))
    coefficients = jnp.where(kept, coefficients, 0.0)
    inverse = jnp.where(kept, 1.0 / jnp.where(kept, singular, 1.0), 0.0)
    x = jnp.matmul(right_t.T, coefficients * inverse * inverse, precision=_HIGHEST)
    r_a = jnp.matmul(left, coefficients * inverse, precision=_HIGHEST)
    return d * x, r_a, jnp.linalg.norm(coefficients) > noise * jnp.linalg.norm(pref)

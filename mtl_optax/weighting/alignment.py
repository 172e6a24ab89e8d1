"""Alignment weightings from the spectrum of the Gram: IMTL-G, Aligned-MTL and ConFIG.

All three ask for an update with prescribed inner products with the (unit) task gradients
and obtain it from a pseudo-inverse of the Gram matrix, computed by one symmetric
eigendecomposition on the device (eigenvalues below ``rtol · λ_max`` count as zero, with
``rtol = K · eps`` of the working dtype, the convention of ``numpy``/``torch`` ``pinv``):

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
  independent (every ``⟨ĝ_i, u⟩`` is then a positive multiple of ``p_i``).

All three are scale-free (``homogeneity = 0``): linear under gradient scaling.
"""

from __future__ import annotations

import jax.numpy as jnp

from mtl_optax.weighting.base import Weighting, check_inputs, empty_init, finish
from mtl_optax.weighting.hyper import check_preference

_SCALE_MODES = ("min", "median", "rmse")


def spectrum(gram):
    """``(λ, V, kept)``: eigen-decomposition of ``G`` and the mask of numerically non-zero
    eigenvalues (``λ > K · eps · λ_max``)."""
    k = gram.shape[0]
    eigenvalues, vectors = jnp.linalg.eigh(gram)
    cutoff = jnp.max(eigenvalues) * k * jnp.finfo(gram.dtype).eps
    return eigenvalues, vectors, eigenvalues > cutoff


def pinv_apply(gram, rhs):
    """``G⁺ rhs`` for a symmetric positive semi-definite ``G`` (see :func:`spectrum`).

    One step of iterative refinement (``x += G⁺(rhs − Gx)``) recovers the digits float32
    loses on Grams of gradients whose norms differ by orders of magnitude.
    """
    eigenvalues, vectors, kept = spectrum(gram)
    inverse = jnp.where(kept, 1.0 / jnp.where(kept, eigenvalues, 1.0), 0.0)

    def apply(v):
        return vectors @ (inverse * (vectors.T @ v))

    x = apply(rhs)
    return x + apply(rhs - gram @ x)


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
        v = pinv_apply(gram, jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0)))
        total = jnp.sum(v)
        degenerate = jnp.abs(total) <= jnp.finfo(gram.dtype).eps * jnp.sum(jnp.abs(v))
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

    Checked in ``tests/test_alignment.py`` against a float64 NumPy transcription on the
    Jacobian (unit rows, ``pinv``), the torchjd example
    ``J = [[-4, 1, 1], [6, 1, 1]] → u = [0.1588, 2.0706, 2.0706]`` and the torchjd fixtures.

    Example::

        w = mtl.config()
        weights, state = w.update(gram, None, w.init(gram.shape[0]))
    """
    check_preference(pref_vector)

    def update(gram, losses, state, **extra):
        del extra
        k, gram, _ = check_inputs(weighting, gram, losses)
        pref = check_preference(pref_vector, k)
        pref = jnp.ones(k, gram.dtype) if pref is None else jnp.asarray(pref, gram.dtype)
        d = _unit_scaling(gram)
        a = d * pinv_apply(gram * d[:, None] * d[None, :], pref)
        g_a = gram @ a
        norm2 = a @ g_a
        valid = norm2 > 0
        weights = jnp.where(valid, jnp.sum(g_a) / jnp.where(valid, norm2, 1.0), 0.0) * a
        return finish(jnp.where(jnp.all(jnp.isfinite(gram)), weights, jnp.nan)), state

    weighting = Weighting(empty_init, update, needs_gram=True, homogeneity=0.0)
    return weighting

"""The Gram matrix of the task gradients, ``G = J Jᵀ``, computed once for every tier.

``G_ij = Σ_leaves ⟨g_i, g_j⟩`` over the shared leaves, in float32 or wider with full-precision
matmuls: from stacked gradients (:func:`task_gram`), or through a linear map without ever
holding them (:func:`linear_gram`, the bounded-memory mode).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST


def task_gram(task_grads, mask: list[bool] | None = None, *, diagonal_only: bool = False):
    """``G = Σ_leaves J_l J_lᵀ`` over the (masked) leaves, in float32 or wider.

    With ``diagonal_only`` only the squared norms are computed, returned as ``diag(G)``
    in a (K, K) matrix (for weightings with ``needs_gram="diagonal"``).
    """
    leaves = jax.tree_util.tree_leaves(task_grads)
    k = jnp.shape(leaves[0])[0]
    dtype = jnp.promote_types(jnp.result_type(*leaves), jnp.float32)
    gram = jnp.zeros((k,) if diagonal_only else (k, k), dtype)
    for use, leaf in zip(mask or [True] * len(leaves), leaves):
        if use:
            flat = leaf.reshape(k, -1).astype(dtype)
            if diagonal_only:
                gram = gram + jnp.sum(flat * flat, axis=1)
            else:
                gram = gram + jnp.matmul(flat, flat.T, precision=HIGHEST)
    return jnp.diag(gram) if diagonal_only else gram


def task_gram_factor(task_grads, mask: list[bool] | None = None):
    """Upper-triangular ``R`` (K, K) with ``RᵀR = G``: the R factor of ``Jᵀ = QR``.

    Computed leaf by leaf and once more on the stacked factors (tall-skinny QR), so the
    gradients are never concatenated. Householder QR is backward stable: ``R`` is the
    factor of a Jacobian within ``eps ‖J‖`` of the true one, where the Gram's own rounding
    is ``eps ‖J‖²``; a solve on ``R`` loses ``κ(J)`` digits, one on ``G`` loses ``κ(J)²``.
    Checked against ``numpy.linalg.qr`` of the concatenated gradients in
    ``tests/test_alignment.py``.
    """
    leaves = jax.tree_util.tree_leaves(task_grads)
    k = jnp.shape(leaves[0])[0]
    dtype = jnp.promote_types(jnp.result_type(*leaves), jnp.float32)
    factors = [
        jnp.linalg.qr(leaf.reshape(k, -1).astype(dtype).T, mode="r")
        for use, leaf in zip(mask or [True] * len(leaves), leaves)
        if use and leaf.size
    ]
    if not factors:
        return jnp.zeros((k, k), dtype)
    factor = jnp.linalg.qr(jnp.concatenate(factors, axis=0), mode="r")
    return jnp.pad(factor, ((0, k - factor.shape[0]), (0, 0)))


def power_of_two_exponent(task_grads, mask: list[bool] | None = None) -> jax.Array:
    """``e`` (int32) with ``max |g| · 2^-e`` in [0.5, 1) over the (masked) leaves; 0 if none.

    Scaling by a power of two is exact, so ``2^-e · g`` has the same digits as ``g`` and its
    Gram neither overflows (norms ≥ 1e19 in float32) nor underflows (norms ≤ 1e-19).
    Non-finite or all-zero gradients give ``e = 0`` (the Gram then shows them as they are).
    """
    leaves = jax.tree_util.tree_leaves(task_grads)
    dtype = jnp.promote_types(jnp.result_type(*leaves), jnp.float32)
    used = [leaf for use, leaf in zip(mask or [True] * len(leaves), leaves) if use and leaf.size]
    if not used:
        return jnp.zeros((), jnp.int32)
    peak = jnp.max(jnp.stack([jnp.max(jnp.abs(leaf)).astype(dtype) for leaf in used]))
    _, exponent = jnp.frexp(peak)
    return jnp.where(jnp.isfinite(peak) & (peak > 0), exponent, 0).astype(jnp.int32)


def times_power_of_two(x: jax.Array, exponent: jax.Array) -> jax.Array:
    """``x · 2^exponent``, exact wherever the result is a normal number (as ``jnp.ldexp``).

    Two multiplications by normal powers of two ``2^a · 2^b = 2^exponent`` (each factor
    within range for any exponent :func:`power_of_two_exponent` returns), which XLA fuses
    into one pass; ``jnp.ldexp`` costs about ten times more on a large array (its bit
    manipulation: 24 ms against 2 ms on the (40, 256, 512) feature gradients of
    ``benchmarks/speed.py``). Checked against ``np.ldexp`` in ``tests/test_split.py``.
    """
    a = exponent // 2
    one = jnp.ones((), x.dtype)
    return x * jnp.ldexp(one, a) * jnp.ldexp(one, exponent - a)


def _scaled(task_grads, mask):
    """``(2^-e · J, e)`` with :func:`power_of_two_exponent`'s ``e`` (exact)."""
    exponent = power_of_two_exponent(task_grads, mask)
    scaled = jax.tree_util.tree_map(
        lambda g: times_power_of_two(g.astype(jnp.promote_types(g.dtype, jnp.float32)), -exponent),
        task_grads,
    )
    return scaled, exponent


def scaled_task_gram(task_grads, mask: list[bool] | None = None, *, diagonal_only: bool = False):
    """``(Ĝ, e)`` with ``G = 4^e · Ĝ``: the Gram of the gradients rescaled by ``2^-e``."""
    scaled, exponent = _scaled(task_grads, mask)
    return task_gram(scaled, mask, diagonal_only=diagonal_only), exponent


def apply_weighting(weighting, gram, losses, state, *, log2_scale=0, **extra):
    """``weighting.update`` on ``Ĝ`` where the true Gram is ``G = 2^log2_scale · Ĝ``.

    Weights of a weighting with ``homogeneity = h`` are multiplied back by ``2^(h·log2_scale)``
    (exact for the h = 0 and h = -1/2 of the shipped methods); a weighting with
    ``homogeneity=None`` is given the true Gram ``2^log2_scale · Ĝ``.
    """
    h = weighting.homogeneity
    if gram is not None and h is None:
        gram = jnp.ldexp(gram, jnp.asarray(log2_scale, jnp.int32))
    weights, state = weighting.update(gram, losses, state, **extra)
    if gram is not None and h:
        weights = weights * jnp.exp2(jnp.asarray(log2_scale, weights.dtype) * h)
    return weights, state


def weights_from_gradients(weighting, task_grads, losses, state, *, mask=None, **extra):
    """Compute the Gram ``weighting`` needs (none, diagonal or full) and call it.

    Homogeneous weightings see the Gram of power-of-two rescaled gradients (exact at any
    scale the dtype represents); others see the true Gram. A weighting that
    ``reads_gram_factor`` gets ``Ĝ = RᵀR`` and ``gram_factor=R`` from
    :func:`task_gram_factor` instead. Returns ``(weights, state)``.
    """
    if not weighting.needs_gram:
        # a losses-only weighting learns K from the losses; without them, from diag(G)
        gram = None if losses is not None else task_gram(task_grads, mask, diagonal_only=True)
        return weighting.update(gram, losses, state, **extra)
    diagonal = weighting.needs_gram == "diagonal"
    if weighting.homogeneity is None:
        return weighting.update(
            task_gram(task_grads, mask, diagonal_only=diagonal), losses, state, **extra
        )
    if weighting.reads_gram_factor and not diagonal:
        scaled, exponent = _scaled(task_grads, mask)
        factor = task_gram_factor(scaled, mask)
        gram = jnp.matmul(factor.T, factor, precision=HIGHEST)
        extra = {**extra, "gram_factor": factor}
    else:
        gram, exponent = scaled_task_gram(task_grads, mask, diagonal_only=diagonal)
    return apply_weighting(weighting, gram, losses, state, log2_scale=2 * exponent, **extra)


def linear_gram(
    vjp,
    jvp,
    cotangents,
    *,
    diagonal_only: bool,
    chunk_size: int | None,
    exponent: jax.Array | int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """``(Ĝ, e)``, ``G = 4^e Ĝ``: the Gram of ``g_i = Aᵀ c_i`` for a linear map ``A``, computed
    without holding the K gradients.

    ``vjp(c) -> [leaves]`` applies ``Aᵀ`` (one backward pass) and ``jvp([leaves]) -> t``
    applies ``A`` (one forward-mode pass); ``cotangents`` are the K rows ``c_i`` (a pytree
    with a leading task axis). Column j: ``g_j = Aᵀ c_j``, then ``G_ij = ⟨c_i, A g_j⟩``, which
    equals ``⟨g_i, g_j⟩``. ``diagonal_only`` stops after the backward pass (``‖g_j‖²``).
    ``chunk_size`` columns are computed at a time (``None``: one). Memory: the cotangents
    plus ``chunk_size`` gradients.

    Power-of-two scaling (exact) keeps float32 from overflowing or underflowing: with an
    ``exponent`` e, every cotangent and tangent is scaled by ``2^-e`` (the split: e from the
    feature gradients, which ``Aᵀ`` maps linearly); with ``exponent=None`` each tangent
    ``g_j`` is scaled by its own ``2^-e_j`` (the exponent of its largest entry) and the
    columns are brought to the common ``e = max_j e_j`` (the whole model: ``c_i = e_i``
    carries no scale). Either way ``e`` is the exponent :func:`power_of_two_exponent` gives
    the stacked gradients, so ``Ĝ`` is the Gram the stacked path computes.

    The split's encoder (``A`` = the encoder's Jacobian, ``c_i = ∂L_i/∂z``) and the whole
    model (``A`` = the Jacobian of the losses, ``c_i = e_i``) both use it.
    """
    leaves = jax.tree_util.tree_leaves(cotangents)
    k = leaves[0].shape[0]
    dtype = jnp.promote_types(jnp.result_type(*leaves), jnp.float32)
    per_column = exponent is None

    def column(cotangent):
        if not per_column:
            cotangent = jax.tree_util.tree_map(lambda a: jnp.ldexp(a, -exponent), cotangent)
        grads = vjp(cotangent)
        e = power_of_two_exponent(grads) if per_column else jnp.int32(0)
        tangent_scale = -e if per_column else -exponent
        if diagonal_only:
            return sum(jnp.sum(jnp.square(jnp.ldexp(g.astype(dtype), -e))) for g in grads), e
        tangent = jax.tree_util.tree_leaves(
            jvp([jnp.ldexp(g, tangent_scale).astype(g.dtype) for g in grads])
        )
        value = sum(
            jnp.matmul(
                f.reshape(k, -1),
                t.reshape(-1).astype(f.dtype),
                precision=HIGHEST,
                preferred_element_type=dtype,
            )
            for f, t in zip(leaves, tangent)
        )
        return value, e

    columns, exponents = jax.lax.map(column, cotangents, batch_size=chunk_size)
    if per_column:  # column j is 2^-e_j G[:, j] (diagonal: 4^-e_j G_jj); bring all to 4^-e
        exponent = jnp.max(exponents)
        shift = (2 if diagonal_only else 1) * exponents - 2 * exponent
        columns = jnp.ldexp(columns, shift if diagonal_only else shift[:, None])
    if diagonal_only:
        return jnp.diag(columns), jnp.asarray(exponent, jnp.int32)
    # exact in exact arithmetic; removes rounding asymmetry
    return 0.5 * (columns + columns.T), jnp.asarray(exponent, jnp.int32)

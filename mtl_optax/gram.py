"""The Gram matrix of the task gradients, ``G = J Jᵀ``, computed once for every tier.

``G_ij = Σ_leaves ⟨g_i, g_j⟩`` over the shared leaves, in float32 or wider with full-precision
matmuls.
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


def power_of_two_exponent(task_grads, mask: list[bool] | None = None) -> jax.Array:
    """``e`` (int32) with ``max |g| · 2^-e`` in [0.5, 1) over the (masked) leaves; 0 if none.

    Scaling by a power of two is exact, so ``2^-e · g`` has the same digits as ``g`` and its
    Gram neither overflows (norms ≥ 1e19 in float32) nor underflows (norms ≤ 1e-19).
    Non-finite or all-zero gradients give ``e = 0`` (the Gram then shows them as they are).
    """
    leaves = jax.tree_util.tree_leaves(task_grads)
    dtype = jnp.promote_types(jnp.result_type(*leaves), jnp.float32)
    used = [leaf for use, leaf in zip(mask or [True] * len(leaves), leaves) if use]
    if not used:
        return jnp.zeros((), jnp.int32)
    peak = jnp.max(jnp.stack([jnp.max(jnp.abs(leaf)).astype(dtype) for leaf in used]))
    _, exponent = jnp.frexp(peak)
    return jnp.where(jnp.isfinite(peak) & (peak > 0), exponent, 0).astype(jnp.int32)


def scaled_task_gram(task_grads, mask: list[bool] | None = None, *, diagonal_only: bool = False):
    """``(Ĝ, e)`` with ``G = 4^e · Ĝ``: the Gram of the gradients rescaled by ``2^-e``."""
    exponent = power_of_two_exponent(task_grads, mask)
    scaled = jax.tree_util.tree_map(
        lambda g: jnp.ldexp(g.astype(jnp.promote_types(g.dtype, jnp.float32)), -exponent),
        task_grads,
    )
    return task_gram(scaled, mask, diagonal_only=diagonal_only), exponent


def apply_weighting(weighting, gram, losses, state, *, log2_scale=0, **extra):
    """``weighting.update`` on ``Ĝ`` where the true Gram is ``G = 2^log2_scale · Ĝ``.

    Weights of a weighting with ``homogeneity = h`` are multiplied back by ``2^(h·log2_scale)``
    (exact for the h = 0 and h = -1/2 of the shipped methods); a weighting with
    ``homogeneity=None`` must be given the true Gram (``log2_scale = 0``).
    """
    weights, state = weighting.update(gram, losses, state, **extra)
    h = weighting.homogeneity
    if gram is not None and h:
        weights = weights * jnp.exp2(jnp.asarray(log2_scale, weights.dtype) * h)
    return weights, state


def weights_from_gradients(weighting, task_grads, losses, state, *, mask=None, **extra):
    """Compute the Gram ``weighting`` needs (none, diagonal or full) and call it.

    Homogeneous weightings see the Gram of power-of-two rescaled gradients (exact at any
    scale the dtype represents); others see the true Gram. Returns ``(weights, state)``.
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
    gram, exponent = scaled_task_gram(task_grads, mask, diagonal_only=diagonal)
    return apply_weighting(weighting, gram, losses, state, log2_scale=2 * exponent, **extra)

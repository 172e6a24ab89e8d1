"""Tiers 1 and 2 for any model: weight the task losses, then take one backward pass.

The model is split at a shared representation ``z``: ``encode(params, batch) -> z`` and
``task_losses(params, z, batch) -> (K,)``. One forward pass gives the losses;

* tier 1 (the weighting has ``needs_gram=False``): weights from the losses alone;
* tier 2 (``needs_gram=True``): the Gram matrix of the feature gradients ``∂L_i/∂z``
  (K backward passes through the heads, batched with ``vmap``), the MGDA-UB
  approximation of Sener & Koltun (2018);

then one backward pass of ``Σ_i w_i L_i`` through the whole model, with ``w``
``stop_gradient``-ed.

Here ``task_losses`` may mix the tasks arbitrarily, so the K feature gradients need K
backward passes through all heads (cost grows like K² for K heads). When task i's loss
reads only its own copy of the features — the usual shared-encoder model — use
:func:`mtl_optax.split_value_and_grad`, which gets all K feature gradients from one
backward pass and leaves each head its own task gradient.

The feature-level Gram only makes sense when the tasks share input samples: with disjoint
samples per task the feature gradients are orthogonal and ``G`` is diagonal.

Checked in ``tests/test_weighted.py``: gradients equal ``grad(Σ w_i L_i)``, and with ``z``
the shared parameters themselves the weights equal those of tier 3.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from mtl_optax.gram import weights_from_gradients
from mtl_optax.weighting.base import Weighting


class WeightedGrads(NamedTuple):
    losses: jax.Array  # (K,) task losses
    grads: Any  # gradient of Σ w_i L_i, shaped like params
    weighting_state: Any
    weights: jax.Array  # (K,) the weights used


def weighted_value_and_grad(
    encode: Callable, task_losses: Callable, weighting: Weighting
) -> Callable[..., WeightedGrads]:
    """Build ``f(params, batch, weighting_state, **extra) -> WeightedGrads``.

    Args:
      encode: ``encode(params, batch) -> z``, the shared representation (any pytree).
      task_losses: ``task_losses(params, z, batch) -> (K,)`` the task losses from ``z``.
      weighting: a :class:`mtl_optax.Weighting`; its ``needs_gram`` picks tier 1 or 2.

    ``extra`` keyword arguments go to the weighting (unknown ones are ignored).

    Example::

        step = mtl.weighted_value_and_grad(encode, heads, mtl.mgda())
        out = step(params, batch, wstate)
        updates, opt_state = opt.update(out.grads, opt_state, params)
    """

    def fn(params, batch, weighting_state, **extra) -> WeightedGrads:
        z, encode_vjp = jax.vjp(lambda p: encode(p, batch), params)
        losses, heads_vjp = jax.vjp(lambda p, z_: task_losses(p, z_, batch), params, z)
        if jnp.ndim(losses) != 1:
            raise ValueError(
                f"`task_losses` must return a 1-D array of K task losses, got shape "
                f"{jnp.shape(losses)}."
            )
        feature_grads = None
        if weighting.needs_gram:
            # zeros_like(losses): the basis varies over shard_map mesh axes like the losses.
            eye = jnp.eye(losses.shape[0], dtype=losses.dtype) + jnp.zeros_like(losses)
            feature_grads = jax.vmap(lambda e: heads_vjp(e)[1])(eye)
        weights, weighting_state = weights_from_gradients(
            weighting, feature_grads, losses, weighting_state, **extra
        )
        # Same for the weights: constant (tier 1) or device-local weights match the losses' type.
        head_grads, z_cotangent = heads_vjp(weights.astype(losses.dtype) + jnp.zeros_like(losses))
        (encoder_grads,) = encode_vjp(z_cotangent)
        grads = jax.tree_util.tree_map(jnp.add, head_grads, encoder_grads)
        return WeightedGrads(losses, grads, weighting_state, weights)

    return fn

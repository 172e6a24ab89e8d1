"""Random loss weighting (RLW): fresh random weights at every step.

``w = softmax(ε)``, ``ε ~ N(0, I_K)`` drawn anew at each call (Lin et al., "Reasonable
effectiveness of random weighting: a litmus test for multi-task learning", TMLR 2022,
Algorithm 2). This is one rule under two names in the PyTorch libraries: torchjd's
``Random`` aggregator / scalarizer and LibMTL's ``RLW`` both draw standard normal logits
and take their softmax, so the weights are positive and sum to 1 (not K); here
:func:`rlw` is an alias of :func:`random_weighting`.

The PRNG key is kept in the state and split at every call, so a run replays exactly from
its initial key (and a checkpointed state continues the same sequence). The weights do not
read the Gram matrix or the losses (tier 1).

Checked in ``tests/test_loss_weightings.py``: the weights equal ``softmax`` of the normal
draws of the same key sequence, are positive, sum to 1, and replay from a restored state.
"""

from __future__ import annotations

from typing import NamedTuple

import jax

from mtl_optax.weighting import arguments
from mtl_optax.weighting.base import Weighting, check_inputs, check_num_tasks, finish


class RandomWeightingState(NamedTuple):
    key: jax.Array  # raw uint32 PRNG key data


def random_weighting(*, key) -> Weighting:
    """Random weights ``softmax(ε)``, ``ε ~ N(0, I)``, redrawn at every call (sum 1).

    Args:
      key: the PRNG key of the sequence (``jax.random.key(0)`` or ``PRNGKey(0)``).

    Example::

        w = mtl.random_weighting(key=jax.random.key(0))
        state = w.init(3)
        weights, state = w.update(None, jnp.ones(3), state)   # positive, sum 1
    """
    raw = arguments.prng_key(key)

    def init(num_tasks):
        check_num_tasks(num_tasks)
        return RandomWeightingState(raw)

    def update(gram, losses, state, **extra):
        del extra
        k, _, losses = check_inputs(weighting, gram, losses)
        key, draw = jax.random.split(state.key)
        weights = jax.nn.softmax(jax.random.normal(draw, (k,)))
        if losses is not None:
            weights = weights.astype(losses.dtype)
        return finish(weights), RandomWeightingState(key)

    weighting = Weighting(init, update, needs_gram=False, needs_losses=False, homogeneity=0.0)
    return weighting


rlw = random_weighting
"""LibMTL's name for :func:`random_weighting` (the same rule and implementation)."""

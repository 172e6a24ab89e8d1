"""``while_loop`` whose initial carry takes the type of the problem data.

Inside ``jax.shard_map`` a Gram computed from per-device data varies over the mesh axis,
and so does every value a loop body derives from it; ``lax.while_loop`` requires the
initial carry to have the same type, which constants such as ``jnp.array(False)`` do not.
Adding a zero taken from the data gives every carry leaf the data's type (a no-op outside
``shard_map``). Checked by the 4-device tests (tier 2 inside ``shard_map``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def while_loop_like(cond, body, init, like: jax.Array):
    """``jax.lax.while_loop(cond, body, init)`` with ``init`` typed like the array ``like``."""
    zero = jnp.zeros_like(jnp.ravel(like)[0])

    def typed(x):
        x = jnp.asarray(x)
        return x | zero.astype(bool) if x.dtype == bool else x + zero.astype(x.dtype)

    return jax.lax.while_loop(cond, body, jax.tree_util.tree_map(typed, init))

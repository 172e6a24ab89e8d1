"""Weight decay as a constraint: a tuning-free GradientTransformation (DESIGN.md 3.3).

Primary/auxiliary projection with the loss gradient ``g`` as primary and the auxiliary
``½‖θ‖²`` (gradient ``θ``): the update ``u = g + λθ`` with the one-auxiliary closed form
``λ = relu(−⟨g, θ⟩)/‖θ‖²`` (0 if ``θ = 0``) is the closest update to ``g`` along which the
weight norm does not grow (``⟨u, θ⟩ ≥ 0``; descent moves by ``−u``). Unlike weight decay it
has no coefficient: it acts only when the loss gradient would grow the weights.

Checked in ``tests/test_weight_decay.py``: the KKT conditions and equality with
``primary_auxiliary`` on the Gram of ``(g, θ)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from mtl_optax.aggregate import resolve_mask
from mtl_optax.gram import HIGHEST


def weight_decay_constraint(*, mask=None) -> optax.GradientTransformation:
    """Project updates so that ``½‖θ‖²`` (over the ``mask``-ed leaves) does not increase.

    Args:
      mask: which leaves count as weights (``None``: all; a pytree of bools or a callable
        ``params -> mask`` as in ``optax.masked``), e.g. kernels but not biases.

    ``update(updates, state, params)`` requires ``params``. Example::

        opt = optax.chain(mtl.weight_decay_constraint(), optax.sgd(0.1))
    """

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("weight_decay_constraint needs `params` in update().")
        use = resolve_mask(mask, params, name="mask")
        g_leaves, treedef = jax.tree_util.tree_flatten(updates)
        p_leaves = treedef.flatten_up_to(params)

        def dot(a, b):
            return jnp.vdot(a.astype(jnp.float32), b.astype(jnp.float32), precision=HIGHEST)

        inner = sum(dot(g, p) for u, g, p in zip(use, g_leaves, p_leaves) if u)
        norm2 = sum(dot(p, p) for u, p in zip(use, p_leaves) if u)
        lam = jnp.where(norm2 > 0, jax.nn.relu(-inner) / jnp.where(norm2 > 0, norm2, 1.0), 0.0)
        out = [
            (g + lam * p.astype(jnp.float32)).astype(g.dtype) if u else g
            for u, g, p in zip(use, g_leaves, p_leaves)
        ]
        return jax.tree_util.tree_unflatten(treedef, out), state

    return optax.GradientTransformation(init, update)

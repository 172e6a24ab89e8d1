"""Weight decay as a constraint: a tuning-free GradientTransformation.

Primary/auxiliary projection with the loss gradient ``g`` as primary and the auxiliary
``½‖θ‖²`` (gradient ``θ``): the update ``u = g + λθ`` with the one-auxiliary closed form
``λ = relu(−⟨g, θ⟩)/‖θ‖²`` (0 if ``θ = 0``) is the closest update to ``g`` along which the
weight norm does not grow (``⟨u, θ⟩ ≥ 0``; descent moves by ``−u``). Unlike weight decay it
has no coefficient: it acts only when the loss gradient would grow the weights.

Bad inputs: ``update`` needs ``params`` with the structure and leaf shapes of the updates,
and the weight leaves (those the mask selects) must be floating; anything else is a
``ValueError`` naming the leaf, at trace time. NaN or inf in the masked updates or weights
makes all masked updates NaN (``λ`` is NaN), which ``optax.apply_if_finite`` catches.

Checked in ``tests/test_weight_decay.py``: the KKT conditions, equality with
``primary_auxiliary`` on the Gram of ``(g, θ)`` and the bad inputs above.
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
        g_leaves, treedef = jax.tree_util.tree_flatten(updates)
        p_leaves, p_treedef = jax.tree_util.tree_flatten(params)
        if p_treedef != treedef:
            raise ValueError(
                "weight_decay_constraint: `params` and the updates have different structures:"
                f"\n{p_treedef}\nvs\n{treedef}"
            )
        use = resolve_mask(True if mask is None else mask, params, name="mask")
        names = [
            jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(params)
        ]
        for name, u, g, p in zip(names, use, g_leaves, p_leaves):
            if jnp.shape(g) != jnp.shape(p):
                raise ValueError(
                    f"weight_decay_constraint: leaf {name or '<root>'} has update shape "
                    f"{jnp.shape(g)} but parameter shape {jnp.shape(p)}."
                )
            if u and not (
                jnp.issubdtype(jnp.result_type(g), jnp.floating)
                and jnp.issubdtype(jnp.result_type(p), jnp.floating)
            ):
                raise ValueError(
                    f"weight_decay_constraint: leaf {name or '<root>'} is selected as a weight "
                    f"but has dtype {jnp.result_type(p)} (update {jnp.result_type(g)}); exclude "
                    "non-floating leaves with `mask`."
                )

        def dot(a, b):
            return jnp.vdot(a.astype(jnp.float32), b.astype(jnp.float32), precision=HIGHEST)

        inner = sum(dot(g, p) for u, g, p in zip(use, g_leaves, p_leaves) if u)
        norm2 = sum(dot(p, p) for u, p in zip(use, p_leaves) if u)
        # θ = 0: λ = 0. A NaN norm (NaN weights) is not 0, so λ is NaN and so is every update.
        zero = norm2 == 0
        lam = jnp.where(zero, 0.0, jax.nn.relu(-inner) / jnp.where(zero, 1.0, norm2))
        out = [
            (g + lam * p.astype(jnp.float32)).astype(g.dtype) if u else g
            for u, g, p in zip(use, g_leaves, p_leaves)
        ]
        return jax.tree_util.tree_unflatten(treedef, out), state

    return optax.GradientTransformation(init, update)

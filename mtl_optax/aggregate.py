"""``aggregate``: reduce stacked per-task gradients with a weighting (tier 3).

Input updates have a leading task axis on every leaf (from
:func:`mtl_optax.value_and_jacobian`). Shared leaves enter the Gram matrix
``G = Σ_leaves J_l J_lᵀ`` (float32 at least, full-precision matmuls) and are combined as
``Σ_i w_i g_i`` with the weighting's weights; task-specific leaves (heads, where only one
task has a non-zero gradient) are summed over the task axis. The output has the shapes of
``params``, so any optax optimizer can follow::

    opt = optax.chain(mtl.aggregate(mtl.mgda(), num_tasks=K, shared=mask), optax.adam(1e-3))
    updates, opt_state = opt.update(task_grads, opt_state, params, task_losses=losses)

The transform must come first in ``optax.chain`` (it is the one that removes the task
axis). Gradients from :func:`value_and_jacobian` arrive wrapped in :class:`TaskGradients`, so
an optax transform placed before ``aggregate`` fails on the structure mismatch (the error
names the ``TaskGradients`` type) instead of silently treating the task axis as a batch of
parameters. Plain stacked pytrees are accepted too; given ``params`` their shapes are checked
against ``(K, *param.shape)``. The state keeps the last weights for logging
(``state.weights``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mtl_optax.gram import HIGHEST, weights_from_gradients
from mtl_optax.jacobian import TaskGradients
from mtl_optax.weighting.base import Weighting, check_num_tasks


class AggregateState(NamedTuple):
    weights: jax.Array  # (K,) float32, the last weights (for logging)
    weighting_state: Any


def _leaves_with_names(tree) -> tuple[list[str], list[Any], Any]:
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return (
        [jax.tree_util.keystr(path) or "<root>" for path, _ in flat],
        [x for _, x in flat],
        treedef,
    )


def check_task_axis(task_grads, num_tasks: int, params=None) -> None:
    """Trace-time check: every leaf has a leading task axis of size ``num_tasks``.

    With ``params``, also that ``leaf.shape == (num_tasks, *param.shape)`` (this catches an
    aggregate that does not come first in ``optax.chain``).
    """
    names, leaves, treedef = _leaves_with_names(task_grads)
    if not leaves:
        raise ValueError("aggregate got an empty pytree of task gradients.")
    for name, leaf in zip(names, leaves):
        shape = jnp.shape(leaf)
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
            raise ValueError(
                f"Task-gradient leaf {name} has dtype {jnp.result_type(leaf)}; gradients must be "
                "floating point (keep integer state out of the differentiated params)."
            )
        if not shape or shape[0] != num_tasks:
            raise ValueError(
                f"Task-gradient leaf {name} has shape {shape}; every leaf needs a leading "
                f"task axis of size num_tasks={num_tasks} (leaves must agree on it)."
            )
    if params is not None:
        _, p_leaves, p_treedef = _leaves_with_names(params)
        if p_treedef != treedef:
            raise ValueError(
                f"Task gradients and params have different structures:\n{treedef}\nvs\n{p_treedef}"
            )
        for name, leaf, param in zip(names, leaves, p_leaves):
            if jnp.shape(leaf)[1:] != jnp.shape(param):
                raise ValueError(
                    f"Leaf {name}: task gradient shape {jnp.shape(leaf)} is not "
                    f"(num_tasks, *param.shape) = {(num_tasks, *jnp.shape(param))}. "
                    "aggregate() must come first in optax.chain, on stacked per-task gradients."
                )


def resolve_mask(shared, tree, *, name: str = "shared") -> list[bool]:
    """Flatten a mask (None = all True, a pytree of bools, or a callable of the tree).

    ``tree`` has the shapes of the params (a callable mask may look at them).
    """
    _, leaves, treedef = _leaves_with_names(tree)
    if shared is None:
        return [True] * len(leaves)
    mask = shared(tree) if callable(shared) else shared
    mask_leaves, mask_treedef = jax.tree_util.tree_flatten(mask)
    if mask_treedef != treedef:
        raise ValueError(
            f"`{name}` mask structure does not match the gradients:\n{mask_treedef}\nvs\n{treedef}"
        )
    for value in mask_leaves:
        if not isinstance(value, bool):
            raise ValueError(f"`{name}` mask leaves must be Python bools, got {value!r}.")
    return mask_leaves


def aggregate(
    weighting: Weighting,
    *,
    num_tasks: int,
    shared: Any | Callable | None = None,
) -> optax.GradientTransformationExtraArgs:
    """GradientTransformation from stacked per-task gradients to one update (see module doc).

    Args:
      weighting: any :class:`mtl_optax.Weighting` (e.g. ``mtl.mgda()``).
      num_tasks: K, the size of the leading task axis (fixes the state's shapes).
      shared: which leaves are shared between tasks: ``None`` (all), a pytree of Python
        bools with the structure of ``params``, or a callable ``params -> mask`` (as in
        ``optax.masked``; without ``params`` in ``update`` it gets shape/dtype stand-ins
        with the task axis removed). Non-shared leaves are summed over the task axis.

    Extra arguments of ``update``: ``task_losses`` ((K,), required by weightings with
    ``needs_losses``); others are passed to the weighting, which ignores unknown ones.
    """
    check_num_tasks(num_tasks)

    def init(params):
        del params
        return AggregateState(
            weights=jnp.zeros(num_tasks, jnp.float32), weighting_state=weighting.init(num_tasks)
        )

    def update(task_grads, state, params=None, *, task_losses=None, **extra):
        if isinstance(task_grads, TaskGradients):
            task_grads = task_grads.tree
        check_task_axis(task_grads, num_tasks, params)
        if params is None:  # what a callable mask sees: the param shapes, no task axis
            params_like = jax.tree_util.tree_map(
                lambda g: jax.ShapeDtypeStruct(g.shape[1:], g.dtype), task_grads
            )
        else:
            params_like = params
        mask = resolve_mask(shared, params_like)
        weights, weighting_state = weights_from_gradients(
            weighting, task_grads, task_losses, state.weighting_state, mask=mask, **extra
        )
        leaves, treedef = jax.tree_util.tree_flatten(task_grads)
        out = []
        for use, leaf in zip(mask, leaves):
            if use:
                acc = jnp.promote_types(leaf.dtype, jnp.float32)
                combined = jnp.tensordot(
                    weights.astype(acc), leaf.astype(acc), axes=1, precision=HIGHEST
                )
            else:
                combined = jnp.sum(leaf, axis=0)
            out.append(combined.astype(leaf.dtype))
        return jax.tree_util.tree_unflatten(treedef, out), AggregateState(weights, weighting_state)

    return optax.GradientTransformationExtraArgs(init, update)

"""``aggregate``: combine per-task gradients with any multi-task method (tier 3).

Its input is the :class:`mtl_optax.TaskGradients` of :func:`mtl_optax.value_and_jacobian`
(whole model) or :func:`mtl_optax.split_value_and_jacobian` (encoder/heads split); its
output has the shapes of ``params``, so any optax optimizer can follow::

    opt = optax.chain(mtl.aggregate(mtl.mgda(), tasks=K, shared=mask), optax.adam(1e-3))
    updates, opt_state = opt.update(task_grads, opt_state, params, task_losses=losses)

The method is any method of the library: a :class:`mtl_optax.Weighting` (weights from the
Gram matrix ``G = Σ_leaves J_l J_lᵀ`` of the shared leaves and/or the losses, update
``Σ_i w_i g_i``) or a stacked aggregator (``trimmed_mean``, ``graddrop``, ``db_mtl``,
``excess_mtl``), which reads the stacked shared gradients itself.

**One head rule.** Leaves that are not shared (the heads) get ``Σ_i c_i ∇L_i`` where ``c``
is the weights ``w`` for a scalarization (every weighting that reads no Gram, and GradNorm:
the gradient of the weighted loss ``Σ w_i L_i``), and ``c = 1`` for a Gram weighting or a
stacked aggregator (head ``i`` follows its own task, as torchjd's ``mtl_backward`` and
MGDA-UB); DB-MTL's heads get ``c_i = 1/(L_i + ε)``. Every tier and every path (split or
whole model, nnx, linen) applies the same rule.

**Which leaves are shared** is never guessed: gradients of the split carry it; for gradients
of the whole model ``shared`` is required (a mask, a callable, or ``True`` when every leaf
really is shared), so heads are never weighted by accident.

``aggregate`` must be the first transform to see the task gradients: first in
``optax.chain``, with ``optax.apply_if_finite`` / ``optax.MultiSteps`` wrapped around what
follows it. Anything else raises a ``TypeError`` that says so. Under ``nnx.Optimizer`` the
gradients arrive re-wrapped as a flax ``State``; they are recognised and unwrapped.

A NaN or infinite entry of ``task_losses`` makes the update NaN (it cannot raise under
``jit``), so ``optax.apply_if_finite`` after ``aggregate`` skips the step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtl_optax.gram import HIGHEST, weights_from_gradients
from mtl_optax.stacked import StackedAggregator
from mtl_optax.state import (
    AggregateState,
    check_method,
    check_names,
    check_state,
    check_tasks,
    method_name,
    state_type,
)
from mtl_optax.task_gradients import (
    NONE,
    SHARED,
    SLICED,
    TASK,
    TaskGradients,
    decode_key,
    is_task_gradients_key,
    stacked_role,
)
from mtl_optax.weighting.base import Weighting, scales_heads


def leaf_paths(flat) -> list[str]:
    """Leaf names; a flax ``Variable``'s own ``.value`` step is dropped (Param nodes or not)."""
    return [
        jax.tree_util.keystr(tuple(k for k in path if getattr(k, "name", None) != "value"))
        or "<root>"
        for path, _ in flat
    ]


def _plain(x):
    """A flax Variable's value, anything else as it is (masks may hold nnx ``Param`` nodes)."""
    return x.get_value() if hasattr(x, "get_value") and not isinstance(x, jax.Array) else x


class GradientsView(NamedTuple):
    """Task gradients taken apart: leaf names, leaves, output treedef, roles, task names."""

    paths: list[str]
    leaves: list
    treedef: Any
    roles: tuple | None
    names: tuple | None


def unwrap(task_grads: Any, num_tasks: int, params: Any = None) -> GradientsView:
    """Take :class:`TaskGradients` (or the flax ``State`` ``nnx.Optimizer`` makes of them)
    apart and check every leaf against the roles, ``num_tasks`` and ``params``."""
    if isinstance(task_grads, TaskGradients):
        tree, roles, names = task_grads.tree, task_grads.roles, task_grads.names
    elif (
        isinstance(task_grads, Mapping)
        and len(task_grads) == 1
        and is_task_gradients_key(next(iter(task_grads.keys())))
    ):
        key = next(iter(task_grads.keys()))
        tree = task_grads[key]  # re-wrapped by flax (nnx.Optimizer)
        roles, names = decode_key(key)
    else:
        raise TypeError(
            "aggregate takes the TaskGradients returned by mtl.value_and_jacobian or "
            f"mtl.split_value_and_jacobian, got {type(task_grads).__name__}. Stacked per-task "
            "gradients computed otherwise: wrap them, mtl.TaskGradients(stacked_tree)."
        )
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    paths, leaves = leaf_paths(flat), [x for _, x in flat]
    if not leaves:
        raise ValueError("aggregate got an empty pytree of task gradients.")
    if roles is not None and len(roles) != len(leaves):
        raise ValueError(
            f"TaskGradients has {len(roles)} roles for {len(leaves)} leaves: compute the "
            "gradients and pass them on unchanged."
        )
    p_leaves = None
    if params is not None:
        p_flat, p_treedef = jax.tree_util.tree_flatten_with_path(params)
        p_leaves = [x for _, x in p_flat]
        if p_treedef != treedef and leaf_paths(p_flat) != paths:
            raise ValueError(
                "The task gradients and params have different structures (paths "
                f"{paths[:4]}... vs {leaf_paths(p_flat)[:4]}...). aggregate() takes the "
                "TaskGradients returned by value_and_jacobian / split_value_and_jacobian for "
                "exactly the params being optimised; with nnx.Optimizer, differentiate with "
                "respect to the same `wrt` filter."
            )
        treedef = p_treedef
    sizes = set()
    for i, (path, leaf) in enumerate(zip(paths, leaves)):
        dtype = jnp.result_type(leaf)
        if not jnp.issubdtype(dtype, jnp.floating):
            kind = "complex" if jnp.issubdtype(dtype, jnp.complexfloating) else "not floating point"
            raise TypeError(
                f"Task-gradient leaf {path} has dtype {dtype} ({kind}); gradients must be real "
                "floating point: keep integer state out of the differentiated params, and "
                "split complex parameters into real and imaginary parts."
            )
        role = SHARED if roles is None else roles[i]
        shape = jnp.shape(leaf)
        param_shape = None if p_leaves is None else jnp.shape(p_leaves[i])
        if stacked_role(role):
            if not shape:
                raise ValueError(
                    f"Task-gradient leaf {path} is a scalar; every stacked leaf needs a leading "
                    f"task axis of size K={num_tasks}."
                )
            sizes.add(shape[0])
            if param_shape is not None and shape[1:] != param_shape:
                raise ValueError(
                    f"Leaf {path}: task gradient shape {shape} is not (K, *param.shape) = "
                    f"(K, *{param_shape})."
                )
        else:
            if role == SLICED and shape:
                sizes.add(shape[0])
            if param_shape is not None and shape != param_shape:
                raise ValueError(f"Head leaf {path} has shape {shape}, params {param_shape}.")
    if len(sizes) > 1:
        raise ValueError(
            f"The task gradients disagree on the number of tasks: leading axes {sorted(sizes)}."
        )
    if sizes and sizes != {num_tasks}:
        raise ValueError(
            f"aggregate(tasks={num_tasks}) got the gradients of {sizes.pop()} tasks: set "
            "`tasks` to the number of task losses (or their names)."
        )
    return GradientsView(paths, leaves, treedef, roles, names)


def resolve_mask(shared, tree, *, name: str = "shared") -> list[bool]:
    """Flatten a mask: ``True`` (all), a pytree of bools like ``tree`` (or a prefix of it,
    one bool for a whole subtree), or a callable ``tree -> mask``.

    ``tree`` has the shapes of the params (a callable mask may look at them). Mask leaves
    may be Python or NumPy bools, also inside flax ``Variable`` nodes (a mask made from
    ``nnx.state(model, nnx.Param)``).
    """
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    if shared is True:
        return [True] * len(flat)
    mask = shared(tree) if callable(shared) else shared
    mask_flat = jax.tree_util.tree_flatten_with_path(
        mask, is_leaf=lambda x: hasattr(x, "get_value") and not isinstance(x, jax.Array)
    )[0]
    if leaf_paths(mask_flat) != leaf_paths(flat):
        try:  # a prefix of the params tree: {"trunk": True, "heads": False}
            mask_flat = jax.tree_util.tree_flatten_with_path(jax.tree.broadcast(mask, tree))[0]
        except (ValueError, TypeError):
            pass
    if leaf_paths(mask_flat) != leaf_paths(flat):
        raise ValueError(
            f"`{name}` must be True, a callable params -> mask, or a pytree of bools with one "
            f"leaf per params leaf; got {type(mask).__name__} with leaves "
            f"{leaf_paths(mask_flat)[:6]} but the params have leaves {leaf_paths(flat)[:6]}."
        )
    out = []
    for path, value in mask_flat:
        value = _plain(value)
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(
                f"`{name}` mask leaf {jax.tree_util.keystr(path)} must be a Python bool (it "
                f"picks leaves at trace time), got {value!r}; build the mask with "
                "jax.tree_util.tree_map(lambda _: True/False, params)."
            )
        out.append(bool(value))
    return out


def check_shared_argument(shared: Any) -> None:
    """``shared``: None, True, a callable or a pytree (construction time)."""
    if shared is False:
        raise ValueError("`shared=False` would leave nothing to weight; use True or a mask.")


def resolve_roles(view: GradientsView, shared: Any, params: Any) -> list:
    """One role per leaf from the gradients' roles and the ``shared`` mask."""
    if params is None:  # what a callable mask sees: the param shapes, no task axis
        params = jax.tree_util.tree_unflatten(
            view.treedef,
            [
                jax.ShapeDtypeStruct(g.shape[1:] if stacked_role(r) else g.shape, g.dtype)
                for g, r in zip(view.leaves, view.roles or [SHARED] * len(view.leaves))
            ],
        )
    if view.roles is None:
        if shared is None:
            raise ValueError(
                "aggregate needs to know which leaves are shared between the tasks, and these "
                "gradients of the whole model do not say: pass shared= (a pytree of bools or a "
                "callable params -> mask; heads False), shared=True if every leaf is shared, "
                "or compute the gradients with split_value_and_jacobian(encoder, heads), which "
                "knows. Without it the heads would be weighted and enter the Gram."
            )
        return [SHARED if m else TASK for m in resolve_mask(shared, params)]
    roles = list(view.roles)
    if shared is not None:
        for i, (path, m) in enumerate(zip(view.paths, resolve_mask(shared, params))):
            if m and roles[i] != SHARED:
                raise ValueError(
                    f"`shared` marks {path} as shared, but the encoder/heads split delivered it "
                    "as a head leaf (it is not read by the encoder)."
                )
            if not m and roles[i] == SHARED:
                roles[i] = TASK
    return roles


def head_update(role, leaf, scale):
    """The head rule for one non-shared leaf: ``Σ_i c_i g_i`` by role."""
    if role == NONE:
        return leaf
    acc = jnp.promote_types(leaf.dtype, jnp.float32)
    c, x = scale.astype(acc), leaf.astype(acc)
    if role == TASK:
        out = jnp.tensordot(c, x, axes=1, precision=HIGHEST)
    elif role == SLICED:
        out = c.reshape((-1,) + (1,) * (x.ndim - 1)) * x
    else:  # the head of task `role`
        out = c[role] * x
    return out.astype(leaf.dtype)


def combine(method, leaves, roles, losses, method_state, **extra):
    """``(updates, weights, method_state)``: the method on the shared leaves, the head rule on
    the others (module docstring)."""
    shared = [leaf if r == SHARED else None for leaf, r in zip(leaves, roles)]
    if not any(x is not None for x in shared):
        raise ValueError("No shared leaf: the mask leaves nothing for the method to combine.")
    if isinstance(method, Weighting):
        used = [x for x in shared if x is not None]
        weights, method_state = weights_from_gradients(method, used, losses, method_state, **extra)
        combined = [
            None
            if x is None
            else jnp.tensordot(
                weights.astype(jnp.promote_types(x.dtype, jnp.float32)),
                x.astype(jnp.promote_types(x.dtype, jnp.float32)),
                axes=1,
                precision=HIGHEST,
            )
            for x in shared
        ]
        scale = weights if scales_heads(method) else jnp.ones_like(weights)
    else:
        if method.needs_losses and losses is None:
            raise ValueError(
                f"{method_name(method)} needs the task losses: pass `task_losses=losses` to the "
                "optimizer's update (linen: mtl.apply_task_gradients(state, task_grads, "
                "task_losses=losses))."
            )
        combined, weights, scale, method_state = method.update(
            shared, losses, method_state, **extra
        )
    if losses is not None:  # a non-finite loss poisons the step (apply_if_finite skips it)
        finite = jnp.all(jnp.isfinite(losses))
        weights = jnp.where(finite, weights, jnp.nan)
        scale = jnp.where(finite, scale, jnp.nan)
        combined = [None if x is None else jnp.where(finite, x, jnp.nan) for x in combined]
    updates = [
        c.astype(leaf.dtype) if c is not None else head_update(r, leaf, scale)
        for leaf, r, c in zip(leaves, roles, combined)
    ]
    return updates, jax.lax.stop_gradient(weights).astype(jnp.float32), method_state


def init_method_state(method, num_tasks: int, params: Any, shared: Any):
    """The method's own state; a stacked aggregator sizes its per-leaf state from the params
    (every leaf that may be shared: all of them when ``shared`` is left to the split)."""
    if isinstance(method, Weighting):
        return method.init(num_tasks)
    leaves = jax.tree_util.tree_leaves(params)
    mask = [True] * len(leaves) if shared is None else resolve_mask(shared, params)
    shapes = [
        jax.ShapeDtypeStruct(jnp.shape(p), jnp.result_type(p)) if m else None
        for p, m in zip(leaves, mask)
    ]
    return method.init(num_tasks, shapes)


def check_task_losses(task_losses, num_tasks: int):
    if task_losses is None:
        return None
    shape = jnp.shape(task_losses)
    if shape != (num_tasks,):
        raise ValueError(
            f"`task_losses` must have shape ({num_tasks},): one loss per task, the same "
            f"{num_tasks} tasks as `tasks` and the gradients; got {shape}."
        )
    return task_losses


def new_state(method, num_tasks: int, names, method_state) -> AggregateState:
    has_weights = isinstance(method, Weighting) or method.has_weights
    cls = state_type(method_name(method), names, has_weights)
    return cls(jnp.zeros(num_tasks, jnp.float32), method_state)


def aggregate(
    method: Weighting | StackedAggregator,
    *,
    tasks: int | tuple[str, ...] | list[str],
    shared: Any | Callable | bool | None = None,
) -> optax.GradientTransformationExtraArgs:
    """GradientTransformation from per-task gradients to one update (see the module doc).

    Args:
      method: any method of the library, e.g. ``mtl.mgda()``, ``mtl.famo()``,
        ``mtl.trimmed_mean(trim=1)``.
      tasks: the number of tasks K (a Python int: it fixes the state's shapes), or their
        names in order (``task_weights`` then returns a dict; gradients that carry names
        must match them).
      shared: which leaves are shared between tasks. ``None`` (default): taken from the
        gradients of the encoder/heads split; gradients of the whole model then raise an
        error asking for it. ``True``: every leaf (heads too). A pytree of bools with the
        structure of ``params`` (or a prefix of it: ``{"trunk": True, "heads": False}``), or
        a callable ``shared(params) -> mask`` (as in ``optax.masked``): it receives the
        params pytree (``jax.ShapeDtypeStruct`` stand-ins with the task axis removed when
        ``update`` gets no ``params``) and returns such a pytree of Python bools. With the
        split it may only demote encoder leaves to non-shared.

    Extra arguments of ``update``: ``task_losses`` ((K,), required by methods that read the
    losses); others go to the method, which ignores unknown ones.
    """
    check_method(method)
    num_tasks, names = check_tasks(tasks)
    check_shared_argument(shared)

    def init(params):
        return new_state(
            method, num_tasks, names, init_method_state(method, num_tasks, params, shared)
        )

    def update(task_grads, state, params=None, *, task_losses=None, **extra):
        state = check_state(state, method, num_tasks, "aggregate")
        losses = check_task_losses(task_losses, num_tasks)
        view = unwrap(task_grads, num_tasks, params)
        check_names(names, view.names, "aggregate")
        roles = resolve_roles(view, shared, params)
        updates, weights, method_state = combine(
            method, view.leaves, roles, losses, state.method_state, **extra
        )
        state = state._replace(weights=weights, method_state=method_state)
        return jax.tree_util.tree_unflatten(view.treedef, updates), state

    return optax.GradientTransformationExtraArgs(init, update)

"""``aggregate``: reduce stacked per-task gradients with a weighting (tier 3).

Input updates have a leading task axis on the leaves shared between tasks (from
:func:`mtl_optax.value_and_jacobian` or :func:`mtl_optax.split_value_and_jacobian`).
Shared leaves enter the Gram matrix ``G = Σ_leaves J_l J_lᵀ`` (float32 at least,
full-precision matmuls) and are combined as ``Σ_i w_i g_i`` with the weighting's weights;
task-specific leaves (heads) are summed over the task axis (the encoder/heads split delivers
them already summed). The output has the shapes of ``params``, so any optax optimizer can
follow::

    opt = optax.chain(mtl.aggregate(mtl.mgda(), num_tasks=K, shared=mask), optax.adam(1e-3))
    updates, opt_state = opt.update(task_grads, opt_state, params, task_losses=losses)

Which leaves are shared is never guessed: gradients from the encoder/heads split carry it;
for gradients of the whole model ``shared`` is required (a mask, a callable, or ``True``
when every leaf really is shared), so heads are never weighted by accident.

The transform must come first in ``optax.chain`` (it is the one that removes the task
axis). A stateful transform placed before it (Adam, momentum, weight decay with params...)
fails with a structure error that names ``TaskGradients`` and says so. Stateless
transforms that do not read params run on the stacked gradients and mean something there:
``optax.clip`` / ``optax.scale`` act element-wise on every task gradient, and
``optax.clip_by_global_norm`` clips the norm of the whole Jacobian (every task gradient
scaled by the same factor, so a weighting that is linear under scaling gives the same
direction, scaled). Anything else belongs after ``aggregate``.

Under ``flax.nnx.Optimizer`` the gradients arrive re-wrapped as a flax ``State``; they are
recognised and unwrapped, and the updates come back with the structure of ``params``.
The state keeps the last weights for logging: :func:`task_weights` reads them from any
optimizer state (optax tuples, ``nnx.Optimizer.opt_state``) as a plain array.

A NaN or infinite entry of ``task_losses`` makes the weights, hence the update, NaN (it
cannot raise under ``jit``), so ``optax.apply_if_finite`` after ``aggregate`` skips the step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtl_optax.gram import HIGHEST, weights_from_gradients
from mtl_optax.jacobian import TASK_AXIS_KEY, TaskGradients
from mtl_optax.split import check_weighting
from mtl_optax.weighting.base import Weighting, check_num_tasks


class AggregateState(NamedTuple):
    weights: jax.Array  # (K,) float32, the last weights (for logging)
    weighting_state: Any


def _paths(flat) -> list[str]:
    """Leaf names; a flax ``Variable``'s own ``.value`` step is dropped (Param nodes or not)."""
    return [
        jax.tree_util.keystr(tuple(k for k in path if getattr(k, "name", None) != "value"))
        or "<root>"
        for path, _ in flat
    ]


def _plain(x):
    """A flax Variable's value, anything else as it is (masks may hold nnx ``Param`` nodes)."""
    return x.get_value() if hasattr(x, "get_value") and not isinstance(x, jax.Array) else x


def unwrap(task_grads, num_tasks: int, params=None) -> tuple[list[str], list, Any, list | None]:
    """``(names, leaves, treedef, stacked)`` of the task gradients, checked against params.

    Accepts a :class:`TaskGradients`, the flax ``State`` that ``nnx.Optimizer`` makes of one
    (a mapping with the single key ``"task_gradients"``), or a plain stacked pytree.
    ``stacked`` is the per-leaf task-axis flag (``None``: unknown, every leaf must be
    stacked). ``treedef`` is that of ``params`` when given (the output's structure).
    """
    stacked = None
    if isinstance(task_grads, TaskGradients):
        tree, stacked = task_grads.tree, task_grads.stacked
    elif isinstance(task_grads, Mapping) and list(task_grads.keys()) == [TASK_AXIS_KEY]:
        tree = task_grads[TASK_AXIS_KEY]  # re-wrapped by flax (nnx.Optimizer)
        stacked = "from shapes"
    else:
        tree = task_grads
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    names, leaves = _paths(flat), [x for _, x in flat]
    if not leaves:
        raise ValueError("aggregate got an empty pytree of task gradients.")
    for name, leaf in zip(names, leaves):
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
            raise ValueError(
                f"Task-gradient leaf {name} has dtype {jnp.result_type(leaf)}; gradients must be "
                "floating point (keep integer state out of the differentiated params)."
            )
    p_leaves = None
    if params is not None:
        p_flat, p_treedef = jax.tree_util.tree_flatten_with_path(params)
        p_leaves = [x for _, x in p_flat]
        if p_treedef != treedef and _paths(p_flat) != names:
            raise ValueError(
                "The task gradients and params have different structures (paths "
                f"{names[:4]}... vs {_paths(p_flat)[:4]}...). aggregate() takes the "
                "TaskGradients returned by value_and_jacobian / split_value_and_jacobian "
                "(or its .tree) for exactly the params being optimised; with nnx.Optimizer, "
                "differentiate with respect to the same `wrt` filter."
            )
        treedef = p_treedef
    if stacked == "from shapes":  # the split's head leaves arrive summed: param shape
        if p_leaves is None:
            raise ValueError("Unwrapping flax-wrapped task gradients needs `params`.")
        stacked = [jnp.shape(g) != jnp.shape(p) for g, p in zip(leaves, p_leaves)]
        if all(stacked):
            stacked = None  # nothing tells a split apart: the user says what is shared
    for i, (name, leaf) in enumerate(zip(names, leaves)):
        shape = jnp.shape(leaf)
        if stacked is not None and not stacked[i]:
            if p_leaves is not None and shape != jnp.shape(p_leaves[i]):
                raise ValueError(
                    f"Head leaf {name} has shape {shape}, params {jnp.shape(p_leaves[i])}."
                )
            continue
        if not shape or shape[0] != num_tasks:
            raise ValueError(
                f"Task-gradient leaf {name} has shape {shape}; every leaf needs a leading "
                f"task axis of size num_tasks={num_tasks} (leaves must agree on it)."
            )
        if p_leaves is not None and shape[1:] != jnp.shape(p_leaves[i]):
            raise ValueError(
                f"Leaf {name}: task gradient shape {shape} is not (num_tasks, *param.shape) "
                f"= {(num_tasks, *jnp.shape(p_leaves[i]))}. aggregate() must come first in "
                "optax.chain, on stacked per-task gradients."
            )
    return names, leaves, treedef, None if stacked is None else list(stacked)


def resolve_mask(shared, tree, *, name: str = "shared") -> list[bool]:
    """Flatten a mask: ``True`` or ``None`` (all), a pytree of bools like ``tree`` (or a
    prefix of it, one bool for a whole subtree), or a callable ``tree -> mask``.

    ``tree`` has the shapes of the params (a callable mask may look at them). Mask leaves
    may be Python or NumPy bools, also inside flax ``Variable`` nodes (a mask made from
    ``nnx.state(model, nnx.Param)``).
    """
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    if shared is None or shared is True:  # None: every leaf (the default of other masks)
        return [True] * len(flat)
    mask = shared(tree) if callable(shared) else shared
    mask_flat = jax.tree_util.tree_flatten_with_path(
        mask, is_leaf=lambda x: hasattr(x, "get_value") and not isinstance(x, jax.Array)
    )[0]
    if _paths(mask_flat) != _paths(flat):
        try:  # a prefix of the params tree: {"trunk": True, "heads": False}
            mask_flat = jax.tree_util.tree_flatten_with_path(jax.tree.broadcast(mask, tree))[0]
        except (ValueError, TypeError):
            pass
    if _paths(mask_flat) != _paths(flat):
        raise ValueError(
            f"`{name}` must be True, a callable params -> mask, or a pytree of bools with one "
            f"leaf per params leaf; got {type(mask).__name__} with leaves "
            f"{_paths(mask_flat)[:6]} but the params have leaves {_paths(flat)[:6]}."
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


def _check_state(state, num_tasks: int) -> AggregateState:
    if isinstance(state, AggregateState):
        return state
    if state is None:
        raise ValueError(
            "aggregate got state=None: create it with opt.init(params) and pass the state "
            "returned by each update to the next."
        )
    if isinstance(state, Mapping) and {"weights", "weighting_state"} <= set(state):
        raise ValueError(
            "aggregate got its state as a dict, as orbax returns it from restore() without "
            "a target: restore with the structure, e.g. "
            "checkpointer.restore(path, target=opt.init(params)) or "
            "ocp.args.StandardRestore(opt.init(params))."
        )
    raise ValueError(
        f"aggregate expected its AggregateState (from init), got {type(state).__name__}; "
        f"aggregate(num_tasks={num_tasks}) must come first in optax.chain."
    )


def _check_num_tasks(num_tasks: Any) -> int:
    if isinstance(num_tasks, (jax.Array, np.ndarray, np.generic)) or isinstance(
        num_tasks, jax.core.Tracer
    ):
        raise TypeError(
            f"`num_tasks` must be a Python int, got the array {num_tasks!r}. It fixes the "
            "state's shapes; with optax.inject_hyperparams pass "
            "static_args=('num_tasks',), e.g. "
            "optax.inject_hyperparams(mtl.aggregate, static_args=('num_tasks',))(w, num_tasks=K)."
        )
    return check_num_tasks(num_tasks)


def _check_losses(task_losses, num_tasks: int):
    if task_losses is None:
        return None
    shape = jnp.shape(task_losses)
    if shape != (num_tasks,):
        raise ValueError(
            f"`task_losses` must have shape ({num_tasks},) (num_tasks={num_tasks}, one loss "
            f"per task, the same tasks as the gradients), got {shape}."
        )
    return task_losses


def task_leaves(task_grads, num_tasks: int, params, shared):
    """``(names, leaves, treedef, mask, stacked)`` of task gradients for a task-axis transform.

    ``mask[i]``: leaf i is shared (weighted); ``stacked[i]``: leaf i has the task axis (the
    split delivers head leaves already summed). ``shared`` as in :func:`aggregate`; every
    transform on stacked gradients resolves it here, so they all follow the same rules.
    """
    names, leaves, treedef, stacked = unwrap(task_grads, num_tasks, params)
    if params is None:  # what a callable mask sees: the param shapes, no task axis
        params_like = jax.tree_util.tree_unflatten(
            treedef,
            [
                jax.ShapeDtypeStruct(g.shape[1:] if s else g.shape, g.dtype)
                for g, s in zip(leaves, stacked or [True] * len(leaves))
            ],
        )
    else:
        params_like = params
    if shared is None:
        if stacked is None:
            raise ValueError(
                "aggregate needs to know which leaves are shared between the tasks, and "
                "these gradients do not say: pass shared= (a pytree of bools or a "
                "callable params -> mask; heads False), shared=True if every leaf is "
                "shared, or compute the gradients with split_value_and_jacobian(encode, "
                "heads), which knows. Without it the heads would be weighted and enter "
                "the Gram."
            )
        mask = list(stacked)
    else:
        mask = resolve_mask(shared, params_like)
        if stacked is not None:
            for name, m, s in zip(names, mask, stacked):
                if m and not s:
                    raise ValueError(
                        f"`shared` marks {name} as shared, but the encoder/heads split "
                        "delivered it summed over the tasks (a head leaf)."
                    )
    stacked = stacked or [True] * len(leaves)
    if not any(mask):
        raise ValueError("No shared leaf: the mask leaves nothing to weight.")
    return names, leaves, treedef, mask, stacked


def aggregate(
    weighting: Weighting,
    *,
    num_tasks: int,
    shared: Any | Callable | bool | None = None,
) -> optax.GradientTransformationExtraArgs:
    """GradientTransformation from stacked per-task gradients to one update (see module doc).

    Args:
      weighting: any :class:`mtl_optax.Weighting` (e.g. ``mtl.mgda()``).
      num_tasks: K, the size of the leading task axis (a Python int: it fixes the state's
        shapes).
      shared: which leaves are shared between tasks. ``None`` (default): taken from the
        gradients of the encoder/heads split; gradients of the whole model then raise an
        error asking for it. ``True``: every leaf (heads too). A pytree of bools with the
        structure of ``params`` (or a prefix of it: ``{"trunk": True, "heads": False}``),
        or a callable ``params -> mask`` (as in ``optax.masked``;
        without ``params`` in ``update`` it gets shape/dtype stand-ins with the task axis
        removed). Non-shared leaves are summed over the task axis.

    Extra arguments of ``update``: ``task_losses`` ((K,), required by weightings with
    ``needs_losses``); others are passed to the weighting, which ignores unknown ones.
    """
    check_weighting(weighting)
    _check_num_tasks(num_tasks)
    if shared is False:
        raise ValueError("`shared=False` would leave nothing to weight; use True or a mask.")

    def init(params):
        del params
        return AggregateState(
            weights=jnp.zeros(num_tasks, jnp.float32), weighting_state=weighting.init(num_tasks)
        )

    def update(task_grads, state, params=None, *, task_losses=None, **extra):
        state = _check_state(state, num_tasks)
        task_losses = _check_losses(task_losses, num_tasks)
        names, leaves, treedef, mask, stacked = task_leaves(task_grads, num_tasks, params, shared)
        gram_leaves = [g for g, s in zip(leaves, stacked) if s]
        gram_mask = [m for m, s in zip(mask, stacked) if s]
        weights, weighting_state = weights_from_gradients(
            weighting, gram_leaves, task_losses, state.weighting_state, mask=gram_mask, **extra
        )
        if task_losses is not None:  # a non-finite loss poisons the step (apply_if_finite)
            finite = jnp.all(jnp.isfinite(task_losses))
            weights = jnp.where(finite, weights, jnp.nan)
        out = []
        for use, is_stacked, leaf in zip(mask, stacked, leaves):
            if use:
                acc = jnp.promote_types(leaf.dtype, jnp.float32)
                combined = jnp.tensordot(
                    weights.astype(acc), leaf.astype(acc), axes=1, precision=HIGHEST
                )
            elif is_stacked:
                combined = jnp.sum(leaf, axis=0)
            else:
                combined = leaf
            out.append(combined.astype(leaf.dtype))
        return jax.tree_util.tree_unflatten(treedef, out), AggregateState(weights, weighting_state)

    return optax.GradientTransformationExtraArgs(init, update)


def task_weights(opt_state) -> jax.Array:
    """The last task weights kept by the one :func:`aggregate` in an optimizer state.

    Works on any optax state tree (``optax.chain`` tuples, wrappers) and on
    ``nnx.Optimizer(...).opt_state``, whose leaves flax wraps in ``OptState`` variables; the
    result is a plain array, ready to log.
    """
    found = [
        s
        for s in jax.tree_util.tree_leaves(
            opt_state, is_leaf=lambda x: isinstance(x, AggregateState)
        )
        if isinstance(s, AggregateState)
    ]
    if len(found) != 1:
        raise ValueError(
            f"Expected exactly one aggregate() state in the optimizer state, found {len(found)}."
        )
    return jnp.asarray(_plain(found[0].weights))

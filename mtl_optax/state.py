"""The state of a multi-task method, the same in every tier, and :func:`task_weights`.

Every entry point keeps one :class:`AggregateState`: the last task weights (for logging)
and the method's own state. Tier 3 keeps it inside the optax state (``aggregate`` in
``optax.chain``; under flax ``nnx.Optimizer.opt_state``); tiers 1 and 2 pass it in and out of
the gradient function. :func:`task_weights` reads the weights from any of them.

The state also carries, as static data, the task names (when the tasks have names) and the
name of the method that made it, so a state of another method is refused with a clear
error instead of being read as this one's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mtl_optax.weighting.base import Weighting, check_num_tasks


class AggregateState(NamedTuple):
    """``weights`` (K,) float32, the last task weights; ``method_state``, the method's own.

    A NamedTuple, so flax serialization, orbax and ``nnx.Optimizer`` handle it like any optax
    state. Each (method, task names) pair gets its own subclass (``state_type``) whose
    class attributes say ``method`` (the method's name), ``names`` (the task names or
    ``None``) and ``has_weights`` (False for methods that combine gradients coordinate by
    coordinate: :func:`task_weights` then reports NaN); they are static, part of the
    pytree's type.
    """

    weights: jax.Array
    method_state: Any
    method = ""
    names = None
    has_weights = True


_STATE_TYPES: dict = {}


def state_type(method: str, names: tuple | None, has_weights: bool) -> type:
    """The :class:`AggregateState` subclass of one method and set of task names (cached, so
    equal configurations give equal pytree types)."""
    key = (method, names, has_weights)
    if key not in _STATE_TYPES:
        _STATE_TYPES[key] = type(
            "AggregateState",
            (AggregateState,),
            {"method": method, "names": names, "has_weights": has_weights, "__slots__": ()},
        )
    return _STATE_TYPES[key]


def method_name(method: Any) -> str:
    """A method's name (e.g. ``"mgda"``): its ``name`` field, else that of the function that
    defines its ``update`` (the constructor that built it)."""
    if getattr(method, "name", None):
        return method.name
    update = getattr(method, "update", None)
    qualname = getattr(update, "__qualname__", type(update).__name__)
    return qualname.split(".<locals>")[0]


def check_method(method: Any, name: str = "method") -> None:
    """``method`` must be a :class:`mtl_optax.Weighting` or a stacked aggregator."""
    from mtl_optax.stacked import StackedAggregator

    if isinstance(method, (Weighting, StackedAggregator)):
        return
    hint = ""
    if hasattr(method, "init") and hasattr(method, "update"):
        hint = (
            " It looks like an optax GradientTransformation: optimizers go AFTER the "
            "aggregation, e.g. optax.chain(mtl.aggregate(mtl.mgda(), tasks=K), "
            "optax.adam(1e-3))."
        )
    elif callable(method):
        hint = " Call the constructor: mtl.mgda(), not mtl.mgda."
    raise TypeError(
        f"`{name}` must be a multi-task method such as mtl.mgda(), mtl.famo() or "
        f"mtl.trimmed_mean(trim=1), got {type(method).__name__}.{hint}"
    )


def check_tasks(tasks: Any) -> tuple[int, tuple[str, ...] | None]:
    """``tasks``: a positive int K, or a sequence of K distinct task names."""
    if isinstance(tasks, (jax.Array, np.ndarray, np.generic)) or isinstance(tasks, jax.core.Tracer):
        raise TypeError(
            f"`tasks` must be a Python int or a sequence of task names, got the array "
            f"{tasks!r}. It fixes the state's shapes; with optax.inject_hyperparams pass "
            "static_args=('tasks',), e.g. "
            "optax.inject_hyperparams(mtl.aggregate, static_args=('tasks',))(method, tasks=K)."
        )
    if isinstance(tasks, (list, tuple)):
        names = tuple(tasks)
        if not names or not all(isinstance(n, str) for n in names):
            raise TypeError(
                f"`tasks` names must be a non-empty sequence of strings, got {tasks!r}."
            )
        if len(set(names)) != len(names):
            raise ValueError(f"`tasks` names must be distinct, got {tasks!r}.")
        return len(names), names
    if isinstance(tasks, str):
        raise TypeError(f"`tasks` must be an int or a sequence of names, got the string {tasks!r}.")
    return check_num_tasks_arg(tasks), None


def check_num_tasks_arg(tasks: Any) -> int:
    try:
        return check_num_tasks(tasks)
    except ValueError:
        raise ValueError(
            f"`tasks` must be a positive int (the number of tasks) or a sequence of task names, "
            f"got {tasks!r}."
        ) from None


def check_names(expected: tuple | None, got: tuple | None, where: str) -> None:
    """Task names of the gradients must match the state's, in order (when both have them)."""
    if expected is not None and got is not None and tuple(expected) != tuple(got):
        raise ValueError(
            f"{where}: the gradients hold tasks {list(got)} but the state was made for "
            f"{list(expected)}; give the tasks in the same order (the heads dict's order)."
        )


def check_state(state: Any, method: Any, num_tasks: int | None, where: str) -> AggregateState:
    """The state passed to an update must be this method's :class:`AggregateState` (for
    ``num_tasks`` tasks, when given)."""
    if isinstance(state, AggregateState):
        if state.method != method_name(method):
            raise ValueError(
                f"{where} got the state of {state.method!r}, but it runs "
                f"{method_name(method)!r}: pass the state made by this method's init (a "
                "checkpoint of another method cannot be resumed with this one)."
            )
        if num_tasks is not None and jnp.shape(state.weights) != (num_tasks,):
            raise ValueError(
                f"{where} got a state for {jnp.shape(state.weights)[0]} tasks, but it runs "
                f"{num_tasks} tasks."
            )
        return state
    if state is None:
        raise ValueError(
            f"{where} got state=None: create it once (tier 3: opt.init(params); tiers 1/2: "
            "grad_fn.init(params)) and pass the state returned by each step to the next."
        )
    if isinstance(state, Mapping) and {"weights", "method_state"} <= set(state):
        raise ValueError(
            f"{where} got its state as a dict, as orbax returns it from restore() without a "
            "target: restore with the structure, e.g. "
            "checkpointer.restore(path, target=opt.init(params)) or "
            "ocp.args.StandardRestore(opt.init(params))."
        )
    raise ValueError(
        f"{where} expected its AggregateState (from init), got {type(state).__name__}."
    )


def task_weights(x: Any):
    """The last task weights of a multi-task method, ready to log.

    Args:
      x: an optax state holding one :func:`mtl_optax.aggregate` state (any nesting: chains,
        wrappers, ``nnx.Optimizer.opt_state``, an ``nnx.Optimizer`` itself), an
        :class:`AggregateState` (tiers 1 and 2), or the ``WeightedGrads`` they return.

    Returns a (K,) array, or a dict ``{name: weight}`` when the tasks have names. Methods
    that combine the gradients coordinate by coordinate and have no task weights (trimmed
    mean, GradDrop, DB-MTL) report NaN for every task.
    """
    x = getattr(x, "opt_state", x)  # nnx.Optimizer
    found = [
        s
        for s in jax.tree_util.tree_leaves(x, is_leaf=lambda y: isinstance(y, AggregateState))
        if isinstance(s, AggregateState)
    ]
    if len(found) != 1:
        raise ValueError(
            f"task_weights expected exactly one multi-task state (from mtl.aggregate or a "
            f"tier-1/2 gradient function) in its argument, found {len(found)}."
        )
    state = found[0]
    weights = state.weights
    weights = weights.get_value() if hasattr(weights, "get_value") else weights
    weights = jnp.asarray(weights)
    if not state.has_weights:
        weights = jnp.full(weights.shape, jnp.nan, weights.dtype)
    if state.names is None:
        return weights
    return {name: weights[i] for i, name in enumerate(state.names)}

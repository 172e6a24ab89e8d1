"""``TaskGradients``: per-task gradients on their way to :func:`mtl_optax.aggregate` (tier 3).

The gradient functions of tier 3 (:func:`mtl_optax.value_and_jacobian`,
:func:`mtl_optax.split_value_and_jacobian`) return the gradients of every task loss in one
pytree node shaped like ``params``. Each leaf has a *role*, fixed at trace time:

* ``"shared"``: stacked ``(K, *shape)``, one gradient per task, combined by the method
  (the encoder of a split model);
* ``"task"``: stacked ``(K, *shape)`` but not shared: gets the head rule ``Σ_i c_i g_i``
  (a head leaf read by several heads, or a leaf the ``shared`` mask leaves out);
* an int ``i``: a head leaf read only by task ``i``, with the parameter's own shape: gets
  ``c_i g_i``;
* ``"sliced"``: a head leaf of :func:`mtl_optax.stacked_heads` with a leading task axis whose
  slice ``i`` belongs to task ``i``: gets ``c_i`` on slice ``i``;
* ``"none"``: read by no task (a zero gradient, passed through).

With ``roles=None`` (gradients of the whole model) every leaf is stacked and the ``shared``
mask of ``aggregate`` decides between ``"shared"`` and ``"task"``. ``c`` is the head rule of
the method (see :func:`mtl_optax.aggregate`).

The roles and the task names travel in the node's static data and in the key of its single
child, so they survive ``nnx.Optimizer``, which rebuilds the gradients as a flax ``State``
keyed by that child's name.

Only ``aggregate`` may take the task axis off. An optax transform that reads the updates
before it (``optax.adam`` placed first in ``optax.chain``, or ``apply_if_finite`` /
``MultiSteps`` wrapped around the chain) would treat K gradients as a batch of parameters;
flattening a ``TaskGradients`` from inside such a transform raises a ``TypeError`` that says
where to put it instead.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

STRATEGIES = ("auto", "vmap", "map", "chunked")
TASK_AXIS_KEY = "task_gradients"  # prefix of the key under which the stacked tree appears

SHARED, TASK, SLICED, NONE = "shared", "task", "sliced", "none"
_CODES = {SHARED: "s", TASK: "t", SLICED: "x", NONE: "n"}
_ROLES = {code: role for role, code in _CODES.items()}


def stacked_role(role) -> bool:
    """Whether a leaf of this role carries one gradient per task on a leading axis."""
    return role in (SHARED, TASK)


def _encode(roles, names) -> str:
    parts = [TASK_AXIS_KEY]
    if roles is not None:
        parts.append("roles=" + ",".join(_CODES.get(r, str(r)) for r in roles))
    if names is not None:
        parts.append("names=" + json.dumps(list(names)))
    return "|".join(parts)


def decode_key(key: str):
    """``(roles, names)`` from the key of a rebuilt ``TaskGradients`` (``None`` if absent)."""
    roles = names = None
    for part in key.split("|")[1:]:
        if part.startswith("roles="):
            roles = tuple(_ROLES.get(c, None) or int(c) for c in part[6:].split(","))
        elif part.startswith("names="):
            names = tuple(json.loads(part[6:]))
    return roles, names


def is_task_gradients_key(key: Any) -> bool:
    return isinstance(key, str) and (key == TASK_AXIS_KEY or key.startswith(TASK_AXIS_KEY + "|"))


class _NamedInErrors(type):
    """JAX's pytree errors print the node *type*; this makes that text say what to do."""

    def __repr__(cls) -> str:
        return (
            f"<class '{cls.__module__}.{cls.__qualname__}': stacked per-task gradients; "
            "mtl.aggregate(...) must be the first transform to see them: first in "
            "optax.chain, with apply_if_finite / MultiSteps wrapped around what follows it>"
        )


_WRAPPERS = {"apply_if_finite": "optax.apply_if_finite", "MultiSteps": "optax.MultiSteps"}


def _check_caller() -> None:
    """Raise if an optax transform other than ``aggregate`` is reading task gradients.

    Walks up from the flatten call to the first frame of either mtl_optax (fine: aggregate,
    or the library's own gradient functions) or an optax ``update`` function (a transform
    that would treat the task axis as parameters).
    """
    frame = sys._getframe(2)
    for _ in range(60):
        if frame is None:
            return
        module = frame.f_globals.get("__name__", "")
        if module.startswith("mtl_optax"):
            return
        if module.startswith("optax") and frame.f_code.co_name in ("update", "update_fn"):
            where = _qualname(frame)
            wrapper = next((name for key, name in _WRAPPERS.items() if key in where), None)
            if wrapper is not None:
                raise TypeError(
                    f"{wrapper} is reading stacked per-task gradients (TaskGradients) before "
                    "mtl.aggregate has combined them. Put it after aggregate, around the rest of "
                    f"the chain: optax.chain(mtl.aggregate(method, tasks=K), {wrapper}(...)), "
                    "e.g. optax.chain(mtl.aggregate(mtl.mgda(), tasks=K), "
                    "optax.apply_if_finite(optax.adam(1e-3), max_consecutive_errors=5))."
                )
            raise TypeError(
                f"An optax transform ({module}.{where}) is reading stacked per-task gradients "
                "(TaskGradients) before mtl.aggregate has combined them: it would treat the K "
                "task gradients as parameters. mtl.aggregate must come FIRST in optax.chain, "
                "e.g. optax.chain(mtl.aggregate(mtl.mgda(), tasks=K), optax.adam(1e-3)); move "
                "every other transform (clipping, weight decay, the optimizer) after it."
            )
        frame = frame.f_back


def _qualname(frame) -> str:
    return getattr(frame.f_code, "co_qualname", frame.f_code.co_name)


class TaskGradients(metaclass=_NamedInErrors):
    """Per-task gradients shaped like params (see the module docstring for the roles).

    A pytree node of its own, so it passes through ``jit``, ``vmap`` and ``tree_map``. It
    behaves as a read-only mapping over ``tree`` when ``tree`` is a mapping
    (``task_grads["trunk"]``), so code that inspects gradients as a dict (flax's
    ``TrainState.apply_gradients``) works.

    Args:
      tree: the gradients, shaped like params (stacked leaves with a leading task axis).
      roles: one role per leaf of ``tree`` (module docstring), or ``None``: every leaf is
        stacked and ``aggregate``'s ``shared`` mask says which are shared.
      names: the task names, in order, or ``None``.

    Wrap your own stacked per-task gradients as ``mtl.TaskGradients(tree)``.
    """

    def __init__(
        self, tree: Any, roles: Sequence | None = None, names: Sequence[str] | None = None
    ):
        self.tree = tree
        self.roles = None if roles is None else tuple(roles)
        self.names = None if names is None else tuple(names)

    def __getitem__(self, key):
        return self.tree[key]

    def __contains__(self, key) -> bool:
        return isinstance(self.tree, Mapping) and key in self.tree

    def __iter__(self) -> Iterator:
        return iter(self.tree) if isinstance(self.tree, Mapping) else iter(())

    def __len__(self) -> int:
        return len(self.tree) if isinstance(self.tree, Mapping) else 0

    def keys(self):
        return self.tree.keys() if isinstance(self.tree, Mapping) else ()

    def values(self):
        return self.tree.values() if isinstance(self.tree, Mapping) else ()

    def items(self):
        return self.tree.items() if isinstance(self.tree, Mapping) else ()

    def __repr__(self) -> str:
        return f"TaskGradients({self.tree!r}, roles={self.roles}, names={self.names})"


def _flatten_with_keys(node: TaskGradients):
    _check_caller()
    key = jax.tree_util.GetAttrKey(_encode(node.roles, node.names))
    return ((key, node.tree),), (node.roles, node.names)


def _flatten(node: TaskGradients):
    _check_caller()
    return (node.tree,), (node.roles, node.names)


def _unflatten(aux, children) -> TaskGradients:
    return TaskGradients(children[0], *aux)


jax.tree_util.register_pytree_with_keys(TaskGradients, _flatten_with_keys, _unflatten, _flatten)


def check_strategy(strategy: Any, chunk_size: Any) -> None:
    """Validate a Jacobian ``strategy`` and its ``chunk_size`` (construction time)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"`strategy` must be one of {STRATEGIES}, got {strategy!r}.")
    if strategy == "chunked" and (
        not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1
    ):
        raise ValueError(
            f"strategy='chunked' needs a positive int `chunk_size`, got {chunk_size!r}."
        )
    if strategy != "chunked" and chunk_size is not None:
        raise ValueError(f"`chunk_size` is only used by strategy='chunked', not {strategy!r}.")


def map_over_tasks(fn: Callable, xs: Any, strategy: str, chunk_size: int | None) -> Any:
    """``fn`` applied to every slice of ``xs`` along the leading task axis, stacked.

    ``"vmap"`` batches all slices, ``"map"`` runs them one after another (``lax.map``),
    ``"chunked"`` runs ``chunk_size`` at a time; ``"auto"`` is ``"map"`` on CPU and
    ``"vmap"`` on accelerators (decided at trace time). On 2 CPU cores ``"map"`` was the
    fastest for K = 2, 10 and 40 (``benchmarks/results/speed_cpu.md``).
    """
    if strategy == "auto":
        strategy = "map" if jax.default_backend() == "cpu" else "vmap"
    if strategy == "vmap":
        return jax.vmap(fn)(xs)
    return jax.lax.map(fn, xs, batch_size=chunk_size)  # chunk_size None: one by one


def basis(losses: jax.Array) -> jax.Array:
    """The K unit cotangents ``e_i``, with the losses' type.

    Adding ``zeros_like(losses)`` gives the basis the losses' variation over ``shard_map``
    mesh axes (a plain ``eye`` would be rejected by the vjp there).
    """
    return jnp.eye(losses.shape[0], dtype=losses.dtype) + jnp.zeros_like(losses)


def check_losses_dtype(losses: Any, name: str) -> None:
    """Task losses must be real floating point: integer losses have zero gradients."""
    dtype = jnp.result_type(losses)
    if jnp.issubdtype(dtype, jnp.complexfloating) or not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"{name} returned losses of dtype {dtype}; task losses must be real floating point "
            "(integer losses have zero gradients, complex ones no ordering). Compute them in "
            "float32, e.g. cast the labels' contribution with .astype(jnp.float32)."
        )


def check_float_params(names: list[str], leaves: list[Any]) -> None:
    """Every params leaf must be real floating point to be differentiated."""
    for name, leaf in zip(names, leaves):
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            raise TypeError(
                f"params leaf {name} has dtype {jnp.result_type(leaf)}; only real floating-point "
                "parameters can be differentiated (keep integer state out of params)."
            )

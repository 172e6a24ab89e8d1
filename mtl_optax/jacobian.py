"""Per-task losses and stacked per-task gradients (tier 3: the exact, K-backward-pass tier).

``value_and_jacobian(task_losses_fn)`` turns ``f(params, ...) -> (K,) losses`` into a function
returning ``(losses, task_grads)`` where every leaf of ``task_grads`` is the gradient of
each task's loss, stacked on a leading task axis of size K: the input of
:func:`mtl_optax.aggregate`. The forward pass runs once; the K backward passes reuse its
residuals (one ``jax.vjp``, then K cotangents ``e_i``):

* ``"vmap"``: the K cotangents batched through one vectorised backward pass (fast on
  accelerators, memory grows with K);
* ``"map"``: one backward pass after another (``lax.map``; lowest memory);
* ``"chunked"``: ``chunk_size`` cotangents at a time (``lax.map`` with ``batch_size``);
* ``"auto"`` (default): ``"map"`` on CPU, ``"vmap"`` on accelerators, decided at trace
  time from ``jax.default_backend()``. On 2 CPU cores ``"map"`` was the fastest strategy
  for K = 2, 10 and 40 (``benchmarks/results/speed_cpu.md``).

Checked in ``tests/test_jacobian.py``: every strategy equals ``jax.jacrev`` and the
per-task ``jax.grad``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

STRATEGIES = ("auto", "vmap", "map", "chunked")


TASK_AXIS_KEY = "task_gradients"  # the key under which the stacked tree appears in paths


@dataclasses.dataclass(frozen=True)
class TaskAxis:
    """Static description of a :class:`TaskGradients` (its pytree aux data).

    ``stacked[l]`` says whether leaf ``l`` carries the leading task axis (an encoder leaf of
    the encoder/heads split) or is already summed over the tasks (a head leaf); ``None``
    means every leaf is stacked.
    """

    stacked: tuple[bool, ...] | None = None


class _NamedInErrors(type):
    """JAX's pytree errors print the node *type*; this makes that text say what to do."""

    def __repr__(cls) -> str:
        return (
            f"<class '{cls.__module__}.{cls.__qualname__}': stacked per-task gradients; "
            "mtl.aggregate(...) must come FIRST in optax.chain (no transform before it)>"
        )


class TaskGradients(metaclass=_NamedInErrors):
    """Stacked per-task gradients: ``tree`` is shaped like params with a leading task axis.

    A pytree node of its own, so it passes through ``jit``, ``vmap`` and ``tree_map``, while
    a stateful optax transform placed before :func:`mtl_optax.aggregate` in ``optax.chain``
    fails on the structure mismatch (the error prints the type, whose text names
    ``TaskGradients`` and says that ``aggregate`` must come first) instead of treating the
    task axis as a batch of parameters. It behaves as a read-only mapping over ``tree`` when
    ``tree`` is a mapping (``task_grads["trunk"]``, ``"trunk" in task_grads``,
    ``task_grads.keys()``), so code that inspects gradients as a dict (flax's
    ``TrainState.apply_gradients``) works.

    ``stacked`` (one bool per leaf of ``tree``, or ``None`` for all) is set by the
    encoder/heads split: head leaves arrive already summed over the tasks, with the
    parameter's own shape, and need no ``shared`` mask.
    """

    def __init__(self, tree: Any, stacked: Sequence[bool] | None = None):
        self.tree = tree
        self.stacked = None if stacked is None else tuple(bool(s) for s in stacked)

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
        return f"TaskGradients({self.tree!r})"


def _flatten_with_keys(node: TaskGradients):
    return ((jax.tree_util.GetAttrKey(TASK_AXIS_KEY), node.tree),), TaskAxis(node.stacked)


def _flatten(node: TaskGradients):
    return (node.tree,), TaskAxis(node.stacked)


def _unflatten(aux: TaskAxis, children) -> TaskGradients:
    return TaskGradients(children[0], aux.stacked)


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
    ``"vmap"`` on accelerators (decided at trace time).
    """
    if strategy == "auto":
        strategy = "map" if jax.default_backend() == "cpu" else "vmap"
    if strategy == "vmap":
        return jax.vmap(fn)(xs)
    return jax.lax.map(fn, xs, batch_size=chunk_size)  # chunk_size None: one by one


def value_and_jacobian(
    task_losses_fn: Callable,
    *,
    strategy: str = "auto",
    chunk_size: int | None = None,
    has_aux: bool = False,
) -> Callable:
    """Wrap ``task_losses_fn(params, *args, **kwargs) -> (K,)`` to also return per-task grads.

    Args:
      task_losses_fn: returns the K task losses as a 1-D array (or ``(losses, aux)`` with
        ``has_aux=True``); differentiated with respect to its first argument.
      strategy: ``"auto"``, ``"vmap"``, ``"map"`` or ``"chunked"`` (module docstring).
      chunk_size: cotangents per batch for ``"chunked"`` (required there).
      has_aux: whether ``task_losses_fn`` returns ``(losses, aux)``.

    Returns:
      A function with the signature of ``task_losses_fn`` returning ``(losses, task_grads)``
      (or ``((losses, aux), task_grads)``); ``task_grads`` is a :class:`TaskGradients`
      wrapping a pytree like ``params`` whose leaves have shape ``(K, *param.shape)``.

    Example::

        losses, task_grads = mtl.value_and_jacobian(task_losses)(params, batch)
    """
    check_strategy(strategy, chunk_size)

    def wrapped(params, *args, **kwargs):
        def losses_only(p):
            return task_losses_fn(p, *args, **kwargs)

        if has_aux:
            losses, vjp, aux = jax.vjp(losses_only, params, has_aux=True)
        else:
            losses, vjp = jax.vjp(losses_only, params)
        if jnp.ndim(losses) != 1:
            raise ValueError(
                f"`task_losses_fn` must return a 1-D array of K task losses, got shape "
                f"{jnp.shape(losses)}."
            )
        # Adding zeros_like(losses) gives the basis the losses' type, including its
        # variation over shard_map mesh axes (a plain eye would be rejected by the vjp).
        cotangents = jnp.eye(losses.shape[0], dtype=losses.dtype) + jnp.zeros_like(losses)

        def one_task(cotangent):
            return vjp(cotangent)[0]

        grads = map_over_tasks(one_task, cotangents, strategy, chunk_size)
        return ((losses, aux) if has_aux else losses), TaskGradients(grads)

    return wrapped

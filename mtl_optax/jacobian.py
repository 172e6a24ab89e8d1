"""Per-task losses and stacked per-task gradients (tier 3 of DESIGN.md 2).

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

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

STRATEGIES = ("auto", "vmap", "map", "chunked")


@jax.tree_util.register_pytree_node_class
class TaskGradients:
    """Stacked per-task gradients: ``tree`` is shaped like params with a leading task axis.

    A pytree node of its own, so it passes through ``jit``, ``vmap`` and ``tree_map`` but
    cannot be mistaken for ordinary gradients: an optax transform placed before
    :func:`mtl_optax.aggregate` in ``optax.chain`` fails on the structure mismatch instead
    of silently treating the task axis as a batch of parameters. ``task_grads["trunk"]``
    indexes the inner tree; ``task_grads.tree`` is the tree itself.
    """

    def __init__(self, tree: Any):
        self.tree = tree

    def __getitem__(self, key):
        return self.tree[key]

    def __repr__(self) -> str:
        return f"TaskGradients({self.tree!r})"

    def tree_flatten(self):
        return (self.tree,), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        del aux
        return cls(children[0])


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
    if strategy not in STRATEGIES:
        raise ValueError(f"`strategy` must be one of {STRATEGIES}, got {strategy!r}.")
    if strategy == "chunked" and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(
            f"strategy='chunked' needs a positive int `chunk_size`, got {chunk_size!r}."
        )
    if strategy != "chunked" and chunk_size is not None:
        raise ValueError(f"`chunk_size` is only used by strategy='chunked', not {strategy!r}.")

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

        chosen = strategy
        if chosen == "auto":
            chosen = "map" if jax.default_backend() == "cpu" else "vmap"
        if chosen == "vmap":
            grads = jax.vmap(one_task)(cotangents)
        else:
            grads = jax.lax.map(one_task, cotangents, batch_size=chunk_size)  # None: one by one
        return ((losses, aux) if has_aux else losses), TaskGradients(grads)

    return wrapped

"""How the task heads of a split model are given, and how they run.

The heads turn the shared features ``z`` into the task losses. They are given in a form that
cannot be miswired: the library hands feature copy ``i`` to task ``i`` itself, so a head
cannot read another task's copy.

* **A sequence or a dict of per-task losses** ``head_i(params, z, batch) -> scalar`` (the
  dict's keys are the task names, in order). Each head runs on its own copy of ``z``; a head
  leaf read by one head belongs to that task, one read by several heads gets its per-task
  gradients stacked (a multi-output layer whose column ``i`` serves task ``i`` works as is).
* **Homogeneous heads** ``mtl.stacked_heads(head, head_params=select)``: one
  ``head(head_params_i, z, batch, task_index) -> scalar``, the head parameters stacked on a
  leading task axis (``select(params)``, a part of ``params``), vmapped over the tasks in one
  batched pass: the efficient form for many tasks.

Both run in one backward pass for all tasks: the cotangent ``c`` (one number per task) gives
the head gradients ``c_i ∇L_i`` and the feature cotangents ``c_i ∂L_i/∂z``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.extend.core import Literal

from mtl_optax.feature_gram import factor_features
from mtl_optax.task_gradients import NONE, SLICED, TASK


class StackedHeads(NamedTuple):
    """Homogeneous heads: see :func:`stacked_heads`."""

    head: Callable
    head_params: Callable


def stacked_heads(head: Callable, *, head_params: Callable) -> StackedHeads:
    """K heads with one function and stacked parameters, vmapped over the tasks.

    Args:
      head: ``head(head_params_i, z, batch, task_index) -> scalar`` the loss of task
        ``task_index`` (a traced int; index labels with it) from its parameters and features.
      head_params: ``params -> the stacked head parameters``, a part of ``params`` (a subtree,
        no computation) whose every leaf has a leading task axis of size K. Under
        :mod:`mtl_optax.flax_nnx` it takes the model and returns the head module built with
        ``nnx.vmap`` (e.g. ``lambda model: model.heads``).

    The number of tasks K is the leading axis of the head parameters. Each head reads only its
    own slice and its own copy of the features: it cannot be miswired.

    Example::

        def head(w, z, batch, i):                    # w: (d,) the slice of task i
            return jnp.mean((z @ w - batch["y"][:, i]) ** 2)

        heads = mtl.stacked_heads(head, head_params=lambda params: params["heads"])  # (K, d)
        grad_fn = mtl.split_value_and_grad(encoder, heads, mtl.mgda())
    """
    if not callable(head):
        raise TypeError(f"stacked_heads: `head` must be callable, got {type(head).__name__}.")
    if not callable(head_params):
        raise TypeError(
            "stacked_heads: `head_params` must be a function params -> the stacked head "
            f"parameters (e.g. lambda params: params['heads']), got {type(head_params).__name__}."
        )
    return StackedHeads(head, head_params)


class HeadsSpec(NamedTuple):
    """The heads resolved: ``fns`` (sequence form) or ``stacked``, and the task names."""

    fns: tuple | None
    stacked: StackedHeads | None
    names: tuple[str, ...] | None


def resolve_heads(heads: Any) -> HeadsSpec:
    """Validate the ``heads`` argument of the split functions."""
    if isinstance(heads, StackedHeads):
        return HeadsSpec(None, heads, None)
    if isinstance(heads, Mapping):
        names = tuple(heads)
        for name in names:
            if not isinstance(name, str):
                raise TypeError(f"`heads` dict keys are the task names: strings, got {name!r}.")
        fns = tuple(heads.values())
        labels = [repr(n) for n in names]
    elif isinstance(heads, Sequence) and not isinstance(heads, str):
        names, fns = None, tuple(heads)
        labels = [str(i) for i in range(len(fns))]
    elif callable(heads):
        raise TypeError(
            "`heads` must be a sequence or a dict of per-task losses "
            "head_i(params, z, batch) -> scalar, or mtl.stacked_heads(head, head_params=...); "
            "got a single function. (A single function of K feature copies, the form of "
            "mtl_optax 0.1, could read another task's copy and train silently wrong; it was "
            "removed.) Example: heads = [lambda p, z, b: loss_a(p, z, b), lambda p, z, b: "
            "loss_b(p, z, b)], or {'a': head_a, 'b': head_b}."
        )
    else:
        raise TypeError(
            "`heads` must be a sequence or a dict of per-task losses, or "
            f"mtl.stacked_heads(...); got {type(heads).__name__}."
        )
    if not fns:
        raise ValueError("`heads` is empty: give one head per task.")
    for label, fn in zip(labels, fns):
        if not callable(fn):
            raise TypeError(f"head {label} must be callable, got {type(fn).__name__}.")
    return HeadsSpec(fns, None, names)


def reads_leaves(fn: Callable, leaves: Sequence[Any]) -> list[bool]:
    """For each leaf, whether ``fn(leaves)`` reads it (its variable is used in the jaxpr).

    Traces ``fn`` once more (trace time only, nothing runs). An input used only in code whose
    result is discarded still counts as read.
    """
    closed = jax.make_jaxpr(fn)(list(leaves))
    used = set()
    for eqn in closed.jaxpr.eqns:
        used.update(v for v in eqn.invars if not isinstance(v, Literal))
    used.update(v for v in closed.jaxpr.outvars if not isinstance(v, Literal))
    return [v in used for v in closed.jaxpr.invars]


def check_scalar_loss(loss: Any, label: str) -> None:
    dtype = jnp.result_type(loss)
    if jnp.shape(loss) != ():
        raise ValueError(
            f"head {label} must return one scalar loss, got shape {jnp.shape(loss)}; reduce "
            "over the batch (e.g. jnp.mean)."
        )
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"head {label} returned a loss of dtype {dtype}; losses must be float.")


class HeadsForward(NamedTuple):
    """The heads run once: losses, roles of the head leaves, and the backward pass.

    ``backward(c, stack_shared=False)`` returns ``(head_grads, feature_cotangents)`` for the
    per-task cotangent ``c`` (K,): ``head_grads`` one per head leaf (``Σ_i c_i ∇L_i``),
    ``feature_cotangents`` like ``z`` with a leading task axis (``c_i ∂L_i/∂z``). With
    ``stack_shared`` the leaves of role ``"task"`` come back stacked per task instead.
    ``weighted(c)`` returns ``(head_grads, Σ_i c_i ∂L_i/∂z)``: the same head gradients and the
    feature cotangent of the weighted loss ``Σ_i c_i L_i``, without the per-task copies.
    ``factored(diagonal_only)`` returns the head gradients of ``c = 1`` and the feature
    gradients as the factors of ``mtl_optax.feature_gram``, or None where the heads read
    ``z`` otherwise or materialising costs less.
    """

    losses: jax.Array
    carry: Any
    roles: list  # per head leaf: task index, "task", "sliced" or "none"
    backward: Callable
    weighted: Callable
    factored: Callable


def run_sequence(fns, labels, head_leaves, call, z, carry, reads) -> HeadsForward:
    """Heads given as one function per task; ``call(i, head_leaves, z, carry) -> (L_i, carry)``.

    ``reads[i]`` says which head leaves head ``i`` reads.
    """
    k = len(fns)
    vjps, losses = [], []
    for i in range(k):
        loss, vjp, carry = jax.vjp(
            lambda h, z_, i=i, carry=carry: call(i, h, z_, carry), head_leaves, z, has_aux=True
        )
        check_scalar_loss(loss, labels[i])
        losses.append(loss)
        vjps.append(vjp)
    readers = [[i for i in range(k) if reads[i][l]] for l in range(len(head_leaves))]
    roles = [r[0] if len(r) == 1 else (TASK if r else NONE) for r in readers]

    def backward(c, stack_shared=False):
        per_head = [vjps[i](c[i].astype(losses[i].dtype)) for i in range(k)]
        grads = []
        for l, (leaf, who) in enumerate(zip(head_leaves, readers)):
            if stack_shared and len(who) > 1:
                zero = jnp.zeros_like(leaf)
                grads.append(jnp.stack([per_head[i][0][l] if i in who else zero for i in range(k)]))
            else:
                grads.append(sum((per_head[i][0][l] for i in who), jnp.zeros_like(leaf)))
        features = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *[p[1] for p in per_head])
        return grads, features

    def weighted(c):
        grads, features = backward(c)
        return grads, jax.tree_util.tree_map(lambda a: jnp.sum(a, axis=0), features)

    return HeadsForward(jnp.stack(losses), carry, roles, backward, weighted, lambda _: None)


def run_stacked(head_leaves, positions, call, z, k, carry) -> HeadsForward:
    """Homogeneous heads, run with the features ``z`` shared by all tasks (not copied K times).

    ``call(head_leaves, carry, per_task) -> (outputs stacked over the tasks, carry)`` vmaps
    ``per_task(loss_of, hp_i, i)`` over the tasks, with ``loss_of(hp_i, z) -> L_i`` head
    ``i``'s loss of its parameter slice ``hp_i``; ``positions[j]`` is the index in
    ``head_leaves`` of the ``j``-th leaf of the stacked head parameters.

    Inside the vmap ``z`` is not batched, so each of the heads' layers that reads ``z`` runs
    as one matrix product for all K tasks (not K products of a K-fold copy of ``z``):

    * the forward pass and ``weighted(c)`` are one ``jax.vjp`` of the vmapped losses with
      respect to the head leaves and ``z``: ``Σ_i c_i ∇L_i`` and ``Σ_i c_i ∂L_i/∂z`` directly;
    * ``backward(c)`` needs every ``c_i ∂L_i/∂z`` apart: each task's own ``jax.vjp`` runs
      inside the vmap (the per-task feature cotangents come out stacked, one batched pass;
      its forward is the same computation as the losses', which XLA computes once under jit).
    """
    carry_in = carry

    def losses_of(h, features):
        return call(h, carry_in, lambda loss_of, hp_i, i: loss_of(hp_i, features))

    losses, vjp, carry = jax.vjp(losses_of, head_leaves, z, has_aux=True)
    if jnp.shape(losses) != (k,):
        raise ValueError(
            f"stacked_heads: `head` must return one scalar loss per task, got shape "
            f"{jnp.shape(losses)[1:]} for each; reduce over the batch (e.g. jnp.mean)."
        )
    check_scalar_loss(losses[0], "of stacked_heads")
    chosen = set(positions)
    roles = [SLICED if j in chosen else NONE for j in range(len(head_leaves))]

    def backward(c, stack_shared=False):
        del stack_shared  # every head leaf is sliced: nothing to stack
        c = c.astype(losses.dtype)

        def per_task(loss_of, hp_i, i):
            _, task_vjp = jax.vjp(loss_of, hp_i, z)
            return task_vjp(c[i])

        (selected, features), _ = call(head_leaves, carry_in, per_task)
        return _place(selected), features

    def _place(selected):
        """The gradients of the selected leaves at their places among the head leaves."""
        grads = [jnp.zeros_like(x) for x in head_leaves]
        for position, grad in zip(positions, jax.tree_util.tree_leaves(selected)):
            grads[position] = grads[position] + grad
        return grads

    def weighted(c):
        return vjp(c.astype(losses.dtype))

    def factored(diagonal_only):
        out = factor_features(call, head_leaves, z, k, carry_in, diagonal_only)
        if out is None:
            return None
        return _place(out[0]), out[1]

    return HeadsForward(losses, carry, roles, backward, weighted, factored)


def selected_positions(selected: Any, leaves: Sequence[Any], what: str) -> list[int]:
    """The index in ``leaves`` of each leaf of ``selected``, matched by identity (all must be).

    In the order of ``jax.tree_util.tree_leaves(selected)``.
    """
    chosen = jax.tree_util.tree_leaves(selected)
    if not chosen:
        raise ValueError(f"stacked_heads: {what} selected no parameters.")
    index = {id(x): i for i, x in enumerate(leaves)}
    if not all(id(x) in index for x in chosen):
        raise ValueError(
            f"stacked_heads: {what} must return a part of the parameters (a subtree, no "
            "computation such as a transpose or a slice), so that slice i of each leaf "
            "belongs to task i."
        )
    return [index[id(x)] for x in chosen]


def stacked_num_tasks(selected_leaves_values: Sequence[Any]) -> int:
    """K from the leading axis of the stacked head parameters (all leaves must agree)."""
    sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in selected_leaves_values}
    if len(sizes) != 1 or None in sizes:
        shapes = [jnp.shape(x) for x in selected_leaves_values]
        raise ValueError(
            "stacked_heads: every head parameter needs the same leading task axis (size K), "
            f"got shapes {shapes}."
        )
    return sizes.pop()

"""Per-task gradients of a whole model: ``task_losses_fn(params, ...) -> K losses``.

For a model that does not split into an encoder and heads (or to treat every parameter
alike), the task losses come from one function of all parameters: a (K,) array, or a dict
of K scalars whose keys name the tasks (in dict order).

* :func:`value_and_jacobian` (tier 3): the gradient of every task loss, stacked on a leading
  task axis, for :func:`mtl_optax.aggregate` with a ``shared`` mask. The forward pass runs
  once; the K backward passes reuse its residuals (one ``jax.vjp``, then K cotangents
  ``e_i``): ``"vmap"`` batches them (fast on accelerators, memory grows with K), ``"map"``
  runs one after another (``lax.map``; lowest memory), ``"chunked"`` ``chunk_size`` at a
  time, ``"auto"`` (default) is ``"map"`` on CPU and ``"vmap"`` on accelerators.
* :func:`value_and_grad` (tier 1, and tier 3 with bounded memory): the weights first, then
  the update from one or two backward passes; a Gram weighting gets the exact Gram of the
  shared leaves column by column (K backward and K forward-mode passes), never the stacked
  Jacobian, or (``gram="structured"``, ``"auto"``) from the structured engine's layer
  operands, which also give the update.

Checked in ``tests/test_jacobian.py``: every strategy equals ``jax.jacrev`` and the per-task
``jax.grad``; ``value_and_grad`` equals ``value_and_jacobian`` + ``aggregate`` for every
weighting in ``tests/zoo.py``; ``gram="structured"`` equals
the columns and tier 3 in ``tests/test_structured_task_gram.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from mtl_optax.aggregate import check_shared_argument, leaf_paths, resolve_mask
from mtl_optax.gram import apply_weighting, linear_gram
from mtl_optax.state import check_tasks
from mtl_optax.structured_gram import engine
from mtl_optax.task_gradients import (
    TaskGradients,
    basis,
    check_float_params,
    check_losses_dtype,
    check_strategy,
    map_over_tasks,
)
from mtl_optax.weighted import WeightedGradFunction, check_weighting_method
from mtl_optax.weighting.base import scales_heads


def as_losses(out: Any, name: str) -> tuple[jax.Array, tuple[str, ...] | None]:
    """``(losses, names)`` from what a task-losses function returned."""
    if isinstance(out, Mapping):
        names = tuple(out)
        if not names or not all(isinstance(n, str) for n in names):
            raise TypeError(f"{name} returned a dict; its keys must be task names (strings).")
        for key, value in out.items():
            if jnp.shape(value) != ():
                raise ValueError(
                    f"{name} returned loss {key!r} of shape {jnp.shape(value)}; each task loss "
                    "must be a scalar (reduce over the batch)."
                )
        losses = jnp.stack([jnp.asarray(v) for v in out.values()])
    elif isinstance(out, (tuple, list)):
        raise TypeError(
            f"{name} returned a {type(out).__name__}: return the K task losses as one (K,) "
            "array or a dict of scalars; with auxiliary outputs return (losses, aux) and pass "
            "has_aux=True."
        )
    else:
        losses, names = out, None
        if jnp.ndim(losses) != 1:
            raise ValueError(
                f"{name} must return a 1-D array of K task losses (or a dict of scalars), got "
                f"shape {jnp.shape(losses)}."
            )
    check_losses_dtype(losses, name)
    return losses, names


def _split_aux(out: Any, has_aux: bool, name: str):
    if not has_aux:
        return out, None
    if not (isinstance(out, tuple) and len(out) == 2):
        raise TypeError(
            f"{name} was declared has_aux=True, so it must return a pair (losses, aux); got "
            f"{type(out).__name__}. Drop has_aux if it returns only the losses."
        )
    return out


def value_and_jacobian(
    task_losses_fn: Callable,
    *,
    strategy: str = "auto",
    chunk_size: int | None = None,
    has_aux: bool = False,
) -> Callable:
    """Wrap ``task_losses_fn(params, *args, **kwargs)`` to also return per-task gradients.

    Args:
      task_losses_fn: returns the K task losses as a (K,) array or a dict of scalars (or
        ``(losses, aux)`` with ``has_aux=True``); differentiated with respect to its first
        argument.
      strategy: ``"auto"``, ``"vmap"``, ``"map"`` or ``"chunked"`` (module docstring).
      chunk_size: cotangents per batch for ``"chunked"`` (required there).
      has_aux: whether ``task_losses_fn`` returns ``(losses, aux)``.

    Returns:
      A function with the signature of ``task_losses_fn`` returning ``(losses, task_grads)``
      (or ``((losses, aux), task_grads)``); ``losses`` is a (K,) array (in dict order),
      ``task_grads`` a :class:`mtl_optax.TaskGradients` shaped like ``params`` whose leaves
      have shape ``(K, *param.shape)`` (and the task names when the losses were a dict).

    Example::

        losses, task_grads = mtl.value_and_jacobian(task_losses)(params, batch)
        opt = optax.chain(mtl.aggregate(mtl.mgda(), tasks=K, shared=mask), optax.adam(1e-3))
        updates, s = opt.update(task_grads, opt.init(params), params, task_losses=losses)
    """
    check_strategy(strategy, chunk_size)
    if not isinstance(has_aux, bool):
        raise TypeError(f"`has_aux` must be a bool, got {has_aux!r}.")

    def wrapped(params, *args, **kwargs):
        names = []

        def losses_only(p):
            out, aux = _split_aux(task_losses_fn(p, *args, **kwargs), has_aux, "task_losses_fn")
            losses, found = as_losses(out, "task_losses_fn")
            names.append(found)
            return losses, aux

        losses, vjp, aux = jax.vjp(losses_only, params, has_aux=True)
        grads = map_over_tasks(lambda c: vjp(c)[0], basis(losses), strategy, chunk_size)
        task_grads = TaskGradients(grads, names=names[0])
        return ((losses, aux) if has_aux else losses), task_grads

    return wrapped


GRAMS = ("columns", "structured", "auto")


class WholeModelConfig(NamedTuple):
    """The validated arguments of :func:`value_and_grad`."""

    weighting: Any
    num_tasks: int
    task_names: tuple[str, ...] | None
    shared: Any
    gram: str
    chunk_size: int | None


def check_gram_option(gram: Any) -> None:
    """Validate the whole model's ``gram`` (construction time)."""
    if not isinstance(gram, str):
        raise TypeError(
            f"`gram` must be one of the strings {GRAMS}, got {gram!r} "
            f"({type(gram).__name__}), e.g. gram='structured'."
        )
    if gram not in GRAMS:
        raise ValueError(f"`gram` must be one of {GRAMS}, got {gram!r}.")


def whole_model_config(method, tasks, shared, gram, chunk_size, entry="value_and_grad"):
    weighting = check_weighting_method(method, entry, "value_and_jacobian")
    num_tasks, task_names = check_tasks(tasks)
    check_shared_argument(shared)
    if shared is None:
        raise ValueError(
            f"{entry} needs `shared=`: which leaves are shared between the tasks (a pytree of "
            "bools or a callable params -> mask; heads False), or shared=True if every leaf "
            "is. For an encoder/heads model, mtl.split_value_and_grad knows it."
        )
    check_gram_option(gram)
    if chunk_size is not None and (
        not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1
    ):
        raise ValueError(f"`chunk_size` must be a positive int or None, got {chunk_size!r}.")
    return WholeModelConfig(weighting, num_tasks, task_names, shared, gram, chunk_size)


def structured_task_gram(losses_of, leaves, batch, mask, config: WholeModelConfig, traced):
    """``(losses, (Ĝ, s), combine, carry)`` from the structured engine (the Gram of the shared
    leaves is ``2^s · Ĝ``), or ``None`` where ``gram="auto"`` takes the columns (the engine
    rejects the model, or its cost model prefers them); ``traced`` is non-empty once
    ``losses_of`` has run."""
    try:
        plan, inputs, treedef, aux_tree = engine.prepare(
            losses_of,
            leaves,
            (batch,),
            {},
            batch_dim=None,
            has_aux=True,
            strategy="auto",
            chunk_size=config.chunk_size,
        )
    except (TypeError, ValueError) as error:
        if not traced:  # task_losses_fn itself failed: the columns would fail alike
            raise
        if config.gram == "auto":
            return None
        raise ValueError(
            f"value_and_grad(gram='structured'): the structured Gram cannot take this model: "
            f"{error} Use gram='columns' (or gram='auto', which falls back to it)."
        ) from error
    shared = [k for k, m in enumerate(mask) if m]
    if config.gram == "auto":
        ghost, materialize = plan.ghost_costs(shared)
        if ghost >= materialize:
            return None
    losses, rest, gram, log2_scale, combine = plan.compute(inputs, treedef, gram_leaves=shared)
    return losses, (gram, log2_scale), combine, jax.tree_util.tree_unflatten(aux_tree, rest)


def whole_model_step(losses_fn, config: WholeModelConfig, params, batch, weighting_state, **extra):
    """One tier-1 / bounded tier-3 step; ``losses_fn(params, batch) -> (losses, carry)``.

    Returns ``(losses, grads, weights, state, names, carry)``.
    """
    weighting, mask = config.weighting, resolve_mask(config.shared, params)
    if not any(mask):
        raise ValueError(
            "the `shared` mask marks no params leaf as shared, which would leave nothing to "
            "weight: mark the shared (encoder) leaves True."
        )
    leaves, treedef = jax.tree_util.tree_flatten(params)
    names = []

    def losses_of(xs, b):
        out, carry = losses_fn(jax.tree_util.tree_unflatten(treedef, xs), b)
        losses, found = as_losses(out, "task_losses_fn")
        if jnp.shape(losses) != (config.num_tasks,):
            raise ValueError(
                f"value_and_grad(tasks={config.num_tasks}): task_losses_fn returned "
                f"{jnp.shape(losses)[0]} losses; set `tasks` to their number (or names)."
            )
        names.append(found)
        return losses, carry

    diagonal = weighting.needs_gram == "diagonal"
    structured = None
    if weighting.needs_gram and config.gram != "columns":
        structured = structured_task_gram(losses_of, leaves, batch, mask, config, names)
    if structured is not None:
        losses, (gram, log2_scale), vjp, carry = structured
        gram = jnp.diag(jnp.diag(gram)) if diagonal else gram
        weights, state = apply_weighting(
            weighting, gram, losses, weighting_state, log2_scale=log2_scale, **extra
        )
    elif weighting.needs_gram:
        check_float_params(leaf_paths(jax.tree_util.tree_flatten_with_path(params)[0]), leaves)
        losses, jvp, carry = jax.linearize(lambda xs: losses_of(xs, batch), leaves, has_aux=True)
        transpose = jax.linear_transpose(jvp, leaves)

        def vjp(c):
            return transpose(c)[0]

        def vjp_shared(c):
            return [g for g, m in zip(vjp(c), mask) if m]

        def jvp_shared(tangents):
            it = iter(tangents)
            return jvp([next(it) if m else jnp.zeros_like(x) for x, m in zip(leaves, mask)])

        if weighting.homogeneity is None:  # needs the true Gram
            gram, _ = linear_gram(
                vjp_shared,
                jvp_shared,
                basis(losses),
                diagonal_only=diagonal,
                chunk_size=config.chunk_size,
                exponent=0,
            )
            weights, state = weighting.update(gram, losses, weighting_state, **extra)
        else:
            gram, exponent = linear_gram(
                vjp_shared,
                jvp_shared,
                basis(losses),
                diagonal_only=diagonal,
                chunk_size=config.chunk_size,
            )
            weights, state = apply_weighting(
                weighting, gram, losses, weighting_state, log2_scale=2 * exponent, **extra
            )
    else:
        losses, vjp_fn, carry = jax.vjp(lambda xs: losses_of(xs, batch), leaves, has_aux=True)

        def vjp(c):
            return vjp_fn(c)[0]

        weights, state = weighting.update(None, losses, weighting_state, **extra)
    w = jax.lax.stop_gradient(weights).astype(losses.dtype)
    shared_grads = vjp(w)
    head_grads = shared_grads if scales_heads(weighting) else vjp(jnp.ones_like(losses))
    grads = [s if m else h for s, h, m in zip(shared_grads, head_grads, mask)]
    grads = jax.tree_util.tree_unflatten(treedef, grads)
    return losses, grads, weights, state, names[0], carry


def value_and_grad(
    task_losses_fn: Callable,
    method,
    *,
    tasks: int | tuple[str, ...] | list[str],
    shared: Any | Callable | bool | None = None,
    gram: str = "columns",
    chunk_size: int | None = None,
) -> WeightedGradFunction:
    """Tier 1 (and bounded-memory tier 3) for a whole model: one weighted update per step.

    Returns ``grad_fn`` with ``grad_fn.init(params) -> state`` and
    ``grad_fn(params, batch, state, **extra) -> (losses, grads, state)`` where
    ``task_losses_fn(params, batch)`` gives the K losses ((K,) or a dict of scalars);
    ``grads`` is shaped like ``params`` and feeds any optax optimizer.

    A weighting that reads no Gram gets its weights from the losses, then one backward pass
    of ``Σ_i w_i L_i`` (``gram`` is then ignored). A Gram weighting gets the exact K × K Gram
    of the ``shared`` leaves, then the update: the same weights and update as
    :func:`value_and_jacobian` + :func:`mtl_optax.aggregate`. The heads (non-shared leaves)
    follow the head rule of ``aggregate``. ``gram`` says how the Gram is obtained:

    * ``"columns"`` (default): column by column, from K backward and K forward-mode passes
      (``chunk_size`` columns at a time), never holding the K gradients: O(parameters)
      memory; the update is one more backward pass.
    * ``"structured"``: by the structured engine (:func:`mtl_optax.value_and_gram` with
      ``batch_dim=None``) from the stored layer inputs ``X`` and the K output cotangents
      ``Δ_i`` of every layer (K backward passes
      that compute no weight gradients): a dense / convolution / embedding weight adds
      ``Σ_{b,c} (X Xᵀ)_{bc} (Δ_i Δ_jᵀ)_{bc}`` (the ghost term) or its K per-task gradients,
      whichever costs less, any other use of a shared parameter its K per-task gradients;
      the update ``Σ_i w_i ∇L_i`` comes from the same operands (``combine(w)``, no further
      backward pass). Memory: the layer inputs and K cotangents of every layer. Cheaper
      than the columns for small batches and wide layers. A model the engine rejects
      (losses that do not depend on the ``batch`` argument) raises a ``ValueError`` naming
      ``gram="columns"``. The Gram is not rescaled by powers of two: in float32, gradient
      norms beyond about 1e19 (or below 1e-19) overflow (underflow), which the columns
      avoid.
    * ``"auto"``: ``"structured"`` where its cost model says the ghost term pays, else
      ``"columns"`` (also where the engine rejects the model). For each shared weight the
      ghost term can serve (a dense / convolution / embedding weight used once), with N rows
      entering the layer (batch × positions), X inputs and Y outputs per block, H blocks
      and K tasks, the ghost term costs ``H·N²·X + K·H·N²·Y + K²·H·N·Y`` multiply-adds and
      the per-task gradients ``K·H·N·X·Y + K²·|θ|``; ``"auto"`` is ``"structured"`` when
      the first sum is below the second over those weights. Otherwise the engine would
      hold K gradients of every layer (the memory the columns avoid) for at most the
      forward-mode passes it saves.

    Args:
      task_losses_fn: ``task_losses_fn(params, batch)`` (``batch`` any pytree).
      method: any :class:`mtl_optax.Weighting` (stacked aggregators need tier 3).
      tasks: the number of tasks K, or their names (checked against a dict of losses).
      shared: which leaves are shared, as in :func:`mtl_optax.aggregate` (required: the
        whole model does not say).
      gram: ``"columns"``, ``"structured"`` or ``"auto"`` (above).
      chunk_size: Gram columns (``"structured"``: task backward passes) per batch
        (``None``: one by one; ``"structured"``: vmapped on accelerators).

    Example::

        grad_fn = mtl.value_and_grad(task_losses, mtl.famo(), tasks=K, shared=mask)
        state = grad_fn.init(params)
        losses, grads, state = grad_fn(params, batch, state)
    """
    config = whole_model_config(method, tasks, shared, gram, chunk_size)

    def step(params, batch, weighting_state, **extra):
        return whole_model_step(
            lambda p, b: (task_losses_fn(p, b), None),
            config,
            params,
            batch,
            weighting_state,
            **extra,
        )[:-1]

    return WeightedGradFunction(
        config.weighting,
        lambda params: (config.num_tasks, config.task_names),
        step,
        "value_and_grad",
    )

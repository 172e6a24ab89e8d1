"""Flax NNX models through the per-task gradients (optional: needs ``flax``).

``import mtl_optax.flax_nnx as mtl_nnx`` (the core package never imports flax). Each helper
takes an ``nnx.Module`` where :mod:`mtl_optax` takes a params pytree, differentiates with
respect to the variables selected by ``wrt`` (default ``nnx.Param``) and, like
``nnx.value_and_grad``, writes every other variable the forward pass changed back into the
model: RNG counts advance (a new dropout mask each step) and BatchNorm statistics update,
exactly as after the same forward pass under ``nnx.value_and_grad``. The model is
differentiated as a pure function (``nnx.split`` / ``nnx.merge`` on a copy), so nothing
mutates a variable from inside the differentiation trace.

* :func:`value_and_jacobian` (any model, tier 3) and :func:`split_value_and_jacobian`
  (encoder/heads split, tier 3): the result goes straight to
  ``nnx.Optimizer(model, optax.chain(mtl.aggregate(...), tx), wrt=nnx.Param).update(model,
  task_grads, task_losses=losses)``; ``mtl.task_weights(optimizer.opt_state)`` gives the
  last weights as a plain array.
* :func:`split_value_and_grad` (tiers 1 and 2, and the bounded-memory tier 3): the
  weighting's state lives in a :class:`TaskWeighting` object, updated in place like the
  model, which also keeps the last weights (``task_weighting.weights``); the returned
  gradients are ordinary ``nnx.grad``-shaped gradients for any ``nnx.Optimizer``.

Checked in ``tests/test_flax_nnx.py``: dropout masks differ between consecutive steps and
the RNG counts, BatchNorm statistics and parameters after n steps equal those of the same
training written with ``nnx.value_and_grad`` and with the plain-pytree API (bit for bit).

Example::

    jac = mtl_nnx.split_value_and_jacobian(encode, heads, num_tasks=K)
    optimizer = nnx.Optimizer(
        model, optax.chain(mtl.aggregate(mtl.mgda(), num_tasks=K), optax.adam(1e-3)),
        wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, batch):
        losses, task_grads = jac(model, batch)
        optimizer.update(model, task_grads, task_losses=losses)
        return losses
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mtl_optax import jacobian as _jacobian
from mtl_optax import split as _split
from mtl_optax.weighting.base import Weighting, check_num_tasks


class TaskWeighting(nnx.Module):
    """Home of a weighting's state for tiers 1 and 2 under nnx (updated in place).

    ``weights`` (an ``nnx.Variable``) holds the last task weights, ``state`` the
    weighting's own state; pass the object to the function made by
    :func:`split_value_and_grad` (inside ``nnx.jit`` too, like the model).
    """

    def __init__(self, weighting: Weighting, *, num_tasks: int):
        _split.check_weighting(weighting)
        check_num_tasks(num_tasks)
        self.weighting = nnx.static(weighting)
        self.num_tasks = num_tasks
        self.state = nnx.Variable(weighting.init(num_tasks))
        self.weights = nnx.Variable(jnp.zeros(num_tasks, jnp.float32))


def _pure(model: nnx.Module, wrt) -> tuple[Any, Any, Callable, Callable]:
    """``(params, rest, call, finish)``: the model as a function of its ``wrt`` variables.

    ``call(fn, params, rest, *args)`` runs ``fn(model_copy, *args)`` on a copy built from
    ``params`` and ``rest`` and returns ``(out, new_rest)``; ``finish(new_rest)`` writes the
    changed non-differentiated variables (RNG counts, batch statistics) back into ``model``.
    """
    graphdef, params, rest = nnx.split(model, wrt, ...)

    def call(fn, p, r, *args, **kwargs):
        copy = nnx.merge(graphdef, p, r, copy=True)
        out = fn(copy, *args, **kwargs)
        return out, nnx.split(copy, wrt, ...)[2]

    def finish(new_rest):
        nnx.update(model, new_rest)

    return params, rest, call, finish


def value_and_jacobian(
    loss_fn: Callable,
    *,
    wrt: Any = nnx.Param,
    strategy: str = "auto",
    chunk_size: int | None = None,
    has_aux: bool = False,
) -> Callable:
    """:func:`mtl_optax.value_and_jacobian` for ``loss_fn(model, *args, **kwargs) -> (K,)``.

    Returns ``f(model, *args, **kwargs) -> (losses, task_grads)`` (``((losses, aux),
    task_grads)`` with ``has_aux``); ``task_grads`` wraps an ``nnx.State`` like
    ``nnx.state(model, wrt)`` with a leading task axis. The forward pass runs once, so RNG
    streams advance once per call, as under ``nnx.value_and_grad``. Every leaf is stacked:
    ``aggregate`` then needs ``shared=`` (use :func:`split_value_and_jacobian` for a shared
    encoder).
    """
    _jacobian.check_strategy(strategy, chunk_size)

    def wrapped(model, *args, **kwargs):
        params, rest, call, finish = _pure(model, wrt)

        def losses_and_rest(p):
            out, new_rest = call(loss_fn, p, rest, *args, **kwargs)
            losses, aux = out if has_aux else (out, None)
            return losses, (aux, new_rest)

        (losses, (aux, new_rest)), task_grads = _jacobian.value_and_jacobian(
            losses_and_rest, strategy=strategy, chunk_size=chunk_size, has_aux=True
        )(params)
        finish(new_rest)
        return ((losses, aux) if has_aux else losses), task_grads

    return wrapped


def _split_forward(encode, heads, model, batch, num_tasks, wrt):
    """``(forward, finish)``: the split's forward pass on ``model``, threading the
    non-params variables from ``encode`` to ``heads`` in the order of one forward pass;
    ``finish()`` writes them back into ``model``."""
    params, rest, call, finish = _pure(model, wrt)

    def enc(p, b):
        return call(encode, p, rest, b)

    def hds(p, features, b, carry):
        return call(heads, p, carry, features, b)

    forward = _split.split_forward(enc, hds, params, batch, num_tasks)
    return forward, lambda: finish(forward.carry)


def split_value_and_jacobian(
    encode: Callable,
    heads: Callable,
    *,
    num_tasks: int,
    wrt: Any = nnx.Param,
    strategy: str = "auto",
    chunk_size: int | None = None,
) -> Callable:
    """:func:`mtl_optax.split_value_and_jacobian` for nnx: ``f(model, batch)``.

    ``encode(model, batch) -> z`` and ``heads(model, features, batch) -> (K,)`` (task i
    reads only ``features[i]``). The encoder variables are those ``encode`` reads; the
    heads' gradients arrive summed, so ``aggregate`` needs no ``shared`` mask (also after
    ``nnx.Optimizer`` re-wraps them). RNG counts and batch statistics change exactly as
    when ``heads(model, features, batch)`` follows ``encode(model, batch)`` in one forward
    pass.
    """
    check_num_tasks(num_tasks)
    _jacobian.check_strategy(strategy, chunk_size)

    def wrapped(model, batch):
        forward, finish = _split_forward(encode, heads, model, batch, num_tasks, wrt)
        task_grads = _split.split_jacobian(forward, strategy, chunk_size)
        finish()
        return forward.losses, task_grads

    return wrapped


def split_value_and_grad(
    encode: Callable,
    heads: Callable,
    *,
    wrt: Any = nnx.Param,
    gram: str = "features",
    chunk_size: int | None = None,
) -> Callable:
    """:func:`mtl_optax.split_value_and_grad` for nnx: ``f(model, task_weighting, batch)``.

    ``task_weighting`` is a :class:`TaskWeighting`; its state and ``weights`` are updated
    in place. Returns ``(losses, grads)`` (as in :func:`mtl_optax.split_value_and_grad`)
    shaped like ``nnx.state(model, wrt)``, for ``nnx.Optimizer.update(model, grads)``.
    ``gram`` and ``chunk_size`` as in :func:`mtl_optax.split_value_and_grad`; extra keyword
    arguments go to the weighting.
    """
    _split.check_gram_mode(gram, chunk_size)

    def wrapped(model, task_weighting, batch, **extra):
        if not isinstance(task_weighting, TaskWeighting):
            raise TypeError(
                "The second argument must be a mtl_optax.flax_nnx.TaskWeighting (the home of "
                "the weighting's state), e.g. TaskWeighting(mtl.mgda(), num_tasks=K); got "
                f"{type(task_weighting).__name__}."
            )
        weighting = task_weighting.weighting
        forward, finish = _split_forward(encode, heads, model, batch, task_weighting.num_tasks, wrt)
        weights, state, backward = _split.split_weights(
            forward, weighting, task_weighting.state.get_value(), gram, chunk_size, **extra
        )
        grads = _split.weighted_grads(forward, weights, backward)
        finish()
        task_weighting.state.set_value(state)
        task_weighting.weights.set_value(jax.lax.stop_gradient(weights).astype(jnp.float32))
        return forward.losses, grads

    return wrapped

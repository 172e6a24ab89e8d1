"""Flax NNX models through every entry point (optional: needs ``flax``).

``import mtl_optax.flax_nnx as mtl_nnx`` (the core package never imports flax). The four
entry points of :mod:`mtl_optax` take an ``nnx.Module`` where they take a params pytree,
differentiate with respect to the variables selected by ``wrt`` (default ``nnx.Param``) and,
like ``nnx.value_and_grad``, write every other variable the forward pass changed back into
the model: RNG counts advance (a new dropout mask each step) and BatchNorm statistics
update, exactly as after the same forward pass under ``nnx.value_and_grad``. The model is
differentiated as a pure function (``nnx.split`` / ``nnx.merge`` on a copy), so nothing
mutates a variable from inside the differentiation trace.

| | tiers 1/2 | tier 3 |
|---|---|---|
| split | :func:`split_value_and_grad` | :func:`split_value_and_jacobian` + ``mtl.aggregate`` |
| whole model | :func:`value_and_grad` | :func:`value_and_jacobian` + ``mtl.aggregate`` |

The split takes ``encoder(model, batch) -> z`` and heads as in :mod:`mtl_optax.heads`: a
sequence or dict of ``head_i(model, z, batch) -> scalar``, or
``mtl.stacked_heads(head, head_params=lambda model: model.heads)`` with the heads built by
``nnx.vmap`` and ``head(head_module_i, z, batch, task_index)`` (stacked heads run vmapped
and may hold only parameters: dropout / BatchNorm belong in the encoder).

Tier 3 keeps the method's state in the optimizer: ``nnx.Optimizer(model,
optax.chain(mtl.aggregate(method, tasks=K), tx), wrt=nnx.Param)`` then
``optimizer.update(model, task_grads, task_losses=losses)``; ``mtl.task_weights(optimizer)``
gives the last weights. Tiers 1 and 2 pass their state explicitly
(``state = grad_fn.init(model)``; ``losses, grads, state = grad_fn(model, batch, state)``)
and their ``grads`` go to any ``nnx.Optimizer``.

Checked in ``tests/test_flax_nnx.py``: dropout masks differ between consecutive steps and
the RNG counts, BatchNorm statistics and parameters after n steps equal those of the same
training written with ``nnx.value_and_grad`` and with the plain-pytree API (bit for bit).

Example::

    from flax import nnx
    import mtl_optax.flax_nnx as mtl_nnx

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.trunk = nnx.Linear(4, 8, rngs=rngs)
            self.a, self.b = nnx.Linear(8, 1, rngs=rngs), nnx.Linear(8, 1, rngs=rngs)

    def encoder(model, batch):
        return nnx.relu(model.trunk(batch["x"]))

    def head_a(model, z, batch):
        return jnp.mean((model.a(z)[:, 0] - batch["y"][:, 0]) ** 2)

    def head_b(model, z, batch):
        return jnp.mean((model.b(z)[:, 0] - batch["y"][:, 1]) ** 2)

    model = Model(nnx.Rngs(0))
    jac = mtl_nnx.split_value_and_jacobian(encoder, {"a": head_a, "b": head_b})
    optimizer = nnx.Optimizer(
        model, optax.chain(mtl.aggregate(mtl.mgda(), tasks=["a", "b"]), optax.adam(1e-3)),
        wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, batch):
        losses, task_grads = jac(model, batch)
        optimizer.update(model, task_grads, task_losses=losses)
        return losses

    losses = step(model, optimizer, batch)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

try:
    from flax import nnx
except ImportError as error:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        'mtl_optax.flax_nnx needs flax: pip install "mtl-optax[flax]" (or pip install flax).'
    ) from error

import jax
import jax.numpy as jnp

from mtl_optax import split as _split
from mtl_optax import whole_model as _whole
from mtl_optax.heads import resolve_heads, stacked_num_tasks
from mtl_optax.task_gradients import check_strategy
from mtl_optax.weighted import WeightedGradFunction, check_weighting_method


def _check_model(model: Any, where: str) -> None:
    if isinstance(model, nnx.Module):
        return
    hint = ""
    if isinstance(model, nnx.State):
        hint = " It is an nnx.State: pass the model itself (mtl_nnx splits and merges it)."
    raise TypeError(
        f"{where} takes the nnx model as first argument, got {type(model).__name__}.{hint}"
    )


def _pure(model: nnx.Module, wrt) -> tuple[Any, Any, Callable, Callable]:
    """``(params, rest, call, finish)``: the model as a function of its ``wrt`` variables.

    ``call(fn, params, rest, *args)`` runs ``fn(model_copy, *args)`` on a copy built from
    ``params`` and ``rest`` and returns ``(out, new_rest)``; ``finish(new_rest)`` writes the
    changed non-differentiated variables (RNG counts, batch statistics) back into ``model``.
    """
    graphdef, params, rest = nnx.split(model, wrt, ...)

    def merge(p, r):
        return nnx.merge(graphdef, p, r, copy=True)

    def call(fn, p, r, *args, **kwargs):
        copy = merge(p, r)
        out = fn(copy, *args, **kwargs)
        return out, nnx.split(copy, wrt, ...)[2]

    def finish(new_rest):
        nnx.update(model, new_rest)

    call.merge = merge
    return params, rest, call, finish


def _pure_split(encoder, spec, call, rest, wrt) -> _split.PureSplit:
    """The nnx split as pure functions of the ``wrt`` state (threading the rest as carry)."""
    encode = lambda p, b: call(encoder, p, rest, b)  # noqa: E731
    if spec.stacked is None:
        return _split.PureSplit(
            spec, encode, lambda i, p, z, b, carry: call(spec.fns[i], p, carry, z, b), None, None
        )
    head, select = spec.stacked

    def sub_module(p, carry):
        module = select(call.merge(p, carry))
        if not isinstance(module, nnx.Module):
            raise TypeError(
                "stacked_heads: under mtl_optax.flax_nnx, `head_params` takes the model and "
                f"returns the head module built with nnx.vmap, got {type(module).__name__}."
            )
        return nnx.split(module, wrt, ...)

    def stacked(p, batch, carry, per_task):
        graphdef, head_state, head_rest = sub_module(p, carry)
        if jax.tree_util.tree_leaves(head_rest):
            kinds = jax.tree_util.tree_leaves(
                head_rest, is_leaf=lambda x: isinstance(x, nnx.Variable)
            )
            raise ValueError(
                "stacked_heads: the head module holds variables other than the differentiated "
                f"ones ({sorted({type(v).__name__ for v in kinds})}); "
                "stacked heads run vmapped and may hold only parameters: put dropout / "
                "BatchNorm in the encoder, or give the heads as a sequence or dict."
            )
        k = stacked_num_tasks(jax.tree_util.tree_leaves(head_state))
        out = jax.vmap(
            lambda state_i, i: per_task(
                lambda s, z: head(nnx.merge(graphdef, s, head_rest), z, batch, i), state_i, i
            )
        )(head_state, jnp.arange(k))
        return out, carry

    def select_state(p):
        return sub_module(p, rest)[1]

    return _split.PureSplit(spec, encode, None, stacked, select_state)


def value_and_jacobian(
    loss_fn: Callable,
    *,
    wrt: Any = nnx.Param,
    strategy: str = "auto",
    chunk_size: int | None = None,
    has_aux: bool = False,
) -> Callable:
    """:func:`mtl_optax.value_and_jacobian` for ``loss_fn(model, *args, **kwargs) -> losses``.

    Returns ``f(model, *args, **kwargs) -> (losses, task_grads)`` (``((losses, aux),
    task_grads)`` with ``has_aux``); ``task_grads`` wraps an ``nnx.State`` like
    ``nnx.state(model, wrt)`` with a leading task axis. The forward pass runs once, so RNG
    streams advance once per call, as under ``nnx.value_and_grad``. Every leaf is stacked:
    ``aggregate`` then needs ``shared=`` (use :func:`split_value_and_jacobian` for a shared
    encoder).
    """
    check_strategy(strategy, chunk_size)

    def wrapped(model, *args, **kwargs):
        _check_model(model, "value_and_jacobian")
        params, rest, call, finish = _pure(model, wrt)

        def losses_and_rest(p):
            out, new_rest = call(loss_fn, p, rest, *args, **kwargs)
            losses, aux = out if has_aux else (out, None)
            return losses, (aux, new_rest)

        (losses, (aux, new_rest)), task_grads = _whole.value_and_jacobian(
            losses_and_rest, strategy=strategy, chunk_size=chunk_size, has_aux=True
        )(params)
        finish(new_rest)
        return ((losses, aux) if has_aux else losses), task_grads

    return wrapped


def value_and_grad(
    loss_fn: Callable,
    method,
    *,
    tasks: int | tuple[str, ...] | list[str],
    shared: Any,
    wrt: Any = nnx.Param,
    gram: str = "columns",
    chunk_size: int | None = None,
) -> WeightedGradFunction:
    """:func:`mtl_optax.value_and_grad` for ``loss_fn(model, batch) -> losses``.

    ``grad_fn.init(model) -> state``; ``grad_fn(model, batch, state) -> (losses, grads,
    state)`` with ``grads`` shaped like ``nnx.state(model, wrt)``. ``shared`` is a mask over
    ``nnx.state(model, wrt)`` (or a callable of it), as in :func:`mtl_optax.aggregate`;
    ``gram`` (``"columns"``, ``"structured"`` or ``"auto"``) and ``chunk_size`` as in
    :func:`mtl_optax.value_and_grad`.
    """
    config = _whole.whole_model_config(method, tasks, shared, gram, chunk_size)

    def step(model, batch, weighting_state, **extra):
        _check_model(model, "value_and_grad")
        params, rest, call, finish = _pure(model, wrt)
        out = _whole.whole_model_step(
            lambda p, b: call(loss_fn, p, rest, b),
            config,
            params,
            batch,
            weighting_state,
            **extra,
        )
        finish(out[-1])
        return out[:-1]

    def init(model):
        _check_model(model, "value_and_grad.init")
        return config.num_tasks, config.task_names

    return WeightedGradFunction(config.weighting, init, step, "value_and_grad")


def split_value_and_jacobian(
    encoder: Callable,
    heads: Any,
    *,
    wrt: Any = nnx.Param,
    strategy: str = "auto",
    chunk_size: int | None = None,
) -> Callable:
    """:func:`mtl_optax.split_value_and_jacobian` for nnx: ``f(model, batch)``.

    ``encoder(model, batch) -> z``; heads as in :mod:`mtl_optax.heads` with the model in
    place of params. The encoder variables are those ``encoder`` reads; each head leaf
    belongs to the heads that read it, so ``aggregate`` needs no ``shared`` mask (also after
    ``nnx.Optimizer`` re-wraps the gradients). RNG counts and batch statistics change
    exactly as when the heads follow ``encoder(model, batch)`` in one forward pass.
    """
    spec = resolve_heads(heads)
    check_strategy(strategy, chunk_size)

    def wrapped(model, batch):
        _check_model(model, "split_value_and_jacobian")
        params, rest, call, finish = _pure(model, wrt)
        forward = _split.split_forward(_pure_split(encoder, spec, call, rest, wrt), params, batch)
        task_grads = _split.split_jacobian(forward, strategy, chunk_size)
        finish(forward.carry)
        return forward.losses, task_grads

    return wrapped


def split_value_and_grad(
    encoder: Callable,
    heads: Any,
    method,
    *,
    wrt: Any = nnx.Param,
    gram: str = "features",
    chunk_size: int | None = None,
) -> WeightedGradFunction:
    """:func:`mtl_optax.split_value_and_grad` for nnx.

    ``grad_fn.init(model) -> state``; ``grad_fn(model, batch, state, **extra) -> (losses,
    grads, state)``, ``grads`` shaped like ``nnx.state(model, wrt)`` for any
    ``nnx.Optimizer``. ``gram`` and ``chunk_size`` as in
    :func:`mtl_optax.split_value_and_grad`; extra keyword arguments go to the weighting.
    """
    spec = resolve_heads(heads)
    weighting = check_weighting_method(method, "split_value_and_grad", "split_value_and_jacobian")
    _split.check_gram_mode(gram, chunk_size)

    def init(model):
        _check_model(model, "split_value_and_grad.init")
        if spec.fns is not None:
            return len(spec.fns), spec.names
        params, rest, call, _ = _pure(model, wrt)
        pure = _pure_split(encoder, spec, call, rest, wrt)
        return stacked_num_tasks(jax.tree_util.tree_leaves(pure.select(params))), None

    def step(model, batch, weighting_state, **extra):
        _check_model(model, "split_value_and_grad")
        params, rest, call, finish = _pure(model, wrt)
        forward = _split.split_forward(_pure_split(encoder, spec, call, rest, wrt), params, batch)
        grads, weights, state = _split.split_step(
            forward, weighting, weighting_state, gram, chunk_size, **extra
        )
        finish(forward.carry)
        return forward.losses, grads, weights, state, forward.names

    return WeightedGradFunction(weighting, init, step, "split_value_and_grad")

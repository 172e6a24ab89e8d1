"""Tiers 1 and 2: the weighted gradient of one step, in about one backward pass.

:func:`mtl_optax.split_value_and_grad` (split model) and :func:`mtl_optax.value_and_grad`
(whole model) build a :class:`WeightedGradFunction`: the weights come first (from the losses,
or from a Gram computed without the stacked Jacobian), then one backward pass gives the
update. Its state is the same :class:`mtl_optax.AggregateState` as ``aggregate``'s, passed
in and returned::

    grad_fn = mtl.split_value_and_grad(encoder, heads, mtl.famo())
    state = grad_fn.init(params)
    losses, grads, state = grad_fn(params, batch, state)     # grads: like params
    updates, opt_state = optax.adam(1e-3).update(grads, opt_state, params)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from mtl_optax.state import AggregateState, check_method, check_state, method_name, state_type
from mtl_optax.weighting.base import Weighting


class WeightedGrads(NamedTuple):
    losses: jax.Array  # (K,) task losses
    grads: Any  # the update direction, shaped like params
    state: AggregateState  # the new state (weights inside: mtl.task_weights(state))


def check_weighting_method(method: Any, entry: str, tier3: str) -> Weighting:
    """Tiers 1 and 2 run weightings; a stacked aggregator needs the stacked Jacobian."""
    check_method(method)
    if not isinstance(method, Weighting):
        raise TypeError(
            f"{method_name(method)} combines the stacked per-task gradients coordinate by "
            f"coordinate, so it needs tier 3: use {tier3} + mtl.aggregate instead of {entry}."
        )
    return method


def poison(losses: jax.Array, tree: Any) -> Any:
    """NaN everywhere when a task loss is not finite (``apply_if_finite`` then skips)."""
    finite = jnp.all(jnp.isfinite(losses))
    return jax.tree_util.tree_map(lambda x: jnp.where(finite, x, jnp.nan).astype(x.dtype), tree)


class WeightedGradFunction:
    """``init(params) -> state`` and ``__call__(params, batch, state, **extra) ->
    WeightedGrads`` for a tier-1/2 entry point (see the module docstring).

    ``extra`` keyword arguments go to the weighting (unknown ones are ignored). ``init`` is an
    attribute of the instance, so ``jax.jit(grad_fn).init`` exists too.
    """

    def __init__(self, method: Weighting, init: Callable, step: Callable, entry: str):
        self.method = method
        self._step = step
        self._entry = entry

        def init_state(params: Any) -> AggregateState:
            """The initial state: zero weights and the method's own initial state."""
            num_tasks, names = init(params)
            cls = state_type(method_name(method), names, True)
            return cls(jnp.zeros(num_tasks, jnp.float32), method.init(num_tasks))

        self.init = init_state

    def __call__(self, params: Any, batch: Any, state: AggregateState, **extra) -> WeightedGrads:
        state = check_state(state, self.method, None, self._entry)
        losses, grads, weights, method_state, names = self._step(
            params, batch, state.method_state, **extra
        )
        if state.names is not None and names is not None and tuple(names) != state.names:
            raise ValueError(
                f"{self._entry}: the losses hold tasks {list(names)} but the state was made "
                f"for {list(state.names)}."
            )
        if jnp.shape(losses) != jnp.shape(state.weights):
            raise ValueError(
                f"{self._entry}: the state was made for {jnp.shape(state.weights)[0]} tasks, the "
                f"model gives {jnp.shape(losses)[0]} losses; make the state with init(params)."
            )
        weights, grads = poison(losses, (jax.lax.stop_gradient(weights).astype(jnp.float32), grads))
        return WeightedGrads(
            losses, grads, state._replace(weights=weights, method_state=method_state)
        )

"""One call to apply task gradients to a flax linen ``TrainState`` (no flax import needed).

``TrainState.apply_gradients(grads=task_grads)`` works with :class:`mtl_optax.TaskGradients`
when the weighting needs no losses, but it cannot pass ``task_losses=`` to the optimizer;
:func:`apply_task_gradients` can::

    state = train_state.TrainState.create(
        apply_fn=model.apply, params=params,
        tx=optax.chain(mtl.aggregate(mtl.mgda(normalization="loss"), num_tasks=K),
                       optax.adam(1e-3)))
    losses, task_grads = jac(state.params, batch)
    state = mtl.apply_task_gradients(state, task_grads, task_losses=losses)

Checked in ``tests/test_flax_linen.py``: training through it matches the plain-pytree
optax loop bit for bit.
"""

from __future__ import annotations

from typing import Any

import optax


def apply_task_gradients(state: Any, task_grads: Any, **extra: Any) -> Any:
    """``state.apply_gradients`` that forwards ``task_losses=`` (and other extra arguments).

    ``state`` is any object with ``tx``, ``opt_state``, ``params``, ``step`` and ``replace``
    (flax's ``TrainState`` and its subclasses). Returns the new state: step + 1, params
    updated, optimizer state advanced.
    """
    for field in ("tx", "opt_state", "params", "step", "replace"):
        if not hasattr(state, field):
            raise TypeError(
                f"`state` must be a flax TrainState (it has no `{field}`), got "
                f"{type(state).__name__}."
            )
    updates, opt_state = state.tx.update(task_grads, state.opt_state, state.params, **extra)
    return state.replace(
        step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state
    )

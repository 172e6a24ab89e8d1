"""Instance-wise risk minimisation (IWRM): every example's loss is an objective.

Jacobian descent over the B per-example losses of a minibatch (Quinton & Rey, "Jacobian
Descent for Multi-Objective Optimization", 2024, sec. 5; torchjd's IWRM recipe with
``autogram.Engine(batch_dim=0)``): a Gram weighting (UPGrad, MGDA, ...) reads the B × B
Gram ``G_bc = ⟨∇L_b, ∇L_c⟩`` of the per-example gradients and returns weights ``w``; the
update is ``Σ_b w_b ∇L_b``. Here both come from one forward and one backward pass of the
structured Gram engine (:func:`mtl_optax.value_and_gram`): the Gram layer by layer from the
stored activations and output cotangents, then ``Σ_b w_b ∇L_b`` from the same stored values
(every layer's weight gradient with cotangent ``w ⊙ Δ``): no per-example gradients are held
where a layer's ghost term is cheaper, and no second backward pass through the network.

A losses-only weighting (``mtl.famo()``, ``mtl.mean_weighting()``, ...) gets its weights
from the per-example losses and the update is the gradient of ``Σ_b w_b L_b`` (the unused
Gram is dropped by XLA under jit).

Checked in ``tests/test_structured_gram_iwrm.py``: losses, weights and update equal those of
the same weighting on the Gram of ``jax.vmap(jax.grad)`` per-example gradients and
``Σ_b w_b g_b`` of them; the update feeds an optax optimizer under jit; BatchNorm in
training mode and bad arguments raise clear errors.
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp

from mtl_optax.gram import apply_weighting
from mtl_optax.structured_gram import engine
from mtl_optax.weighted import WeightedGradFunction, check_weighting_method
from mtl_optax.weighting.base import check_num_tasks


def instance_wise_value_and_grad(
    loss_fn: Callable,
    method,
    *,
    batch_size: int,
    batch_dim: int = 0,
    strategy: str = "auto",
    chunk_size: int | None = None,
) -> WeightedGradFunction:
    """IWRM in one call: per-example losses, weights from their Gram, the weighted update.

    Returns ``grad_fn`` with ``grad_fn.init(params) -> state`` (for ``batch_size`` objectives)
    and ``grad_fn(params, batch, state, **extra) -> (losses, grads, state)``, like
    :func:`mtl_optax.value_and_grad`: ``losses`` are the (B,) per-example losses, ``grads``
    (shaped like ``params``) is ``Σ_b w_b ∇L_b`` and feeds any optax optimizer,
    ``mtl.task_weights(state)`` the (B,) weights of the step. Every leaf of ``params``
    enters the Gram (there are no task heads: each example's loss depends on all of them).

    Args:
      loss_fn: ``loss_fn(params, batch) -> (B,)`` one loss per example, without reduction.
        Example ``b`` is entry ``b`` along ``batch_dim`` of every leaf of ``batch``; its loss
        may depend on example ``b`` only. Batch-coupled computations (BatchNorm in training
        mode, batch means, in-batch contrastive losses) raise
        :class:`mtl_optax.BatchCouplingError` at trace time, as torchjd's engine refuses them:
        use running statistics (``use_running_average=True``) instead. Extra shared
        arguments (an rng key): build ``grad_fn`` inside the jitted step with
        ``functools.partial(loss_fn, key=key)`` (construction only validates).
      method: any :class:`mtl_optax.Weighting`; the Gram weightings (``mtl.upgrad()``,
        ``mtl.mgda()``, ...) are what IWRM is about. Stacked aggregators need the stacked
        per-example gradients (``jax.vmap(jax.grad)`` + ``mtl.aggregate``).
      batch_size: B, the number of examples per batch (it fixes the state's shape; a batch
        of another size raises).
      batch_dim: the examples' axis in the batch leaves (default 0).
      strategy: per layer, ``"auto"`` (default: the cheaper of the ghost term and the
        layer's materialised per-example gradients), ``"ghost"`` or ``"materialize"``; see
        :func:`mtl_optax.value_and_gram`.
      chunk_size: examples per step where a parameter use falls back to per-example
        backward passes (``None``: all at once).

    Example::

        def per_example_loss(params, batch):  # (16,) losses, no reduction
            z = encoder(params, batch)
            return jnp.sum((z @ params["heads"].T - batch["y"]) ** 2, axis=1)

        grad_fn = mtl.instance_wise_value_and_grad(per_example_loss, mtl.upgrad(), batch_size=16)
        tx = optax.adam(1e-3)
        state, opt_state = grad_fn.init(params), tx.init(params)

        @jax.jit
        def train_step(params, opt_state, state, batch):
            losses, grads, state = grad_fn(params, batch, state)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, state

        params, opt_state, state = train_step(params, opt_state, state, batch)
    """
    weighting = check_weighting_method(
        method, "instance_wise_value_and_grad", "jax.vmap(jax.grad) per-example gradients"
    )
    try:
        batch_size = check_num_tasks(batch_size)
    except ValueError:
        raise ValueError(
            f"`batch_size` must be a positive int (the number of examples per batch), got "
            f"{batch_size!r}."
        ) from None
    if not isinstance(batch_dim, int) or isinstance(batch_dim, bool):
        raise TypeError(f"`batch_dim` must be an int, got {batch_dim!r}.")
    engine.check_options(batch_dim, False, strategy, chunk_size)

    def step(params, batch, method_state, **extra):
        losses, gram, log2_scale, combine = engine.run(
            loss_fn,
            params,
            (batch,),
            {},
            batch_dim=batch_dim,
            has_aux=False,
            strategy=strategy,
            chunk_size=chunk_size,
        )
        if losses.shape != (batch_size,):
            raise ValueError(
                f"instance_wise_value_and_grad(batch_size={batch_size}): the batch holds "
                f"{losses.shape[0]} examples. Pass batch_size={losses.shape[0]} (and make the "
                "state with init), or drop the last incomplete batch."
            )
        if not weighting.needs_gram:
            weights, method_state = weighting.update(None, losses, method_state, **extra)
        else:
            if weighting.needs_gram == "diagonal":
                gram = jnp.diag(jnp.diag(gram))
            weights, method_state = apply_weighting(
                weighting, gram, losses, method_state, log2_scale=log2_scale, **extra
            )
        grads = combine(weights.astype(losses.dtype))
        return losses, grads, weights, method_state, None

    return WeightedGradFunction(
        weighting, lambda params: (batch_size, None), step, "instance_wise_value_and_grad"
    )

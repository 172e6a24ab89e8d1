"""The Gram matrix of per-example (or per-task) gradients without per-example gradients.

For losses ``L_1..L_n`` of parameters θ, ``G_bc = ⟨∇L_b, ∇L_c⟩`` is what Gram-based
weightings (UPGrad, MGDA, ...) need. With one loss per example (instance-wise risk
minimisation, n = batch size) ``jax.vmap(jax.grad)`` holds n × |θ| numbers; this engine
gets ``G`` from one forward and one backward pass, layer by layer (the "ghost" trick of
differentially private training, Goodfellow 2015; Li et al. 2022; Bu et al. 2022), as
torchjd's ``autogram.Engine`` does in PyTorch:

1. The loss function is traced to a jaxpr. Every operation where a parameter-dependent,
   batch-independent value ``v`` meets the batch (``y = x @ W``, a convolution, an
   embedding lookup, ``x * scale + bias``, ...) is a *use* of the parameters it depends on.
   The example axis of every intermediate value is propagated from the batch inputs;
   operations that mix examples (BatchNorm's batch mean, any reduction, contraction,
   sort, cumulative sum or concatenation over the example axis) raise
   :class:`BatchCouplingError` naming the operation and its source line.
2. A zero probe is added to every use's output ``y``; one backward pass of ``Σ_b L_b``
   with respect to the probes gives ``Δ = ∂(Σ_b L_b)/∂y``, whose example-b slice is
   ``∂L_b/∂y_b`` (the examples do not interact). The parameters themselves are not
   differentiated: there are no weight-gradient products in this pass.
3. Per leaf, from the stored operands and ``Δ``:

   * dense / einsum / attention projections (``dot_general``), convolutions (unfolded
     patches) and embedding gathers (one-hot rows) give ``g_b = Σ_t a_bt ⊗ d_bt`` and the
     **ghost** term ``G_bc += Σ_{t,s} ⟨a_bt, a_cs⟩⟨d_bt, d_cs⟩`` (``(X Xᵀ) ⊙ (Δ Δᵀ)``
     without a sequence axis); a leaf used twice (tied embeddings: lookup and output
     projection) adds the cross terms of its two uses;
   * the leaf's per-example gradients are **materialised** instead (the operation run on
     one example at a time and differentiated, then ``G += g gᵀ``) when that is cheaper:
     with T rows per example (sequence positions, output pixels), H blocks and parameter
     groups of sizes X (input side) and Y (output side), the ghost term costs
     ``B²·T²·H·(X + Y + 1)`` and materialising ``B·T·H·X·Y + B²·|θ|`` multiply-adds
     (``strategy="auto"``, the default, takes the smaller; ``"ghost"`` /
     ``"materialize"`` force one where both apply). A 784 → 512 dense layer at B = 256
     takes the ghost term; a LeNet convolution (T = 576 output pixels) materialises;
   * any other use (elementwise scale and bias are materialised per example, which is
     cheap for their size; anything else — a parameter broadcast over the examples, a
     custom_vjp function of a parameter — differentiates the operation with the cotangent
     of one example at a time, ``chunk_size`` examples per step) falls back exactly to
     per-example gradients of that use, mapped to the leaves through the
     parameters-only computation that produced ``v`` (``v = θ²``, ``v = θ.T``, ...).

4. ``combine(w) = Σ_b w_b g_b`` (a params-shaped pytree) reuses the same operands and
   cotangents: every use's backward with cotangent ``w ⊙ Δ`` (for a dense layer
   ``Xᵀ diag(w) Δ``), no second pass through the network.
   :func:`instance_wise_value_and_grad` packages this as a training step (instance-wise
   risk minimisation: weights from a Gram weighting, then ``combine(w)``).

With ``batch_dim=None`` the function returns K task losses of any computation (examples
may interact) and the engine runs K backward passes (vmapped on accelerators, one after
another on CPU) of the probes, then ``G_ij = Σ_uses ⟨A Aᵀ, Δ_i Δ_jᵀ⟩`` — cheaper than
stacking the K gradients when the batch is small and the layers wide — or the per-task
gradient of each use, whichever costs less. ``mtl.value_and_grad(..., gram="structured")``
(or ``"auto"``) runs this on a whole model's task losses: the Gram of its shared leaves only,
the update from ``combine``, the heads by the head rule.

Checked in ``tests/test_structured_gram.py``: equal to the Gram of ``jax.vmap(jax.grad)``
(float32 within 1e-5 relative, float64 within 1e-12) on an MLP, a CNN, a transformer block
(embedding, layer norm, attention), tied embeddings, flax linen and nnx models and exotic
parameter uses; ``combine`` equal to ``Σ_b w_b`` of the per-example gradients; the task
Gram equal to :func:`mtl_optax.task_gram` of :func:`mtl_optax.value_and_jacobian`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp

from mtl_optax.structured_gram import engine
from mtl_optax.structured_gram.example_axis import BatchCouplingError
from mtl_optax.structured_gram.instance_wise import instance_wise_value_and_grad

__all__ = [
    "BatchCouplingError",
    "instance_wise_value_and_grad",
    "value_and_gram",
    "value_gram_and_combine",
]


def value_gram_and_combine(
    fn: Callable,
    *,
    batch_dim: int | None = 0,
    has_aux: bool = False,
    strategy: str = "auto",
    chunk_size: int | None = None,
) -> Callable:
    """Wrap ``fn`` to return ``(losses, gram, combine)`` (see :func:`value_and_gram`).

    ``combine(w)`` returns ``Σ_b w_b ∇L_b`` shaped like ``params``, computed from the
    operands and cotangents stored by the same call (no second backward pass). Use it
    inside the same jitted function as the call that produced it.

    Example (instance-wise UPGrad step)::

        losses, gram, combine = value_gram_and_combine(per_example_loss)(params, batch)
        weights, state = mtl.upgrad().update(gram, losses, state)
        grads = combine(weights)
    """
    engine.check_options(batch_dim, has_aux, strategy, chunk_size)

    def wrapped(params, *args, **kwargs):
        values, gram, log2_scale, combine = engine.run(
            fn,
            params,
            args,
            kwargs,
            batch_dim=batch_dim,
            has_aux=has_aux,
            strategy=strategy,
            chunk_size=chunk_size,
        )
        return values, jnp.ldexp(gram, log2_scale), combine

    return wrapped


def value_and_gram(
    fn: Callable,
    *,
    batch_dim: int | None = 0,
    has_aux: bool = False,
    strategy: str = "auto",
    chunk_size: int | None = None,
) -> Callable:
    """Wrap ``fn(params, batch, ...) -> (B,)`` to return ``(losses, G)``, G the (B, B) Gram.

    ``G_bc = ⟨∇_θ L_b, ∇_θ L_c⟩`` over every leaf of ``params`` (the first argument), from
    one forward and one backward pass (module docstring: the ghost term per layer, exact
    per-example fallbacks elsewhere).

    Args:
      fn: ``fn(params, batch, *args, **kwargs)`` returning one loss per example, without
        reduction (``(losses, aux)`` with ``has_aux``). Example ``b`` is entry ``b`` along
        axis ``batch_dim`` of every leaf of ``batch``; other arguments (rng keys, flags)
        are shared by all examples. The loss of example ``b`` must depend on example ``b``
        only (else :class:`BatchCouplingError`).
      batch_dim: the examples' axis in the batch leaves (default 0, as torchjd's
        ``Engine(batch_dim=0)``). ``None``: ``fn(params, *args) -> (K,)`` is any vector of
        task losses; ``G`` is their K × K Gram (K backward passes, no independence
        assumption), equal to ``mtl.task_gram`` of ``mtl.value_and_jacobian``.
      has_aux: ``fn`` returns ``(losses, aux)``; the wrapper returns ``((losses, aux), G)``.
      strategy: ``"auto"`` (per leaf, the cheaper of ghost term and materialised
        per-example gradients), ``"ghost"`` or ``"materialize"`` (forced where both apply).
      chunk_size: examples (tasks) per step where a use falls back to one backward per
        example (task); None: all at once (vmapped). Memory of that use: chunk × operand.

    Returns:
      ``f(params, batch, ...) -> (losses, gram)``, ``gram`` in float32 or wider, (B, B).
      Every term is formed from factors rescaled by powers of two, so ``gram`` is exact up
      to rounding wherever its entries are in range; entries beyond float32's (gradient
      norms past ~1e±19) come out 0 or ±inf, as any Gram of those gradients would.
      :func:`mtl_optax.instance_wise_value_and_grad` keeps the scale apart and weights such
      batches exactly.

    Example::

        def per_example_loss(params, batch):  # (16,) losses, no reduction
            z = encoder(params, batch)
            return jnp.sum((z @ params["heads"].T - batch["y"]) ** 2, axis=1)

        losses, gram = mtl.value_and_gram(per_example_loss)(params, batch)  # (16,), (16, 16)
        upgrad = mtl.upgrad()
        weights, _ = upgrad.update(gram, losses, upgrad.init(16))
    """
    full = value_gram_and_combine(
        fn, batch_dim=batch_dim, has_aux=has_aux, strategy=strategy, chunk_size=chunk_size
    )

    def wrapped(params, *args, **kwargs):
        values, gram, _ = full(params, *args, **kwargs)
        return values, gram

    return wrapped

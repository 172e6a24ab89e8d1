"""Learned weightings: task weights with their own parameters and optimizer.

Each keeps its parameters and an optax optimizer state inside the weighting state, so it
stays a pure, jittable, vmappable and serialisable :class:`~mtl_optax.Weighting`. The
parameters are trained inside ``update`` on their own objective, from the inputs the
weighting receives (the losses, and ``diag(G)`` for GradNorm), one optimizer step per call:

* **uncertainty weighting** (Kendall et al., CVPR 2018): log-variances ``s`` minimise
  ``Σ_i ½(e^{−s_i} L_i + s_i)`` given ``sg(L)``; weights ``w_i = ½ e^{−s_i}``; optimum
  ``s_i = log L_i``, i.e. a smoothed real-time weighting ``w_i = 1/(2 L_i)``;
* **IMTL-L** (Liu et al., ICLR 2021): scales ``s`` minimise ``Σ_i (e^{s_i} L_i − s_i)``;
  weights ``w_i = e^{s_i}``; optimum ``s_i = −log L_i`` (``w_i = 1/L_i``);
* **GradNorm** (Chen et al., ICML 2018): weights ``w`` (sum K) minimise
  ``Σ_i |w_i ‖g_i‖ − T_i|`` towards targets that give slower-training tasks larger gradients;
* **FAMO** (Liu et al., NeurIPS 2023): softmax logits learned from the observed decrease of
  the log-losses, so that all losses decrease at about the same rate.

Timing, as in the sources: UW, IMTL-L and GradNorm return the weights of the state they
received and step their parameters for the next call (the parameters and the model take
their gradient step at the same point); FAMO first updates its logits from the decrease
between the previous call's losses and the current ones, then returns the weights of the
updated logits (the source updates them after the model step, before the next one).

Checked in ``tests/test_learned_weightings.py`` against float64 NumPy transcriptions of each
method over several steps (including Adam with L2 weight decay for FAMO), the closed-form
optima of UW and IMTL-L on fixed losses, and GradNorm moving the weights towards equal
weighted gradient norms; UW, IMTL-L and FAMO also call by call against torchjd 0.18's
scalarizers (``tests/test_torchjd_scalarizer_fixtures.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtl_optax.weighting import arguments
from mtl_optax.weighting.base import Weighting, check_inputs, check_num_tasks, finish

DEFAULT_LEARNING_RATE = 1e-3


def _step(optimizer, params, opt_state, grads):
    """One optimizer step on ``params`` (the weighting's own parameters)."""
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


# --------------------------------------------------------------------------- UW and IMTL-L
class LogScaleState(NamedTuple):
    """Per-task log-scale parameters ``s`` and their optimizer state."""

    log_scale: jax.Array  # (K,)
    opt_state: Any


def _log_scale_weighting(
    objective: Callable[[jax.Array, jax.Array], jax.Array],
    weights_of: Callable[[jax.Array], jax.Array],
    optimizer: optax.GradientTransformation | None,
    init_value: float,
) -> Weighting:
    """Learned ``s`` minimising ``objective(s, sg(L))``; the model weights are ``weights_of(s)``."""
    opt = arguments.optimizer(optax.adam(DEFAULT_LEARNING_RATE) if optimizer is None else optimizer)

    def init(num_tasks):
        s = jnp.full(check_num_tasks(num_tasks), init_value, jnp.float32)
        return LogScaleState(s, opt.init(s))

    def update(gram, losses, state, **extra):
        del extra
        k, _, losses = check_inputs(weighting, gram, losses)
        arguments.same_tasks("state", state.log_scale, k)
        s = state.log_scale
        grads = jax.grad(objective)(s, jax.lax.stop_gradient(losses).astype(s.dtype))
        new_state = LogScaleState(*_step(opt, s, state.opt_state, grads))
        ok = jnp.all(jnp.isfinite(losses))
        weights = jnp.where(ok, weights_of(s), jnp.nan)
        return finish(weights.astype(losses.dtype)), arguments.unless_bad(ok, new_state, state)

    weighting = Weighting(init, update, needs_gram=False, needs_losses=True, homogeneity=0.0)
    return weighting


def uncertainty_weighting(
    *, optimizer: optax.GradientTransformation | None = None, init: float = 0.0
) -> Weighting:
    """Uncertainty weighting (UW): ``w_i = ½ e^{−s_i}`` with learned log-variances ``s``.

    The total loss of Kendall et al. is ``Σ_i ½(e^{−s_i} L_i + s_i)``. Its gradient in the
    model parameters is ``Σ_i w_i ∇L_i``, in ``s`` it is ``½(1 − e^{−s_i} L_i)``, zero at
    ``s_i = log L_i``: at its optimum UW is the real-time weighting ``1/(2 L_i)``.

    Args:
      optimizer: optax optimizer of ``s``. The sources train ``s`` with the model's own
        optimizer; the default ``optax.adam(1e-3)`` is the usual Adam setting for the
        model. ``s`` must travel ``log L_i`` from its start, so a loss of 10³ needs several
        thousand steps at this rate; pass a larger learning rate to adapt faster.
      init: initial ``s`` (default 0, ``w = ½``: the paper and torchjd; LibMTL uses −0.5).

    Example::

        w = mtl.uncertainty_weighting()
        state = w.init(2)
        weights, state = w.update(None, jnp.array([0.5, 2.0]), state)  # [0.5, 0.5]
    """
    init = arguments.real("init", init)
    return _log_scale_weighting(
        lambda s, l: jnp.sum(0.5 * (jnp.exp(-s) * l + s)),
        lambda s: 0.5 * jnp.exp(-s),
        optimizer,
        init,
    )._replace(name="uncertainty_weighting")


def imtl_l(*, optimizer: optax.GradientTransformation | None = None) -> Weighting:
    """IMTL-L: ``w_i = e^{s_i}`` with ``s`` minimising ``Σ_i (e^{s_i} L_i − s_i)``.

    The loss-balance half of Impartial Multi-Task Learning (Liu et al., ICLR 2021): the
    scaled losses ``e^{s_i} L_i`` are driven to 1 (optimum ``s_i = −log L_i``, so
    ``w_i = 1/L_i``). It is UW with ``s → −s`` and twice the weight. ``s`` starts at 0
    (plain sum), as in the paper and torchjd.

    Args:
      optimizer: optax optimizer of ``s`` (default ``optax.adam(1e-3)``; the sources train
        ``s`` with the model's optimizer, see :func:`uncertainty_weighting`).

    Example::

        w = mtl.imtl_l()
        weights, state = w.update(None, jnp.array([0.5, 2.0]), w.init(2))  # [1, 1]
    """
    return _log_scale_weighting(
        lambda s, l: jnp.sum(jnp.exp(s) * l - s),
        jnp.exp,
        optimizer,
        0.0,
    )._replace(name="imtl_l")


# --------------------------------------------------------------------------- GradNorm
class GradNormState(NamedTuple):
    weights: jax.Array  # (K,) current loss weights (sum K)
    initial_losses: jax.Array  # (K,) L_i(0), set at the first call
    step: jax.Array  # () int32
    opt_state: Any


def gradnorm(
    *,
    alpha: float = 1.5,
    optimizer: optax.GradientTransformation | None = None,
    eps: float = 1e-8,
) -> Weighting:
    """GradNorm: loss weights trained so that every task's weighted gradient norm follows
    its relative training rate.

    With ``G_i = w_i ‖g_i‖`` (``‖g_i‖² = diag(G)``, the only part of the Gram it reads),
    inverse training rates ``r_i = (L_i/L_i(0)) / mean_j(L_j/L_j(0))`` and targets
    ``T_i = mean(G)·r_i^α`` held constant, ``w`` takes one optimizer step on
    ``Σ_i |G_i − T_i|`` and is renormalised to ``Σ w_i = K`` (Chen et al., ICML 2018,
    Algorithm 1; LibMTL parametrises ``w`` by a softmax instead, we follow the paper).
    ``w`` starts at 1 and ``L(0)`` is the loss of the first call.

    Args:
      alpha: asymmetry α (default 1.5, the paper's choice for NYUv2); 0 asks for equal
        weighted gradient norms.
      optimizer: optax optimizer of ``w`` (default ``optax.adam(1e-3)``; the paper and LibMTL
        train ``w`` with the model's optimizer).
      eps: initial losses (and the mean loss ratio) below ``eps`` count as ``eps``, so
        zero losses give finite weights.

    The optimizer step on ``w`` depends on the absolute gradient norms (with a non-adaptive
    optimizer its size scales with them), so ``homogeneity`` is None: in tier 3 the
    weighting sees the true ``diag(G)``.
    Runs in tiers 2 and 3 (``needs_gram="diagonal"``).

    Example::

        w = mtl.gradnorm()
        weights, state = w.update(jnp.diag(jnp.array([4.0, 1.0])), jnp.array([1.0, 2.0]),
                                  w.init(2))  # [1, 1]; state.weights moved towards task 1
    """
    alpha = arguments.real("alpha", alpha, low=0.0, strict=False)
    eps = arguments.real("eps", eps, low=0.0)
    opt = arguments.optimizer(optax.adam(DEFAULT_LEARNING_RATE) if optimizer is None else optimizer)

    def init(num_tasks):
        k = check_num_tasks(num_tasks)
        weights = jnp.ones(k, jnp.float32)
        return GradNormState(
            weights, jnp.ones(k, jnp.float32), jnp.zeros((), jnp.int32), opt.init(weights)
        )

    def update(gram, losses, state, **extra):
        del extra
        k, gram, losses = check_inputs(weighting, gram, losses)
        arguments.same_tasks("state", state.weights, k)
        dtype = state.weights.dtype
        norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0)).astype(dtype)
        ok = jnp.all(jnp.isfinite(losses)) & jnp.all(jnp.isfinite(norms))
        weights = finish(jnp.where(ok, state.weights, jnp.nan).astype(losses.dtype))
        losses = losses.astype(dtype)
        initial = jnp.where(state.step == 0, losses, state.initial_losses)
        ratio = losses / jnp.maximum(initial, eps)
        rate = ratio / jnp.maximum(jnp.mean(ratio), eps)

        def objective(w):
            weighted_norms = w * norms
            target = jax.lax.stop_gradient(jnp.mean(weighted_norms) * rate**alpha)
            return jnp.sum(jnp.abs(weighted_norms - target))

        grads = jax.grad(objective)(state.weights)
        new_w, opt_state = _step(opt, state.weights, state.opt_state, grads)
        new_w = k * new_w / jnp.sum(new_w)
        new_state = GradNormState(new_w, initial, state.step + 1, opt_state)
        return weights, arguments.unless_bad(ok, new_state, state)

    # The paper and LibMTL train every parameter on Σ w_i L_i: the heads get w_i ∇L_i too.
    weighting = Weighting(
        init,
        update,
        needs_gram="diagonal",
        needs_losses=True,
        homogeneity=None,
        scalarization=True,
    )
    return weighting


# --------------------------------------------------------------------------- FAMO
class FAMOState(NamedTuple):
    logits: jax.Array  # (K,) ξ
    opt_state: Any
    previous_losses: jax.Array  # (K,) ℓ = L − b + ε of the previous call
    step: jax.Array  # () int32


def famo(
    *,
    optimizer: optax.GradientTransformation | None = None,
    min_losses=None,
    eps: float = 1e-8,
) -> Weighting:
    """FAMO: fast adaptive multitask optimization (Liu et al., NeurIPS 2023).

    Logits ``ξ`` (init 0), ``z = softmax(ξ)``; with ``ℓ_i = L_i − b_i + ε`` the weights are

        ``w_i = z_i / (c·ℓ_i)``,  ``c = Σ_j z_j/ℓ_j``,

    the gradient of ``Σ_i z_i log ℓ_i / c`` (``c`` held constant): a convex combination
    of the log-loss gradients. Each call (after the first) first updates ``ξ`` from the
    observed decrease ``δ_i = log ℓ_i(previous call) − log ℓ_i(now)``: the gradient
    ``J_softmax(ξ)ᵀ δ`` takes one optimizer step, so tasks whose loss fell faster get less
    weight. The previous losses come from the previous minibatch (the source recomputes
    them on the same batch after the step, which costs a second forward pass).

    Args:
      optimizer: optimizer of ``ξ``. Default: Adam with learning rate 0.025 and L2 weight
        decay 1e-3 added to the gradient (``optax.chain(optax.add_decayed_weights(1e-3),
        optax.adam(0.025))``, PyTorch's ``Adam(weight_decay=)``); the paper's Algorithm 2,
        LibMTL and torchjd use 1e-3, the official code 1e-5.
      min_losses: known minimum losses ``b`` (K,), default 0.
      eps: ε (default 1e-8, as the sources).

    A loss below its minimum ``b_i`` raises a ``ValueError`` when concrete and gives NaN
    weights under ``jit``.

    Example::

        w = mtl.famo()
        state = w.init(2)
        weights, state = w.update(None, jnp.array([1.0, 4.0]), state)  # [0.8, 0.2]

    The weights always sum to 1 (``Σ_i z_i/(c ℓ_i) = 1``).
    """
    eps = arguments.real("eps", eps, low=0.0)
    opt = arguments.optimizer(
        optax.chain(optax.add_decayed_weights(1e-3), optax.adam(0.025))
        if optimizer is None
        else optimizer
    )
    if min_losses is not None:
        minimum = np.asarray(min_losses, np.float32)
        if minimum.ndim != 1 or not np.all(np.isfinite(minimum)):
            raise ValueError(
                f"`min_losses` must be a finite 1-D sequence (one per task), got {min_losses!r}."
            )

    def init(num_tasks):
        k = check_num_tasks(num_tasks)
        if min_losses is not None:
            arguments.same_tasks("`min_losses`", minimum, k)
        logits = jnp.zeros(k, jnp.float32)
        return FAMOState(
            logits, opt.init(logits), jnp.ones(k, jnp.float32), jnp.zeros((), jnp.int32)
        )

    def update(gram, losses, state, **extra):
        del extra
        k, _, losses = check_inputs(weighting, gram, losses)
        arguments.same_tasks("state", state.logits, k)
        gap = losses.astype(state.logits.dtype)
        if min_losses is not None:
            arguments.same_tasks("`min_losses`", minimum, k)
            gap = gap - minimum
        valid = arguments.non_negative(gap, method="famo (loss minus `min_losses`)")
        shifted = gap + eps
        decrease = jnp.log(state.previous_losses) - jnp.log(shifted)
        _, softmax_vjp = jax.vjp(jax.nn.softmax, state.logits)
        (grads,) = softmax_vjp(decrease)
        stepped = _step(opt, state.logits, state.opt_state, grads)
        first = state.step == 0
        logits, opt_state = jax.tree_util.tree_map(
            lambda old, new: jnp.where(first, old, new), (state.logits, state.opt_state), stepped
        )
        z = jax.nn.softmax(logits)
        weights = z / (jnp.sum(z / shifted) * shifted)
        ok = jnp.all(valid & jnp.isfinite(gap))
        new_state = FAMOState(logits, opt_state, shifted, state.step + 1)
        weights = jnp.where(ok, weights, jnp.nan)
        return finish(weights.astype(losses.dtype)), arguments.unless_bad(ok, new_state, state)

    weighting = Weighting(init, update, needs_gram=False, needs_losses=True, homogeneity=0.0)
    return weighting

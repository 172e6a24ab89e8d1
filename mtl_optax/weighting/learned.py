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
  ``Σ_i |w_i ‖g_i‖ − T_i|`` towards targets that give slower-training tasks larger gradients
  (the paper's Algorithm 1, or LibMTL's softmax parametrisation and first-epoch warm-up);
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
    initial_losses: jax.Array  # (K,) L_i(0) (summed over the warm-up while it lasts)
    step: jax.Array  # () int32
    opt_state: Any
    logits: jax.Array  # (K,) trained logits with parametrization="softmax" (else unused, 0)


_GRADNORM_PARAMETRIZATIONS = ("weights", "softmax")


def gradnorm(
    *,
    alpha: float = 1.5,
    optimizer: optax.GradientTransformation | None = None,
    warmup: int = 0,
    parametrization: str = "weights",
    eps: float = 1e-8,
) -> Weighting:
    """GradNorm: loss weights trained so that every task's weighted gradient norm follows
    its relative training rate.

    With ``G_i = w_i ‖g_i‖`` (``‖g_i‖² = diag(G)``, the only part of the Gram it reads),
    inverse training rates ``r_i = (L_i/L_i(0)) / mean_j(L_j/L_j(0))`` and targets
    ``T_i = mean(G)·r_i^α`` held constant, ``w`` takes one optimizer step on
    ``Σ_i |G_i − T_i|`` and is renormalised to ``Σ w_i = K``.

    Defaults follow the paper (Chen et al., ICML 2018, Algorithm 1; there is no code by the
    authors): ``w`` starts at 1, ``L(0)`` is the loss of the first call and ``w`` is
    trained from the first call on. LibMTL (its own implementation) differs in three ways,
    each reachable here: ``w = K·softmax(ξ)`` with the logits ``ξ`` trained
    (``parametrization="softmax"``), equal weights and no training during the first epoch,
    whose mean loss is ``L(0)`` (``warmup=`` the steps of an epoch), and the model's
    optimizer on ``ξ`` (``optimizer=``; LibMTL's default is Adam, lr 1e-4, weight decay
    1e-5, applied to the model and ``ξ`` together).

    Args:
      alpha: asymmetry α (default 1.5, the paper's choice for NYUv2 and LibMTL's default);
        0 asks for equal weighted gradient norms.
      optimizer: optax optimizer of ``w`` (or ``ξ``); default ``optax.adam(1e-3)`` (the
        paper trains ``w`` with the model's optimizer).
      warmup: calls with ``w = 1`` and no training whose mean loss is ``L(0)`` (default 0:
        ``L(0)`` is the first call's loss, as in the paper).
      parametrization: ``"weights"`` (default, the paper: ``w`` itself, renormalised to sum
        K after each step) or ``"softmax"`` (LibMTL: ``w = K·softmax(ξ)``, ``ξ`` from 0).
      eps: initial losses (and the mean loss ratio) below ``eps`` count as ``eps``, so
        zero losses give finite weights.

    Negative losses are an error (NaN weights under ``jit``): training rates are ratios of
    losses. The optimizer step depends on the absolute gradient norms (with a non-adaptive
    optimizer its size scales with them), so ``homogeneity`` is None: in tier 3 the
    weighting sees the true ``diag(G)``. Runs in tiers 2 and 3 (``needs_gram="diagonal"``).

    Checked in ``tests/test_learned_weightings.py`` against a float64 transcription of
    Algorithm 1 and in ``tests/test_reference_fixtures.py`` call by call against LibMTL's
    ``GradNorm`` (``warmup=2, parametrization="softmax"``, SGD on both sides).

    Example::

        w = mtl.gradnorm()
        weights, state = w.update(jnp.diag(jnp.array([4.0, 1.0])), jnp.array([1.0, 2.0]),
                                  w.init(2))  # [1, 1]; state.weights moved towards task 1
    """
    alpha = arguments.real("alpha", alpha, low=0.0, strict=False)
    eps = arguments.real("eps", eps, low=0.0)
    warmup = arguments.non_negative_int("warmup", warmup)
    if parametrization not in _GRADNORM_PARAMETRIZATIONS:
        raise ValueError(
            f"`parametrization` must be one of {_GRADNORM_PARAMETRIZATIONS}, got "
            f"{parametrization!r}."
        )
    softmax = parametrization == "softmax"
    opt = arguments.optimizer(optax.adam(DEFAULT_LEARNING_RATE) if optimizer is None else optimizer)

    def weights_of(params):
        return params.shape[0] * jax.nn.softmax(params) if softmax else params

    def init(num_tasks):
        k = check_num_tasks(num_tasks)
        weights, logits = jnp.ones(k, jnp.float32), jnp.zeros(k, jnp.float32)
        initial = jnp.zeros(k, jnp.float32)
        step = jnp.zeros((), jnp.int32)
        return GradNormState(
            weights, initial, step, opt.init(logits if softmax else weights), logits
        )

    def update(gram, losses, state, **extra):
        del extra
        k, gram, losses = check_inputs(weighting, gram, losses)
        arguments.same_tasks("state", state.weights, k)
        valid = arguments.non_negative(
            losses, method="gradnorm", reason="divides the task losses by their initial values"
        )
        dtype = state.weights.dtype
        norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0)).astype(dtype)
        ok = jnp.all(valid & jnp.isfinite(losses)) & jnp.all(jnp.isfinite(norms))
        weights = finish(jnp.where(ok, state.weights, jnp.nan).astype(losses.dtype))
        losses = losses.astype(dtype)
        training = state.step >= warmup
        first = state.step == warmup
        mean_of_warmup = state.initial_losses / max(warmup, 1)
        initial = jnp.where(first, mean_of_warmup if warmup else losses, state.initial_losses)
        ratio = losses / jnp.maximum(initial, eps)
        rate = ratio / jnp.maximum(jnp.mean(ratio), eps)
        params = state.logits if softmax else state.weights

        def objective(p):
            weighted_norms = weights_of(p) * norms
            target = jax.lax.stop_gradient(jnp.mean(weighted_norms) * rate**alpha)
            return jnp.sum(jnp.abs(weighted_norms - target))

        new_params, opt_state = _step(opt, params, state.opt_state, jax.grad(objective)(params))
        new_w = weights_of(new_params) if softmax else k * new_params / jnp.sum(new_params)
        trained = GradNormState(
            new_w, initial, state.step + 1, opt_state, new_params if softmax else state.logits
        )
        warming = state._replace(initial_losses=state.initial_losses + losses, step=state.step + 1)
        new_state = jax.tree_util.tree_map(lambda a, b: jnp.where(training, a, b), trained, warming)
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
    learning_rate: float | None = None,
    weight_decay: float | None = None,
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

    Defaults follow the authors' ``famo.py`` (Cranial-XIX/FAMO, the file its README points
    users to): Adam on ``ξ`` with learning rate 0.025 and L2 weight decay 0.01 added to the
    gradient (PyTorch's ``Adam(weight_decay=)``). Other sources: LibMTL and torchjd use
    weight decay 1e-3 (``weight_decay=1e-3``), the authors' ``methods/weight_methods.py``
    1e-5 and their experiment scripts 1e-3 (NYUv2, CelebA, QM9) or 0.01 (Cityscapes).

    ``famo.py`` also clips the model's shared gradient to global norm 1
    (``max_norm=1.0``). That acts on the update, not on the weights, and FAMO never sees the
    gradients (it runs in tier 1), so it belongs to the training loop: add
    ``optax.clip_by_global_norm(1.0)`` (masked to the shared parameters, e.g. with
    ``optax.masked``) before the optimizer to match it. The authors' experiment trainer
    (``methods/weight_methods.py``) calls the clip before the backward pass, where it has no
    effect; LibMTL and torchjd do not clip.

    Args:
      optimizer: optimizer of ``ξ`` (overrides ``learning_rate`` / ``weight_decay``, which
        must then be left unset).
      learning_rate: Adam learning rate of ``ξ`` (default 0.025, every source).
      weight_decay: L2 weight decay of ``ξ`` added to its gradient (default 0.01).
      min_losses: known minimum losses ``b`` (K,), default 0.
      eps: ε (default 1e-8, as the sources).

    A loss below its minimum ``b_i`` raises a ``ValueError`` when concrete and gives NaN
    weights under ``jit``.

    Checked in ``tests/test_learned_weightings.py`` against a float64 transcription with
    PyTorch-style Adam, call by call against torchjd's ``FAMO``
    (``tests/test_torchjd_scalarizer_fixtures.py``), LibMTL's ``FAMO`` and ``famo.py``
    itself, including its clipped update (``tests/test_reference_fixtures.py``).

    Example::

        w = mtl.famo()
        state = w.init(2)
        weights, state = w.update(None, jnp.array([1.0, 4.0]), state)  # [0.8, 0.2]

    The weights always sum to 1 (``Σ_i z_i/(c ℓ_i) = 1``).
    """
    eps = arguments.real("eps", eps, low=0.0)
    if optimizer is not None and (learning_rate is not None or weight_decay is not None):
        raise ValueError(
            "famo: pass either `optimizer` or `learning_rate`/`weight_decay`, not both (the "
            "optimizer replaces the default Adam they configure)."
        )
    if optimizer is None:
        lr = arguments.real("learning_rate", 0.025 if learning_rate is None else learning_rate,
                            low=0.0)  # fmt: skip
        decay = 0.01 if weight_decay is None else weight_decay
        decay = arguments.real("weight_decay", decay, low=0.0, strict=False)
        optimizer = optax.chain(optax.add_decayed_weights(decay), optax.adam(lr))
    opt = arguments.optimizer(optimizer)
    if min_losses is not None:
        minimum = arguments.real_vector("min_losses", min_losses).astype(np.float32)

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

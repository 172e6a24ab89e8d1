"""Methods that read the stacked per-task gradients themselves (tier 3 only).

These methods look at the gradients coordinate by coordinate or keep per-task gradient
state, so they are not functions of the Gram matrix and cannot be ``Weighting`` s. They are
used exactly like every other method, through :func:`mtl_optax.aggregate`
(``mtl.aggregate(mtl.trimmed_mean(trim=1), tasks=K)``), on the gradients of
:func:`mtl_optax.value_and_jacobian` (with a ``shared`` mask) or of
:func:`mtl_optax.split_value_and_jacobian`. They combine the shared leaves; the heads follow
``aggregate``'s head rule with the scale each method states (1: head ``i`` gets ``∇L_i``).

* :func:`trimmed_mean` (Yin et al., 2018): coordinate-wise mean after dropping the ``trim``
  largest and ``trim`` smallest values.
* :func:`graddrop` (Chen et al., 2020, "Just Pick a Sign"): random sign-consistency masks.
* :func:`db_mtl` (Lin et al., 2023, "Dual-Balancing Multi-Task Learning"): log-loss
  gradients, an EMA per task, each rescaled to the largest EMA norm.
* :func:`excess_mtl` (He et al., 2024, "Robust Multi-Task Learning with Excess Risks"):
  exponentiated-gradient weights from AdaGrad-style excess-risk estimates, which need the
  per-coordinate squared gradients (state shaped like the shared parameters, times K).
* :func:`moco` (Fernando et al., 2023, "Mitigating Gradient Bias in Multi-objective
  Learning"): tracked (averaged, loss-scaled) task gradients, combined with weights from
  their Gram.

A ``StackedAggregator`` is a pair of pure functions:

* ``init(num_tasks, shapes) -> state``: ``shapes`` has one entry per parameter leaf, a
  ``jax.ShapeDtypeStruct`` when the leaf may be shared, ``None`` when it is known not to be;
* ``update(leaves, losses, state, **extra) -> (combined, weights, head_scale, state)``:
  ``leaves`` has one entry per parameter leaf, the stacked ``(K, *shape)`` gradients of a
  shared leaf or ``None``; ``combined`` the combined shared leaves (``None`` elsewhere);
  ``weights`` (K,) for logging (ignored unless ``has_weights``); ``head_scale`` the (K,)
  factors ``c`` of the head rule.

Property summary (tested in ``tests/test_aggregator_properties.py``): none is
non-conflicting; trimmed mean is linear under gradient scaling and deterministic; GradDrop
is linear under scaling of all gradients by ``c > 0`` and random; DB-MTL is linear under
scaling (its rescaling uses ratios of norms) and stateful; ExcessMTL is neither.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mtl_optax.gram import task_gram
from mtl_optax.weighting.base import check_num_tasks
from mtl_optax.weighting.hyper import check_int, check_key, check_real
from mtl_optax.weighting.tracking import MoCoWeightsState, moco_weights


class StackedAggregator(NamedTuple):
    """A method on stacked per-task gradients (see the module docstring)."""

    init: Callable[..., Any]
    update: Callable[..., tuple]
    needs_losses: bool = False
    has_weights: bool = False


def accumulation_dtype(leaf):
    return jnp.promote_types(leaf.dtype, jnp.float32)


def _ones(k):
    return jnp.ones(k, jnp.float32)


def _per_leaf_zeros(k, shapes):
    """``(K, *shape)`` zeros (float32 or wider) per candidate shared leaf, ``None`` elsewhere
    (an empty subtree: checkpointers refuse zero-size arrays)."""
    return tuple(
        jnp.zeros((k, *s.shape), accumulation_dtype(s)) if s is not None else None for s in shapes
    )


class TrimmedMeanState(NamedTuple):
    """Trimmed mean keeps no state."""


def trimmed_mean(*, trim: int) -> StackedAggregator:
    """Coordinate-wise trimmed mean over the tasks.

    Args:
      trim: values dropped at each end of every coordinate (``2 · trim`` in all); needs
        ``K ≥ 2 · trim + 1`` (checked when the state is made).

    Stateless, deterministic, linear under gradient scaling, permutation invariant; no task
    weights (``task_weights`` reports NaN); heads get ``∇L_i``. Checked in
    ``tests/test_stacked.py`` against ``scipy.stats.trim_mean`` and the torchjd fixtures.

    Example::

        opt = optax.chain(mtl.aggregate(mtl.trimmed_mean(trim=1), tasks=5), optax.adam(1e-3))
    """
    trim = check_int("trim", trim, low=0)

    def init(num_tasks, shapes):
        del shapes
        k = check_num_tasks(num_tasks)
        if k < 2 * trim + 1:
            raise ValueError(
                f"trimmed_mean drops 2 * trim = {2 * trim} of {k} values per coordinate; it "
                f"needs at least 2 * trim + 1 = {2 * trim + 1} tasks. Lower `trim`."
            )
        return TrimmedMeanState()

    def update(leaves, losses, state, **extra):
        del losses, extra
        k = next(x.shape[0] for x in leaves if x is not None)
        combined = [
            None if x is None else jnp.mean(jnp.sort(x, axis=0)[trim : k - trim], axis=0)
            for x in leaves
        ]
        return combined, _ones(k), _ones(k), state

    return StackedAggregator(init, update)


class GradDropState(NamedTuple):
    key: jax.Array  # the PRNG key of the next step


def graddrop(*, key: jax.Array, leak: float | Any = 0.0) -> StackedAggregator:
    """GradDrop: keep, per coordinate, only the gradients of one randomly chosen sign.

    Per coordinate, ``P = ½(1 + Σ_i g_i / Σ_i |g_i|)`` (the positive-sign purity) and
    ``U ~ Uniform(0, 1)``; task i's value is kept when ``P > U`` and ``g_i > 0`` or
    ``P < U`` and ``g_i < 0``; the update is ``Σ_i (ℓ_i + (1 − ℓ_i) M_i) g_i`` with leak
    ``ℓ`` (as in torchjd, with the identity purity transform; coordinates where every task's
    gradient is 0 give 0).

    Args:
      key: JAX PRNG key, kept in the state and split at every step.
      leak: scalar or (K,) leak in [0, 1] (default 0: no leak; 1 gives the sum).

    No task weights (``task_weights`` reports NaN); heads get ``∇L_i``. Checked in
    ``tests/test_stacked.py`` against a NumPy transcription fed the same uniform draws, and
    leak = 1 → the sum.

    Example::

        method = mtl.graddrop(key=jax.random.PRNGKey(0))
        opt = optax.chain(mtl.aggregate(method, tasks=3), optax.sgd(0.1))
    """
    key = check_key(key)
    leak_array = np.asarray(leak, dtype=object if isinstance(leak, str) else None)
    if isinstance(leak, (bool, str)) or not np.issubdtype(leak_array.dtype, np.number):
        raise TypeError(f"`leak` must be a real scalar or a (K,) array in [0, 1], got {leak!r}.")
    leak_array = leak_array.astype(np.float64)
    if leak_array.ndim > 1 or not np.all((leak_array >= 0) & (leak_array <= 1)):  # rejects NaN
        raise ValueError(f"`leak` must be a scalar or a (K,) array in [0, 1], got {leak!r}.")

    def init(num_tasks, shapes):
        del shapes
        k = check_num_tasks(num_tasks)
        if leak_array.shape not in ((), (k,)):
            raise ValueError(
                f"`leak` must be a scalar or shape ({k},), got shape {leak_array.shape}."
            )
        return GradDropState(key=key)

    def update(leaves, losses, state, **extra):
        del losses, extra
        k = next(x.shape[0] for x in leaves if x is not None)
        leak_values = jnp.asarray(np.broadcast_to(leak_array, (k,)), jnp.float32)
        next_key, sub = jax.random.split(state.key)
        keys = jax.random.split(sub, len(leaves))

        def combine(index, leaf):
            total, magnitude = jnp.sum(leaf, axis=0), jnp.sum(jnp.abs(leaf), axis=0)
            purity = 0.5 * (1.0 + total / jnp.where(magnitude > 0, magnitude, 1.0))
            uniform = jax.random.uniform(keys[index], purity.shape, leaf.dtype)
            keep = ((purity > uniform) & (leaf > 0)) | ((purity < uniform) & (leaf < 0))
            lk = leak_values.astype(leaf.dtype).reshape((k,) + (1,) * (leaf.ndim - 1))
            return jnp.sum((lk + (1.0 - lk) * keep) * leaf, axis=0)

        combined = [None if x is None else combine(i, x) for i, x in enumerate(leaves)]
        return combined, _ones(k), _ones(k), GradDropState(next_key)

    return StackedAggregator(init, update)


class DBMTLState(NamedTuple):
    count: jax.Array  # int32 steps taken
    buffers: tuple  # per leaf: (K, *shape) gradient EMA for shared leaves, None otherwise


def check_losses(losses, name):
    if losses is None:
        raise ValueError(
            f"{name} needs the task losses: pass `task_losses=losses` to the optimizer's update."
        )


def db_mtl(*, beta: float = 0.9, beta_sigma: float = 0.0, eps: float = 1e-8) -> StackedAggregator:
    """DB-MTL: balance log-loss gradients by their EMA norms (needs ``task_losses=``).

    Step t: task gradients of ``log(L_i + eps)``, ``h_i = g_i/(L_i + eps)``; per-task EMA
    ``b_i ← h_i + (β/t^σ)(b_i − h_i)`` (state, init 0); shared update
    ``Σ_i (max_j‖b_j‖/‖b_i‖) b_i`` (norms over all shared leaves; a zero EMA gets weight 0).
    Heads get ``h_i`` (``c_i = 1/(L_i + eps)``: the gradient of ``Σ log(L_i + eps)``, as
    LibMTL's per-task backward passes of the log-losses give them).

    Defaults follow the authors' code, LibMTL's ``DB_MTL`` (the DB-MTL authors maintain
    LibMTL) with its configuration: β = 0.9, σ = 0 (``DB_beta_sigma=0``: a constant EMA
    rate), ε = 1e-8. One deliberate difference: LibMTL divides by ``‖b_i‖ + 1e-8``; here the
    ratio is exact (a zero EMA gets weight 0), which keeps the update linear under gradient
    scaling; the two differ only for EMA norms near 1e-8.

    Args:
      beta: EMA rate β in [0, 1] (0.9).
      beta_sigma: decay σ ≥ 0 of the rate ``β/t^σ`` (0, LibMTL's configuration; its
        argparse help has no other default).
      eps: ε > 0 added to the losses before the logarithm (LibMTL's 1e-8); 0 is rejected
        (a zero loss would give an infinite gradient).

    Negative losses (``L_i + eps ≤ 0``) raise a ``ValueError`` when concrete and give NaN
    updates under ``jit`` (the state unchanged): the method takes ``log(L_i + eps)``.
    No weights of the current gradients (``task_weights`` reports NaN). Checked in
    ``tests/test_stacked.py`` against a NumPy transcription over several steps and in
    ``tests/test_reference_fixtures.py`` against LibMTL's ``DB_MTL`` (σ = 0 and 0.5).

    Example::

        opt = optax.chain(mtl.aggregate(mtl.db_mtl(), tasks=K, shared=mask), optax.adam(1e-3))
        s = opt.init(params)
        updates, s = opt.update(task_grads, s, params, task_losses=losses)
    """
    beta = check_real("beta", beta, low=0.0, high=1.0)
    beta_sigma = check_real("beta_sigma", beta_sigma, low=0.0)
    if isinstance(eps, (int, float)) and not isinstance(eps, bool) and eps == 0:
        raise ValueError(
            "`eps` must be > 0: db_mtl takes log(L_i + eps), so a zero loss with eps=0 gives an "
            "infinite gradient; use the default 1e-8 (LibMTL's)."
        )
    eps = check_real("eps", eps, low=0.0, low_open=True)

    def init(num_tasks, shapes):
        k = check_num_tasks(num_tasks)
        return DBMTLState(count=jnp.zeros((), jnp.int32), buffers=_per_leaf_zeros(k, shapes))

    def update(leaves, losses, state, **extra):
        del extra
        check_losses(losses, "db_mtl")
        k = losses.shape[0]
        shifted = jnp.asarray(losses, jnp.float32) + eps
        if not isinstance(shifted, jax.core.Tracer) and bool(np.any(np.asarray(shifted) <= 0)):
            raise ValueError(
                f"db_mtl takes log(L_i + eps), so every loss must be > -eps; got "
                f"{np.asarray(losses)}. Shift the losses (or use a method without logarithms)."
            )
        ok = jnp.all(shifted > 0) & jnp.all(jnp.isfinite(shifted))
        count = state.count + 1
        rate = beta / count.astype(jnp.float32) ** beta_sigma
        scale = jnp.where(ok, 1.0 / shifted, jnp.nan)
        buffers = []
        for leaf, old in zip(leaves, state.buffers):
            if leaf is None:
                buffers.append(old)
                continue
            leaf = leaf.astype(accumulation_dtype(leaf))
            h = leaf * scale.astype(leaf.dtype).reshape((k,) + (1,) * (leaf.ndim - 1))
            buffers.append(h + rate.astype(h.dtype) * (old.astype(h.dtype) - h))
        squares = [
            jnp.sum(b.reshape(k, -1) ** 2, axis=1)
            for leaf, b in zip(leaves, buffers)
            if leaf is not None
        ]
        norms = jnp.sqrt(sum(squares))
        top = jnp.max(norms)
        alpha = jnp.where(norms > 0, top / jnp.where(norms > 0, norms, 1.0), 0.0)
        combined = [
            None if leaf is None else jnp.tensordot(alpha.astype(b.dtype), b, axes=1)
            for leaf, b in zip(leaves, buffers)
        ]
        new_state = DBMTLState(count=count, buffers=tuple(buffers))
        new_state = jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new_state, state)
        return combined, alpha, scale, new_state

    return StackedAggregator(init, update, needs_losses=True)


class ExcessMTLState(NamedTuple):
    count: jax.Array  # int32 calls so far
    weights: jax.Array  # (K,) simplex weights p (init 1/K); the method returns K·p or p
    baseline: jax.Array  # (K,) excess risk of the first post-warm-up call (or warm-up mean)
    warmup_sum: jax.Array  # (K,) summed excess risks of the warm-up calls
    squares: tuple  # per leaf: (K, *shape) summed squared gradients (shared), None otherwise


def excess_mtl(
    *,
    robust_step_size: float = 1e-2,
    n_warmup_steps: int = 0,
    scale_by_num_tasks: bool = True,
    update_first_call: bool = False,
) -> StackedAggregator:
    """ExcessMTL: weights by exponentiated gradient on estimated excess risks.

    Per call: ``S_i += g_i²`` (coordinate-wise, state); excess risk
    ``e_i = Σ g_i² / √(S_i + 1e-7)`` (a diagonal-Hessian estimate). Simplex weights ``p``
    (from ``1/K``) take the exponentiated-gradient step ``p ← softmax(log p + η·e/e₀)`` with a
    baseline ``e₀``; the update is ``Σ w_i g_i`` with ``w = K·p`` (or ``p``).

    Defaults follow the authors' code (uiuctml/ExcessMTL; LibMTL's ``ExcessMTL`` is the
    same): step size ``η = 1e-2``, weights from 1 (sum K), and the first call only records
    ``e₀`` (no weight update). torchjd: ``robust_step_size=1.0, scale_by_num_tasks=False,
    update_first_call=True`` (simplex weights; the first call steps with the raw ``e``); its
    ``n_warmup_steps`` (uniform weights while ``e`` is averaged into ``e₀``) is available too.
    The baseline division adds 1e-7 (torchjd's; the authors divide by ``e₀`` alone).
    Heads get ``∇L_i`` (the library's head rule; the authors' weighted loss gives them
    ``w_i ∇L_i``); ``task_weights`` reports ``w``.

    Args:
      robust_step_size: exponentiated-gradient step ``η`` (> 0; 1e-2 the authors', 1.0
        torchjd's).
      n_warmup_steps: calls with uniform weights that only collect statistics (≥ 0; the
        baseline is then their mean excess risk and the next call steps).
      scale_by_num_tasks: weights summing to K, as the authors' (default), or to 1.
      update_first_call: without warm-up, step at the first call with the unscaled ``e``
        (torchjd) instead of only recording the baseline (the authors).

    The absolute ``1e-7`` constants make it not linear under gradient scaling. Checked in
    ``tests/test_stacked.py`` against a NumPy transcription over several calls (with and
    without warm-up), the torchjd fixture sequences and LibMTL's ``ExcessMTL``
    (``tests/test_reference_fixtures.py``).

    Example::

        opt = optax.chain(mtl.aggregate(mtl.excess_mtl(), tasks=K, shared=mask), optax.adam(1e-3))
        updates, s = opt.update(task_grads, opt.init(params), params)
    """
    step_size = check_real("robust_step_size", robust_step_size, low=0.0, low_open=True)
    warmup = check_int("n_warmup_steps", n_warmup_steps, low=0)
    for name, flag in (
        ("scale_by_num_tasks", scale_by_num_tasks),
        ("update_first_call", update_first_call),
    ):
        if not isinstance(flag, bool):
            raise TypeError(f"`{name}` must be True or False, got {flag!r}.")

    def init(num_tasks, shapes):
        k = check_num_tasks(num_tasks)
        zeros = jnp.zeros(k, jnp.float32)
        return ExcessMTLState(
            count=jnp.zeros((), jnp.int32),
            weights=jnp.full((k,), 1.0 / k, jnp.float32),
            baseline=zeros,
            warmup_sum=zeros,
            squares=_per_leaf_zeros(k, shapes),
        )

    def update(leaves, losses, state, **extra):
        del losses, extra
        k = state.weights.shape[0]
        squares, excess = [], jnp.zeros(k, jnp.float32)
        for leaf, old in zip(leaves, state.squares):
            if leaf is None:
                squares.append(old)
                continue
            sq = leaf.astype(accumulation_dtype(leaf)) ** 2
            total = old + sq
            excess = excess + jnp.sum((sq / jnp.sqrt(total + 1e-7)).reshape(k, -1), axis=1)
            squares.append(total)
        in_warmup = state.count < warmup
        first = state.count == warmup
        if warmup > 0:
            baseline = jnp.where(first, (state.warmup_sum / warmup), state.baseline)
            scaled = excess / (baseline + 1e-7)
        else:
            baseline = jnp.where(first, excess, state.baseline)
            scaled = jnp.where(first, excess, excess / (baseline + 1e-7))
        stepped = jax.nn.softmax(jnp.log(state.weights) + step_size * scaled)
        hold = in_warmup if (warmup > 0 or update_first_call) else (in_warmup | first)
        weights = jnp.where(hold, state.weights, stepped)
        new_state = ExcessMTLState(
            count=state.count + 1,
            weights=weights,
            baseline=jnp.where(in_warmup, state.baseline, baseline),
            warmup_sum=jnp.where(in_warmup, state.warmup_sum + excess, state.warmup_sum),
            squares=tuple(squares),
        )
        weights = weights * (k if scale_by_num_tasks else 1.0)
        combined = [
            None if leaf is None else jnp.tensordot(weights.astype(leaf.dtype), leaf, axes=1)
            for leaf in leaves
        ]
        return combined, weights, _ones(k), new_state

    return StackedAggregator(init, update, has_weights=True)


class MoCoState(NamedTuple):
    count: jax.Array  # int32 calls so far
    tracked: tuple  # per leaf: (K, *shape) tracked gradients y (shared), None otherwise
    weights: MoCoWeightsState  # the weight step's state (λ and its own count)


def moco(
    *,
    beta: float = 0.5,
    beta_sigma: float = 0.5,
    gamma: float = 0.1,
    gamma_sigma: float = 0.5,
    rho: float = 0.0,
) -> StackedAggregator:
    """MoCo: tracked task gradients combined by weights from their Gram (needs ``task_losses=``).

    Call t (from 1): ``ĝ_i = L_i g_i / (‖g_i‖ + 1e-8)`` (norm over all shared leaves);
    tracked gradients ``y_i ← y_i − β_t (y_i − ĝ_i)``, ``β_t = β/t^{β_σ}`` (state, init 0);
    weights ``λ ← softmax(λ − γ_t (Y Yᵀ + ρI) λ)``, ``γ_t = γ/t^{γ_σ}`` (init ``1/K``); shared
    update ``Σ_i λ_i y_i``. Heads get ``∇L_i`` (LibMTL's per-task backward passes); the
    weights ``λ`` are reported by ``task_weights``.

    Args:
      beta, beta_sigma: tracking rate ``β/t^{β_σ}`` (0.5 and 0.5, LibMTL's defaults).
      gamma, gamma_sigma: weight step ``γ/t^{γ_σ}`` (0.1 and 0.5, LibMTL's).
      rho: ℓ2 regularisation of the weights (0, LibMTL's).

    Follows LibMTL (commit 4336804), the reference implementation; not linear under gradient
    scaling (the ``1e-8`` and the absolute weight step) and stateful. Checked in
    ``tests/test_tracking.py`` against LibMTL's MoCo run on the same gradients and losses
    (updates, weights and tracked gradients over 6 steps, K = 2 and 3).

    Example::

        opt = optax.chain(mtl.aggregate(mtl.moco(), tasks=K, shared=mask), optax.adam(1e-3))
        s = opt.init(params)
        updates, s = opt.update(task_grads, s, params, task_losses=losses)
    """
    beta = check_real("beta", beta, low=0.0, high=1.0, low_open=True)
    beta_sigma = check_real("beta_sigma", beta_sigma, low=0.0)
    weight_step = moco_weights(gamma=gamma, gamma_sigma=gamma_sigma, rho=rho)

    def init(num_tasks, shapes):
        k = check_num_tasks(num_tasks)
        return MoCoState(jnp.zeros((), jnp.int32), _per_leaf_zeros(k, shapes), weight_step.init(k))

    def update(leaves, losses, state, **extra):
        del extra
        check_losses(losses, "moco")
        k = losses.shape[0]
        count = state.count + 1
        rate = beta / count.astype(jnp.float32) ** beta_sigma
        used = [x.astype(accumulation_dtype(x)) for x in leaves if x is not None]
        norms = jnp.sqrt(sum(jnp.sum(x.reshape(k, -1) ** 2, axis=1) for x in used))
        scale = jnp.asarray(losses, jnp.float32) / (norms + 1e-8)
        tracked = []
        for leaf, old in zip(leaves, state.tracked):
            if leaf is None:
                tracked.append(old)
                continue
            leaf = leaf.astype(accumulation_dtype(leaf))
            target = leaf * scale.astype(leaf.dtype).reshape((k,) + (1,) * (leaf.ndim - 1))
            tracked.append(old - rate.astype(old.dtype) * (old - target))
        gram = task_gram([y for leaf, y in zip(leaves, tracked) if leaf is not None])
        weights, weights_state = weight_step.update(gram, None, state.weights)
        combined = [
            None if leaf is None else jnp.tensordot(weights.astype(y.dtype), y, axes=1)
            for leaf, y in zip(leaves, tracked)
        ]
        return combined, weights, _ones(k), MoCoState(count, tuple(tracked), weights_state)

    return StackedAggregator(init, update, needs_losses=True, has_weights=True)

"""Direct aggregators on stacked per-task gradients (tier 3 only).

These methods look at the gradients coordinate by coordinate or keep per-task gradient
state, so they are not functions of the Gram matrix and cannot be ``Weighting`` s. Each is an
``optax.GradientTransformationExtraArgs`` used exactly like :func:`mtl_optax.aggregate`:
first in ``optax.chain``, on the stacked gradients of :func:`mtl_optax.value_and_jacobian`
(``TaskGradients`` or a plain pytree with a leading task axis), with the same ``shared``
mask; the task-axis checks and the mask are ``aggregate``'s own helpers, so both transforms
treat the leaves alike. Shared leaves are combined by the method; task-specific leaves are
summed over the task axis (DB-MTL sums the gradients of its log-losses there).

* :func:`trimmed_mean` (Yin et al., 2018): coordinate-wise mean after dropping the ``trim``
  largest and ``trim`` smallest values.
* :func:`graddrop` (Chen et al., 2020, "Just Pick a Sign"): random sign-consistency masks.
* :func:`db_mtl` (Lin et al., 2023, "Dual-Balancing Multi-Task Learning"): log-loss
  gradients, an EMA per task, each rescaled to the largest EMA norm.
* :func:`excess_mtl` (He et al., 2024, "Robust Multi-Task Learning with Excess Risks"):
  exponentiated-gradient weights from AdaGrad-style excess-risk estimates, which need the
  per-coordinate squared gradients (state shaped like the shared parameters, times K).

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
import optax

from mtl_optax.aggregate import resolve_mask, task_leaves
from mtl_optax.weighting.base import check_num_tasks
from mtl_optax.weighting.hyper import check_int, check_key, check_real


def _accumulation_dtype(leaf):
    return jnp.promote_types(leaf.dtype, jnp.float32)


def _combine_leaves(leaves, treedef, mask, stacked, combine_shared: Callable, combine_other=None):
    """Apply ``combine_shared(index, leaf)`` to shared leaves, sum the other stacked leaves
    over tasks (or ``combine_other``); head leaves of the split arrive summed and pass as is."""
    out = []
    for index, (use, is_stacked, leaf) in enumerate(zip(mask, stacked, leaves)):
        if use:
            combined = combine_shared(index, leaf.astype(_accumulation_dtype(leaf)))
        elif not is_stacked:
            combined = leaf
        elif combine_other is not None:
            combined = combine_other(index, leaf.astype(_accumulation_dtype(leaf)))
        else:
            combined = jnp.sum(leaf.astype(_accumulation_dtype(leaf)), axis=0)
        out.append(combined.astype(leaf.dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


def trimmed_mean(
    *, num_tasks: int, trim: int, shared: Any | Callable | None = None
) -> optax.GradientTransformationExtraArgs:
    """Coordinate-wise trimmed mean over the tasks.

    Args:
      num_tasks: K.
      trim: values dropped at each end of every coordinate (``2 · trim`` in all); needs
        ``K ≥ 2 · trim + 1``.
      shared: which leaves are shared (as in :func:`mtl_optax.aggregate`).

    Stateless, deterministic, linear under gradient scaling, permutation invariant.
    Checked in ``tests/test_stacked.py`` against ``scipy.stats.trim_mean`` and the torchjd
    fixtures.

    Example::

        opt = optax.chain(mtl.trimmed_mean(num_tasks=5, trim=1), optax.adam(1e-3))
    """
    k = check_num_tasks(num_tasks)
    trim = check_int("trim", trim, low=0)
    if k < 2 * trim + 1:
        raise ValueError(
            f"trimmed_mean drops 2 * trim = {2 * trim} of num_tasks={k} values per coordinate; "
            f"it needs num_tasks >= 2 * trim + 1 = {2 * trim + 1}. Lower `trim`."
        )

    def init(params):
        del params
        return optax.EmptyState()

    def update(task_grads, state, params=None, **extra):
        del extra
        _, leaves, treedef, mask, stacked = task_leaves(task_grads, k, params, shared)

        def combine(_, leaf):
            return jnp.mean(jnp.sort(leaf, axis=0)[trim : k - trim], axis=0)

        return _combine_leaves(leaves, treedef, mask, stacked, combine), state

    return optax.GradientTransformationExtraArgs(init, update)


class GradDropState(NamedTuple):
    key: jax.Array  # the PRNG key of the next step


def graddrop(
    *,
    num_tasks: int,
    key: jax.Array,
    leak: float | Any = 0.0,
    shared: Any | Callable | None = None,
) -> optax.GradientTransformationExtraArgs:
    """GradDrop: keep, per coordinate, only the gradients of one randomly chosen sign.

    Per coordinate, ``P = ½(1 + Σ_i g_i / Σ_i |g_i|)`` (the positive-sign purity) and
    ``U ~ Uniform(0, 1)``; task i's value is kept when ``P > U`` and ``g_i > 0`` or
    ``P < U`` and ``g_i < 0``; the update is ``Σ_i (ℓ_i + (1 − ℓ_i) M_i) g_i`` with leak
    ``ℓ`` (as in torchjd, with the identity purity transform; coordinates where every task's
    gradient is 0 give 0).

    Args:
      num_tasks: K.
      key: JAX PRNG key, kept in the state and split at every step.
      leak: scalar or (K,) leak in [0, 1] (default 0: no leak; 1 gives the sum).
      shared: which leaves are shared (as in :func:`mtl_optax.aggregate`).

    Checked in ``tests/test_stacked.py`` against a NumPy transcription fed the same uniform
    draws, and leak = 1 → the sum.

    Example::

        opt = optax.chain(mtl.graddrop(num_tasks=3, key=jax.random.PRNGKey(0)), optax.sgd(0.1))
    """
    k = check_num_tasks(num_tasks)
    key = check_key(key)
    leak_array = np.asarray(leak, dtype=np.float64)
    if leak_array.shape not in ((), (k,)) or isinstance(leak, bool):
        raise ValueError(f"`leak` must be a scalar or shape ({k},), got {leak!r}.")
    if not np.all((leak_array >= 0) & (leak_array <= 1)):  # also rejects NaN
        raise ValueError(f"`leak` values must lie in [0, 1], got {leak!r}.")
    leak_values = jnp.asarray(np.broadcast_to(leak_array, (k,)), jnp.float32)

    def init(params):
        del params
        return GradDropState(key=key)

    def update(task_grads, state, params=None, **extra):
        del extra
        _, leaves, treedef, mask, stacked = task_leaves(task_grads, k, params, shared)
        next_key, sub = jax.random.split(state.key)
        keys = jax.random.split(sub, len(leaves))

        def combine(index, leaf):
            total, magnitude = jnp.sum(leaf, axis=0), jnp.sum(jnp.abs(leaf), axis=0)
            purity = 0.5 * (1.0 + total / jnp.where(magnitude > 0, magnitude, 1.0))
            uniform = jax.random.uniform(keys[index], purity.shape, leaf.dtype)
            keep = ((purity > uniform) & (leaf > 0)) | ((purity < uniform) & (leaf < 0))
            lk = leak_values.astype(leaf.dtype).reshape((k,) + (1,) * (leaf.ndim - 1))
            return jnp.sum((lk + (1.0 - lk) * keep) * leaf, axis=0)

        return _combine_leaves(leaves, treedef, mask, stacked, combine), GradDropState(next_key)

    return optax.GradientTransformationExtraArgs(init, update)


class DBMTLState(NamedTuple):
    count: jax.Array  # int32 steps taken
    buffers: tuple  # per leaf: (K, *shape) gradient EMA for shared leaves, (0,) otherwise


def _check_losses(task_losses, k, name):
    if task_losses is None:
        raise ValueError(f"{name} needs the task losses: pass `task_losses=` to update.")
    if jnp.shape(task_losses) != (k,):
        raise ValueError(
            f"`task_losses` must have shape ({k},) (one per task), got {jnp.shape(task_losses)}."
        )


def db_mtl(
    *,
    num_tasks: int,
    beta: float = 0.9,
    beta_sigma: float = 0.5,
    eps: float = 1e-8,
    shared: Any | Callable | None = None,
) -> optax.GradientTransformationExtraArgs:
    """DB-MTL: balance log-loss gradients by their EMA norms (needs ``task_losses=``).

    Step t: task gradients of ``log(L_i + eps)``, ``h_i = g_i/(L_i + eps)``; per-task EMA
    ``b_i ← h_i + (β/t^σ)(b_i − h_i)`` (state, init 0); shared update
    ``Σ_i (max_j‖b_j‖/‖b_i‖) b_i`` (norms over all shared leaves; a zero EMA gets weight 0).
    Task-specific leaves get ``Σ_i h_i`` (the gradient of ``Σ log(L_i + eps)``).

    Args:
      num_tasks: K.
      beta, beta_sigma: EMA rate ``β/t^σ`` (0.9 and 0.5, LibMTL's defaults).
      eps: added to the losses before the log (LibMTL's 1e-8).
      shared: which leaves are shared (as in :func:`mtl_optax.aggregate`); resolved from
        ``params`` in ``init`` to size the EMA state.

    Checked in ``tests/test_stacked.py`` against a NumPy transcription over several steps.

    Example::

        opt = optax.chain(mtl.db_mtl(num_tasks=K), optax.adam(1e-3))
        updates, s = opt.update(task_grads, s, params, task_losses=losses)
    """
    k = check_num_tasks(num_tasks)
    beta = check_real("beta", beta, low=0.0, high=1.0)
    beta_sigma = check_real("beta_sigma", beta_sigma, low=0.0)
    eps = check_real("eps", eps, low=0.0)

    def init(params):
        mask = resolve_mask(shared, params)
        leaves = jax.tree_util.tree_leaves(params)
        buffers = tuple(
            jnp.zeros((k, *jnp.shape(p)), _accumulation_dtype(jnp.asarray(p)))
            if use
            else jnp.zeros((0,), jnp.float32)
            for use, p in zip(mask, leaves)
        )
        return DBMTLState(count=jnp.zeros((), jnp.int32), buffers=buffers)

    def update(task_grads, state, params=None, *, task_losses=None, **extra):
        del extra
        _, leaves, treedef, mask, stacked = task_leaves(task_grads, k, params, shared)
        _check_losses(task_losses, k, "db_mtl")
        if not all(stacked):
            raise ValueError(
                "db_mtl rescales each task's gradient by 1/(L_i + eps), the heads' too, so it "
                "needs them per task: compute the gradients with value_and_jacobian and pass "
                "shared= (the encoder/heads split delivers the head gradients already summed)."
            )
        count = state.count + 1
        rate = beta / count.astype(jnp.float32) ** beta_sigma
        scale = 1.0 / (jnp.asarray(task_losses, jnp.float32) + eps)

        def log_gradient(leaf):
            return leaf * scale.astype(leaf.dtype).reshape((k,) + (1,) * (leaf.ndim - 1))

        buffers = []
        for use, leaf, old in zip(mask, leaves, state.buffers):
            if use:
                h = log_gradient(leaf.astype(_accumulation_dtype(leaf)))
                buffers.append(h + rate.astype(h.dtype) * (old.astype(h.dtype) - h))
            else:
                buffers.append(old)
        squares = [jnp.sum(b.reshape(k, -1) ** 2, axis=1) for use, b in zip(mask, buffers) if use]
        norms = jnp.sqrt(sum(squares)) if squares else jnp.zeros(k)
        top = jnp.max(norms)
        alpha = jnp.where(norms > 0, top / jnp.where(norms > 0, norms, 1.0), 0.0)

        def combine(index, _):
            b = buffers[index]
            return jnp.tensordot(alpha.astype(b.dtype), b, axes=1)

        def combine_other(_, leaf):
            return jnp.sum(log_gradient(leaf), axis=0)

        out = _combine_leaves(leaves, treedef, mask, stacked, combine, combine_other)
        return out, DBMTLState(count=count, buffers=tuple(buffers))

    return optax.GradientTransformationExtraArgs(init, update)


class ExcessMTLState(NamedTuple):
    count: jax.Array  # int32 calls so far
    weights: jax.Array  # (K,) task weights on the simplex (init 1/K)
    baseline: jax.Array  # (K,) excess risk of the first post-warm-up call (or warm-up mean)
    warmup_sum: jax.Array  # (K,) summed excess risks of the warm-up calls
    squares: tuple  # per leaf: (K, *shape) summed squared gradients (shared), (0,) otherwise


def excess_mtl(
    *,
    num_tasks: int,
    robust_step_size: float = 1.0,
    n_warmup_steps: int = 0,
    shared: Any | Callable | None = None,
) -> optax.GradientTransformationExtraArgs:
    """ExcessMTL: weights by exponentiated gradient on estimated excess risks.

    Per call: ``S_i += g_i²`` (coordinate-wise, state); excess risk
    ``e_i = Σ g_i² / √(S_i + 1e-7)`` (a diagonal-Hessian estimate); during the first
    ``n_warmup_steps`` calls the weights stay ``1/K`` and ``e`` is accumulated; the first
    later call fixes the baseline (the warm-up mean, or with no warm-up its own raw ``e``,
    used unscaled that once); afterwards ``e ← e/(baseline + 1e-7)``;
    ``w ← softmax(log w + robust_step_size · e)``; update ``Σ w_i g_i``. As in torchjd
    (weights start at ``1/K``, on the simplex, where the official code and LibMTL start at 1).

    Args:
      num_tasks: K.
      robust_step_size: exponentiated-gradient step (> 0; 1.0 as torchjd).
      n_warmup_steps: calls with uniform weights that only collect statistics (≥ 0).
      shared: which leaves are shared (as in :func:`mtl_optax.aggregate`); resolved from
        ``params`` in ``init`` to size the ``S`` state.

    The absolute ``1e-7`` constants make it not linear under gradient scaling. Checked in
    ``tests/test_stacked.py`` against a NumPy transcription over several calls (with and
    without warm-up) and the torchjd fixture sequences.

    Example::

        opt = optax.chain(mtl.excess_mtl(num_tasks=K), optax.adam(1e-3))
    """
    k = check_num_tasks(num_tasks)
    step_size = check_real("robust_step_size", robust_step_size, low=0.0, low_open=True)
    warmup = check_int("n_warmup_steps", n_warmup_steps, low=0)

    def init(params):
        mask = resolve_mask(shared, params)
        squares = tuple(
            jnp.zeros((k, *jnp.shape(p)), _accumulation_dtype(jnp.asarray(p)))
            if use
            else jnp.zeros((0,), jnp.float32)
            for use, p in zip(mask, jax.tree_util.tree_leaves(params))
        )
        zeros = jnp.zeros(k, jnp.float32)
        return ExcessMTLState(
            count=jnp.zeros((), jnp.int32),
            weights=jnp.full((k,), 1.0 / k, jnp.float32),
            baseline=zeros,
            warmup_sum=zeros,
            squares=squares,
        )

    def update(task_grads, state, params=None, **extra):
        del extra
        _, leaves, treedef, mask, stacked = task_leaves(task_grads, k, params, shared)
        squares, excess = [], jnp.zeros(k, jnp.float32)
        for use, leaf, old in zip(mask, leaves, state.squares):
            if use:
                sq = leaf.astype(_accumulation_dtype(leaf)) ** 2
                total = old + sq
                excess = excess + jnp.sum((sq / jnp.sqrt(total + 1e-7)).reshape(k, -1), axis=1)
                squares.append(total)
            else:
                squares.append(old)
        in_warmup = state.count < warmup
        first = state.count == warmup
        if warmup > 0:
            baseline = jnp.where(first, (state.warmup_sum / warmup), state.baseline)
            scaled = excess / (baseline + 1e-7)
        else:
            baseline = jnp.where(first, excess, state.baseline)
            scaled = jnp.where(first, excess, excess / (baseline + 1e-7))
        stepped = jax.nn.softmax(jnp.log(state.weights) + step_size * scaled)
        weights = jnp.where(in_warmup, state.weights, stepped)
        new_state = ExcessMTLState(
            count=state.count + 1,
            weights=weights,
            baseline=jnp.where(in_warmup, state.baseline, baseline),
            warmup_sum=jnp.where(in_warmup, state.warmup_sum + excess, state.warmup_sum),
            squares=tuple(squares),
        )

        def combine(_, leaf):
            return jnp.tensordot(weights.astype(leaf.dtype), leaf, axes=1)

        return _combine_leaves(leaves, treedef, mask, stacked, combine), new_state

    return optax.GradientTransformationExtraArgs(init, update)

"""Two-batch stochastic weightings: SDMGrad and MoDo, on a cross-batch Gram ``J₁J₂ᵀ``.

Both update task weights ``λ`` on the simplex by (projected) gradient steps on
``½λᵀGλ``-type objectives. With ``G`` estimated from one mini-batch the step is biased;
the papers use ``A = J₁ J₂ᵀ``, the inner products between task gradients of two
**independent** mini-batches (unbiased for ``E[J]E[J]ᵀ``, not symmetric, not PSD).

The ``Weighting`` protocol carries it as an extra keyword of ``update``: pass
``cross_gram=A`` (a (K, K) array, e.g. from :func:`cross_task_gram` of two stacked gradient
pytrees) through ``aggregate``'s ``update(..., cross_gram=A)`` or to the weighting directly.
Without it the single-batch Gram the tier computed is used (the biased variant). The weights
then apply to whatever gradients the tier combines (the papers use a third batch for SDMGrad,
the mean of the two batches for MoDo; both are the caller's choice).

* **SDMGrad** (Xiao et al., 2023, "Direction-oriented Multi-objective Learning"): ``A`` is
  divided by the squared mean of ``√diag(A)``; ``n_iter`` momentum-SGD steps
  ``w ← Π_Δ(w − lr · v)``, ``v ← momentum · v + A(w + λ w̃)``; weights
  ``(w + λ w̃)/(1 + λ)`` with ``w̃ = 1/K``. ``w`` is kept in the state.
* **MoDo** (Chen et al., 2024, "Three-Way Trade-Off in Multi-Objective Learning"): one step
  ``λ ← Π_Δ(λ − γ (Aλ + ρλ))`` per call, ``λ`` kept in the state and returned.

Defaults follow torchjd 0.18 (SDMGrad: lr 10, momentum 0.5, 20 iterations, λ = 0.3, the
value the SDMGrad authors and LibMTL use in experiments; MoDo: γ = 0.1, ρ = 0.1).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mtl_optax.gram import HIGHEST
from mtl_optax.weighting.base import Weighting, check_inputs, check_num_tasks, finish
from mtl_optax.weighting.hyper import check_int, check_real


class SimplexWeightsState(NamedTuple):
    """The running task weights on the simplex (init ``1/K``)."""

    weights: jax.Array  # (K,) float32


def cross_task_gram(task_grads_1, task_grads_2, mask: list[bool] | None = None) -> jax.Array:
    """``A = J₁ J₂ᵀ``: inner products of two batches' stacked task gradients, (K, K)."""
    leaves_1 = jax.tree_util.tree_leaves(task_grads_1)
    leaves_2 = jax.tree_util.tree_leaves(task_grads_2)
    if len(leaves_1) != len(leaves_2):
        raise ValueError("cross_task_gram: the two gradient pytrees have different structures.")
    k = jnp.shape(leaves_1[0])[0]
    dtype = jnp.promote_types(jnp.result_type(*leaves_1, *leaves_2), jnp.float32)
    cross = jnp.zeros((k, k), dtype)
    for use, a, b in zip(mask or [True] * len(leaves_1), leaves_1, leaves_2):
        if use:
            a, b = a.reshape(k, -1).astype(dtype), b.reshape(k, -1).astype(dtype)
            cross = cross + jnp.matmul(a, b.T, precision=HIGHEST)
    return cross


def project_to_simplex(x: jax.Array) -> jax.Array:
    """Euclidean projection of ``x`` onto ``{w ≥ 0, Σ w = 1}`` (sort-based, exact)."""
    k = x.shape[0]
    ordered = jnp.sort(x)[::-1]
    cumulative = jnp.cumsum(ordered) - 1.0
    index = jnp.arange(1, k + 1, dtype=x.dtype)
    count = jnp.sum(ordered - cumulative / index > 0)
    theta = cumulative[count - 1] / count.astype(x.dtype)
    return jnp.maximum(x - theta, 0.0)


def _cross_or_gram(gram, extra, k):
    cross = extra.get("cross_gram")
    if cross is None:
        return gram
    if jnp.shape(cross) != (k, k):
        raise ValueError(
            f"`cross_gram` must be a ({k}, {k}) matrix J₁J₂ᵀ, got shape {jnp.shape(cross)}."
        )
    return jnp.asarray(cross).astype(gram.dtype)


def _init_simplex(num_tasks):
    k = check_num_tasks(num_tasks)
    return SimplexWeightsState(weights=jnp.full((k,), 1.0 / k, jnp.float32))


def _check_state(state, k):
    if jnp.shape(state.weights) != (k,):
        raise ValueError(
            f"The weighting state was initialised for {jnp.shape(state.weights)[0]} tasks but "
            f"the Gram matrix has {k}; call init({k})."
        )


def sdmgrad(
    *, lr: float = 10.0, momentum: float = 0.5, n_iter: int = 20, lambda_: float = 0.3
) -> Weighting:
    """SDMGrad: direction-oriented weights, pulled towards the mean by ``lambda_``.

    Args:
      lr: inner SGD learning rate (> 0).
      momentum: inner SGD momentum, in [0, 1).
      n_iter: inner iterations per call (≥ 1).
      lambda_: pull towards the mean direction (≥ 0).

    Extra keyword of ``update``: ``cross_gram`` (see the module doc). The normalisation makes
    the weights scale-free (``homogeneity = 0``; a zero diagonal leaves ``A`` unscaled, where
    torchjd adds 1e-8).

    Checked in ``tests/test_two_batch.py`` against a NumPy transcription (sort-free
    bisection simplex projection) over several calls.

    Example::

        w = mtl.sdmgrad()
        weights, state = w.update(gram, None, w.init(K), cross_gram=a)
    """
    lr = check_real("lr", lr, low=0.0, low_open=True)
    momentum = check_real("momentum", momentum, low=0.0, high=1.0, high_open=True)
    n_iter = check_int("n_iter", n_iter, low=1)
    lambda_ = check_real("lambda_", lambda_, low=0.0)

    def update(gram, losses, state, **extra):
        k, gram, _ = check_inputs(weighting, gram, losses)
        _check_state(state, k)
        a = _cross_or_gram(gram, extra, k)
        scale = jnp.mean(jnp.sqrt(jnp.maximum(jnp.diagonal(a), 0.0))) ** 2
        a = a / jnp.where(scale > 0, scale, 1.0)
        mean = jnp.full((k,), 1.0 / k, a.dtype)

        def step(carry, _):
            w, velocity = carry
            velocity = momentum * velocity + a @ (w + lambda_ * mean)
            return (project_to_simplex(w - lr * velocity), velocity), None

        w0 = state.weights.astype(a.dtype)
        (w, _), _ = jax.lax.scan(step, (w0, jnp.zeros_like(w0)), None, length=n_iter)
        # momentum starts at the first gradient exactly (v₀ = 0 gives v₁ = grad)
        finite = jnp.all(jnp.isfinite(a))
        w = jnp.where(finite, w, jnp.nan)
        new_state = SimplexWeightsState(jnp.where(finite, w, state.weights).astype(jnp.float32))
        return finish((w + lambda_ * mean) / (1.0 + lambda_)), new_state

    weighting = Weighting(_init_simplex, update, needs_gram=True, homogeneity=0.0)
    return weighting


def modo(*, gamma: float = 0.1, rho: float = 0.1) -> Weighting:
    """MoDo: one projected-gradient step on the task weights per call.

    Args:
      gamma: step size of the weight update (> 0).
      rho: ℓ2 regularisation of the weights (≥ 0).

    Extra keyword of ``update``: ``cross_gram`` (see the module doc). Not homogeneous in the
    Gram (the step size is absolute): ``homogeneity = None``.

    Checked in ``tests/test_two_batch.py`` against a NumPy transcription over several calls.

    Example::

        w = mtl.modo()
        weights, state = w.update(gram, None, w.init(K), cross_gram=a)
    """
    gamma = check_real("gamma", gamma, low=0.0, low_open=True)
    rho = check_real("rho", rho, low=0.0)

    def update(gram, losses, state, **extra):
        k, gram, _ = check_inputs(weighting, gram, losses)
        _check_state(state, k)
        a = _cross_or_gram(gram, extra, k)
        weights = state.weights.astype(a.dtype)
        weights = project_to_simplex(weights - gamma * (a @ weights + rho * weights))
        finite = jnp.all(jnp.isfinite(a))
        new_state = SimplexWeightsState(
            jnp.where(finite, weights, state.weights).astype(jnp.float32)
        )
        return finish(jnp.where(finite, weights, jnp.nan)), new_state

    weighting = Weighting(_init_simplex, update, needs_gram=True, homogeneity=None)
    return weighting

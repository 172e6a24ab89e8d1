"""Two-batch stochastic weightings: SDMGrad and MoDo, on a cross-batch Gram ``J₁J₂ᵀ``.

Both update task weights ``λ`` on the simplex by (projected) gradient steps on
``½λᵀGλ``-type objectives. With ``G`` estimated from one mini-batch the step is biased;
the papers use ``A = J₁ J₂ᵀ``, the inner products between task gradients of two
**independent** mini-batches (unbiased for ``E[J]E[J]ᵀ``, not symmetric, not PSD).

The ``Weighting`` protocol carries it as an extra keyword of ``update``: pass
``cross_gram=A`` (a (K, K) array, e.g. from :func:`cross_task_gram` of two stacked gradient
pytrees) through ``aggregate``'s ``update(..., cross_gram=A)`` or to the weighting directly.
Without it the call raises a ``ValueError``, unless the weighting was built with
``single_batch=True``: then the single-batch Gram the tier computed is used (the biased
variant, which the papers' guarantees do not cover). The weights apply to whatever
gradients the tier combines (the papers use a third batch for SDMGrad, the mean of the two
batches or a third one for MoDo; both are the caller's choice).

* **SDMGrad** (Xiao et al., 2023, "Direction-oriented Multi-objective Learning"): ``A`` is
  divided by the squared mean of ``√diag(A)``; ``n_iter`` momentum-SGD steps
  ``w ← Π_Δ(w − lr · v)``, ``v ← momentum · v + A(w + λ w̃)`` (the momentum restarts at
  every call); weights ``c·(w + λ w̃)/(1 + λ)`` with ``w̃ = 1/K`` and ``c = K`` (the
  authors' code multiplies the update by K "to match the sum loss") or 1. ``w`` is kept in
  the state.
* **MoDo** (Chen et al., 2024, "Three-Way Trade-Off in Multi-Objective Learning"): one step
  ``λ ← Π_Δ(λ − γ (Aλ + ρλ))`` per call, ``λ`` kept in the state and returned.

Defaults follow the authors' code: SDMGrad (OptMN-Lab/sdmgrad) lr 10, momentum 0.5, 20
iterations, λ = 0.3 (their experiment scripts; the class default is 0.6), update times K;
MoDo (heshandevaka/Trade-Off-MOL) γ = 0.1, ρ = 0.1. torchjd 0.18 uses the same values
without the factor K (``scale_by_num_tasks=False``); LibMTL uses SDMGrad lr 5 without the
factor K (``lr=5.0, scale_by_num_tasks=False``) and MoDo γ = 1e-3 (``gamma=1e-3``). One
deliberate difference: the sources add an absolute ε to the normalisation (``1e-4`` inside
the square root in the authors' code, ``1e-8`` to the square in LibMTL and torchjd); here a
zero diagonal leaves ``A`` unscaled instead, which keeps the weights exactly scale-free.
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
    """Euclidean projection of ``x`` onto ``{w ≥ 0, Σ w = 1}`` (sort-based, exact).

    ``x`` is first shifted by its maximum (the projection does not change when every entry
    moves by the same amount): the largest entry is then exactly 0, so the first term of the
    count is exactly 1 > 0 at any magnitude. Unshifted, entries of ~1e30 absorb the ``− 1``
    (``x_0 − (x_0 − 1) = 0``), nothing is counted and ``θ = ·/0`` is infinite.
    """
    k = x.shape[0]
    x = x - jnp.max(x)
    ordered = jnp.sort(x)[::-1]
    cumulative = jnp.cumsum(ordered) - 1.0
    index = jnp.arange(1, k + 1, dtype=x.dtype)
    count = jnp.sum(ordered - cumulative / index > 0)
    theta = cumulative[count - 1] / count.astype(x.dtype)
    return jnp.maximum(x - theta, 0.0)


def _cross_or_gram(gram, extra, k, single_batch: bool, method: str):
    cross = extra.get("cross_gram")
    if cross is None:
        if single_batch:
            return gram
        raise ValueError(
            f"{method} needs the cross-batch matrix A = J₁J₂ᵀ of two independent mini-batches: "
            "pass `cross_gram=A` to update (e.g. mtl.cross_task_gram(grads_1, grads_2)), or "
            f"build it with {method}(single_batch=True) to use the single-batch Gram (biased)."
        )
    if jnp.shape(cross) != (k, k):
        raise ValueError(
            f"`cross_gram` must be a ({k}, {k}) matrix J₁J₂ᵀ, got shape {jnp.shape(cross)}."
        )
    if not jnp.issubdtype(jnp.result_type(cross), jnp.floating):
        raise ValueError(
            f"`cross_gram` must be floating point, got dtype {jnp.result_type(cross)}."
        )
    return jnp.asarray(cross).astype(gram.dtype)


def _check_flag(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be True or False, got {value!r}.")
    return value


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
    *,
    lr: float = 10.0,
    momentum: float = 0.5,
    n_iter: int = 20,
    lambda_: float = 0.3,
    scale_by_num_tasks: bool = True,
    single_batch: bool = False,
) -> Weighting:
    """SDMGrad: direction-oriented weights, pulled towards the mean by ``lambda_``.

    Args:
      lr: inner SGD learning rate (> 0; 10, the authors' and torchjd's; LibMTL uses 5).
      momentum: inner SGD momentum, in [0, 1).
      n_iter: inner iterations per call (≥ 1).
      lambda_: pull towards the mean direction (≥ 0).
      scale_by_num_tasks: multiply the weights by K, as the authors' code does (default);
        False for LibMTL's and torchjd's weights (sum 1).
      single_batch: without ``cross_gram=``, use the single-batch Gram instead of raising.

    Extra keyword of ``update``: ``cross_gram`` (see the module doc). The normalisation makes
    the weights scale-free (``homogeneity = 0``).

    Checked in ``tests/test_two_batch.py`` against a NumPy transcription (sort-free
    bisection simplex projection) over several calls, against torchjd's
    ``SDMGradWeighting`` and against LibMTL's ``SDMGrad`` (``tests/test_reference_fixtures.py``).

    Example::

        a = jac @ (jac + 0.1).T                         # J₁ J₂ᵀ of two mini-batches
        w = mtl.sdmgrad()
        weights, state = w.update(gram, None, w.init(K), cross_gram=a)
    """
    lr = check_real("lr", lr, low=0.0, low_open=True)
    momentum = check_real("momentum", momentum, low=0.0, high=1.0, high_open=True)
    n_iter = check_int("n_iter", n_iter, low=1)
    lambda_ = check_real("lambda_", lambda_, low=0.0)
    factor_k = _check_flag("scale_by_num_tasks", scale_by_num_tasks)
    _check_flag("single_batch", single_batch)

    def update(gram, losses, state, **extra):
        k, gram, _ = check_inputs(weighting, gram, losses)
        _check_state(state, k)
        a = _cross_or_gram(gram, extra, k, single_batch, "sdmgrad")
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
        factor = k if factor_k else 1.0
        return finish(factor * (w + lambda_ * mean) / (1.0 + lambda_)), new_state

    weighting = Weighting(_init_simplex, update, needs_gram=True, homogeneity=0.0)
    return weighting


def modo(*, gamma: float = 0.1, rho: float = 0.1, single_batch: bool = False) -> Weighting:
    """MoDo: one projected-gradient step on the task weights per call.

    Args:
      gamma: step size of the weight update (> 0; 0.1, the authors' and torchjd's; LibMTL
        uses 1e-3).
      rho: ℓ2 regularisation of the weights (≥ 0; 0.1, the authors' and LibMTL's).
      single_batch: without ``cross_gram=``, use the single-batch Gram instead of raising.

    Extra keyword of ``update``: ``cross_gram`` (see the module doc). Not homogeneous in the
    Gram (the step size is absolute): ``homogeneity = None``.

    Checked in ``tests/test_two_batch.py`` against a NumPy transcription over several calls,
    against torchjd's ``MoDoWeighting`` and against LibMTL's ``MoDo``
    (``tests/test_reference_fixtures.py``).

    Example::

        a = jac @ (jac + 0.1).T                         # J₁ J₂ᵀ of two mini-batches
        w = mtl.modo()
        weights, state = w.update(gram, None, w.init(K), cross_gram=a)
    """
    gamma = check_real("gamma", gamma, low=0.0, low_open=True)
    rho = check_real("rho", rho, low=0.0)
    _check_flag("single_batch", single_batch)

    def update(gram, losses, state, **extra):
        k, gram, _ = check_inputs(weighting, gram, losses)
        _check_state(state, k)
        a = _cross_or_gram(gram, extra, k, single_batch, "modo")
        weights = state.weights.astype(a.dtype)
        weights = project_to_simplex(weights - gamma * (a @ weights + rho * weights))
        finite = jnp.all(jnp.isfinite(a))
        new_state = SimplexWeightsState(
            jnp.where(finite, weights, state.weights).astype(jnp.float32)
        )
        return finish(jnp.where(finite, weights, jnp.nan)), new_state

    weighting = Weighting(_init_simplex, update, needs_gram=True, homogeneity=None)
    return weighting

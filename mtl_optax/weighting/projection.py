"""Projection weightings: PCGrad and GradVac, random task order, computed on the Gram.

Both modify each task gradient ``g_i`` by adding multiples of the other gradients, visited in
a random order drawn independently for every ``i`` and every step; the update is the sum of
the modified gradients. Writing ``g_i^{mod} = Σ_k c_ik g_k``, every quantity the methods need
is a function of the Gram matrix (``⟨g_i^{mod}, g_j⟩ = (cG)_j``, ``‖g_i^{mod}‖² = cGcᵀ``),
so they are weightings with ``w = Σ_i c_i`` and run in every tier.

* **PCGrad** (Yu et al., 2020, "Gradient Surgery for Multi-Task Learning"): when
  ``⟨g_i^{mod}, g_j⟩ < 0`` project ``g_j`` out: ``c_ij −= ⟨g_i^{mod}, g_j⟩/‖g_j‖²``.
* **GradVac** (Wang et al., 2021, "Gradient Vaccine"): EMA targets ``φ̂_ij`` of the cosine
  ``φ_ij = cos(g_i^{mod}, g_j)`` (state, init 0, ``φ̂ ← (1−β)φ̂ + βφ`` after each visit);
  when ``φ_ij < φ̂_ij`` add
  ``g_j · ‖g_i^{mod}‖ (φ̂√(1−φ²) − φ√(1−φ̂²)) / (‖g_j‖ √(1−φ̂²))``, which raises the cosine to
  exactly ``φ̂``. With ``φ̂ = 0`` (the first step) this is PCGrad's projection.

Randomness: the weighting keeps a PRNG key in its state and splits it every step, so a run
is reproducible from the key given at construction. Neither method is non-conflicting for
K ≥ 3 (a later projection can re-create a conflict); for K = 2 PCGrad's update has
``⟨u, g_i⟩ ≥ 0`` and does not depend on the order. Both are scale-free (weights unchanged
when ``G → cG``): linear under gradient scaling. Zero gradients are never projected onto
(their rows of ``G`` are zero). A non-finite Gram gives NaN weights.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mtl_optax.weighting.base import Weighting, check_inputs, check_num_tasks, finish
from mtl_optax.weighting.hyper import check_key, check_real


class RandomOrderState(NamedTuple):
    """PCGrad's state: the PRNG key of the next step."""

    key: jax.Array


class GradVacState(NamedTuple):
    """GradVac's state: the PRNG key of the next step and the EMA cosine targets."""

    key: jax.Array
    targets: jax.Array  # (K, K) φ̂_ij, float32


def task_orders(key: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """``(next_key, orders)``: one random permutation of ``range(k)`` per task, (k, k) int.

    Row ``i`` is the order in which task ``i`` visits the others (``i`` itself is skipped).
    """
    key, sub = jax.random.split(key)
    orders = jax.vmap(lambda kk: jax.random.permutation(kk, k))(jax.random.split(sub, k))
    return key, orders


def _nan_unless_finite(weights: jax.Array, gram: jax.Array) -> jax.Array:
    """A non-finite Gram gives NaN weights (the comparisons of the walk would otherwise
    silently skip every projection)."""
    return jnp.where(jnp.all(jnp.isfinite(gram)), weights, jnp.nan)


def _check_targets(state: GradVacState, k: int) -> None:
    if jnp.shape(state.targets) != (k, k):
        raise ValueError(
            f"The weighting state was initialised for {jnp.shape(state.targets)[0]} tasks but "
            f"the Gram matrix has {k}; call init({k})."
        )


def pcgrad(*, key: jax.Array) -> Weighting:
    """PCGrad: project conflicting gradients out, in a random order; weights from ``G``.

    Args:
      key: JAX PRNG key (e.g. ``jax.random.PRNGKey(0)``), kept in the state and split at
        every step (it draws each task's visiting order).

    Defaults follow the authors' code (tianheyu927/PCGrad): the sum of the projected
    gradients, each task visiting the others in a fresh random order; LibMTL and torchjd
    are the same (LibMTL also visits the task itself and adds 1e-8 to ``‖g_j‖²``, which
    only matters for gradients of norm ≲ 1e-4).

    Checked in ``tests/test_projection.py`` against a NumPy transcription on the Jacobian with
    the same orders, and (order-independent K = 2) the torchjd fixtures, LibMTL's ``PCGrad``
    and the published example ``J = [[-4, 1, 1], [6, 1, 1]] → u = [0.5848, 3.8012, 3.8012]``.

    Example::

        w = mtl.pcgrad(key=jax.random.PRNGKey(0))
        weights, state = w.update(gram, None, w.init(gram.shape[0]))
    """
    key = check_key(key)

    def init(num_tasks):
        check_num_tasks(num_tasks)
        return RandomOrderState(key=key)

    def update(gram, losses, state, **extra):
        del extra
        k, gram, _ = check_inputs(weighting, gram, losses)
        next_key, orders = task_orders(state.key, k)

        def modified(i, order):
            def visit(c, j):
                inner = gram[j] @ c
                project = (j != i) & (inner < 0) & (gram[j, j] > 0)
                step = jnp.where(project, -inner / jnp.where(project, gram[j, j], 1.0), 0.0)
                return c.at[j].add(step), None

            return jax.lax.scan(visit, jax.nn.one_hot(i, k, dtype=gram.dtype), order)[0]

        coefficients = jax.vmap(modified)(jnp.arange(k), orders)
        weights = _nan_unless_finite(jnp.sum(coefficients, axis=0), gram)
        return finish(weights), RandomOrderState(key=next_key)

    weighting = Weighting(init, update, needs_gram=True, homogeneity=0.0)
    return weighting


def gradvac(*, key: jax.Array, beta: float = 0.5) -> Weighting:
    """GradVac: raise each pairwise cosine to its EMA target, in a random order.

    Args:
      key: JAX PRNG key, kept in the state and split at every step.
      beta: EMA rate of the cosine targets, in [0, 1] (0.5, as in torchjd and LibMTL; the
        authors published no code, and the paper tunes it per experiment).

    Defaults follow LibMTL and torchjd, which agree: one group (the whole model, LibMTL's
    ``GradVac_group_type=0``), targets from 0, a fresh random order per task and step.

    Difference from torchjd: it adds ``eps = 1e-8`` to the denominators; here a zero norm
    (or a target of exactly 1) skips the correction instead, which keeps the weights exactly
    scale-free. Elsewhere the results agree to float32 rounding.

    Checked in ``tests/test_projection.py`` against a NumPy transcription with the same
    orders over several steps (the targets carry over), against torchjd's GradVac on K = 2
    sequences (order-independent) and, on the first step, against PCGrad.

    Example::

        w = mtl.gradvac(key=jax.random.PRNGKey(0))
        weights, state = w.update(gram, None, w.init(gram.shape[0]))
    """
    key = check_key(key)
    beta = check_real("beta", beta, low=0.0, high=1.0)

    def init(num_tasks):
        k = check_num_tasks(num_tasks)
        return GradVacState(key=key, targets=jnp.zeros((k, k), jnp.float32))

    def update(gram, losses, state, **extra):
        del extra
        k, gram, _ = check_inputs(weighting, gram, losses)
        _check_targets(state, k)
        next_key, orders = task_orders(state.key, k)
        norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))

        def modified(i, order, targets_i):
            def visit(carry, j):
                c, targets_i = carry
                c_gram = c @ gram
                norm_i = jnp.sqrt(jnp.maximum(c_gram @ c, 0.0))
                denom = norm_i * norms[j]
                phi = jnp.where(denom > 0, c_gram[j] / jnp.where(denom > 0, denom, 1.0), 0.0)
                target = targets_i[j].astype(gram.dtype)
                root_phi = jnp.sqrt(jnp.maximum(1.0 - phi * phi, 0.0))
                root_target = jnp.sqrt(jnp.maximum(1.0 - target * target, 0.0))
                scale = norms[j] * root_target
                correct = (j != i) & (phi < target) & (scale > 0)
                step = norm_i * (target * root_phi - phi * root_target)
                step = jnp.where(correct, step / jnp.where(correct, scale, 1.0), 0.0)
                ema = jnp.where(j != i, (1.0 - beta) * target + beta * phi, target)
                return (c.at[j].add(step), targets_i.at[j].set(ema.astype(targets_i.dtype))), None

            start = (jax.nn.one_hot(i, k, dtype=gram.dtype), targets_i)
            return jax.lax.scan(visit, start, order)[0]

        coefficients, targets = jax.vmap(modified)(jnp.arange(k), orders, state.targets)
        weights = finish(_nan_unless_finite(jnp.sum(coefficients, axis=0), gram))
        finite = jnp.all(jnp.isfinite(gram))
        targets = jnp.where(finite, targets, state.targets)  # a skipped step keeps the targets
        return weights, GradVacState(key=next_key, targets=targets)

    weighting = Weighting(init, update, needs_gram=True, homogeneity=0.0)
    return weighting

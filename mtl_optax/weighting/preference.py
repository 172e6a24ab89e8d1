"""Preference scalarizations: COSMOS and PBI, one trade-off per preference vector ``r``.

Both turn the loss vector ``L`` into one scalar ``s(L)`` that is small where ``L`` lies
along a preference direction ``r`` (non-negative, one entry per task); as weightings they
return ``w = ∂s/∂L``, so ``Σ w_i ∇L_i = ∇s`` (the gradient of the scalarized loss).

* **COSMOS** (Ruchte & Grabocka, "Scalable Pareto Front Approximation for Deep
  Multi-Objective Learning", ICDM 2021): ``s = rᵀL − λ cos(r, L)``, a linear scalarization
  rewarded for pointing ``L`` along ``r``. ``∂cos/∂L = (r̂ − cos·L̂)/‖L‖`` is orthogonal to
  ``L``, so ``(w − r)ᵀL = 0`` and ``‖w − r‖ = λ sin∠(r, L)/‖L‖``: the cosine term grows like
  ``1/‖L‖`` as the losses approach 0 and then dominates. Norms below 1e-8 count as 1e-8 in
  value while the norm's derivative stays ``L/‖L‖`` (0 at ``L = 0``): exactly the gradient
  autograd takes through ``torch.nn.functional.cosine_similarity``, which the authors' code
  and torchjd use (so ``L = 0`` gives ``w = r − λ r̂·1e8``, as there).
* **PBI** (penalty-based boundary intersection; Zhang & Li, "MOEA/D: A Multiobjective
  Evolutionary Algorithm Based on Decomposition", IEEE TEVC 2007): with ``f = L − z*`` (``z*``
  the reference point, the origin by default) and ``r̂ = r/‖r‖``, ``d₁ = fᵀr̂`` (the distance
  along ``r``), ``d₂ = ‖f − d₁ r̂‖`` (the distance to the line), ``s = d₁ + θ d₂``. Hence
  ``w = r̂ + θ p/√(‖p‖² + 1e-12)`` with ``p = f − d₁ r̂``: ``w − r̂ ⊥ r̂`` and ``‖w − r̂‖ → θ``
  off the line; on it (``p = 0``, e.g. one task) ``w = r̂``. The 1e-12 under the root is
  torchjd's (it keeps ``d₂``'s gradient finite on the line). A ``p`` within rounding of
  the line (``‖p‖ ≤ 4K·eps·‖f‖``, eps of the losses' dtype) counts as on it: in float32
  the rounding noise of ``p`` (≈ 1e-7‖f‖) would otherwise come out as weights of size
  ``θ/10`` in a random direction; in float64 the floor (≈ 1e-15‖f‖) changes nothing visible.

Both are stateless and read only the losses (tier 1); their weights can be negative (COSMOS
when ``λ/‖L‖`` is large, PBI when ``θ`` is). To learn a whole Pareto front, as in the COSMOS
paper, sample ``r`` per step (``jax.random.dirichlet``), condition the model on it, and pass
it to ``update`` as ``preference=r``; a per-call ``preference`` (and PBI's ``reference``)
overrides the constructor's. Concrete bad values raise; traced ones give NaN weights.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mtl_optax.weighting.base import Weighting, check_inputs, empty_init, finish
from mtl_optax.weighting.hyper import check_real

COSINE_EPS = 1e-8  # torch.nn.functional.cosine_similarity's norm floor
PBI_EPS = 1e-12  # torchjd's PBI: added to ‖p‖² under the square root


def _check_vector(name: str, value: Any, *, non_negative: bool) -> np.ndarray | None:
    """A non-empty, finite, real 1-D vector (non-negative with a positive sum if asked)."""
    if value is None:
        return None
    if isinstance(value, jax.core.Tracer):
        raise TypeError(
            f"`{name}` given to the constructor must be concrete; pass a traced value to "
            f"`update(..., {name}=...)` instead."
        )
    array = np.asarray(value)
    if array.dtype == bool or not np.issubdtype(array.dtype, np.number):
        raise TypeError(f"`{name}` must be a vector of real numbers, got {value!r}.")
    if np.iscomplexobj(array) or array.ndim != 1 or array.size == 0:
        raise ValueError(
            f"`{name}` must be a non-empty 1-D vector of reals (one entry per task), got {value!r}."
        )
    if not np.all(np.isfinite(array)):
        raise ValueError(f"`{name}` must be finite, got {value!r}.")
    if non_negative and (np.any(array < 0) or not np.sum(array) > 0):
        raise ValueError(
            f"`{name}` must be non-negative with a positive sum (a direction among the "
            f"objectives), got {value!r}."
        )
    return array.astype(np.float64)


def _per_task(name, fixed, extra, k, dtype, *, default, non_negative):
    """The vector for this call: ``extra[name]`` if given, else the constructor's, else
    ``default``; shape (K,), with a validity flag (False only for traced bad values)."""
    value = extra.get(name)
    if value is None:
        value = default(k) if fixed is None else fixed
    elif not isinstance(value, jax.core.Tracer):
        value = _check_vector(name, value, non_negative=non_negative)
    if jnp.shape(value) != (k,):
        raise ValueError(
            f"`{name}` has shape {jnp.shape(value)} but there are {k} tasks; give one entry "
            "per task."
        )
    value = jnp.asarray(value).astype(dtype)
    valid = jnp.all(jnp.isfinite(value))
    if non_negative:
        valid = valid & jnp.all(value >= 0) & (jnp.sum(value) > 0)
    return value, valid


def _uniform(k):
    return np.full(k, 1.0 / k)


def cosmos(*, lambda_: float = 2.0, preference: Any = None) -> Weighting:
    """COSMOS: ``w = ∂/∂L [rᵀL − λ cos(r, L)] = r − λ (r̂ − cos·L̂)/‖L‖``.

    Args:
      lambda_: λ ≥ 0, the cosine reward (default 2, the authors' code's default, used for
        MultiMNIST; their other settings use 0.01 to 8; torchjd has no default). 0 gives the
        linear scalarization ``w = r``.
      preference: ``r``, non-negative with a positive sum, one entry per task (default
        uniform ``1/K``, the mean of the authors' Dirichlet samples). Overridden per call by
        ``update(..., preference=r)``.

    Matches torchjd 0.18's ``COSMOS(lambda_, weights=r)`` (weights = the gradient of its
    output) and the authors' ``COSMOSMethod`` loss for a given ``r``; the authors' input
    conditioning on ``r`` is the model's business (see the module doc). Losses may have any
    sign; as ``‖L‖ → 0`` the weights grow like ``λ/‖L‖`` (see the module doc).

    Checked in ``tests/test_preference.py`` against torchjd 0.18's outputs (stored fixtures)
    and the closed-form geometry ``(w − r)ᵀL = 0``, ``‖w − r‖ = λ sin∠(r, L)/‖L‖``.

    Example::

        w = mtl.cosmos(lambda_=2.0, preference=[0.7, 0.3])
        weights, _ = w.update(None, jnp.array([1.0, 1.0]), w.init(2))
        # r − 2(r̂ − cos·L̂)/‖L‖ ≈ [0.33, 0.67]: pulled from r towards the other task
    """
    lambda_ = check_real("lambda_", lambda_, low=0.0)
    fixed = _check_vector("preference", preference, non_negative=True)

    def update(gram, losses, state, **extra):
        k, _, losses = check_inputs(weighting, gram, losses)
        r, valid = _per_task(
            "preference", fixed, extra, k, losses.dtype, default=_uniform, non_negative=True
        )
        norm_l = jnp.linalg.norm(losses)
        n_l = jnp.maximum(norm_l, COSINE_EPS)
        unit_r = r / jnp.maximum(jnp.linalg.norm(r), COSINE_EPS)
        cosine = unit_r @ losses / n_l
        # torch's floor changes the norm's value, not its derivative L/‖L‖ (0 at L = 0)
        direction = losses / jnp.where(norm_l > 0, norm_l, 1.0)
        weights = r - lambda_ * (unit_r - cosine * direction) / n_l
        ok = valid & jnp.all(jnp.isfinite(losses))
        return finish(jnp.where(ok, weights, jnp.nan)), state

    weighting = Weighting(empty_init, update, needs_gram=False, needs_losses=True, homogeneity=0.0)
    return weighting


def pbi(*, theta: float = 5.0, preference: Any = None, reference: Any = None) -> Weighting:
    """PBI: ``w = ∂/∂L [d₁ + θ d₂] = r̂ + θ p/√(‖p‖² + 1e-12)``, ``p = f − (fᵀr̂) r̂``.

    Args:
      theta: θ ≥ 0, the penalty on the distance to the preference line (default 5, the MOEA/D
        paper's; torchjd has no default). 0 gives ``w = r̂`` (a linear scalarization along
        the unit preference).
      preference: ``r``, non-negative with a positive sum, one entry per task (default
        uniform, i.e. the diagonal direction). Overridden per call by ``preference=``.
      reference: ``z*``, the ideal point subtracted from the losses, one finite entry per
        task (default the origin, for non-negative losses; MOEA/D takes the best value of
        each objective seen so far). Overridden per call by ``reference=``.

    Matches torchjd 0.18's ``PBI(theta, weights=r, reference=z*)`` (weights = the gradient
    of its output).

    Checked in ``tests/test_preference.py`` against torchjd 0.18's outputs (stored fixtures),
    the boundary geometry (``w − r̂ ⊥ r̂``, ``‖w − r̂‖ = θ`` off the line, ``w = r̂`` on it,
    invariance to shifting ``L`` along ``r``) and central finite differences of ``d₁ + θd₂``
    in float64.

    Example::

        w = mtl.pbi(theta=5.0, preference=[1.0, 1.0])
        weights, _ = w.update(None, jnp.array([2.0, 1.0]), w.init(2))
        # r̂ + θ·(1, −1)/√2 ≈ [4.24, −2.83]: pushed back towards the diagonal
    """
    theta = check_real("theta", theta, low=0.0)
    fixed = _check_vector("preference", preference, non_negative=True)
    fixed_reference = _check_vector("reference", reference, non_negative=False)

    def update(gram, losses, state, **extra):
        k, _, losses = check_inputs(weighting, gram, losses)
        dtype = losses.dtype
        r, valid_r = _per_task(
            "preference", fixed, extra, k, dtype, default=_uniform, non_negative=True
        )
        z, valid_z = _per_task(
            "reference", fixed_reference, extra, k, dtype, default=np.zeros, non_negative=False
        )
        unit_r = r / jnp.linalg.norm(r)
        f = losses - z
        off_line = f - (f @ unit_r) * unit_r
        off_line = off_line - (off_line @ unit_r) * unit_r  # twice: ⊥ r̂ to rounding
        # an ``off_line`` at the rounding level of ``f`` is a point on the line (float32
        # would otherwise turn its noise into weights of size θ through the 1e-12 smoothing)
        noise = 4 * k * jnp.finfo(dtype).eps * jnp.linalg.norm(f)
        off_line = jnp.where(jnp.linalg.norm(off_line) > noise, off_line, 0.0)
        weights = unit_r + theta * off_line / jnp.sqrt(off_line @ off_line + PBI_EPS)
        ok = valid_r & valid_z & jnp.all(jnp.isfinite(losses))
        return finish(jnp.where(ok, weights, jnp.nan)), state

    weighting = Weighting(empty_init, update, needs_gram=False, needs_losses=True, homogeneity=0.0)
    return weighting

"""Weightings driven by the loss history: DWA and smooth Tchebycheff (STCH).

Both read only the losses (tier 1) and keep a short summary of past losses in their state:

* **DWA** (Liu et al., "End-to-end multi-task learning with attention", CVPR 2019): the
  descent rate ``r_i = L̄_i(t−1)/L̄_i(t−2)`` of the average losses of the last two complete
  windows, ``w = K·softmax(r/T)`` (sum K); ``w = 1`` until two windows are complete. The
  paper's window is an epoch; a pure step function does not know epochs, so the window is
  ``window`` steps (set it to your steps per epoch to match the paper).
* **STCH** (Lin et al., "Smooth Tchebycheff scalarization for multi-objective
  optimization", ICML 2024, in the multi-task form of the authors' code, Xi-L/STCH, which
  LibMTL copies): ``K·μ·logsumexp_i(log(L_i/z_i + ε)/μ)`` against a nadir point ``z``, the
  mean loss of the last ``nadir_steps`` calls of a warm-up during which the objective is
  ``Σ_i log(L_i + ε)``. As weights (``∂/∂L_i``): ``1/(L_i + ε)`` during the warm-up,
  ``K·softmax(log(L/z + ε)/μ)_i / (L_i + ε z_i)`` after it (μ cancels from the
  derivative's scale).

Checked in ``tests/test_loss_weightings.py`` against float64 NumPy transcriptions over
sequences of losses (DWA window rolls, STCH warm-up then nadir); DWA also call by call
against torchjd 0.18's ``DWA`` (``tests/test_torchjd_scalarizer_fixtures.py``), DWA and STCH
against LibMTL's and the STCH authors' classes (``tests/test_reference_fixtures.py``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mtl_optax.weighting import arguments
from mtl_optax.weighting.base import Weighting, check_inputs, check_num_tasks, finish
from mtl_optax.weighting.loss_scale import DEFAULT_EPS


class DWAState(NamedTuple):
    window_sum: jax.Array  # (K,) losses of the current, incomplete window
    window_steps: jax.Array  # () int32, steps in the current window
    last: jax.Array  # (K,) mean loss of the last complete window, L̄(t−1)
    before_last: jax.Array  # (K,) mean loss of the window before, L̄(t−2)
    windows: jax.Array  # () int32, complete windows so far


def dwa(*, temperature: float = 2.0, window: int = 100, eps: float = DEFAULT_EPS) -> Weighting:
    """Dynamic weight average: ``w = K·softmax((L̄(t−1)/L̄(t−2))/T)``.

    Args:
      temperature: T (default 2, the paper's, LibMTL's and torchjd's value); larger is
        more uniform.
      window: steps per averaging window (default 100; the paper averages over an epoch).
      eps: window means below ``eps`` count as ``eps`` (zero losses give finite weights).

    Negative losses are an error (NaN weights under ``jit``, the state unchanged): the
    ratio is a descent rate of positive losses, as in the paper (torchjd also accepts
    consistently negative losses; this version does not).

    Defaults follow the authors' code (lorenmt/mtan: T = 2, ``w = K·softmax``, ``w = 1``
    for the first two epochs), as do LibMTL and torchjd; their window is an epoch.

    The weights of a call come from the complete windows before it; the call's losses are
    then added to the current window. Until two windows are complete ``w = 1``.

    Example::

        w = mtl.dwa(window=1)
        state = w.init(2)
        for losses in ([1.0, 1.0], [0.5, 1.0]):
            weights, state = w.update(None, jnp.array(losses), state)   # [1, 1] twice
        weights, state = w.update(None, jnp.array([0.4, 0.9]), state)   # task 1 more weight
    """
    temperature = arguments.real("temperature", temperature, low=0.0)
    window = arguments.positive_int("window", window)
    eps = arguments.real("eps", eps, low=0.0)

    def init(num_tasks):
        zeros = jnp.zeros(check_num_tasks(num_tasks), jnp.float32)
        count = jnp.zeros((), jnp.int32)
        return DWAState(zeros, count, zeros, zeros, count)

    def update(gram, losses, state, **extra):
        del extra
        k, _, losses = check_inputs(weighting, gram, losses)
        arguments.same_tasks("state", state.window_sum, k)
        valid = arguments.non_negative(losses, method="dwa", reason="divides mean task losses")
        rate = jnp.maximum(state.last, eps) / jnp.maximum(state.before_last, eps)
        ready = state.windows >= 2
        weights = jnp.where(
            ready, k * jax.nn.softmax(jnp.where(ready, rate, 0.0) / temperature), 1.0
        )
        window_sum = state.window_sum + losses.astype(state.window_sum.dtype)
        steps = state.window_steps + 1
        full = steps == window
        mean = window_sum / window
        new_state = DWAState(
            window_sum=jnp.where(full, 0.0, window_sum),
            window_steps=jnp.where(full, 0, steps),
            last=jnp.where(full, mean, state.last),
            before_last=jnp.where(full, state.last, state.before_last),
            windows=state.windows + full,
        )
        ok = jnp.all(valid & jnp.isfinite(losses))
        weights = jnp.where(ok, weights, jnp.nan)
        return finish(weights.astype(losses.dtype)), arguments.unless_bad(ok, new_state, state)

    weighting = Weighting(init, update, needs_gram=False, needs_losses=True, homogeneity=0.0)
    return weighting


NADIR_FLOOR = 1e-8


class STCHState(NamedTuple):
    """STCH's state: calls so far and the summed losses of the nadir window."""

    step: jax.Array  # () int32
    nadir_sum: jax.Array  # (K,) losses summed over the nadir window


def stch(
    *,
    mu: float = 1.0,
    warmup: int = 400,
    nadir_steps: int = 100,
    scale_by_num_tasks: bool = True,
    eps: float = 1e-20,
) -> Weighting:
    """Smooth Tchebycheff scalarisation of the log-losses against a warm-up nadir point.

    Defaults follow the authors' code (Xi-L/STCH, ``STCH_MTL``; LibMTL's ``STCH`` is the same
    code): ``μ = 1``, 4 warm-up epochs plus a fifth whose mean loss is the nadir point, the
    objective multiplied by K, ``ε = 1e-20`` inside the logarithms. A pure step function does
    not know epochs, so the windows are counted in calls, with 100 calls standing for an
    epoch as in :func:`dwa`: set ``warmup = 4 · steps_per_epoch`` and ``nadir_steps =
    steps_per_epoch`` to match the authors' schedule exactly.

    Args:
      mu: smoothing μ (default 1, the authors' and LibMTL's; the paper evaluates
        μ ∈ {0.01, 0.1, 0.5, 1}); μ → 0 puts all the weight on the task with the largest
        ``L_i/z_i``.
      warmup: calls before the nadir window (default 400); their weights are ``1/(L_i + ε)``.
      nadir_steps: calls after them whose mean loss is the nadir point ``z`` (default 100,
        the authors' last warm-up epoch); their weights are also ``1/(L_i + ε)``.
      scale_by_num_tasks: multiply the weights after the warm-up by K, as the authors' code
        does (default True). With False the step does not grow K-fold when the warm-up ends.
      eps: ε (default 1e-20, the authors'). Nadir entries below 1e-8 (zero losses during
        the nadir window) count as 1e-8, so the weights stay finite in float32.

    Negative losses are an error (NaN weights under ``jit``); so are non-finite ones. This
    library's convention before version 0.2 (nadir = mean of every warm-up call, no factor
    K) is ``stch(warmup=0, nadir_steps=N, scale_by_num_tasks=False)``. torchjd's ``STCH``
    scalarizer is the paper's generic form (no logarithm, a given reference point): a
    different function.

    Checked in ``tests/test_loss_weightings.py`` against a float64 transcription (central
    differences of the objective) and in ``tests/test_reference_fixtures.py`` call by call
    against the authors' and LibMTL's ``STCH`` classes.

    Example::

        w = mtl.stch(warmup=0, nadir_steps=1)
        state = w.init(2)
        weights, state = w.update(None, jnp.array([1.0, 100.0]), state)   # [1, 0.01]
        weights, state = w.update(None, jnp.array([0.5, 100.0]), state)   # nadir [1, 100]
    """
    mu = arguments.real("mu", mu, low=0.0)
    warmup = arguments.non_negative_int("warmup", warmup)
    nadir_steps = arguments.positive_int("nadir_steps", nadir_steps)
    if not isinstance(scale_by_num_tasks, bool):
        raise TypeError(f"`scale_by_num_tasks` must be True or False, got {scale_by_num_tasks!r}.")
    eps = arguments.real("eps", eps, low=0.0)

    def init(num_tasks):
        k = check_num_tasks(num_tasks)
        return STCHState(jnp.zeros((), jnp.int32), jnp.zeros(k, jnp.float32))

    def update(gram, losses, state, **extra):
        del extra
        k, _, losses = check_inputs(weighting, gram, losses)
        arguments.same_tasks("state", state.nadir_sum, k)
        valid = arguments.non_negative(losses, method="stch")
        collecting = (state.step >= warmup) & (state.step < warmup + nadir_steps)
        nadir_sum = jnp.where(
            collecting, state.nadir_sum + losses.astype(state.nadir_sum.dtype), state.nadir_sum
        )
        nadir = jnp.maximum(nadir_sum / nadir_steps, NADIR_FLOOR).astype(losses.dtype)
        relative = losses / nadir + eps
        share = jax.nn.softmax(jnp.log(relative) / mu)
        factor = k if scale_by_num_tasks else 1
        after = factor * share / nadir / relative  # ∂/∂L_i of the objective
        weights = jnp.where(state.step < warmup + nadir_steps, 1.0 / (losses + eps), after)
        ok = jnp.all(valid & jnp.isfinite(losses))
        weights = jnp.where(ok, weights, jnp.nan)
        new_state = STCHState(state.step + 1, nadir_sum)
        return finish(weights.astype(losses.dtype)), arguments.unless_bad(ok, new_state, state)

    weighting = Weighting(init, update, needs_gram=False, needs_losses=True, homogeneity=0.0)
    return weighting

"""Weightings driven by the loss history: DWA and smooth Tchebycheff (STCH).

Both read only the losses (tier 1) and keep a short summary of past losses in their state:

* **DWA** (Liu et al., "End-to-end multi-task learning with attention", CVPR 2019): the
  descent rate ``r_i = L̄_i(t−1)/L̄_i(t−2)`` of the average losses of the last two complete
  windows, ``w = K·softmax(r/T)`` (sum K); ``w = 1`` until two windows are complete. The
  paper's window is an epoch; a pure step function does not know epochs, so the window is
  ``window`` steps (set it to your steps per epoch to match the paper).
* **STCH** (Lin et al., "Smooth Tchebycheff scalarization for multi-objective
  optimization", ICML 2024, in the multi-task form of its official code and LibMTL):
  ``μ·logsumexp_i(log(L_i/z_i)/μ)`` against a nadir point ``z``, the mean loss over a warm-up
  of ``warmup`` steps during which the objective is ``Σ_i log L_i``. As weights
  (``∂/∂L_i``): ``1/L_i`` during the warm-up, ``softmax(log(L/z)/μ)_i / L_i`` after it
  (μ cancels from the derivative's scale).

Checked in ``tests/test_loss_weightings.py`` against float64 NumPy transcriptions over
sequences of losses (DWA window rolls, STCH warm-up then nadir); DWA also call by call
against torchjd 0.18's ``DWA`` (``tests/test_torchjd_scalarizer_fixtures.py``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mtl_optax.weighting import arguments
from mtl_optax.weighting.base import Weighting, check_inputs, check_num_tasks, finish
from mtl_optax.weighting.loss_scale import DEFAULT_EPS, warmup_mean, warmup_mean_init


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
        The losses are expected to be positive, as in the paper (the ratio is a descent
        rate); torchjd also accepts consistently negative losses, this version does not.

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
        ok = jnp.all(jnp.isfinite(losses))
        weights = jnp.where(ok, weights, jnp.nan)
        return finish(weights.astype(losses.dtype)), arguments.unless_bad(ok, new_state, state)

    weighting = Weighting(init, update, needs_gram=False, needs_losses=True, homogeneity=0.0)
    return weighting


def stch(*, mu: float = 1.0, warmup: int = 100, eps: float = DEFAULT_EPS) -> Weighting:
    """Smooth Tchebycheff scalarisation of the log-losses against a warm-up nadir point.

    Args:
      mu: smoothing μ (default 1; the paper evaluates μ ∈ {0.01, 0.1, 0.5, 1} without a
        single best, torchjd has no default); μ → 0 puts all the weight on the task with
        the largest ``L_i/z_i``.
      warmup: warm-up steps (default 100; the sources count it in epochs) whose mean loss,
        the running mean of :func:`initial_loss_weighting`, is the nadir point ``z``;
        during them the weights are ``1/L_i``.
      eps: losses (and nadir entries) below ``eps`` count as ``eps``; negative losses are an
        error (NaN weights under ``jit``).

    Example::

        w = mtl.stch(warmup=1)
        state = w.init(2)
        weights, state = w.update(None, jnp.array([1.0, 100.0]), state)   # [1, 0.01]
        weights, state = w.update(None, jnp.array([0.5, 100.0]), state)   # nadir [1, 100]
    """
    mu = arguments.real("mu", mu, low=0.0)
    warmup = arguments.positive_int("warmup", warmup)
    eps = arguments.real("eps", eps, low=0.0)

    def update(gram, losses, state, **extra):
        del extra
        k, _, losses = check_inputs(weighting, gram, losses)
        arguments.same_tasks("state", state.total, k)
        valid = arguments.non_negative(losses, method="stch")
        clipped = jnp.maximum(losses, eps)
        warming = state.count < warmup
        nadir, new_state = warmup_mean(state, losses, warmup)
        share = jax.nn.softmax(jnp.log(clipped / jnp.maximum(nadir, eps)) / mu)
        weights = jnp.where(warming, 1.0, share) / clipped
        ok = jnp.all(valid & jnp.isfinite(losses))
        weights = jnp.where(ok, weights, jnp.nan)
        return finish(weights.astype(losses.dtype)), arguments.unless_bad(ok, new_state, state)

    weighting = Weighting(
        warmup_mean_init, update, needs_gram=False, needs_losses=True, homogeneity=0.0
    )
    return weighting

"""Argument and input checks shared by the loss-based weightings.

Hyper-parameters are checked when a weighting is built (type, range, NaN); inputs when it
is traced (number of tasks against the state). Values that only exist at run time (the
losses under ``jax.jit``) cannot raise: where a method takes logarithms, a negative loss
raises a ``ValueError`` when the losses are concrete and turns the weights into NaN under
``jit`` (so ``optax.apply_if_finite`` skips the step instead of training on a wrong number).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax


def real(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    strict: bool = True,
    allow_inf: bool = False,
) -> float:
    """A real Python number (not a bool, not NaN), ``> low`` (``≥ low`` if not ``strict``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a real number, got {value!r} ({type(value).__name__}).")
    value = float(value)
    if math.isnan(value) or (math.isinf(value) and not allow_inf):
        raise ValueError(f"`{name}` must be a finite number, got {value}.")
    if low is not None and (value <= low if strict else value < low):
        relation = ">" if strict else "≥"
        raise ValueError(f"`{name}` must be {relation} {low}, got {value}.")
    return value


def positive_int(name: str, value: Any) -> int:
    """A Python int ≥ 1 (not a bool): window lengths, step counts."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"`{name}` must be a Python int, got {value!r} ({type(value).__name__}); it fixes "
            "a number of steps, so it cannot be an array or a float."
        )
    if value < 1:
        raise ValueError(f"`{name}` must be ≥ 1, got {value}.")
    return int(value)


def non_negative_int(name: str, value: Any) -> int:
    """A Python int ≥ 0 (not a bool): warm-up lengths that may be empty."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"`{name}` must be a Python int, got {value!r} ({type(value).__name__}); it fixes "
            "a number of steps, so it cannot be an array or a float."
        )
    if value < 0:
        raise ValueError(f"`{name}` must be ≥ 0, got {value}.")
    return int(value)


def optimizer(value: Any) -> optax.GradientTransformation:
    """An optax ``GradientTransformation`` (anything with ``init`` and ``update``)."""
    if not (callable(getattr(value, "init", None)) and callable(getattr(value, "update", None))):
        raise TypeError(
            f"`optimizer` must be an optax.GradientTransformation (e.g. optax.adam(1e-3)), got "
            f"{value!r}."
        )
    return value


def prng_key(value: Any) -> jax.Array:
    """A PRNG key (``jax.random.key`` or ``PRNGKey``), stored as its raw uint32 data."""
    try:
        if jnp.issubdtype(jnp.result_type(value), jax.dtypes.prng_key):
            value = jax.random.key_data(value)
    except TypeError:
        pass
    arr = jnp.asarray(value) if isinstance(value, (jax.Array, np.ndarray)) else None
    if arr is None or arr.dtype != jnp.uint32 or arr.ndim != 1:
        raise TypeError(
            f"`key` must be a PRNG key, e.g. jax.random.key(0) or jax.random.PRNGKey(0); got "
            f"{value!r}."
        )
    return arr


def real_vector(name: str, value: Any) -> np.ndarray:
    """A non-empty 1-D vector of finite real numbers known when the method is built, as
    float64 NumPy: no strings, bools, complex numbers, NaN/inf, or traced arrays."""
    what = (
        f"`{name}` must be a non-empty 1-D sequence of finite real numbers (one per task), "
        "known when the method is built"
    )
    if isinstance(value, jax.core.Tracer) or (
        isinstance(value, (list, tuple)) and any(isinstance(v, jax.core.Tracer) for v in value)
    ):
        raise TypeError(
            f"{what}; got a traced array (built inside jax.jit?). Build the method outside the "
            "jitted function, with concrete numbers."
        )
    try:
        arr = np.asarray(value)
    except Exception as error:  # ragged sequences, unconvertible objects
        raise TypeError(f"{what}; got {value!r} ({error}).") from None
    if arr.dtype.kind not in "iuf":  # b: bool, c: complex, U/S: strings, O: objects
        raise TypeError(f"{what}; got {value!r} (dtype {arr.dtype}).")
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{what}; got shape {arr.shape}.")
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what}; got {arr} (NaN or infinite entries).")
    return arr


def per_task(name: str, value: Any) -> np.ndarray:
    """A non-empty 1-D vector of finite positive floats (one per task), as float64 NumPy."""
    arr = real_vector(name, value)
    if np.any(arr <= 0):
        raise ValueError(f"`{name}` must be finite and > 0 for every task, got {arr}.")
    return arr


def same_tasks(name: str, array: jax.Array, k: int) -> None:
    """The state (or a per-task hyper-parameter) was built for the ``k`` tasks at hand."""
    n = jnp.shape(array)[0]
    if n != k:
        raise ValueError(
            f"The weighting's {name} is for {n} tasks but the losses have {k}; call init({k})."
        )


def non_negative(
    losses: jax.Array, *, method: str, reason: str = "takes the logarithm of the task losses"
) -> jax.Array:
    """Mask of valid (``≥ 0``) losses for a method that takes their logarithm (or ratios).

    Concrete losses with a negative entry raise a ``ValueError``; under tracing the caller
    turns the weights NaN where the mask is False.
    """
    if not isinstance(losses, jax.core.Tracer) and bool(np.any(np.asarray(losses) < 0)):
        raise ValueError(
            f"{method} {reason}, so they must be ≥ 0; got {np.asarray(losses)}. Shift the "
            "losses (or use a method without logarithms or ratios)."
        )
    return losses >= 0


def unless_bad(ok: jax.Array, new_state: Any, old_state: Any) -> Any:
    """``new_state`` if ``ok`` else ``old_state``: a step with non-finite (or, where logs are
    taken, negative) inputs returns NaN weights and leaves the state as it was, so a step
    skipped by ``optax.apply_if_finite`` does not poison running means or parameters."""
    return jax.tree_util.tree_map(lambda new, old: jnp.where(ok, new, old), new_state, old_state)

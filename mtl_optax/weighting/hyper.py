"""Construction-time checks of hyper-parameters shared by the weightings and aggregators.

Each raises a ``TypeError``/``ValueError`` naming the argument, the value received and what
is expected, before anything is traced.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np

from mtl_optax.weighting.arguments import real_vector


def check_real(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """A finite Python/NumPy real (not a bool) in ``[low, high]`` (open ends on request)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"`{name}` must be a real number, got {value!r} ({type(value).__name__}).")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"`{name}` must be finite, got {value!r}.")
    if low is not None and (value < low or (low_open and value == low)):
        bound = f"> {low}" if low_open else f">= {low}"
        raise ValueError(f"`{name}` must be {bound}, got {value!r}.")
    if high is not None and (value > high or (high_open and value == high)):
        bound = f"< {high}" if high_open else f"<= {high}"
        raise ValueError(f"`{name}` must be {bound}, got {value!r}.")
    return value


def check_int(name: str, value: Any, *, low: int = 0) -> int:
    """A Python/NumPy integer (not a bool) ``>= low``; it fixes a shape or a loop count."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"`{name}` must be an int, got {value!r} ({type(value).__name__}).")
    if value < low:
        raise ValueError(f"`{name}` must be an int >= {low}, got {value!r}.")
    return int(value)


def check_key(key: Any) -> jax.Array:
    """A JAX PRNG key: a typed key (``jax.random.key``) or a raw uint32 (2,) ``PRNGKey``."""
    if key is None:
        raise TypeError(
            "`key` is required: pass a JAX PRNG key such as key=jax.random.PRNGKey(0); random "
            "methods keep it in their state and split it at every step."
        )
    try:
        array = jax.numpy.asarray(key)
    except (TypeError, ValueError):
        array = None
    if array is not None and jax.dtypes.issubdtype(array.dtype, jax.dtypes.prng_key):
        if array.shape == ():
            return array
    elif array is not None and array.dtype == np.uint32 and array.shape == (2,):
        return array
    raise TypeError(
        f"`key` must be a JAX PRNG key such as jax.random.PRNGKey(0), got {key!r}; random "
        "methods keep it in their state and split it at every step."
    )


def check_preference(pref_vector: Any, k: int | None = None) -> np.ndarray | None:
    """A finite 1-D preference vector (one entry per task; of length K when ``k`` is given).

    None stays None (the method's default preference).
    """
    if pref_vector is None:
        return None
    pref = real_vector("pref_vector", pref_vector)
    if k is not None and pref.shape != (k,):
        raise ValueError(
            f"`pref_vector` has {pref.shape[0]} entries but there are {k} tasks; pass one "
            "entry per task."
        )
    return pref

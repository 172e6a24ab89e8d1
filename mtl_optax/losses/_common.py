"""Private helpers shared by the loss modules: validation and dtype policy.

Dtype policy (all modules): floating inputs are promoted to at least float32
before any arithmetic (``jnp.promote_types(dtype, float32)``), and results are
returned in that compute dtype. bfloat16/float16 inputs therefore give float32
losses, float32 gives float32 and float64 (with x64 enabled) gives float64.

Validation policy:

* Types, shapes and dtypes are checked at trace time (eager and under ``jit``): a
  ``TypeError`` for an argument of the wrong Python type (a bool, string or ``None``
  where a number is needed), a ``ValueError`` for a wrong shape or dtype; the message
  names the argument, what was received and the fix.
* Values (label ranges, positivity, finiteness of hyper-parameters, ...) are checked
  when they are concrete, with a ``ValueError``. Under ``jit``/``vmap`` they are tracers
  and cannot be inspected; the affected results become NaN instead (per example for a
  bad label or row, everywhere for a bad hyper-parameter), which
  ``optax.apply_if_finite`` or a NaN check catches. A bad value never gives a finite
  wrong number.
* NaN in the data propagates: NaN inputs give NaN outputs.
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np


def is_concrete(x) -> bool:
    """True when ``x`` holds a value known at trace time (not a tracer)."""
    return not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(x))


def concrete_value(x):
    """NumPy copy of ``x`` if it is concrete, else ``None``."""
    if not is_concrete(x):
        return None
    try:
        return np.asarray(x)
    except (jax.errors.ConcretizationTypeError, TypeError):
        return None


def float_array(name: str, x) -> jax.Array:
    """Checks that ``x`` is a floating array (promotion happens in the jitted cores)."""
    x = jnp.asarray(x)
    try:
        chex.assert_type(x, float)
    except AssertionError as err:
        raise ValueError(
            f"`{name}` must be a floating array, got dtype {x.dtype}; cast it, e.g. "
            f"`{name}.astype(jnp.float32)`."
        ) from err
    return x


def promote(x: jax.Array) -> jax.Array:
    """Casts a floating array to at least float32 (the compute and output dtype)."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def int_array(name: str, x) -> jax.Array:
    x = jnp.asarray(x)
    if x.dtype == jnp.bool_ or not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError(
            f"`{name}` must be an integer array of class indices, got dtype {x.dtype}; "
            f"cast it, e.g. `{name}.astype(jnp.int32)`."
        )
    return x


def bool_array(name: str, x) -> jax.Array:
    x = jnp.asarray(x)
    if x.dtype != jnp.bool_:
        raise ValueError(
            f"`{name}` must be a boolean array, got dtype {x.dtype}; pass e.g. "
            f"`{name}.astype(bool)`."
        )
    return x


def check_shape(name: str, x, shape, *, hint: str = "") -> None:
    """``chex.assert_shape`` re-raised as a ValueError naming ``name``."""
    try:
        chex.assert_shape(x, tuple(shape))
    except AssertionError as err:
        msg = f"`{name}` must have shape {tuple(shape)}, got {tuple(jnp.shape(x))}."
        if hint:
            msg += " " + hint
        raise ValueError(msg) from err


def check_rank(name: str, x, rank: int) -> None:
    try:
        chex.assert_rank(x, rank)
    except AssertionError as err:
        raise ValueError(
            f"`{name}` must have rank {rank}, got shape {tuple(jnp.shape(x))}."
        ) from err


def check_min_rank(name: str, x, rank: int) -> None:
    if jnp.ndim(x) < rank:
        raise ValueError(
            f"`{name}` must have at least {rank} dimension(s), got shape {tuple(jnp.shape(x))}."
        )


def check_nonempty_last_axis(name: str, x) -> None:
    if jnp.shape(x)[-1] == 0:
        raise ValueError(
            f"`{name}` must have at least one entry along its last (class/candidate) axis, "
            f"got shape {tuple(jnp.shape(x))}."
        )


def check_labels(name: str, labels, num_classes: int):
    """Integer dtype always; range ``[0, num_classes)`` when concrete.

    Returns ``(labels, ok)``: ``ok`` is ``True`` for concrete labels (out-of-range ones
    raise) and, for traced labels, the boolean array ``0 <= labels < num_classes`` to pass
    to :func:`nan_unless`.
    """
    labels = int_array(name, labels)
    value = concrete_value(labels)
    if value is None:
        return labels, (labels >= 0) & (labels < num_classes)
    if value.size:
        lo, hi = int(value.min()), int(value.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(
                f"`{name}` must lie in [0, {num_classes}), got values in [{lo}, {hi}]."
            )
    return labels, True


def check_labelled_logits(logits, labels, *, logits_name="logits", labels_name="labels"):
    """Logits (..., C) floating with C >= 1, labels (...) integer in range.

    Returns ``(logits, labels, ok)`` with ``ok`` from :func:`check_labels`.
    """
    logits = float_array(logits_name, logits)
    check_min_rank(logits_name, logits, 1)
    check_nonempty_last_axis(logits_name, logits)
    labels = jnp.asarray(labels)
    check_shape(
        labels_name,
        labels,
        logits.shape[:-1],
        hint=f"(`{logits_name}` has shape {logits.shape}; labels are class indices.)",
    )
    labels, ok = check_labels(labels_name, labels, logits.shape[-1])
    return logits, labels, ok


def _describe_range(low, high, low_open, high_open) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low == 0:
        return "positive" if low_open else "non-negative"
    if low is not None:
        return f"{'>' if low_open else '>='} {low}"
    return ""


def _in_range(x, low, high, low_open, high_open, xp):
    ok = xp.isfinite(x)
    if low is not None:
        ok = ok & ((x > low) if low_open else (x >= low))
    if high is not None:
        ok = ok & ((x < high) if high_open else (x <= high))
    return ok


def check_scalar(name: str, value, *, low=None, high=None, low_open=False, high_open=False):
    """A real scalar hyper-parameter, finite and within ``low``/``high``.

    Bools, strings, ``None`` and complex numbers are a ``TypeError``, non-scalar arrays a
    ``ValueError``, always. A concrete value out of range (or NaN/inf) is a ``ValueError``;
    otherwise returns ``True``. A traced value returns the traced boolean "finite and in
    range", for :func:`nan_unless`.
    """
    if isinstance(value, (bool, np.bool_)) or (
        isinstance(value, (np.ndarray, jax.Array)) and value.dtype == np.bool_
    ):
        raise TypeError(f"`{name}` must be a real number, got the boolean {value!r}.")
    if not isinstance(value, (int, float, np.number, np.ndarray, jax.Array)):
        raise TypeError(f"`{name}` must be a real number, got {type(value).__name__} {value!r}.")
    kind = jnp.result_type(value)
    if not (jnp.issubdtype(kind, jnp.integer) or jnp.issubdtype(kind, jnp.floating)):
        raise TypeError(f"`{name}` must be a real number, got dtype {kind}.")
    if jnp.ndim(value) != 0:
        raise ValueError(f"`{name}` must be a scalar, got shape {jnp.shape(value)}.")
    concrete = concrete_value(value)
    if concrete is None:
        x = jnp.asarray(value, jnp.promote_types(kind, jnp.float32))
        return _in_range(x, low, high, low_open, high_open, jnp)
    concrete = float(concrete)
    if not _in_range(concrete, low, high, low_open, high_open, math):
        described = _describe_range(low, high, low_open, high_open)
        requirement = f"finite and {described}" if described else "finite"
        raise ValueError(f"`{name}` must be {requirement}, got {concrete!r}.")
    return True


def check_array_values(name: str, x, *, positive: bool):
    """Every entry finite and positive (``positive=True``) or non-negative.

    Concrete: ``ValueError`` or ``True``. Traced: the traced scalar "all entries valid".
    """
    value = concrete_value(x)
    if value is None:
        x = jnp.asarray(x)
        return jnp.all(jnp.isfinite(x) & ((x > 0) if positive else (x >= 0)))
    bad = (value <= 0) if positive else (value < 0)
    if np.any(bad) or not np.all(np.isfinite(value)):
        kind = "positive" if positive else "non-negative"
        raise ValueError(f"`{name}` must be finite and {kind}, got {value!r}.")
    return True


def check_static_int(name: str, value, *, low: int = 1) -> int:
    """A Python int ``>= low``; bools and NumPy/JAX integers are rejected (it sets shapes)."""
    if isinstance(value, bool) or not isinstance(value, int):
        hint = " Use e.g. `int(...)`." if isinstance(value, (np.integer, jax.Array)) else ""
        raise TypeError(
            f"`{name}` must be a Python int, got {type(value).__name__} {value!r}.{hint}"
        )
    if value < low:
        raise ValueError(f"`{name}` must be an int >= {low}, got {value}.")
    return value


def check_axis(name: str, axis, ndim: int) -> None:
    """``axis``: ``None``, an int or a tuple of ints, each in ``[-ndim, ndim)``."""
    if axis is None:
        return
    for a in axis if isinstance(axis, tuple) else (axis,):
        if isinstance(a, bool) or not isinstance(a, int):
            raise TypeError(f"`{name}` must be None, an int or a tuple of ints, got {axis!r}.")
        if not -ndim <= a < ndim:
            raise ValueError(f"`{name}`={axis} is out of range for an array of rank {ndim}.")


def all_ok(*oks):
    """Combines validity flags (``True`` or traced boolean arrays) with ``&``."""
    traced = [ok for ok in oks if ok is not True]
    if not traced:
        return True
    out = traced[0]
    for ok in traced[1:]:
        out = out & ok
    return out


def nan_unless(out, ok):
    """``out`` where ``ok`` holds, NaN elsewhere (``ok`` broadcasts against ``out``).

    The NaN-propagating answer to a value that could not be checked under ``jit``. Written
    as a product with ``1`` or ``NaN`` (not ``jnp.where``) so that the gradient is NaN too:
    ``jnp.where`` would give the NaN entries a zero gradient, and an optimizer would take a
    finite step from a bad batch. Where ``ok`` holds, ``out`` is returned bit for bit.
    """
    if ok is True:
        return out
    return out * jnp.where(ok, jnp.ones((), out.dtype), jnp.asarray(jnp.nan, out.dtype))


def cross_entropy_from_logits(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """``logsumexp(logits) - logits[label]`` along the last axis (no checks)."""
    target = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - target


def safe_sqrt(x: jax.Array, eps: float) -> jax.Array:
    """``sqrt(max(x, 0))`` with a finite gradient everywhere.

    Exact for ``x >= eps``; linear ``x / sqrt(eps)`` on ``[0, eps)`` (continuous at
    ``eps``, value 0 at 0, slope ``1/sqrt(eps)``). Absolute error <= ``sqrt(eps)/4``.
    """
    x = jnp.maximum(x, 0.0)
    big = x > eps
    safe = jnp.where(big, x, eps)
    return jnp.where(big, jnp.sqrt(safe), x / jnp.sqrt(jnp.asarray(eps, x.dtype)))

"""Private helpers shared by the loss modules: validation and dtype policy.

Dtype policy (all modules): floating inputs are promoted to at least float32
before any arithmetic (``jnp.promote_types(dtype, float32)``), and results are
returned in that compute dtype. bfloat16/float16 inputs therefore give float32
losses, float32 gives float32 and float64 (with x64 enabled) gives float64.

Validation policy: shapes and dtypes are checked with ``chex`` at trace time and
re-raised as ``ValueError`` naming the argument and the shapes involved. Value
checks (label range, positivity of priors, ...) run only when the value is
concrete; under ``jit``/``vmap`` the value is a tracer and the check is skipped.
"""

from __future__ import annotations

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
        raise ValueError(f"`{name}` must be a floating array, got dtype {x.dtype}.") from err
    return x


def promote(x: jax.Array) -> jax.Array:
    """Casts a floating array to at least float32 (the compute and output dtype)."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def int_array(name: str, x) -> jax.Array:
    x = jnp.asarray(x)
    try:
        chex.assert_type(x, int)
    except AssertionError as err:
        raise ValueError(f"`{name}` must be an integer array, got dtype {x.dtype}.") from err
    return x


def bool_array(name: str, x) -> jax.Array:
    x = jnp.asarray(x)
    if x.dtype != jnp.bool_:
        raise ValueError(f"`{name}` must be a boolean array, got dtype {x.dtype}.")
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


def check_labels(name: str, labels, num_classes: int) -> jax.Array:
    """Integer dtype always; range ``[0, num_classes)`` when concrete."""
    labels = int_array(name, labels)
    value = concrete_value(labels)
    if value is not None and value.size:
        lo, hi = int(value.min()), int(value.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(
                f"`{name}` must lie in [0, {num_classes}), got values in [{lo}, {hi}]."
            )
    return labels


def check_positive(name: str, x, *, allow_zero: bool = False) -> None:
    """Value check, skipped for tracers."""
    value = concrete_value(x)
    if value is None:
        return
    bad = np.any(value < 0) if allow_zero else np.any(value <= 0)
    if bad or np.any(np.isnan(value)):
        kind = "non-negative" if allow_zero else "positive"
        raise ValueError(f"`{name}` must be {kind}, got {value!r}.")


def check_labelled_logits(logits, labels, *, logits_name="logits", labels_name="labels"):
    """Logits (..., C) floating, labels (...) integer in range. Returns promoted arrays."""
    logits = float_array(logits_name, logits)
    check_min_rank(logits_name, logits, 1)
    labels = jnp.asarray(labels)
    check_shape(
        labels_name,
        labels,
        logits.shape[:-1],
        hint=f"(`{logits_name}` has shape {logits.shape}; labels are class indices.)",
    )
    labels = check_labels(labels_name, labels, logits.shape[-1])
    return logits, labels


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

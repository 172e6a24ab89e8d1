r"""Class imbalance: modified losses (logit adjustment, F1-weighted BCE, focal, LDAM)
and reweighting (class-balanced weights).

* Logit adjustment (Menon et al., 2021, "Long-tail learning via logit adjustment"):
  train with ``CE(logits + τ log π, y)`` *or* predict with ``logits − τ log π`` —
  not both (that adjusts twice). ``prior_bias_init`` gives the bias ``τ log π``
  for a final layer so that the initial softmax matches the priors. ``τ = 1`` is
  the Fisher-consistent choice for balanced error.
* F1-weighted binary CE: with the batch smooth-F1
  ``F = sg(2 Σ y p / Σ (y + p))``, ``−[y(1 − F/2) log p + (1 − y)(F/2) log(1 − p)]``,
  computed from logits with ``log_sigmoid`` (stable for large |logit|).
* Softmax focal loss (Lin et al., 2017, "Focal Loss for Dense Object Detection"):
  ``(1 − p_y)^γ · CE``, ``γ = 2``.
* Class-balanced weights (Cui et al., 2019, "Class-Balanced Loss Based on
  Effective Number of Samples"): ``(1 − β)/(1 − β^{n_c})`` normalised to sum ``C``,
  ``β = 0.9999``.
* LDAM (Cao et al., 2019, "Learning Imbalanced Datasets with Label-Distribution-
  Aware Margin Loss"): margin ``Δ_c ∝ n_c^{−1/4}`` with the largest margin
  ``max_margin = 0.5``, subtracted from the target logit before scaling by
  ``s = 30``.

Dtypes: inputs promoted to ≥ float32; results in that dtype.

Example::

    import jax.numpy as jnp
    from mtl_optax.losses import class_priors, logit_adjusted_cross_entropy
    labels = jnp.array([0, 0, 0, 1, 2, 0])
    priors = class_priors(labels, num_classes=3)          # [4/6, 1/6, 1/6]
    logits = jnp.zeros((6, 3))
    loss = logit_adjusted_cross_entropy(logits, labels, class_priors=priors).mean()
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mtl_optax.losses import _common as C

__all__ = [
    "class_priors",
    "logit_adjusted_cross_entropy",
    "posthoc_logit_adjustment",
    "prior_bias_init",
    "f1_weighted_binary_cross_entropy",
    "softmax_focal_loss",
    "class_balanced_weights",
    "ldam_loss",
]


def _check_priors(class_priors, num_classes=None):
    """Floating ``(C,)``, every prior finite and > 0. Returns ``(priors, ok)``."""
    class_priors = C.float_array("class_priors", class_priors)
    C.check_rank("class_priors", class_priors, 1)
    C.check_nonempty_last_axis("class_priors", class_priors)
    if num_classes is not None:
        C.check_shape(
            "class_priors",
            class_priors,
            (num_classes,),
            hint=f"(one prior per class; logits have {num_classes} classes.)",
        )
    return class_priors, C.check_array_values("class_priors", class_priors, positive=True)


def _check_counts(class_counts, num_classes=None):
    """Real ``(C,)`` counts, finite and >= 0, at least one > 0. Returns ``(counts, ok)``."""
    class_counts = jnp.asarray(class_counts)
    if class_counts.dtype == jnp.bool_ or not (
        jnp.issubdtype(class_counts.dtype, jnp.integer)
        or jnp.issubdtype(class_counts.dtype, jnp.floating)
    ):
        raise ValueError(
            f"`class_counts` must be an integer or floating array of counts, got dtype "
            f"{class_counts.dtype}."
        )
    C.check_rank("class_counts", class_counts, 1)
    C.check_nonempty_last_axis("class_counts", class_counts)
    if num_classes is not None:
        C.check_shape(
            "class_counts",
            class_counts,
            (num_classes,),
            hint=f"(one count per class; logits have {num_classes} classes.)",
        )
    ok = C.check_array_values("class_counts", class_counts, positive=False)
    value = C.concrete_value(class_counts)
    if value is None:
        ok = ok & jnp.any(class_counts > 0)
    elif not np.any(value > 0):
        raise ValueError("`class_counts` must contain at least one positive count.")
    return class_counts, ok


def _check_tau(tau):
    return C.check_scalar("tau", tau, low=0)


def class_priors(labels, *, num_classes: int) -> jax.Array:
    r"""Class frequencies ``n_c / n`` of integer ``labels`` (any shape), float32 ``(C,)``.

    Zero-count classes get prior 0 — pass a smoothed version (e.g. ``(n_c + 1)/(n + C)``)
    to the logit-adjustment functions, which require positive priors. Traced labels
    outside ``[0, C)`` make every prior NaN (concrete ones raise).

    Oracle: ``tests/losses/test_imbalance.py::test_class_priors_and_logit_adjustment``
    (``np.bincount``).
    """
    C.check_static_int("num_classes", num_classes)
    labels, ok = C.check_labels("labels", labels, num_classes)
    return C.nan_unless(_class_priors(labels, num_classes), jnp.all(ok))


@functools.partial(jax.jit, static_argnums=(1,))
def _class_priors(labels, num_classes):
    counts = jnp.bincount(labels.reshape(-1), length=num_classes).astype(jnp.float32)
    return counts / max(labels.size, 1)


@jax.jit
def _logit_adjusted(logits, labels, class_priors, tau):
    logits = C.promote(logits)
    adjusted = logits + tau * jnp.log(class_priors.astype(logits.dtype))
    return C.cross_entropy_from_logits(adjusted, labels)


def logit_adjusted_cross_entropy(logits, labels, *, class_priors, tau: float = 1.0):
    r"""``CE(logits + τ log π, y)`` per example (logit-adjusted loss).

    ``class_priors`` ``(C,)`` must be finite and positive; they need not sum to 1 (a
    constant shift cancels in the softmax). ``tau ≥ 0`` (0 is plain cross-entropy).
    Bad values raise when concrete; under ``jit`` a bad prior or ``tau`` makes every loss
    NaN and an out-of-range label its example's loss. Predict with the raw logits
    afterwards — do not also apply :func:`posthoc_logit_adjustment`.

    Oracle: ``tests/losses/test_imbalance.py::test_class_priors_and_logit_adjustment``.
    """
    logits, labels, labels_ok = C.check_labelled_logits(logits, labels)
    class_priors, priors_ok = _check_priors(class_priors, logits.shape[-1])
    ok = C.all_ok(labels_ok, priors_ok, _check_tau(tau))
    return C.nan_unless(_logit_adjusted(logits, labels, class_priors, tau), ok)


def posthoc_logit_adjustment(logits, *, class_priors, tau: float = 1.0) -> jax.Array:
    r"""Adjusted logits ``logits − τ log π`` for prediction after plain-CE training.

    Priors and ``tau`` as in :func:`logit_adjusted_cross_entropy` (NaN under ``jit``
    when invalid).

    Oracle: ``tests/losses/test_imbalance.py::test_class_priors_and_logit_adjustment``.
    """
    logits = C.float_array("logits", logits)
    C.check_min_rank("logits", logits, 1)
    class_priors, priors_ok = _check_priors(class_priors, logits.shape[-1])
    ok = C.all_ok(priors_ok, _check_tau(tau))
    return C.nan_unless(C.promote(logits) - tau * jnp.log(C.promote(class_priors)), ok)


def prior_bias_init(class_priors, *, tau: float = 1.0) -> jax.Array:
    r"""Bias initialisation ``τ log π`` (``(C,)``) for the final layer.

    Priors need not sum to 1: ``softmax`` of the bias is ``π / Σπ`` for ``τ = 1``.

    Oracle: ``tests/losses/test_imbalance.py::test_class_priors_and_logit_adjustment``
    (softmax of the bias equals the normalised priors for ``τ = 1``).
    """
    class_priors, priors_ok = _check_priors(class_priors)
    ok = C.all_ok(priors_ok, _check_tau(tau))
    return C.nan_unless(tau * jnp.log(C.promote(class_priors)), ok)


def _reduce_axes(ndim, axis):
    C.check_axis("axis", axis, ndim)
    if axis is None:
        return tuple(range(ndim))
    return tuple(a % ndim for a in (axis if isinstance(axis, tuple) else (axis,)))


def f1_weighted_binary_cross_entropy(logits, labels, *, where=None, axis=None, eps=1e-12):
    r"""F1-weighted binary cross-entropy, elementwise (same shape as ``logits``).

    ``p = sigmoid(logits)``, ``F = sg(2 Σ y p / max(Σ (y + p), eps))`` with the sums
    over ``axis`` (default: all axes, i.e. the batch) and over entries where
    ``where`` is True; loss ``−[y(1 − F/2) log σ(x) + (1 − y)(F/2) log σ(−x)]``.
    Entries with ``where`` False give 0. ``labels`` are 0/1 (bool, int or float; soft
    labels in [0, 1] also work). Labels outside ``[0, 1]`` (e.g. ±1 labels, which would
    give negative losses) or NaN are a ``ValueError`` when concrete; under ``jit`` they
    make the whole result NaN (``F`` couples all entries). Entries where ``where`` is
    False are not checked. ``eps > 0``.

    Oracle: ``tests/losses/test_imbalance.py::test_f1_weighted_bce_matches_numpy``.
    """
    logits = C.float_array("logits", logits)
    labels = jnp.asarray(labels)
    if not (
        labels.dtype == jnp.bool_
        or jnp.issubdtype(labels.dtype, jnp.integer)
        or jnp.issubdtype(labels.dtype, jnp.floating)
    ):
        raise ValueError(
            f"`labels` must be 0/1 labels (bool, int or float), got dtype {labels.dtype}."
        )
    C.check_shape("labels", labels, logits.shape, hint="(one 0/1 label per logit.)")
    if where is not None:
        where = C.bool_array("where", where)
        C.check_shape("where", where, logits.shape)
    axes = _reduce_axes(logits.ndim, axis)
    eps_ok = C.check_scalar("eps", eps, low=0, low_open=True)
    in_range = (labels >= 0) & (labels <= 1)  # False for NaN
    if where is not None:
        in_range = in_range | ~where
    value = C.concrete_value(in_range)
    if value is None:
        labels_ok = jnp.all(in_range)
    elif not np.all(value):
        bad = np.asarray(labels)[~value]
        raise ValueError(
            f"`labels` must lie in [0, 1] (0/1 or soft labels), got e.g. {bad[:3].tolist()}; "
            "map ±1 labels with (labels + 1) / 2."
        )
    else:
        labels_ok = True
    return C.nan_unless(_f1_bce(logits, labels, where, axes, eps), C.all_ok(eps_ok, labels_ok))


def _f1_bce_impl(logits, labels, where, axes, eps):
    x = C.promote(logits)
    y = labels.astype(x.dtype)
    mask = jnp.ones_like(x) if where is None else where.astype(x.dtype)
    p = jax.nn.sigmoid(x)
    num = 2.0 * jnp.sum(mask * y * p, axis=axes, keepdims=True)
    den = jnp.sum(mask * (y + p), axis=axes, keepdims=True)
    f1 = jax.lax.stop_gradient(num / jnp.maximum(den, eps))
    loss = -(
        y * (1.0 - f1 / 2.0) * jax.nn.log_sigmoid(x)
        + (1.0 - y) * (f1 / 2.0) * jax.nn.log_sigmoid(-x)
    )
    return jnp.where(mask > 0, loss, 0.0)


_f1_bce = jax.jit(_f1_bce_impl, static_argnums=(3,))


@jax.jit
def _focal(logits, labels, gamma):
    logits = C.promote(logits)
    lp = jax.nn.log_softmax(logits, axis=-1)
    lp_y = jnp.take_along_axis(lp, labels[..., None], axis=-1)[..., 0]
    one_minus_p = jnp.maximum(-jnp.expm1(lp_y), 0.0)
    positive = one_minus_p > 0
    safe = jnp.where(positive, one_minus_p, 1.0)
    weight = jnp.where(positive, safe**gamma, jnp.zeros_like(safe) ** gamma)
    return -weight * lp_y


def softmax_focal_loss(logits, labels, *, gamma: float = 2.0) -> jax.Array:
    r"""Softmax focal loss ``−(1 − p_y)^γ log p_y`` per example.

    ``1 − p_y`` is computed as ``−expm1(log p_y)`` (accurate when ``p_y → 1``);
    at ``p_y = 1`` the weight is ``0^γ`` (1 for ``γ = 0``) with a finite gradient.
    ``γ ≥ 0``, default 2 (paper); ``γ = 0`` is plain cross-entropy. Bad values raise
    when concrete and give NaN under ``jit`` (per example for a label).

    Oracle: ``tests/losses/test_imbalance.py::test_focal_matches_numpy``.
    """
    logits, labels, labels_ok = C.check_labelled_logits(logits, labels)
    ok = C.all_ok(labels_ok, C.check_scalar("gamma", gamma, low=0))
    return C.nan_unless(_focal(logits, labels, gamma), ok)


@jax.jit
def _class_balanced(counts, beta):
    n = counts.astype(jnp.float32)
    present = n > 0
    # 1 − β^n = −expm1(n log β), accurate for β near 1; the common factor (1 − β)
    # cancels in the normalisation.
    effective = -jnp.expm1(jnp.where(present, n, 1.0) * jnp.log(beta))
    w = jnp.where(present, 1.0 / effective, 0.0)
    return w * (n.shape[0] / jnp.sum(w))


def class_balanced_weights(class_counts, *, beta: float = 0.9999) -> jax.Array:
    r"""Class-balanced weights ``(1 − β)/(1 − β^{n_c})``, normalised to sum ``C``.

    ``class_counts`` ``(C,)`` non-negative (ints or floats). Zero-count classes get
    weight 0 (they never occur as a label, so their weight is unused) and the
    present classes are normalised so all ``C`` weights still sum to ``C``.
    ``β ∈ [0, 1)``: ``β = 0`` gives equal weights, ``β → 1`` inverse frequency;
    default 0.9999 (paper). Returns float32 ``(C,)``. Negative, NaN or all-zero counts
    and ``β`` outside ``[0, 1)`` raise when concrete and give NaN weights under ``jit``.

    Oracle: ``tests/losses/test_imbalance.py::test_class_balanced_weights_matches_numpy``.
    """
    class_counts, counts_ok = _check_counts(class_counts)
    ok = C.all_ok(counts_ok, C.check_scalar("beta", beta, low=0, high=1, high_open=True))
    return C.nan_unless(_class_balanced(class_counts, jnp.asarray(beta, jnp.float32)), ok)


@jax.jit
def _ldam(logits, labels, counts, max_margin, scale):
    logits = C.promote(logits)
    n = counts.astype(logits.dtype)
    present = n > 0
    n_min = jnp.min(jnp.where(present, n, jnp.inf))
    margins = jnp.where(
        present, max_margin * (n_min / jnp.where(present, n, 1.0)) ** 0.25, max_margin
    )
    onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
    return C.cross_entropy_from_logits(scale * (logits - margins * onehot), labels)


def ldam_loss(logits, labels, *, class_counts, max_margin: float = 0.5, scale: float = 30.0):
    r"""LDAM per example: ``CE(s·(logits − Δ_y·onehot_y), y)``, ``Δ_c = m·(n_min/n_c)^{1/4}``.

    ``Δ_c ∝ n_c^{−1/4}`` scaled so the rarest present class has ``max_margin``
    (0.5, paper); zero-count classes get ``max_margin`` (they are never targets).
    ``logits`` are typically cosine logits; ``scale = 30`` as in the paper. Counts as in
    :func:`class_balanced_weights`; ``max_margin ≥ 0``, ``scale > 0``. Bad values raise
    when concrete and give NaN under ``jit``.

    Oracle: ``tests/losses/test_imbalance.py::test_ldam_matches_numpy``.
    """
    logits, labels, labels_ok = C.check_labelled_logits(logits, labels)
    class_counts, counts_ok = _check_counts(class_counts, logits.shape[-1])
    ok = C.all_ok(
        labels_ok,
        counts_ok,
        C.check_scalar("max_margin", max_margin, low=0),
        C.check_scalar("scale", scale, low=0, low_open=True),
    )
    return C.nan_unless(_ldam(logits, labels, class_counts, max_margin, scale), ok)

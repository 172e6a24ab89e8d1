r"""Margin softmax losses on cosine logits (CosFace, ArcFace, SphereFace, metric margin).

All losses take cosines ``cos`` of shape ``(..., C)`` between a normalised
embedding ``z`` and ``C`` normalised class vectors ``c_j`` (see
:func:`cosine_logits`) and integer labels ``(...)``, and return per-example
cross-entropies ``(...)`` of modified, scaled logits:

* CosFace / AM-Softmax (Wang et al., 2018, "CosFace: Large Margin Cosine Loss for
  Deep Face Recognition"; "Additive Margin Softmax for Face Verification"):
  ``CE(s·(cos − m·onehot_y))``, defaults ``s=30, m=0.35`` (paper values).
* ArcFace (Deng et al., 2019, "ArcFace: Additive Angular Margin Loss for Deep Face
  Recognition"): target logit ``cos(θ_y + m) = cos·cos m − sin·sin m`` with
  ``sin = sqrt(max(1 − cos², eps))`` (no ``arccos``); when ``θ_y > π − m``
  (``cos < −cos m``) the monotone fallback ``cos − m·sin m`` is used so the target
  logit keeps decreasing in θ. Defaults ``s=64, m=0.5`` (paper values).
* SphereFace / A-Softmax (Liu et al., 2017, "SphereFace: Deep Hypersphere Embedding
  for Face Recognition"), normalised-feature form: target logit
  ``ψ(θ) = (−1)^k cos(mθ) − 2k`` for ``θ ∈ [kπ/m, (k+1)π/m]``. ``cos(mθ)`` is the
  Chebyshev polynomial ``T_m(cos)`` and ``k`` counts the thresholds
  ``cos ≤ cos(jπ/m)``, so no angle is ever computed: ψ is a polynomial on each
  piece, continuous and monotone, with a finite gradient at ``cos = ±1``.
  Defaults ``s=30, m=4`` (``m=4`` is the paper's). The optional ``blend=λ`` gives
  the paper's annealed target ``(λ·cos + ψ)/(1 + λ)``.
* Metric margin: ``1 − cos`` is not a metric but the chord
  ``sqrt(2 − 2cos)``, ``sqrt(1 − cos)`` and the angle θ are. A triangle-inequality
  argument for retrieval asks for ``d(z, c_y) + m < d(z, c_j)`` with ``m`` about
  twice the mean within-class distance to the class centre
  (:func:`estimate_margin`). Loss ``log(1 + Σ_{j≠y} exp(s·(d(z,c_y) + m − d(z,c_j))))``
  = ``CE(−s·(d + m·onehot_y))``.

Bad inputs: cosines must lie in ``[−1, 1]`` up to rounding (``|cos| ≤ 1 + 1e-3``; raw
logits passed by mistake would otherwise give finite nonsense), ``scale > 0``, margins
``≥ 0`` (ArcFace: ``< π``), all finite. Violations are a ``ValueError`` when the values
are concrete; under ``jit`` a bad hyper-parameter makes every loss NaN, and a bad label or
an out-of-range cosine makes its example's loss NaN. Checked in
``tests/losses/test_bad_inputs.py``.

Boundary safety: square roots go through a safe square root that is exact for
``x ≥ 1e-6``, linear below (value 0 at 0, slope ``1e3``) so values are exact at
``cos = ±1`` and gradients are finite there; the angle is ``2·atan2(√(1−cos),
√(1+cos))`` (no ``arccos``). Inputs are promoted to ≥ float32; losses are
returned in that dtype (bfloat16 in → float32 out).

Example::

    import jax, jax.numpy as jnp
    from mtl_optax.losses import cosine_logits, arcface_loss, estimate_margin
    k1, k2 = jax.random.split(jax.random.key(0))
    emb = jax.random.normal(k1, (8, 16)); w = jax.random.normal(k2, (16, 10))
    labels = jnp.arange(8) % 10
    cos = cosine_logits(emb, w)                          # (8, 10)
    loss = arcface_loss(cos, labels).mean()
    m = estimate_margin(emb, labels, num_classes=10)     # for metric_margin_loss
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from mtl_optax.losses import _common as C

__all__ = [
    "cosine_logits",
    "cosface_loss",
    "arcface_loss",
    "sphereface_loss",
    "metric_margin_loss",
    "estimate_margin",
]

_SQRT_EPS = 1e-6
_METRICS = ("chord", "sqrt_one_minus_cos", "angle")


def _normalise(x, axis, eps=1e-12):
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=axis, keepdims=True), eps))


def _distance(cos, metric):
    if metric == "chord":
        return C.safe_sqrt(2.0 - 2.0 * cos, _SQRT_EPS)
    if metric == "sqrt_one_minus_cos":
        return C.safe_sqrt(1.0 - cos, _SQRT_EPS)
    # angle: tan(θ/2) = sqrt((1 - cos) / (1 + cos)); atan2 has bounded derivatives.
    return 2.0 * jnp.arctan2(C.safe_sqrt(1.0 - cos, _SQRT_EPS), C.safe_sqrt(1.0 + cos, _SQRT_EPS))


def _check_metric(metric):
    if metric not in _METRICS:
        raise ValueError(f"`metric` must be one of {_METRICS}, got {metric!r}.")


_COS_SLACK = 1e-3  # rounding may put cosines a few ulps outside [-1, 1]


def _check_common(cos, labels, scale, margin, *, margin_name="margin", margin_high=None):
    """Validates cosines, labels, ``scale > 0`` and ``0 ≤ margin (< margin_high)``.

    Returns ``(cos, labels, ok)``; ``ok`` (per example, or ``True``) for :func:`C.nan_unless`.
    """
    cos, labels, labels_ok = C.check_labelled_logits(cos, labels, logits_name="cos")
    in_range = ~(jnp.abs(cos) > 1.0 + _COS_SLACK)  # NaN cosines propagate instead
    value = C.concrete_value(in_range)
    if value is None:
        cos_ok = jnp.all(in_range, axis=-1)
    elif not np.all(value):
        raise ValueError(
            f"`cos` must hold cosines in [-1, 1], got values up to "
            f"{float(np.nanmax(np.abs(np.asarray(cos)))):.4g} in magnitude; compute them "
            "with cosine_logits(embeddings, class_weights)."
        )
    else:
        cos_ok = True
    ok = C.all_ok(
        labels_ok,
        cos_ok,
        C.check_scalar("scale", scale, low=0, low_open=True),
        C.check_scalar(margin_name, margin, low=0, high=margin_high, high_open=True),
    )
    return cos, labels, ok


def cosine_logits(embeddings, class_weights, *, eps: float = 1e-12) -> jax.Array:
    r"""Cosines between embeddings ``(B, D)`` and class vectors ``class_weights (D, C)``.

    Rows of ``embeddings`` and columns of ``class_weights`` are normalised as
    ``x · rsqrt(max(‖x‖², eps))`` (a zero vector gives cosine 0, finite gradient).
    Rounding may put values a few ulps outside ``[−1, 1]``; the losses here are
    robust to that. Returns ``(B, C)`` in the promoted dtype.

    Oracle: ``tests/losses/test_margin.py::test_cosine_logits_matches_numpy``.
    """
    embeddings = C.float_array("embeddings", embeddings)
    class_weights = C.float_array("class_weights", class_weights)
    C.check_rank("embeddings", embeddings, 2)
    C.check_rank("class_weights", class_weights, 2)
    C.check_nonempty_last_axis("embeddings", embeddings)
    if embeddings.shape[1] != class_weights.shape[0]:
        raise ValueError(
            f"`class_weights` must have shape (D, C) with D = embeddings.shape[1] = "
            f"{embeddings.shape[1]}; got embeddings {embeddings.shape}, "
            f"class_weights {class_weights.shape}."
        )
    ok = C.check_scalar("eps", eps, low=0, low_open=True)
    return C.nan_unless(_cosine_logits(embeddings, class_weights, eps), ok)


@jax.jit
def _cosine_logits(embeddings, class_weights, eps):
    e = _normalise(C.promote(embeddings), -1, eps)
    w = _normalise(C.promote(class_weights), 0, eps)
    return e @ w


@jax.jit
def _cosface(cos, labels, scale, margin):
    cos = C.promote(cos)
    onehot = jax.nn.one_hot(labels, cos.shape[-1], dtype=cos.dtype)
    return C.cross_entropy_from_logits(scale * (cos - margin * onehot), labels)


def cosface_loss(cos, labels, *, scale: float = 30.0, margin: float = 0.35) -> jax.Array:
    r"""CosFace / AM-Softmax per example: ``CE(s·(cos − m·onehot_y), y)``.

    Args:
      cos: ``(..., C)`` cosines; labels: ``(...)`` integer classes.
      scale: ``s > 0``, default 30; margin: ``m ≥ 0``, default 0.35 (paper values).

    Oracle: ``tests/losses/test_margin.py::test_losses_match_numpy`` (float64 NumPy
    formula), ``check_grads`` and finite gradients at ``cos = ±1``.
    """
    cos, labels, ok = _check_common(cos, labels, scale, margin)
    return C.nan_unless(_cosface(cos, labels, scale, margin), ok)


@jax.jit
def _arcface(cos, labels, scale, margin, eps):
    cos = C.promote(cos)
    onehot = jax.nn.one_hot(labels, cos.shape[-1], dtype=jnp.bool_)
    cos_m, sin_m = jnp.cos(margin), jnp.sin(margin)
    sin = jnp.sqrt(jnp.maximum(1.0 - cos * cos, eps))
    target = cos * cos_m - sin * sin_m
    target = jnp.where(cos > -cos_m, target, cos - margin * sin_m)
    logits = scale * jnp.where(onehot, target, cos)
    return C.cross_entropy_from_logits(logits, labels)


def arcface_loss(
    cos, labels, *, scale: float = 64.0, margin: float = 0.5, eps: float = 1e-6
) -> jax.Array:
    r"""ArcFace per example: target logit ``cos(θ_y + m)``, others ``cos``, all times ``s``.

    ``cos(θ+m) = cos·cos m − sin·sin m`` with ``sin = sqrt(max(1 − cos², eps))``;
    for ``θ_y > π − m`` (``cos_y < −cos m``) the fallback ``cos − m·sin m``.
    ``eps=1e-6`` keeps the square root's gradient finite at ``cos = ±1`` in float32
    (it changes the target logit by at most ``sqrt(eps)·sin m``). ``0 ≤ margin < π``.

    Oracle: ``tests/losses/test_margin.py::test_losses_match_numpy`` (float64 NumPy
    with ``arccos``), ``check_grads`` and finite gradients at ``cos = ±1``.
    """
    cos, labels, ok = _check_common(cos, labels, scale, margin, margin_high=math.pi)
    ok = C.all_ok(ok, C.check_scalar("eps", eps, low=0, low_open=True))
    return C.nan_unless(_arcface(cos, labels, scale, margin, eps), ok)


def _chebyshev(x, m):
    t_prev, t = jnp.ones_like(x), x
    if m == 0:
        return t_prev
    for _ in range(m - 1):
        t_prev, t = t, 2.0 * x * t - t_prev
    return t


@functools.partial(jax.jit, static_argnames=("margin",))
def _sphereface(cos, labels, scale, margin, blend):
    cos = C.promote(cos)
    onehot = jax.nn.one_hot(labels, cos.shape[-1], dtype=jnp.bool_)
    c = jnp.clip(cos, -1.0, 1.0)
    thresholds = jnp.cos(jnp.arange(1, margin + 1) * (math.pi / margin)).astype(c.dtype)
    k = jnp.sum(c[..., None] <= thresholds, axis=-1).astype(c.dtype)  # θ ≥ kπ/m
    sign = 1.0 - 2.0 * jnp.mod(k, 2.0)
    psi = sign * _chebyshev(c, margin) - 2.0 * k
    target = (blend * cos + psi) / (1.0 + blend)
    logits = scale * jnp.where(onehot, target, cos)
    return C.cross_entropy_from_logits(logits, labels)


def sphereface_loss(
    cos, labels, *, scale: float = 30.0, margin: int = 4, blend: float = 0.0
) -> jax.Array:
    r"""SphereFace (A-Softmax, normalised features) per example.

    Target logit ``s·(λ·cos + ψ(θ))/(1 + λ)`` with ``ψ(θ) = (−1)^k cos(mθ) − 2k``,
    ``k = ⌊mθ/π⌋``; other logits ``s·cos``. Computed as ``(−1)^k T_m(cos) − 2k``
    with ``k = #{j ∈ 1..m : cos ≤ cos(jπ/m)}`` — a polynomial on each piece, so
    no ``arccos`` and a finite gradient at ``cos = ±1``. ``margin`` must be a
    positive integer (static); ``blend = λ ≥ 0`` (default 0, i.e. pure ψ).

    Oracle: ``tests/losses/test_margin.py::test_losses_match_numpy`` (float64 NumPy
    with ``arccos`` and ``cos(mθ)``), ``check_grads`` away from the piece joints.
    """
    if isinstance(margin, bool) or not isinstance(margin, int) or margin < 1:
        raise ValueError(f"`margin` must be a positive Python int for SphereFace, got {margin!r}.")
    cos, labels, ok = _check_common(cos, labels, scale, blend, margin_name="blend")
    return C.nan_unless(_sphereface(cos, labels, scale, margin, blend), ok)


@functools.partial(jax.jit, static_argnames=("metric",))
def _metric_margin(cos, labels, metric, scale, margin):
    cos = C.promote(cos)
    d = _distance(cos, metric)
    onehot = jax.nn.one_hot(labels, cos.shape[-1], dtype=cos.dtype)
    return C.cross_entropy_from_logits(-scale * (d + margin * onehot), labels)


def metric_margin_loss(
    cos, labels, *, metric: str = "chord", scale: float = 30.0, margin: float = 0.35
) -> jax.Array:
    r"""Triangle-inequality margin loss for a true metric ``d`` on the sphere.

    ``log(1 + Σ_{j≠y} exp(s·(d(z,c_y) + m − d(z,c_j))))``, computed stably as
    ``CE(−s·(d + m·onehot_y), y)``. ``metric`` ∈ ``{"chord": sqrt(2 − 2cos),
    "sqrt_one_minus_cos": sqrt(1 − cos), "angle": θ}``. Defaults ``s=30, m=0.35``
    follow CosFace (chord and angle change about one-for-one with ``cos`` in the
    middle of the range); prefer ``margin=estimate_margin(...)``.

    Oracle: ``tests/losses/test_margin.py::test_losses_match_numpy`` (float64 NumPy
    with ``arccos``/``sqrt``), ``check_grads`` and finite gradients at ``cos = ±1``.
    """
    _check_metric(metric)
    cos, labels, ok = _check_common(cos, labels, scale, margin)
    return C.nan_unless(_metric_margin(cos, labels, metric, scale, margin), ok)


@functools.partial(jax.jit, static_argnames=("num_classes", "metric"))
def _estimate_margin(embeddings, labels, num_classes, metric):
    z = _normalise(C.promote(embeddings), -1)
    centres = jax.ops.segment_sum(z, labels, num_segments=num_classes)
    centres = _normalise(centres, -1)  # zero-count classes stay the zero vector, unused
    cos = jnp.sum(z * centres[labels], axis=-1)
    return 2.0 * jnp.mean(_distance(cos, metric))


def estimate_margin(embeddings, labels, *, num_classes: int, metric: str = "chord") -> jax.Array:
    r"""Twice the mean within-class distance ``d(z_i, c_{y_i})`` to the class centre.

    Embeddings ``(B, D)`` are normalised; centre ``c_k`` = normalised mean of the
    normalised embeddings of class ``k``. The mean runs over the ``B`` examples, so
    classes absent from the batch (zero count) contribute nothing. Returns a scalar
    (wrap in ``jax.lax.stop_gradient`` when used as a margin inside a loss); NaN under
    ``jit`` if a label is outside ``[0, num_classes)`` (concrete ones raise).

    Oracle: ``tests/losses/test_margin.py::test_estimate_margin_matches_numpy``.
    """
    _check_metric(metric)
    embeddings = C.float_array("embeddings", embeddings)
    C.check_rank("embeddings", embeddings, 2)
    C.check_nonempty_last_axis("embeddings", embeddings)
    labels = jnp.asarray(labels)
    C.check_shape("labels", labels, embeddings.shape[:1])
    C.check_static_int("num_classes", num_classes)
    labels, ok = C.check_labels("labels", labels, num_classes)
    return C.nan_unless(_estimate_margin(embeddings, labels, num_classes, metric), jnp.all(ok))

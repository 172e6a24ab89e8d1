"""Tests for mtl_optax.losses.margin against float64 NumPy formulas (with arccos)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import logsumexp as np_lse

from mtl_optax.losses import (
    arcface_loss,
    cosface_loss,
    cosine_logits,
    estimate_margin,
    metric_margin_loss,
    sphereface_loss,
)
from tests.losses._gradcheck import check_grad_fd


def _np_ce(logits, y):
    return np_lse(logits, axis=-1) - np.take_along_axis(logits, y[..., None], -1)[..., 0]


def _np_cosface(c, y, scale=30.0, margin=0.35):
    return _np_ce(scale * (c - margin * np.eye(c.shape[-1])[y]), y)


def _np_arcface(c, y, scale=64.0, margin=0.5):
    s, m = scale, margin
    theta = np.arccos(np.clip(c, -1, 1))
    target = np.where(theta <= np.pi - m, np.cos(theta + m), c - m * np.sin(m))
    return _np_ce(s * np.where(np.eye(c.shape[-1], dtype=bool)[y], target, c), y)


def _np_sphereface(c, y, scale=30.0, margin=4, blend=0.0):
    s, m = scale, margin
    theta = np.arccos(np.clip(c, -1, 1))
    k = np.minimum(np.floor(m * theta / np.pi), m - 1)
    psi = (-1.0) ** k * np.cos(m * theta) - 2 * k
    target = (blend * c + psi) / (1 + blend)
    return _np_ce(s * np.where(np.eye(c.shape[-1], dtype=bool)[y], target, c), y)


_NP_DIST = {
    "chord": lambda c: np.sqrt(np.maximum(2 - 2 * c, 0)),
    "sqrt_one_minus_cos": lambda c: np.sqrt(np.maximum(1 - c, 0)),
    "angle": lambda c: np.arccos(np.clip(c, -1, 1)),
}


def _np_metric(c, y, metric="chord", scale=30.0, margin=0.35):
    s, m = scale, margin
    d = _NP_DIST[metric](c)
    dy = np.take_along_axis(d, y[:, None], -1)
    z = s * (dy + m - d)
    z = np.where(np.eye(c.shape[-1], dtype=bool)[y], -np.inf, z)
    return np.logaddexp(0.0, np_lse(z, axis=-1))


CASES = [
    (cosface_loss, _np_cosface, {}),
    (cosface_loss, _np_cosface, {"scale": 10.0, "margin": 0.2}),
    (arcface_loss, _np_arcface, {}),
    (arcface_loss, _np_arcface, {"scale": 16.0, "margin": 0.3}),
    (sphereface_loss, _np_sphereface, {}),
    (sphereface_loss, _np_sphereface, {"margin": 3, "blend": 2.0}),
    (metric_margin_loss, _np_metric, {"metric": "chord"}),
    (metric_margin_loss, _np_metric, {"metric": "sqrt_one_minus_cos", "margin": 0.2}),
    (metric_margin_loss, _np_metric, {"metric": "angle", "scale": 8.0}),
]
IDS = [f"{f.__name__}-{i}" for i, (f, _, _) in enumerate(CASES)]


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    c = rng.uniform(-0.98, 0.98, size=(6, 5))
    y = rng.integers(0, 5, size=(6,)).astype(np.int32)
    return c, y


@pytest.mark.parametrize("fn,ref,kw", CASES, ids=IDS)
def test_losses_match_numpy(data, fn, ref, kw):
    c, y = data
    out = fn(c.astype(np.float32), y, **kw)
    assert out.shape == (6,) and out.dtype == jnp.float32
    np.testing.assert_allclose(out, ref(c, y, **kw), rtol=2e-4, atol=2e-4)


GRAD_CASES = [CASES[i] for i in (0, 2, 4, 5, 6, 7, 8)]  # every code path once


@pytest.mark.parametrize("fn,ref,kw", GRAD_CASES, ids=[IDS[i] for i in (0, 2, 4, 5, 6, 7, 8)])
def test_gradients_interior_and_boundary(data, fn, ref, kw):
    c, y = data
    check_grad_fd(lambda x: fn(x, y, **kw).sum(), c, rtol=1e-4, atol=1e-5)
    # cos = +-1 exactly, on targets and non-targets
    cb = c.astype(np.float32).copy()
    cb[np.arange(6), y] = np.array([1, -1, 1, -1, 1, -1])
    cb[0, (y[0] + 1) % 5] = -1.0
    cb[1, (y[1] + 1) % 5] = 1.0
    value = fn(cb, y, **kw)
    grad = jax.jit(jax.grad(lambda x: fn(x, y, **kw).sum()))(cb)
    assert np.all(np.isfinite(value)) and np.all(np.isfinite(grad))
    # values at the boundary agree with the exact formula (ArcFace's eps shifts its
    # target logit by at most sqrt(eps) * sin(m) * s)
    tol = 0.05 if fn is arcface_loss else 2e-4
    np.testing.assert_allclose(value, ref(cb.astype(np.float64), y, **kw), rtol=tol, atol=tol)


def test_cosine_logits_matches_numpy():
    rng = np.random.default_rng(1)
    e = rng.normal(size=(4, 3)).astype(np.float32)
    w = rng.normal(size=(3, 5)).astype(np.float32)
    e[2] = 0.0  # zero embedding: cosine 0, finite gradient
    ref = (e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-30)) @ (
        w / np.linalg.norm(w, axis=0, keepdims=True)
    )
    out = cosine_logits(e, w)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    g = jax.grad(lambda a, b: cosine_logits(a, b).sum(), argnums=(0, 1))(e, w)
    assert all(np.all(np.isfinite(x)) for x in g)


@pytest.mark.parametrize("metric", ["chord", "sqrt_one_minus_cos", "angle"])
def test_estimate_margin_matches_numpy(metric):
    rng = np.random.default_rng(2)
    z = rng.normal(size=(10, 4)).astype(np.float32)
    y = np.array([0, 0, 0, 2, 2, 2, 2, 3, 3, 0])  # classes 1 and 4 have zero count
    out = estimate_margin(z, y, num_classes=5, metric=metric)
    zn = z.astype(np.float64) / np.linalg.norm(z, axis=1, keepdims=True)
    dists = []
    for k in (0, 2, 3):
        centre = zn[y == k].mean(0)
        centre /= np.linalg.norm(centre)
        dists.extend(_NP_DIST[metric](zn[y == k] @ centre))
    assert out.shape == () and np.isfinite(out)
    np.testing.assert_allclose(out, 2 * np.mean(dists), rtol=1e-4, atol=1e-6)


def test_jit_and_vmap(data):
    c, y = data
    cc = np.stack([c, -c]).astype(np.float32)
    yy = np.stack([y, y])
    for fn, _, kw in CASES[::2]:
        eager = np.stack([fn(cc[i], yy[i], **kw) for i in range(2)])
        vm = jax.jit(jax.vmap(lambda a, b, f=fn, k=kw: f(a, b, **k)))(cc, yy)
        np.testing.assert_allclose(vm, eager, rtol=1e-5, atol=1e-5)
    # vmap over a traced margin hyper-parameter
    margins = jnp.array([0.1, 0.5])
    out = jax.vmap(lambda m: arcface_loss(c, y, margin=m))(margins)
    np.testing.assert_allclose(out[1], _np_arcface(c, y, margin=0.5), rtol=2e-4, atol=2e-4)


def test_bfloat16_input():
    c = jnp.asarray([[0.5, -0.25, 1.0]], jnp.bfloat16)
    y = jnp.array([2])
    for fn, ref, kw in CASES[::2]:
        out = fn(c, y, **kw)
        assert out.dtype == jnp.float32
        np.testing.assert_allclose(
            out, ref(np.asarray(c, np.float64), np.asarray(y), **kw), rtol=1e-3, atol=1e-3
        )


def test_bad_inputs_raise():
    c = jnp.zeros((3, 4))
    with pytest.raises(ValueError, match=r"`labels` must have shape \(3,\)"):
        cosface_loss(c, jnp.array([0, 1]))
    with pytest.raises(ValueError, match=r"`labels` must lie in \[0, 4\)"):
        arcface_loss(c, jnp.array([0, 1, 4]))
    with pytest.raises(ValueError, match="`labels` must be an integer array"):
        arcface_loss(c, jnp.array([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="`scale` must be finite and positive"):
        cosface_loss(c, jnp.array([0, 1, 2]), scale=0.0)
    with pytest.raises(ValueError, match=r"`margin` must be finite and in \[0, 3.14159"):
        arcface_loss(c, jnp.array([0, 1, 2]), margin=-0.1)
    with pytest.raises(ValueError, match="`margin` must be finite and non-negative"):
        cosface_loss(c, jnp.array([0, 1, 2]), margin=-0.1)
    with pytest.raises(ValueError, match="`margin` must be a positive Python int"):
        sphereface_loss(c, jnp.array([0, 1, 2]), margin=2.5)
    with pytest.raises(ValueError, match="`metric` must be one of"):
        metric_margin_loss(c, jnp.array([0, 1, 2]), metric="cosine")
    with pytest.raises(ValueError, match=r"`class_weights` must have shape \(D, C\)"):
        cosine_logits(jnp.ones((2, 3)), jnp.ones((4, 5)))
    with pytest.raises(ValueError, match=r"`labels` must lie in \[0, 3\)"):
        estimate_margin(jnp.ones((2, 3)), jnp.array([0, 3]), num_classes=3)

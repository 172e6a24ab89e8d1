"""Tests for mtl_optax.losses.imbalance against float64 NumPy/SciPy formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import expit
from scipy.special import log_softmax as np_log_softmax

from mtl_optax.losses import (
    class_balanced_weights,
    class_priors,
    f1_weighted_binary_cross_entropy,
    ldam_loss,
    logit_adjusted_cross_entropy,
    posthoc_logit_adjustment,
    prior_bias_init,
    softmax_focal_loss,
)
from tests.losses._gradcheck import check_grad_fd


def _np_ce(logits, y):
    return -np.take_along_axis(np_log_softmax(logits, -1), y[..., None], -1)[..., 0]


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 4)) * 2
    y = np.array([0, 0, 0, 1, 3, 0], np.int32)  # class 2 has zero count
    return logits, y


def test_class_priors_and_logit_adjustment(data):
    logits, y = data
    pri = class_priors(y, num_classes=4)
    np.testing.assert_allclose(pri, np.bincount(y, minlength=4) / 6, rtol=1e-6)
    smooth = (np.bincount(y, minlength=4) + 1.0) / 10.0
    for tau in (1.0, 0.5):
        out = logit_adjusted_cross_entropy(
            logits.astype(np.float32), y, class_priors=smooth, tau=tau
        )
        np.testing.assert_allclose(out, _np_ce(logits + tau * np.log(smooth), y), rtol=1e-5)
        adj = posthoc_logit_adjustment(logits.astype(np.float32), class_priors=smooth, tau=tau)
        np.testing.assert_allclose(adj, logits - tau * np.log(smooth), rtol=1e-5, atol=1e-6)
    bias = prior_bias_init(smooth)
    np.testing.assert_allclose(jax.nn.softmax(bias), smooth / smooth.sum(), rtol=1e-5)
    check_grad_fd(lambda x: logit_adjusted_cross_entropy(x, y, class_priors=smooth).sum(), logits)


def _np_f1_bce(x, y, mask):
    p = expit(x)
    f1 = 2 * np.sum(mask * y * p) / np.sum(mask * (y + p))
    loss = -(y * (1 - f1 / 2) * np.log(p) + (1 - y) * (f1 / 2) * np.log1p(-p))
    return np.where(mask, loss, 0.0), f1


def test_f1_weighted_bce_matches_numpy():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(8, 3)) * 2
    y = (rng.random((8, 3)) < 0.3).astype(np.float32)
    mask = rng.random((8, 3)) < 0.8
    ref, f1 = _np_f1_bce(x, y, np.ones_like(mask))
    np.testing.assert_allclose(
        f1_weighted_binary_cross_entropy(x.astype(np.float32), y), ref, rtol=1e-5, atol=1e-6
    )
    ref_m, f1_m = _np_f1_bce(x, y, mask)
    out = f1_weighted_binary_cross_entropy(x.astype(np.float32), y.astype(bool), where=mask)
    np.testing.assert_allclose(out, ref_m, rtol=1e-5, atol=1e-6)
    # per-column F (axis=0) for multi-label use
    cols = [_np_f1_bce(x[:, j], y[:, j], np.ones(8))[0] for j in range(3)]
    np.testing.assert_allclose(
        f1_weighted_binary_cross_entropy(x, y, axis=0), np.stack(cols, 1), rtol=1e-5, atol=1e-6
    )
    # F is stop-gradient: the gradient is that of the weighted BCE with F held fixed
    xs = jnp.asarray(x, jnp.float32)
    g = jax.grad(lambda z: f1_weighted_binary_cross_entropy(z, y, where=mask).sum())(xs)
    p = expit(x)
    g_ref = np.where(mask, -(y * (1 - f1_m / 2) * (1 - p) - (1 - y) * (f1_m / 2) * p), 0.0)
    np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-6)
    # extreme logits: finite (log_sigmoid), no NaN
    big = jnp.array([[100.0, -100.0, 0.0]])
    out = f1_weighted_binary_cross_entropy(big, jnp.array([[0.0, 1.0, 1.0]]))
    assert np.all(np.isfinite(out))
    assert np.all(
        np.isfinite(
            jax.grad(
                lambda z: f1_weighted_binary_cross_entropy(z, jnp.array([[0.0, 1.0, 1.0]])).sum()
            )(big)
        )
    )


def test_focal_matches_numpy(data):
    logits, y = data
    p_y = np.exp(-_np_ce(logits, y))
    for gamma in (0.0, 2.0, 0.5):
        out = softmax_focal_loss(logits.astype(np.float32), y, gamma=gamma)
        np.testing.assert_allclose(
            out, (1 - p_y) ** gamma * _np_ce(logits, y), rtol=1e-5, atol=1e-7
        )
    check_grad_fd(lambda x: softmax_focal_loss(x, y, gamma=2.0).sum(), logits)
    # p_y == 1 exactly in float32: loss 0, gradient finite for gamma in {0, 0.5, 2}
    sure = jnp.array([[50.0, -50.0, -50.0]])
    for gamma in (0.0, 0.5, 2.0):
        g = jax.grad(lambda x, gm=gamma: softmax_focal_loss(x, jnp.array([0]), gamma=gm).sum())(
            sure
        )
        assert np.all(np.isfinite(g))


def _np_cb(n, beta):
    w = np.where(n > 0, (1 - beta) / (1 - beta ** np.maximum(n, 1)), 0.0)
    return w * len(n) / w.sum()


def test_class_balanced_weights_matches_numpy():
    n = np.array([1000, 10, 0, 1])
    for beta in (0.9999, 0.9, 0.0):
        w = class_balanced_weights(n, beta=beta)
        np.testing.assert_allclose(w, _np_cb(n.astype(np.float64), beta), rtol=1e-4)
        assert np.isclose(float(w.sum()), 4.0, rtol=1e-5) and w[2] == 0.0
    # beta -> 1 approaches inverse frequency (normalised)
    inv = np.array([1 / 1000, 1 / 10, 0, 1.0])
    np.testing.assert_allclose(
        class_balanced_weights(n, beta=1 - 1e-7), inv * 4 / inv.sum(), rtol=1e-3
    )


def _np_ldam(logits, y, counts, m=0.5, s=30.0):
    present = counts > 0
    marg = np.where(present, 1 / np.maximum(counts, 1) ** 0.25, 0.0)
    marg = np.where(present, marg * m / marg[present].max(), m)
    return _np_ce(s * (logits - marg[y][:, None] * np.eye(logits.shape[1])[y]), y)


def test_ldam_matches_numpy(data):
    logits, y = data
    cos = np.tanh(logits)
    counts = np.array([500, 20, 0, 3])
    out = ldam_loss(cos.astype(np.float32), y, class_counts=counts)
    np.testing.assert_allclose(out, _np_ldam(cos, y, counts), rtol=1e-5, atol=1e-5)
    out = ldam_loss(cos, y, class_counts=counts, max_margin=0.3, scale=10.0)
    np.testing.assert_allclose(out, _np_ldam(cos, y, counts, 0.3, 10.0), rtol=1e-5, atol=1e-5)
    check_grad_fd(lambda x: ldam_loss(x, y, class_counts=counts).sum(), cos)


def test_jit_and_vmap(data):
    logits, y = data
    logits = logits.astype(np.float32)
    xx, yy = np.stack([logits, -logits]), np.stack([y, y])
    pri = np.array([0.4, 0.3, 0.1, 0.2])
    counts = np.array([5, 3, 0, 1])
    fns = [
        lambda a, b: logit_adjusted_cross_entropy(a, b, class_priors=pri),
        lambda a, b: softmax_focal_loss(a, b),
        lambda a, b: ldam_loss(a, b, class_counts=counts),
        lambda a, b: f1_weighted_binary_cross_entropy(a, b[:, None] == jnp.arange(4)),
    ]
    for fn in fns:
        vm = jax.jit(jax.vmap(fn))(xx, yy)
        np.testing.assert_allclose(vm[1], fn(xx[1], yy[1]), rtol=1e-5, atol=1e-6)
    # vmap over traced hyper-parameters
    out = jax.vmap(lambda b: class_balanced_weights(counts, beta=b))(jnp.array([0.0, 0.9]))
    np.testing.assert_allclose(out[1], _np_cb(counts.astype(np.float64), 0.9), rtol=1e-4)
    assert softmax_focal_loss(jnp.asarray(logits, jnp.bfloat16), y).dtype == jnp.float32


def test_bad_inputs_raise(data):
    logits, y = data
    with pytest.raises(ValueError, match="`class_priors` must be finite and positive"):
        logit_adjusted_cross_entropy(logits, y, class_priors=np.array([0.5, 0.5, 0.0, 0.0]))
    with pytest.raises(ValueError, match=r"`class_priors` must have shape \(4,\)"):
        posthoc_logit_adjustment(logits, class_priors=np.ones(3))
    with pytest.raises(ValueError, match=r"`labels` must lie in \[0, 4\)"):
        softmax_focal_loss(logits, y + 1)
    with pytest.raises(ValueError, match="`class_counts` must be finite and non-negative"):
        class_balanced_weights(np.array([3, -1]))
    with pytest.raises(ValueError, match=r"`beta` must be finite and in \[0, 1\)"):
        class_balanced_weights(np.array([3, 1]), beta=1.0)
    with pytest.raises(ValueError, match=r"`class_counts` must have shape \(4,\)"):
        ldam_loss(logits, y, class_counts=np.array([1, 2]))
    with pytest.raises(ValueError, match=r"`labels` must have shape \(6, 4\)"):
        f1_weighted_binary_cross_entropy(logits, y)
    with pytest.raises(ValueError, match="`gamma` must be finite and non-negative"):
        softmax_focal_loss(logits, y, gamma=-1.0)

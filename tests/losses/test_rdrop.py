"""Tests for mtl_optax.losses.rdrop against float64 NumPy/SciPy and a flax Dropout model."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import log_softmax as np_log_softmax
from scipy.special import rel_entr

from mtl_optax.losses import (
    rdrop_consistency,
    rdrop_loss,
    rdrop_regression_loss,
    two_pass_duplicated,
    two_pass_vmap,
)
from tests.losses._gradcheck import check_grad_fd


def _np_sym_kl(a, b):
    p, q = np.exp(np_log_softmax(a, -1)), np.exp(np_log_softmax(b, -1))
    return 0.5 * (rel_entr(q, p).sum(-1) + rel_entr(p, q).sum(-1))


def _np_rdrop(a, b, y, alpha):
    ce = lambda z: -np.take_along_axis(np_log_softmax(z, -1), y[..., None], -1)[..., 0]
    return ce(a) + ce(b) + alpha * _np_sym_kl(a, b)


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 5, 4)) * 2
    y = rng.integers(0, 4, size=(5,)).astype(np.int32)
    return a, b, y


def test_rdrop_matches_numpy(data):
    a, b, y = data
    a32, b32 = a.astype(np.float32), b.astype(np.float32)
    for alpha in (0.0, 4.0):
        np.testing.assert_allclose(
            rdrop_loss(a32, b32, y, alpha=alpha), _np_rdrop(a, b, y, alpha), rtol=1e-5, atol=1e-5
        )
    np.testing.assert_allclose(rdrop_consistency(a32, b32), _np_sym_kl(a, b), rtol=1e-5, atol=1e-6)
    # gradients reach both passes (no stop-gradient) and match finite differences
    g1 = check_grad_fd(lambda u, v: rdrop_loss(u, v, y).sum(), a, b, argnum=0)
    g2 = check_grad_fd(lambda u, v: rdrop_loss(u, v, y).sum(), a, b, argnum=1)
    assert np.abs(g1).sum() > 0 and np.abs(g2).sum() > 0
    gk = check_grad_fd(lambda u, v: rdrop_consistency(u, v).sum(), a, b, argnum=1)
    assert np.abs(gk).sum() > 0
    # masked classes (-inf in both passes) contribute 0, no NaN
    am, bm = a32.copy(), b32.copy()
    am[:, 3] = bm[:, 3] = -np.inf
    kl = rdrop_consistency(am, bm)
    np.testing.assert_allclose(kl, _np_sym_kl(a[:, :3], b[:, :3]), rtol=1e-5, atol=1e-6)
    g = jax.grad(lambda u: rdrop_consistency(u, bm).sum())(am)
    assert np.all(np.isfinite(g))


def test_rdrop_regression_matches_numpy():
    rng = np.random.default_rng(1)
    p1, p2, t = rng.normal(size=(3, 4, 2))
    ref = (p1 - t) ** 2 + (p2 - t) ** 2 + 2.5 * (p1 - p2) ** 2
    out = rdrop_regression_loss(
        p1.astype(np.float32), p2.astype(np.float32), t.astype(np.float32), alpha=2.5
    )
    np.testing.assert_allclose(out, ref, rtol=1e-5)
    out = rdrop_regression_loss(p1, p2, t.astype(np.float32), alpha=2.5, axis=-1)
    np.testing.assert_allclose(out, ref.sum(-1), rtol=1e-5)


class _MLP(nn.Module):
    rate: float = 0.5

    @nn.compact
    def __call__(self, x, *, train: bool):
        x = nn.relu(nn.Dense(16)(x))
        x = nn.Dropout(self.rate, deterministic=not train)(x)
        return nn.Dense(3)(x)


def test_flax_two_pass_helpers():
    model = _MLP()
    x = jnp.asarray(np.random.default_rng(2).normal(size=(4, 5)), jnp.float32)
    y = jnp.array([0, 1, 2, 0])
    params = jax.jit(lambda k, inp: model.init(k, inp, train=False))(jax.random.key(0), x)
    key = jax.random.key(1)

    @functools.partial(jax.jit, static_argnames="train")
    def apply_fn(k, inp, train=True):
        return model.apply(params, inp, train=train, rngs={"dropout": k})

    # vmap over two keys: each pass equals a direct call with its own key, and they differ
    two = jax.jit(lambda k, inp: two_pass_vmap(apply_fn, k, inp))(key, x)
    assert two.shape == (2, 4, 3)
    k1, k2 = jax.random.split(key)
    np.testing.assert_allclose(two[0], apply_fn(k1, x), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(two[1], apply_fn(k2, x), rtol=1e-5, atol=1e-6)
    assert np.abs(np.asarray(two[0] - two[1])).max() > 1e-3
    assert np.all(np.asarray(rdrop_consistency(two[0], two[1])) > 0)

    # one forward on the duplicated batch: halves see different masks
    dup = two_pass_duplicated(apply_fn, key, x)
    assert dup.shape == (2, 4, 3)
    assert np.abs(np.asarray(dup[0] - dup[1])).max() > 1e-3
    # raw uint32 keys work too
    raw = two_pass_vmap(apply_fn, jax.random.PRNGKey(3), x)
    assert raw.shape == (2, 4, 3)

    # deterministic (dropout off): both helpers give identical passes, KL exactly 0
    det = lambda k, inp: apply_fn(k, inp, train=False)
    for pair in (two_pass_vmap(det, key, x), two_pass_duplicated(det, key, x)):
        np.testing.assert_array_equal(pair[0], pair[1])
        assert np.all(np.asarray(rdrop_consistency(pair[0], pair[1])) == 0.0)
        p0 = np.asarray(pair[0], np.float64)
        ce2 = _np_rdrop(p0, p0, np.asarray(y), 0.0)  # = 2 * CE, the KL term vanishes
        np.testing.assert_allclose(rdrop_loss(pair[0], pair[1], y), ce2, rtol=1e-5)


def test_jit_and_vmap(data):
    a, b, y = data
    a, b = a.astype(np.float32), b.astype(np.float32)
    aa, bb, yy = np.stack([a, b]), np.stack([b, a]), np.stack([y, y])
    out = jax.jit(jax.vmap(lambda u, v, t: rdrop_loss(u, v, t, alpha=1.0)))(aa, bb, yy)
    np.testing.assert_allclose(out[0], rdrop_loss(a, b, y, alpha=1.0), rtol=1e-6)
    # symmetric in the two passes
    np.testing.assert_allclose(out[1], out[0], rtol=1e-6)
    alphas = jnp.array([0.0, 4.0])
    out = jax.vmap(lambda al: rdrop_loss(a, b, y, alpha=al))(alphas)
    np.testing.assert_allclose(
        out[1], _np_rdrop(a.astype(np.float64), b.astype(np.float64), y, 4.0), rtol=1e-5
    )
    assert rdrop_loss(jnp.asarray(a, jnp.bfloat16), b, y).dtype == jnp.float32


def test_bad_inputs_raise(data):
    a, b, y = data
    with pytest.raises(ValueError, match=r"`logits2` must have shape \(5, 4\)"):
        rdrop_loss(a, b[:, :3], y)
    with pytest.raises(ValueError, match=r"`labels` must lie in \[0, 4\)"):
        rdrop_loss(a, b, y + 4)
    with pytest.raises(ValueError, match="`alpha` must be finite and non-negative"):
        rdrop_loss(a, b, y, alpha=-1.0)
    with pytest.raises(ValueError, match=r"`targets` must have shape \(5, 4\)"):
        rdrop_regression_loss(a, b, a[:2])
    with pytest.raises(ValueError, match="leading axis 2\\*B = 10"):
        two_pass_duplicated(lambda k, x: x[:3], jax.random.key(0), jnp.ones((5, 2)))

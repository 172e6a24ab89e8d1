"""Tests for mtl_optax.losses.contrastive against float64 NumPy/SciPy oracles."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import logsumexp as np_lse

from mtl_optax.losses import flat_nce, info_nce, simclr_scores
from tests.losses._gradcheck import check_grad_fd


def _np_info_nce(s, t, valid):
    s = np.where(valid, s.astype(np.float64), -np.inf)
    st = np.take_along_axis(s, t[..., None], -1)[..., 0]
    return np_lse(s, axis=-1) - st


def _np_flat_nce(s, t, valid):
    s = np.where(valid, s.astype(np.float64), -np.inf)
    st = np.take_along_axis(s, t[..., None], -1)[..., 0]
    neg = valid & (np.arange(s.shape[-1]) != t[..., None])
    return np_lse(np.where(neg, s, -np.inf), axis=-1) - st


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    s = rng.normal(size=(3, 4, 7)).astype(np.float32) * 3
    t = rng.integers(0, 7, size=(3, 4))
    valid = rng.random((3, 4, 7)) > 0.3
    valid[np.arange(3)[:, None], np.arange(4)[None], t] = True  # positives always valid
    return s, t, valid


@pytest.mark.parametrize("fn,ref", [(info_nce, _np_info_nce), (flat_nce, _np_flat_nce)])
def test_values_match_numpy(data, fn, ref):
    s, t, valid = data
    all_valid = np.ones_like(valid)
    np.testing.assert_allclose(fn(s, t), ref(s, t, all_valid), rtol=1e-5, atol=1e-5)
    # boolean mask positives give the same result
    mask = np.arange(7) == t[..., None]
    np.testing.assert_allclose(fn(s, mask), ref(s, t, all_valid), rtol=1e-5, atol=1e-5)
    # `where` masks and equivalent -inf entries
    np.testing.assert_allclose(fn(s, t, where=valid), ref(s, t, valid), rtol=1e-5, atol=1e-5)
    s_inf = np.where(valid, s, -np.inf)
    np.testing.assert_allclose(fn(s_inf, t), ref(s, t, valid), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fn,ref", [(info_nce, _np_info_nce), (flat_nce, _np_flat_nce)])
def test_axis_argument(data, fn, ref):
    s, t, valid = data
    expected = ref(s, t, valid)  # (3, 4), candidates on the last axis
    st = np.moveaxis(s, -1, 1)  # (3, 7, 4)
    out = fn(st, t, where=np.moveaxis(valid, -1, 1), axis=1)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    mask = np.moveaxis(np.arange(7) == t[..., None], -1, 1)
    np.testing.assert_allclose(
        fn(st, mask, where=np.moveaxis(valid, -1, 1), axis=1), expected, rtol=1e-5, atol=1e-5
    )


def test_info_nce_is_log_one_plus_xi(data):
    s, t, _ = data
    s64 = s.astype(np.float64)
    st = np.take_along_axis(s64, t[..., None], -1)
    xi = np.exp(s64 - st).sum(-1) - 1.0
    np.testing.assert_allclose(info_nce(s, t), np.log1p(xi), rtol=1e-5)
    np.testing.assert_allclose(flat_nce(s, t), np.log(xi), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fn", [info_nce, flat_nce])
def test_check_grads_with_masks(data, fn):
    s, t, valid = data
    with jax.enable_x64(True):
        s64 = jnp.asarray(s, jnp.float64)
        check_grad_fd(lambda x: fn(x, t, where=valid).sum(), s64)
        # -inf entries: finite, zero gradient on them
        g = jax.jit(jax.grad(lambda x: fn(jnp.where(valid, x, -jnp.inf), t).sum()))(s64)
        assert np.all(np.isfinite(g))
        assert np.all(np.asarray(g)[~valid] == 0.0)


def test_flat_nce_gradient_identities(data):
    s, t, _ = data
    s = jnp.asarray(s[0])
    t = t[0]
    g_flat = jax.grad(lambda x: flat_nce(x, t).sum())(s)
    g_paper = jax.grad(
        lambda x: jnp.exp(flat_nce(x, t) - jax.lax.stop_gradient(flat_nce(x, t))).sum()
    )(s)
    np.testing.assert_allclose(g_flat, g_paper, rtol=1e-6, atol=1e-7)
    # (1 + xi) / xi * grad InfoNCE, with xi and softmax from a float64 NumPy oracle
    s64 = np.asarray(s, np.float64)
    st = s64[np.arange(4), t][:, None]
    xi = np.exp(s64 - st).sum(-1) - 1.0
    p = np.exp(s64 - np_lse(s64, axis=-1, keepdims=True))
    g_info_ref = p - (np.arange(7) == t[:, None])
    np.testing.assert_allclose(g_flat, ((1 + xi) / xi)[:, None] * g_info_ref, rtol=1e-5, atol=1e-6)
    g_info = jax.grad(lambda x: info_nce(x, t).sum())(s)
    np.testing.assert_allclose(g_info, g_info_ref, rtol=1e-5, atol=1e-6)


def test_flat_nce_float32_precision_when_positive_dominates():
    rng = np.random.default_rng(1)
    n = 16
    neg = rng.normal(size=(n,))
    s64 = np.concatenate([[neg.max() + 30.0 + rng.random()], neg])  # positive 30+ above
    t = 0
    # float64 references
    xi = np.exp(s64[1:] - s64[0]).sum()
    flat_ref = np.concatenate([[-1.0], np.exp(s64[1:] - np_lse(s64[1:]))])
    # -xi/(1+xi) for the positive, written so that even float64 does not cancel
    info_ref = np.exp(s64 - np_lse(s64))
    info_ref[t] = -xi / (1 + xi)
    np.testing.assert_allclose(flat_ref, (1 + xi) / xi * info_ref, rtol=1e-8)  # sanity
    s32 = jnp.asarray(s64, jnp.float32)
    g_flat = jax.grad(lambda x: flat_nce(x, t))(s32)
    assert g_flat.dtype == jnp.float32
    np.testing.assert_allclose(g_flat, flat_ref, rtol=1e-5, atol=0)
    # the naive softmax-CE gradient of InfoNCE in float32 loses the positive entirely
    naive = jax.nn.softmax(s32) - jax.nn.one_hot(t, n + 1)
    assert info_ref[t] < 0
    rel_err = abs(float(naive[t]) - info_ref[t]) / abs(info_ref[t])
    assert rel_err > 1e-5, rel_err
    assert float(naive[t]) == 0.0  # softmax(s)_t rounds to exactly 1
    # and rescaling it by (1+xi)/xi cannot recover the FlatNCE direction
    recovered = (1 + xi) / xi * np.asarray(naive, np.float64)
    assert abs(recovered[t] - flat_ref[t]) > 0.5


def test_flat_nce_no_negative_row_is_zero_without_nan():
    s = jnp.array([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]])
    where = jnp.array([[True, False, False], [True, True, True]])
    t = jnp.array([0, 2])
    loss = flat_nce(s, t, where=where)
    assert loss[0] == 0.0
    g = jax.grad(lambda x: flat_nce(x, t, where=where).sum())(s)
    assert np.all(np.isfinite(g)) and np.all(np.asarray(g)[0] == 0.0)


def _np_simclr(z1, z2, temp):
    z = np.concatenate([z1, z2]).astype(np.float64)
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    s = z @ z.T / temp
    np.fill_diagonal(s, -np.inf)
    b = z1.shape[0]
    return s, np.concatenate([np.arange(b) + b, np.arange(b)])


def test_simclr_scores_matches_numpy():
    rng = np.random.default_rng(2)
    z1, z2 = rng.normal(size=(2, 5, 6)).astype(np.float32)
    scores, pos = simclr_scores(z1, z2, temperature=0.2)
    ref_s, ref_p = _np_simclr(z1, z2, 0.2)
    assert scores.shape == (10, 10) and pos.shape == (10,)
    np.testing.assert_array_equal(pos, ref_p)
    np.testing.assert_allclose(scores, ref_s, rtol=1e-5, atol=1e-5)
    valid = ~np.eye(10, dtype=bool)
    np.testing.assert_allclose(
        info_nce(scores, pos), _np_info_nce(ref_s, ref_p, valid), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(
        flat_nce(scores, pos), _np_flat_nce(ref_s, ref_p, valid), rtol=1e-5, atol=1e-4
    )


@pytest.mark.parametrize("fn", [info_nce, flat_nce])
def test_simclr_gradients_finite_including_identical_and_zero_views(fn):
    rng = np.random.default_rng(3)
    z1 = rng.normal(size=(4, 3)).astype(np.float32)
    z2 = z1.copy()  # cos = 1 exactly between partners
    z2[1] = 0.0  # a zero embedding

    def loss(a, b):
        s, p = simclr_scores(a, b, temperature=0.1)
        return fn(s, p).mean()

    loss = jax.jit(loss)
    value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(z1, z2)
    assert np.isfinite(value)
    assert all(np.all(np.isfinite(g)) for g in grads)
    a, b = rng.normal(size=(2, 3, 4))
    check_grad_fd(loss, a, b, argnum=1)


def test_jit_and_vmap(data):
    s, t, valid = data
    for fn in (info_nce, flat_nce):
        eager = fn(s, t, where=valid)
        jitted = jax.jit(lambda a, b, w, f=fn: f(a, b, where=w))(s, t, valid)
        vmapped = jax.vmap(lambda a, b, w, f=fn: f(a, b, where=w))(s, t, valid)
        np.testing.assert_allclose(jitted, eager, rtol=1e-6)
        np.testing.assert_allclose(vmapped, eager, rtol=1e-6)
    # vmap over temperature (traced hyper-parameter) in the pair helper
    z = jnp.ones((3, 4)) + jnp.arange(12.0).reshape(3, 4)
    temps = jnp.array([0.1, 0.5])
    out = jax.jit(jax.vmap(lambda tau: info_nce(*simclr_scores(z, z + 1.0, temperature=tau))))(
        temps
    )
    assert out.shape == (2, 6) and np.all(np.isfinite(out))


def test_bfloat16_input_returns_float32(data):
    s, t, _ = data
    out = flat_nce(jnp.asarray(s, jnp.bfloat16), t)
    assert out.dtype == jnp.float32
    s_bf = np.asarray(jnp.asarray(s, jnp.bfloat16), np.float64)
    ref = _np_flat_nce(s_bf, t, np.ones(s.shape, bool))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_bad_inputs_raise():
    s = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match=r"`positives` must have shape \(2,\)"):
        info_nce(s, jnp.array([0, 1, 2]))
    with pytest.raises(ValueError, match=r"`positives` must lie in \[0, 3\)"):
        info_nce(s, jnp.array([0, 3]))
    with pytest.raises(ValueError, match="exactly one True per row"):
        flat_nce(s, jnp.array([[True, True, False], [True, False, False]]))
    with pytest.raises(ValueError, match="`where` must have shape"):
        info_nce(s, jnp.array([0, 1]), where=jnp.ones((2, 4), bool))
    with pytest.raises(ValueError, match="masked out"):
        info_nce(s, jnp.array([0, 1]), where=jnp.array([[False, True, True]] * 2))
    with pytest.raises(ValueError, match="`scores` must be a floating array"):
        info_nce(jnp.zeros((2, 3), jnp.int32), jnp.array([0, 1]))
    with pytest.raises(ValueError, match="`temperature` must be finite and positive"):
        simclr_scores(jnp.ones((2, 3)), jnp.ones((2, 3)), temperature=0.0)
    with pytest.raises(ValueError, match=r"`z2` must have shape \(2, 3\)"):
        simclr_scores(jnp.ones((2, 3)), jnp.ones((3, 3)))
    with pytest.raises(ValueError, match="`axis`=2 is out of range"):
        info_nce(s, jnp.array([0, 1]), axis=2)
    # label range is not checked (and cannot be) under jit: no error, just runs
    jax.jit(info_nce)(s, jnp.array([0, 1]))

"""Tests for mtl_optax.losses.flooding: formulas, transform signs, and the gradient-penalty
interpretation of descent/ascent pairs checked on a quadratic (exact) and a
non-quadratic loss (error O(eps^3))."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mtl_optax.losses import (
    alternating_ascent,
    flood,
    flooding,
    gradient_penalty,
    iflood,
)

RNG = np.random.default_rng(0)
_M = RNG.normal(size=(3, 3))
A = _M @ _M.T + 3 * np.eye(3)  # SPD
B = RNG.normal(size=3)
THETA0 = RNG.normal(size=3)
W = RNG.normal(size=(4, 3))


def quadratic(theta):
    a, b = jnp.asarray(A, theta.dtype), jnp.asarray(B, theta.dtype)
    return 0.5 * theta @ (a @ theta) - b @ theta


def nonquadratic(theta):
    w = jnp.asarray(W, theta.dtype)
    return jnp.sum(jnp.log(jnp.cosh(w @ theta))) + 0.25 * jnp.sum(theta**4)


def test_flood_and_iflood():
    losses = np.array([0.1, 0.5, 0.9], np.float32)
    b = 0.5
    ref = np.abs(losses - b) + b
    np.testing.assert_allclose(flood(losses, level=b), ref, rtol=1e-6)
    np.testing.assert_allclose(iflood(losses, level=b), ref, rtol=1e-6)
    # gradient signs: reversed strictly below b, +1 at the tie and above
    g = jax.grad(lambda x: iflood(x, level=b).sum())(jnp.asarray(losses))
    np.testing.assert_array_equal(g, [-1.0, 1.0, 1.0])
    assert flood(jnp.asarray(losses, jnp.bfloat16), level=b).dtype == jnp.float32
    # flood on the batch mean versus iFlood per instance differ
    mean_flood = flood(losses.mean(), level=0.45)
    assert np.isclose(mean_flood, 0.5)  # mean 0.5 >= 0.45: unchanged
    assert np.isclose(iflood(losses, level=0.45).mean(), np.mean(np.abs(losses - 0.45) + 0.45))
    # jit + vmap over levels
    levels = jnp.array([0.0, 0.3, 2.0])
    out = jax.jit(jax.vmap(lambda lv: iflood(losses, level=lv)))(levels)
    ref = np.abs(losses[None] - np.asarray(levels)[:, None]) + np.asarray(levels)[:, None]
    np.testing.assert_allclose(out, ref, rtol=1e-6)


def test_flooding_transform_flips_below_level():
    level, lr = 0.5, 0.1
    grads = {"w": jnp.array([1.0, -2.0]), "b": jnp.array(3.0)}
    params = jax.tree.map(jnp.zeros_like, grads)
    opt = optax.chain(flooding(level=level), optax.sgd(lr))
    state = opt.init(params)
    update = jax.jit(opt.update)
    for value, sign in [(0.2, -1.0), (0.4999, -1.0), (0.5, 1.0), (0.9, 1.0)]:
        updates, state = update(grads, state, params, value=jnp.asarray(value))
        for k in grads:
            np.testing.assert_allclose(updates[k], -lr * sign * grads[k], rtol=1e-6)
    assert int(state[0].count) == 4
    # agrees with differentiating flood(L) directly
    loss_fn = lambda p: jnp.sum((p - 1.0) ** 2)
    p = jnp.array([0.8, 1.1])
    value, g = jax.value_and_grad(loss_fn)(p)
    for lv in (0.01, 0.5):
        g_flood = jax.grad(lambda q, lv=lv: flood(loss_fn(q), level=lv))(p)
        t = flooding(level=lv)
        u, _ = t.update(g, t.init(p), p, value=value)
        np.testing.assert_allclose(u, g_flood, rtol=1e-6)
    # unknown extra args are ignored
    u, _ = flooding(level=0.01).update(g, t.init(p), p, value=value, step=3, foo="bar")
    np.testing.assert_allclose(u, g)
    # vmap over a batch of loss values
    t = flooding(level=0.5)
    out = jax.vmap(lambda v: t.update(g, t.init(p), value=v)[0])(jnp.array([0.1, 1.0]))
    np.testing.assert_allclose(out, np.stack([-g, g]), rtol=1e-6)


@functools.partial(jax.jit, static_argnums=0)
def _descent_then_ascent_with_flooding(loss_fn, theta, eps):
    opt = optax.chain(flooding(level=1.0), optax.sgd(eps))
    state = opt.init(theta)
    for value in (2.0, 0.0):  # above the level (descent), then below (ascent)
        g = jax.grad(loss_fn)(theta)
        u, state = opt.update(g, state, theta, value=jnp.asarray(value))
        theta = optax.apply_updates(theta, u)
    return theta


@functools.partial(jax.jit, static_argnums=0)
def _grad_norm_step(loss_fn, theta, rate):
    sq = lambda t: jnp.sum(jax.grad(loss_fn)(t) ** 2)
    return theta - rate * jax.grad(sq)(theta)


def test_descent_ascent_is_grad_norm_step():
    with jax.enable_x64(True):
        theta = jnp.asarray(THETA0)
        # quadratic: exact, and the oracle is the closed form 2A(A theta - b)
        eps = 0.05
        two = _descent_then_ascent_with_flooding(quadratic, theta, eps)
        closed = THETA0 - eps**2 / 2 * 2 * A @ (A @ THETA0 - B)
        np.testing.assert_allclose(two, closed, rtol=0, atol=1e-13)
        np.testing.assert_allclose(
            _grad_norm_step(quadratic, theta, eps**2 / 2), closed, atol=1e-13
        )
        # non-quadratic: error O(eps^3); halving eps divides it by ~8
        errs = []
        for e in (0.004, 0.002, 0.001):
            a = _descent_then_ascent_with_flooding(nonquadratic, theta, e)
            b = _grad_norm_step(nonquadratic, theta, e**2 / 2)
            errs.append(float(jnp.linalg.norm(a - b)))
            # the pair moved by O(eps^2), much more than the error
            assert float(jnp.linalg.norm(a - theta)) > 20 * errs[-1]
        ratios = np.array(errs[:-1]) / np.array(errs[1:])
        assert np.all((ratios > 6.5) & (ratios < 9.5)), ratios


@functools.partial(jax.jit, static_argnums=0)
def _alternating_two_steps(loss_fn, theta, e1, e2):
    opt = alternating_ascent(descent_rate=e1, ascent_rate=e2)
    state = opt.init(theta)
    for _ in range(2):
        u, state = opt.update(jax.grad(loss_fn)(theta), state)
        theta = optax.apply_updates(theta, u)
    return theta, state


@functools.partial(jax.jit, static_argnums=0)
def _penalty_step(loss_fn, theta, coefficient, rate):
    return theta - rate * jax.grad(gradient_penalty(loss_fn, coefficient=coefficient))(theta)


def test_alternating_matches_penalty():
    with jax.enable_x64(True):
        theta = jnp.asarray(THETA0)
        for loss_fn, exact in ((quadratic, True), (nonquadratic, False)):
            errs = []
            for e1 in (0.004, 0.002, 0.001):
                e2 = e1 / 2
                c = e1 * e2 / (2 * (e1 - e2))
                two, state = _alternating_two_steps(loss_fn, theta, e1, e2)
                assert int(state.count) == 2
                pred = _penalty_step(loss_fn, theta, c, e1 - e2)
                errs.append(float(jnp.linalg.norm(two - pred)))
                # the prediction is better than plain gradient descent at rate e1 - e2
                plain = _penalty_step(loss_fn, theta, 0.0, e1 - e2)
                assert float(jnp.linalg.norm(two - plain)) > 10 * errs[-1]
            if exact:
                assert max(errs) < 1e-13, errs
            else:
                ratios = np.array(errs[:-1]) / np.array(errs[1:])
                assert np.all((ratios > 6.5) & (ratios < 9.5)), ratios
        # equal rates: a gradient step on ||grad L||^2 at rate eps^2/2
        eps = 0.03
        two, _ = _alternating_two_steps(quadratic, theta, eps, eps)
        closed = THETA0 - eps**2 * A @ (A @ THETA0 - B)
        np.testing.assert_allclose(two, closed, atol=1e-13)


def test_gradient_penalty_matches_closed_form():
    theta = np.array([0.3, -0.2, 0.5], np.float32)
    pen = gradient_penalty(quadratic, coefficient=0.7)
    g = A @ theta - B
    value_ref = 0.5 * theta @ A @ theta - B @ theta + 0.7 * g @ g
    grad_ref = g + 0.7 * 2 * A @ g
    v, gr = jax.jit(jax.value_and_grad(pen))(jnp.asarray(theta))
    np.testing.assert_allclose(v, value_ref, rtol=1e-5)
    np.testing.assert_allclose(gr, grad_ref, rtol=1e-5, atol=1e-5)
    # pytree params and extra positional args
    tree_loss = lambda p, x: jnp.sum((p["a"] * x) ** 2) + jnp.sum(p["b"] ** 2)
    p = {"a": jnp.array([1.0, 2.0]), "b": jnp.array(3.0)}
    x = jnp.array([0.5, -1.0])
    # d/da = 2 a x^2 = [0.5, 4], d/db = 2 b = 6; loss = 0.25 + 4 + 9
    ref = 13.25 + 0.1 * (0.5**2 + 4.0**2 + 6.0**2)
    np.testing.assert_allclose(gradient_penalty(tree_loss, coefficient=0.1)(p, x), ref, rtol=1e-6)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="`level` must be finite and non-negative"):
        flood(jnp.array(1.0), level=-0.1)
    with pytest.raises(ValueError, match="`level` must be finite and non-negative"):
        flooding(level=-1.0)
    t = flooding(level=0.1)
    g = jnp.ones(2)
    with pytest.raises(ValueError, match="requires the keyword argument `value=`"):
        t.update(g, t.init(g), g)
    with pytest.raises(ValueError, match=r"`value` must be a scalar loss, got shape \(2,\)"):
        t.update(g, t.init(g), g, value=jnp.ones(2))
    with pytest.raises(ValueError, match="`descent_rate` must be finite and positive"):
        alternating_ascent(descent_rate=0.0, ascent_rate=0.1)
    with pytest.raises(ValueError, match="`loss` must be a floating array"):
        flood(jnp.array(1), level=0.1)

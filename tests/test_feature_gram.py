"""Tier 2's factored feature Gram (mtl_optax.feature_gram) against jax.jacrev at the features."""

from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mtl_optax as mtl
from mtl_optax import feature_gram, split


def encode(params, batch):
    return jnp.tanh(batch["x"] @ params["trunk"])


def dense_head(hp, z, batch, i):  # y = z W_i + b_i, a 2-way softmax cross-entropy
    logits = z @ hp["w"] + hp["b"]
    return optax.losses.softmax_cross_entropy_with_integer_labels(logits, batch["y"][:, i]).mean()


def twice_head(hp, z, batch, i):  # z read by two products, as the rhs of one of them
    a = z @ hp["w"]
    c = jnp.einsum("fd,bd->fb", hp["v"], z)
    return jnp.mean(jnp.tanh(a).sum(-1) * jnp.sin(c).sum(0)) + jnp.mean(a**2)


def norm_head(hp, z, batch, i):  # z through a normalisation first: no first product
    zn = (z - z.mean(-1, keepdims=True)) / (z.std(-1, keepdims=True) + 1e-3)
    return jnp.mean((zn @ hp["w"]).sum(-1) ** 2)


def init(key, k, d=32, f=2, n=16, d_in=4, dtype=jnp.float32):
    keys = jax.random.split(key, 6)
    params = {
        "trunk": jax.random.normal(keys[0], (d_in, d), dtype),
        "heads": {
            "w": jax.random.normal(keys[1], (k, d, f), dtype),
            "b": jax.random.normal(keys[2], (k, f), dtype),
            "v": jax.random.normal(keys[3], (k, 2, d), dtype),
        },
    }
    batch = {
        "x": jax.random.normal(keys[4], (n, d_in), dtype),
        "y": jax.random.randint(keys[5], (n, k), 0, f),
    }
    return params, batch


def stacked(head):
    return mtl.stacked_heads(head, head_params=lambda p: p["heads"])


def factored(encoder, head, params, batch, diagonal=False):
    forward = split.split_forward(split.plain_split(encoder, stacked(head)), params, batch)
    return forward.heads.factored(diagonal)


def jacrev_rows(encoder, head, params, batch):
    """(K, size of z) float64: the feature gradients, one task at a time with jax.jacrev."""
    z = encoder(params, batch)
    k = params["heads"]["w"].shape[0]

    def losses(z_):
        slices = [jax.tree_util.tree_map(lambda a, i=i: a[i], params["heads"]) for i in range(k)]
        return jnp.stack([head(hp, z_, batch, i) for i, hp in enumerate(slices)])

    jac = jax.jacrev(losses)(z)
    return np.concatenate(
        [np.asarray(x, np.float64).reshape(k, -1) for x in jax.tree_util.tree_leaves(jac)], axis=1
    )


def gram_and_combine(out, weights):
    g, e = feature_gram.factored_gram(out[1], diagonal_only=False)
    full = np.asarray(g, np.float64) * 4.0 ** float(e)
    comb = feature_gram.factored_combine(out[1], weights)
    flat = np.concatenate(
        [np.asarray(x, np.float64).ravel() for x in jax.tree_util.tree_leaves(comb)]
    )
    return full, flat


@pytest.mark.parametrize("head", [dense_head, twice_head], ids=["dense", "twice"])
def test_factored_gram_and_combine_equal_jacrev_in_float64(head):
    with jax.enable_x64(True):
        params, batch = init(jax.random.PRNGKey(0), k=5, dtype=jnp.float64)
        out = factored(encode, head, params, batch)
        assert out is not None
        rows = jacrev_rows(encode, head, params, batch)
        w = jnp.linspace(0.2, 1.4, 5)
        gram, comb = gram_and_combine(out, w)
        np.testing.assert_allclose(gram, rows @ rows.T, rtol=1e-12, atol=1e-12 * np.abs(gram).max())
        np.testing.assert_allclose(comb, np.asarray(w) @ rows, rtol=1e-12, atol=1e-13)
        g_diag, e = feature_gram.factored_gram(
            factored(encode, head, params, batch, diagonal=True)[1], diagonal_only=True
        )
        np.testing.assert_allclose(
            np.diag(np.asarray(g_diag)) * 4.0 ** float(e), np.sum(rows**2, axis=1), rtol=1e-12
        )


@settings(max_examples=8, deadline=None)
@given(
    k=st.integers(1, 5),
    rows=st.lists(st.integers(1, 5), min_size=1, max_size=2),
    d=st.integers(1, 9),
    f=st.integers(1, 4),
    lhs=st.booleans(),
    seed=st.integers(0, 10**6),
)
def test_factored_route_equals_jacrev_over_shapes(k, rows, d, f, lhs, seed):
    """Any row axes (B or B × T), feature width, head width and operand side, K = 1..5;
    the route forced (at these sizes materialising would be cheaper)."""

    def encoder(params, batch):
        return jnp.tanh(batch["x"] @ params["trunk"]).reshape(*rows, d)

    def head(hp, z, batch, i):
        if lhs:  # z the lhs of the product: y (*rows, f)
            y, bias = z @ hp["w"], hp["b"]
        else:  # z the rhs: y (f, *rows)
            y = jnp.einsum("df,...d->f...", hp["w"], z)
            bias = hp["b"].reshape((f,) + (1,) * len(rows))
        return jnp.sum(jnp.sin(y) * bias)

    with jax.enable_x64(True):
        keys = jax.random.split(jax.random.PRNGKey(seed), 4)
        params = {
            "trunk": jax.random.normal(keys[0], (3, d), jnp.float64),
            "heads": {
                "w": jax.random.normal(keys[1], (k, d, f), jnp.float64),
                "b": jax.random.normal(keys[2], (k, f), jnp.float64),
            },
        }
        n = int(np.prod(rows))
        batch = {"x": jax.random.normal(keys[3], (n, 3), jnp.float64)}
        with mock.patch.object(feature_gram, "ghost_is_cheaper", lambda *a, **kw: True):
            out = factored(encoder, head, params, batch)
        rows_ = jacrev_rows(encoder, head, params, batch)
        w = jnp.linspace(-1.0, 2.0, k)
        gram, comb = gram_and_combine(out, w)
        scale = max(np.abs(rows_ @ rows_.T).max(), 1e-300)
        np.testing.assert_allclose(gram, rows_ @ rows_.T, rtol=1e-10, atol=1e-12 * scale)
        np.testing.assert_allclose(
            comb, np.asarray(w) @ rows_, rtol=1e-10, atol=1e-12 * np.abs(rows_).max()
        )


def test_head_gradients_of_the_factored_pass_are_each_tasks_own():
    params, batch = init(jax.random.PRNGKey(1), k=4)
    head_grads, _ = factored(encode, dense_head, params, batch)
    z = encode(params, batch)
    own = jax.vmap(jax.grad(dense_head), in_axes=(0, None, None, 0))(
        params["heads"], z, batch, jnp.arange(4)
    )
    # head leaves in tree order: b, v, w
    for got, name in zip(head_grads, ("b", "v", "w")):
        np.testing.assert_allclose(got, own[name], rtol=1e-5, atol=1e-6)


def test_multi_axis_features_and_an_unused_leaf():
    """z a dict: a (B, T, d) leaf contracted on d, and a leaf no head reads."""

    def encoder(params, batch):
        h = jnp.tanh(batch["x"] @ params["trunk"])  # (n, d)
        return {"seq": jnp.stack([h, h**2], axis=1), "unused": h[:, :2]}

    def head(hp, z, batch, i):
        return jnp.mean(jnp.sin(z["seq"] @ hp["w"]) * hp["b"])

    with jax.enable_x64(True):
        params, batch = init(jax.random.PRNGKey(2), k=3, dtype=jnp.float64)
        out = factored(encoder, head, params, batch)
        assert out is not None
        rows = jacrev_rows(encoder, head, params, batch)
        w = jnp.array([0.5, -1.0, 2.0])
        gram, comb = gram_and_combine(out, w)
        np.testing.assert_allclose(gram, rows @ rows.T, rtol=1e-12, atol=1e-14)
        # jacrev's leaves are in z's tree order (seq, unused), as the combine's
        np.testing.assert_allclose(comb, np.asarray(w) @ rows, rtol=1e-12, atol=1e-14)


def test_heads_that_read_z_otherwise_or_wide_first_layers_materialise():
    params, batch = init(jax.random.PRNGKey(3), k=3)
    assert factored(encode, norm_head, params, batch) is None

    def skip_head(hp, z, batch, i):  # z itself also reaches the loss
        return jnp.mean(z @ hp["w"]) + jnp.mean(z)

    assert factored(encode, skip_head, params, batch) is None

    def two_contractions(hp, z, batch, i):  # contracts z's features, then its rows
        return jnp.mean(z @ hp["w"]) + jnp.mean(jnp.ones((2, z.shape[0])) @ z)

    def stopped(hp, z, batch, i):
        return jnp.mean(jax.lax.stop_gradient(z) @ hp["w"])

    def in_cond(hp, z, batch, i):
        return jax.lax.cond(i > 0, lambda: jnp.mean(z @ hp["w"]), lambda: 0.0)

    for head in (two_contractions, stopped, in_cond):
        assert factored(encode, head, params, batch) is None, head.__name__
    # a 64-wide first layer on 32 features: materialising costs fewer multiply-adds
    wide = {**params, "heads": {**params["heads"], "w": jnp.ones((3, 32, 64))}}

    def wide_head(hp, z, batch, i):
        return jnp.mean(jnp.tanh(z @ hp["w"]))

    assert factored(encode, wide_head, wide, batch) is None
    assert factored(encode, dense_head, params, batch) is not None


def test_the_route_follows_the_multiply_add_counts():
    """K = 40 ten-way heads on 512 features, batch 256 (benchmarks.speed): factored; the
    same with 256-wide first layers: materialised."""
    for width, expect in ((10, True), (256, False)):
        params = {
            "trunk": jnp.zeros((4, 512)),
            "heads": {"w": jnp.zeros((40, 512, width)), "b": jnp.zeros((40, width))},
        }
        batch = {"x": jnp.zeros((256, 4)), "y": jnp.zeros((256, 40), jnp.int32)}

        def head(hp, z, batch, i):
            return jnp.mean((z @ hp["w"] + hp["b"]) ** 2)

        route = []

        def probe(p, head=head, batch=batch, route=route):
            route.append(factored(encode, head, p, batch) is not None)
            return jnp.zeros(())

        jax.eval_shape(probe, params)  # shapes only: nothing of this size runs
        assert route == [expect]


@pytest.mark.parametrize("name", ["mgda", "upgrad", "imtl_g", "gradient_normalized", "gradnorm"])
def test_tier2_factored_equals_tier2_materialised(name, monkeypatch):
    """The whole tier-2 step (weights, encoder and head gradients) by both routes."""
    params, batch = init(jax.random.PRNGKey(4), k=4)
    method = {
        "mgda": mtl.mgda(),
        "upgrad": mtl.upgrad(),
        "imtl_g": mtl.imtl_g(),
        "gradient_normalized": mtl.gradient_normalized(),  # diag(G)
        "gradnorm": mtl.gradnorm(),  # diag(G), and scales the heads
    }[name]
    grad_fn = mtl.split_value_and_grad(encode, stacked(dense_head), method)
    _, grads_f, state_f = grad_fn(params, batch, grad_fn.init(params))
    monkeypatch.setattr(feature_gram, "ghost_is_cheaper", lambda *a, **k: False)
    _, grads_m, state_m = grad_fn(params, batch, grad_fn.init(params))
    np.testing.assert_allclose(state_f.weights, state_m.weights, rtol=2e-5, atol=1e-6)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6), grads_f, grads_m
    )


def scaled_head(hp, z, batch, i):
    return batch["scale"] * dense_head(hp, z, batch, i)


SCALED = mtl.split_value_and_grad(encode, stacked(scaled_head), mtl.mgda())
SCALED_STEP = jax.jit(SCALED)  # one compilation for every example below


@settings(max_examples=12, deadline=None)
@given(scale=st.sampled_from([1e-30, 1e-12, 1e12, 1e30]), seed=st.integers(0, 50))
def test_tier2_weights_do_not_depend_on_the_loss_scale(scale, seed):
    """float32 factors are scaled by powers of two: a loss scaled by 1e±30 (feature Gram
    entries ~1e±60, beyond float32) gives MGDA the weights of the unscaled loss."""
    params, batch = init(jax.random.PRNGKey(seed), k=3)
    weights = []
    for factor in (1.0, scale):
        batch = {**batch, "scale": jnp.float32(factor)}
        _, _, state = SCALED_STEP(params, batch, SCALED.init(params))
        weights.append(state.weights)
    np.testing.assert_allclose(weights[1], weights[0], rtol=1e-4, atol=1e-6)


def test_flax_nnx_stacked_linear_heads_take_the_factored_route(monkeypatch):
    nnx = pytest.importorskip("flax.nnx")
    import mtl_optax.flax_nnx as mtl_nnx

    k = 4

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.trunk = nnx.Linear(4, 32, rngs=rngs)

            @nnx.split_rngs(splits=k)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def make(rngs):
                return nnx.Linear(32, 2, rngs=rngs)

            self.heads = make(rngs)

    def encoder(model, batch):
        return jnp.tanh(model.trunk(batch["x"]))

    def head(module, z, batch, i):
        return optax.losses.softmax_cross_entropy_with_integer_labels(
            module(z), batch["y"][:, i]
        ).mean()

    _, batch = init(jax.random.PRNGKey(5), k=k)
    model = Model(nnx.Rngs(0))
    calls = []
    original = feature_gram.factored_gram

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(split, "factored_gram", spy)
    heads = mtl.stacked_heads(head, head_params=lambda m: m.heads)
    grad_fn = mtl_nnx.split_value_and_grad(encoder, heads, mtl.mgda())
    _, _, state = grad_fn(model, batch, grad_fn.init(model))
    assert calls
    # the reference: weights from the Gram of jax.jacrev at the features
    z = encoder(model, batch)
    kernel, bias = model.heads.kernel[...], model.heads.bias[...]

    def losses(z_):
        logits = jnp.einsum("bd,kdo->kbo", z_, kernel) + bias[:, None]
        return optax.losses.softmax_cross_entropy_with_integer_labels(logits, batch["y"].T).mean(1)

    rows = np.asarray(jax.jacrev(losses)(z), np.float64).reshape(k, -1)
    gram = jnp.asarray(rows @ rows.T, jnp.float32)
    expected, _ = mtl.mgda().update(gram, None, mtl.mgda().init(k))
    np.testing.assert_allclose(state.weights, expected, rtol=1e-4, atol=1e-6)


def test_factored_tier2_under_vmap_over_an_ensemble():
    """``jax.vmap`` of the tier-2 step over two models equals the two steps one by one."""
    (p1, batch), (p2, _) = (init(jax.random.PRNGKey(s), k=4) for s in (6, 7))
    grad_fn = mtl.split_value_and_grad(encode, stacked(dense_head), mtl.upgrad())
    state = grad_fn.init(p1)
    each = [grad_fn(p, batch, state) for p in (p1, p2)]
    both = jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), p1, p2)
    states = jax.tree_util.tree_map(lambda a: jnp.stack([a, a]), state)
    _, grads, out = jax.jit(jax.vmap(grad_fn, in_axes=(0, None, 0)))(both, batch, states)
    for i, (_, grads_i, state_i) in enumerate(each):
        np.testing.assert_allclose(out.weights[i], state_i.weights, rtol=1e-5, atol=1e-7)
        jax.tree_util.tree_map(
            lambda a, b, i=i: np.testing.assert_allclose(a[i], b, rtol=1e-4, atol=1e-6),
            grads,
            grads_i,
        )

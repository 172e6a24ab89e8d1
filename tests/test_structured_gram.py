"""The structured Gram engine equals the Gram of materialised per-example gradients.

Oracle: ``jax.vmap(jax.grad)`` of the loss of one example (the batch cut to that example,
kept as a batch of one), stacked and multiplied out with ``mtl.task_gram`` (full-precision
matmuls); ``combine(w)`` against ``Σ_b w_b`` of the same stacked gradients; the task Gram
against ``mtl.task_gram`` of ``mtl.value_and_jacobian``. Every model runs with the three
strategies (``auto``, ``ghost`` forced, ``materialize`` forced) and the test checks, through
``leaf_strategies``, that the ghost paths it means to cover are the ones taken.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import mtl_optax as mtl
from mtl_optax.structured_gram import BatchCouplingError, value_and_gram, value_gram_and_combine
from mtl_optax.structured_gram.engine import leaf_strategies

STRATEGIES = ("auto", "ghost", "materialize")
RTOL32, RTOL64 = 1e-5, 1e-12


# --------------------------------------------------------------------------- oracle
def per_example_grads(loss_fn, params, batch, *args, batch_dim=0):
    """Stacked per-example gradients: ``jax.grad`` of each example's loss, vmapped."""

    def one(example):
        single = jax.tree_util.tree_map(lambda a: jnp.expand_dims(a, batch_dim), example)
        return jax.grad(lambda p: loss_fn(p, single, *args)[0])(params)

    return jax.vmap(one, in_axes=(batch_dim,))(batch)


def rel_err(a, b) -> float:
    """max |a - b| / max |b| over all leaves (NumPy: no compilation outside the tests' jit)."""
    a = [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(a)]
    b = [np.asarray(y, np.float64) for y in jax.tree_util.tree_leaves(b)]
    scale = max(max(np.max(np.abs(y)) for y in b), np.finfo(np.float64).tiny)
    return max(np.max(np.abs(x - y)) for x, y in zip(a, b)) / scale


def normal(rng, shape, dtype=np.float32, scale=1.0):
    """NumPy Gaussian draws (model setup compiles nothing)."""
    return jnp.asarray((scale * rng.standard_normal(shape)).astype(dtype))


def random_like(tree, seed, scale=0.5):
    """A pytree of Gaussian arrays shaped like ``tree`` (abstract flax variables)."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda s: normal(rng, s.shape, s.dtype, scale), tree)


def assert_exact(
    loss_fn, params, batch, *args, batch_dim=0, rtol=RTOL32, strategies=("ghost", "materialize")
):
    """Gram (each strategy) and combine equal the oracle; one jitted program (one compile).

    ``combine`` does not depend on the strategy (every use's backward with ``w ⊙ Δ``), so it
    is checked once; ``auto`` picks one of the two per leaf (checked by tracing alone in
    the ``leaf_strategies`` tests).
    """

    @jax.jit
    def run(params, batch):
        grads = per_example_grads(loss_fn, params, batch, *args, batch_dim=batch_dim)
        expected = mtl.task_gram(grads)
        w = jnp.linspace(-1.0, 2.0, expected.shape[0], dtype=expected.dtype)
        expected_update = jax.tree_util.tree_map(lambda g: jnp.tensordot(w, g, 1), grads)
        grams, update, losses = {}, None, None
        for strategy in strategies:
            engine = value_gram_and_combine(loss_fn, batch_dim=batch_dim, strategy=strategy)
            losses, grams[strategy], combine = engine(params, batch, *args)
            if update is None:
                update = combine(w)
        return expected, expected_update, loss_fn(params, batch, *args), losses, grams, update

    expected, expected_update, expected_losses, losses, grams, update = run(params, batch)
    np.testing.assert_allclose(losses, expected_losses, rtol=rtol, atol=0)
    for strategy, gram in grams.items():
        assert gram.dtype == expected.dtype
        assert rel_err(gram, expected) <= rtol, (strategy, rel_err(gram, expected))
    assert jax.tree_util.tree_structure(update) == jax.tree_util.tree_structure(params)
    assert rel_err(update, expected_update) <= rtol, ("combine", rel_err(update, expected_update))


# --------------------------------------------------------------------------- models
def init_mlp(seed, sizes, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return [
        {"w": normal(rng, (m, n), dtype, m**-0.5), "b": normal(rng, (n,), dtype, 0.1)}
        for m, n in zip(sizes[:-1], sizes[1:])
    ]


CLASS_WEIGHTS = np.array([1.0, 2.0, 0.5], np.float32)  # captured constants in the jaxpr


def mlp_loss(params, batch):
    x, y = batch
    for layer in params[:-1]:
        x = jax.nn.relu(x @ layer["w"] + layer["b"])
    logits = x @ (params[-1]["w"] * CLASS_WEIGHTS) + params[-1]["b"]
    weights = jnp.asarray(CLASS_WEIGHTS)[y]
    return weights * optax.softmax_cross_entropy_with_integer_labels(logits, y)


def mlp_problem(dtype=np.float32, sizes=(6, 8, 7, 3), n=5):
    rng = np.random.default_rng(0)
    batch = (normal(rng, (n, sizes[0]), dtype), jnp.asarray(rng.integers(0, 3, n)))
    return mlp_loss, init_mlp(1, sizes, dtype), batch


def lax_conv_loss(params, batch):
    """NCHW convolutions: dilated, strided with feature groups (depthwise-style), pooled."""
    (x,) = batch
    dn = ("NCHW", "OIHW", "NCHW")
    h = jax.lax.conv_general_dilated(
        x, params["k1"], (1, 1), "SAME", rhs_dilation=(2, 1), dimension_numbers=dn
    )
    h = jnp.tanh(h + params["b1"][None, :, None, None])
    h = jax.lax.conv_general_dilated(
        h, params["k2"], (2, 2), "VALID", feature_group_count=2, dimension_numbers=dn
    )
    return jnp.sum(jnp.mean(h, (2, 3)) ** 2, 1)


def lax_conv_problem(dtype=np.float32):
    rng = np.random.default_rng(1)
    params = {
        "k1": normal(rng, (4, 2, 3, 3), dtype),
        "b1": normal(rng, (4,), dtype),
        "k2": normal(rng, (4, 2, 2, 2), dtype),
    }
    return lax_conv_loss, params, (normal(rng, (3, 2, 7, 6), dtype),)


class LinenCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3))(x))
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = nn.relu(nn.Conv(5, (3, 3), strides=2, padding="VALID")(x))
        return nn.Dense(3)(x.reshape(x.shape[0], -1))


def linen_cnn_problem():
    model = LinenCNN()
    x = normal(np.random.default_rng(2), (4, 10, 10, 2))

    def loss(params, batch):
        logits = model.apply(params, batch[0])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1])

    params = random_like(jax.eval_shape(model.init, jax.random.PRNGKey(0), x), 3)
    return loss, params, (x, jnp.array([0, 1, 2, 1]))


def layer_norm(x, scale, bias):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + 1e-5) * scale + bias


def transformer_loss(params, batch):
    """Embedding (tied with the output projection), position table, pre-norm multi-head
    attention with per-head projections, a ReLU MLP; mean next-token cross-entropy."""
    tokens, targets = batch
    t = tokens.shape[1]
    h = jnp.take(params["embed"], tokens, axis=0) + params["pos"][:t]
    a = layer_norm(h, params["ln1_s"], params["ln1_b"])
    q = jnp.einsum("btd,dhe->bthe", a, params["wq"])
    k = jnp.einsum("btd,dhe->bthe", a, params["wk"])
    v = jnp.einsum("btd,dhe->bthe", a, params["wv"])
    scores = jnp.einsum("bqhe,bkhe->bhqk", q, k) / np.sqrt(q.shape[-1])
    mask = jnp.tril(jnp.ones((t, t), bool))
    att = jax.nn.softmax(jnp.where(mask, scores, -1e9), axis=-1)
    h = h + jnp.einsum("bhqk,bkhe,hed->bqd", att, v, params["wo"])
    m = layer_norm(h, params["ln2_s"], params["ln2_b"])
    h = h + jax.nn.relu(m @ params["w1"] + params["b1"]) @ params["w2"]
    logits = h @ params["embed"].T
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean(-1)


def transformer_problem(dtype=np.float32, vocab=11, d=8, heads=2, t=5, n=3):
    rng = np.random.default_rng(3)
    draw = functools.partial(normal, rng, dtype=dtype)
    params = {
        "embed": draw((vocab, d)),
        "pos": draw((t, d), scale=0.1),
        "ln1_s": 1 + draw((d,), scale=0.1),
        "ln1_b": draw((d,), scale=0.1),
        "wq": draw((d, heads, d // heads), scale=d**-0.5),
        "wk": draw((d, heads, d // heads), scale=d**-0.5),
        "wv": draw((d, heads, d // heads), scale=d**-0.5),
        "wo": draw((heads, d // heads, d), scale=d**-0.5),
        "ln2_s": 1 + draw((d,), scale=0.1),
        "ln2_b": draw((d,), scale=0.1),
        "w1": draw((d, 2 * d), scale=d**-0.5),
        "b1": draw((2 * d,), scale=0.1),
        "w2": draw((2 * d, d), scale=(2 * d) ** -0.5),
    }
    tokens = rng.integers(0, vocab, (n, t))
    return transformer_loss, params, (jnp.asarray(tokens), jnp.asarray((tokens * 3 + 1) % vocab))


def tied_loss(params, batch):
    """Embedding lookup, per-head projections, the embedding reused as output projection."""
    tokens, targets = batch
    h = jnp.take(params["embed"], tokens, axis=0)
    q = jnp.einsum("btd,dhe->bthe", h, params["wq"])
    h = h + jnp.einsum("bthe,hed->btd", jnp.tanh(q), params["wo"])
    logits = h @ params["embed"].T
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean(-1)


def tied_problem(dtype=np.float32, vocab=7, d=4, heads=2, t=3, n=3):
    rng = np.random.default_rng(15)
    params = {
        "embed": normal(rng, (vocab, d), dtype),
        "wq": normal(rng, (d, heads, d // heads), dtype, d**-0.5),
        "wo": normal(rng, (heads, d // heads, d), dtype, d**-0.5),
    }
    tokens = rng.integers(0, vocab, (n, t))
    return tied_loss, params, (jnp.asarray(tokens), jnp.asarray((tokens + 2) % vocab))


class NnxNet(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(1, 3, (3,), rngs=rngs)
        self.norm = nnx.LayerNorm(3, rngs=rngs)
        self.out = nnx.Linear(3 * 6, 2, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.norm(self.conv(x)))
        return self.out(h.reshape(h.shape[0], -1))


def nnx_problem():
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: NnxNet(nnx.Rngs(0))))
    state = random_like(abstract, 6)

    def loss(state, batch):
        return jnp.sum((nnx.merge(graphdef, state)(batch[0]) - batch[1]) ** 2, -1)

    x = normal(np.random.default_rng(7), (4, 6, 1))
    return loss, state, (x, jnp.ones((4, 2)))


@jax.custom_vjp
def scaled_sine(x, w):
    return jnp.sin(x * w)


def _scaled_sine_fwd(x, w):
    return scaled_sine(x, w), (x, w)


def _scaled_sine_bwd(res, g):
    x, w = res
    c = g * jnp.cos(x * w)
    return c * w, jnp.sum(c * x, axis=tuple(range(x.ndim - w.ndim)))


scaled_sine.defvjp(_scaled_sine_fwd, _scaled_sine_bwd)


def exotic_loss(params, batch):
    """Parameters used in ways no ghost term covers (the exact per-example fallback):
    a dot with a parameter-only function of a weight, a parameter broadcast over the
    examples and concatenated, a sort after scaling, a power with a batch exponent, a
    custom_vjp function of a parameter, and a parameter-only regulariser in every loss."""
    (x,) = batch
    h = x @ (params["w"] ** 2)
    h = jnp.concatenate([h, jnp.broadcast_to(params["c"], (x.shape[0], 2))], -1)
    h = jnp.sort(h * params["s"], axis=-1)
    h = jnp.exp(jnp.sin(h)) ** x[:, :1]
    h = scaled_sine(h, params["v"])
    return jnp.sum(h, -1) + jnp.sum(params["c"] ** 2)


def exotic_problem(dtype=np.float32):
    rng = np.random.default_rng(8)
    params = {
        "w": normal(rng, (3, 4), dtype),
        "c": jnp.asarray(np.array([0.3, -0.5], dtype)),
        "s": jnp.asarray(np.array(1.3, dtype)),
        "v": normal(rng, (6,), dtype),
    }
    return exotic_loss, params, (normal(rng, (4, 3), dtype),)


def sequence_loss(params, batch):
    """Time-major batch (examples on axis 1), a reshape merging time and examples into one
    axis and back, and the ``logp[arange(B), labels]`` gather."""
    x, y = batch  # x: (T, B, D), y: (1, B) labels (time-major too)
    t, b, _ = x.shape
    h = jnp.tanh(x.reshape(t * b, -1) @ params["w"])
    logits = h.reshape(t, b, -1).mean(0) @ params["v"]
    return -jax.nn.log_softmax(logits)[jnp.arange(b), y[0]]


def sequence_problem():
    rng = np.random.default_rng(9)
    params = {"w": normal(rng, (5, 6)), "v": normal(rng, (6, 3))}
    return sequence_loss, params, (normal(rng, (3, 4, 5)), jnp.array([[0, 2, 1, 2]]))


PROBLEMS = {
    "mlp": mlp_problem,
    "lax_conv": lax_conv_problem,
    "linen_cnn": linen_cnn_problem,
    "transformer": transformer_problem,
    "nnx": nnx_problem,
    "exotic": exotic_problem,
}


# --------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("name", list(PROBLEMS))
def test_gram_and_combine_equal_per_example_gradients(name):
    loss_fn, params, batch = PROBLEMS[name]()
    assert_exact(loss_fn, params, batch)


def test_examples_on_another_axis_merged_reshape_and_arange_gather():
    loss_fn, params, batch = sequence_problem()
    assert_exact(loss_fn, params, batch, batch_dim=1)


@pytest.mark.parametrize("mode", [None, "clip", "fill"])
def test_embedding_lookups_out_of_range_follow_jax_grad(mode):
    """Out-of-range indices: the forward pass reads a clamped (or, with "fill", a zero) row;
    jax.grad drops the index's gradient unless the mode is "clip". The Gram follows jax.grad
    (it gave such an example the clamped row's gradient before)."""

    def loss_fn(params, batch):
        rows = params["table"].at[batch["ids"]].get(mode=mode)
        return jnp.sum(jnp.tanh(rows) ** 2, axis=-1)

    params = {"table": normal(np.random.default_rng(0), (5, 4))}
    batch = {"ids": jnp.array([0, 1, 1, 2, 4, 4, 7, 9], jnp.int32)}
    assert_exact(loss_fn, params, batch)


@pytest.mark.parametrize(
    "problem, strategies",
    [(tied_problem, ("ghost",)), (lax_conv_problem, ("ghost",)), (exotic_problem, ("auto",))],
)
def test_float64_exact_to_1e_12(problem, strategies):
    """Ghost terms (dot with per-head blocks, gather with the tied projection's cross terms,
    convolution) and the exact fallbacks, in float64."""
    with jax.enable_x64(True):
        loss_fn, params, batch = problem(np.float64)
        assert_exact(loss_fn, params, batch, rtol=RTOL64, strategies=strategies)
        if problem is tied_problem:
            plan = leaf_strategies(loss_fn, params, batch, strategy="ghost")
            assert set(plan.values()) == {"ghost"}, plan


def test_the_ghost_paths_are_the_ones_taken():
    """The forced strategy reaches the ghost term for dot (with per-head blocks), gather
    (with the tied output projection's cross terms) and convolution leaves."""
    loss_fn, params, batch = transformer_problem()
    plan = leaf_strategies(loss_fn, params, batch, strategy="ghost")
    for leaf in ("embed", "wq", "wk", "wv", "wo", "w1", "w2"):
        assert plan[f"['{leaf}']"] == "ghost", (leaf, plan)
    for leaf in ("ln1_s", "ln1_b", "b1", "pos"):  # elementwise: per-example sums
        assert plan[f"['{leaf}']"] == "materialize", (leaf, plan)
    loss_fn, params, batch = lax_conv_problem()
    plan = leaf_strategies(loss_fn, params, batch, strategy="ghost")
    assert plan["['k1']"] == "ghost" and plan["['k2']"] == "materialize"  # k2: feature groups


def test_auto_picks_the_cheaper_path_per_layer():
    """Without a sequence axis the ghost term (B²·(X + Y)) beats materialising (B·X·Y plus
    the B²·X·Y Gram) for every dense layer; with T = 64 positions per example a 8 -> 8 dense
    layer materialises (B²·T²·17 > B·T·64 + B²·64), as does a convolution with 42 output
    pixels per example; elementwise scales and biases are always materialised."""
    params = init_mlp(10, (64, 48, 2))

    def plain_mlp(params, batch):
        h = jax.nn.relu(batch[0] @ params[0]["w"] + params[0]["b"])
        return jnp.sum(h @ params[1]["w"] + params[1]["b"], -1)

    batch = (normal(np.random.default_rng(11), (32, 64)),)
    plan = leaf_strategies(plain_mlp, params, batch)
    assert plan["[0]['w']"] == plan["[1]['w']"] == "ghost", plan
    assert plan["[0]['b']"] == plan["[1]['b']"] == "materialize", plan

    def sequence(p, batch):
        return jnp.sum(jnp.tanh(batch[0] @ p["w"]), (1, 2))

    long = (normal(np.random.default_rng(12), (4, 64, 8)),)
    plan = leaf_strategies(sequence, {"w": normal(np.random.default_rng(13), (8, 8))}, long)
    assert plan["['w']"] == "materialize", plan
    loss_fn, params, batch = lax_conv_problem()
    assert leaf_strategies(loss_fn, params, batch)["['k1']"] == "materialize"


def test_eager_call_equals_jitted_call():
    """The engine also runs outside jit (every other test runs it inside one program)."""

    def loss_fn(p, batch):
        return jnp.sum(jnp.tanh(batch[0] @ p["w"]), -1)

    rng = np.random.default_rng(16)
    params, batch = {"w": normal(rng, (4, 2))}, (normal(rng, (3, 4)),)
    engine = value_gram_and_combine(loss_fn)
    w = jnp.asarray(np.arange(3.0, dtype=np.float32))
    losses, gram, combine = engine(params, batch)
    jitted = jax.jit(lambda p, b: (lambda o: (o[0], o[1], o[2](w)))(engine(p, b)))
    jit_losses, jit_gram, jit_update = jitted(params, batch)
    assert rel_err(gram, jit_gram) <= RTOL32 and rel_err(combine(w), jit_update) <= RTOL32
    np.testing.assert_allclose(losses, jit_losses, rtol=1e-6)


@settings(max_examples=4, deadline=None)
@given(
    n=st.integers(1, 5),
    t=st.integers(1, 4),
    d_in=st.integers(1, 6),
    d_out=st.integers(1, 6),
    log_scale=st.integers(-3, 3),
)
def test_dense_over_sequences_any_shape_and_scale(n, t, d_in, d_out, log_scale):
    """y = x W + b over (B, T, d_in): ghost and materialised Grams equal the oracle for any
    batch, sequence length, width and input scale 10^k."""
    rng = np.random.default_rng(n * 1000 + t * 100 + d_in * 10 + d_out)
    x = normal(rng, (n, t, d_in), scale=10.0**log_scale)
    params = {"w": normal(rng, (d_in, d_out)), "b": normal(rng, (d_out,))}

    def loss(p, batch):
        return jnp.sum(jnp.tanh(batch[0] @ p["w"] + p["b"]), (1, 2))

    assert_exact(loss, params, (x,), strategies=("ghost", "materialize"))


def test_chunked_fallback_and_extra_arguments_and_aux():
    """A dropout mask drawn from a key argument shared by the examples; the masked fallback
    in chunks of 3 examples; has_aux returns the aux untouched."""
    loss_fn, params, batch = exotic_problem()
    key = jax.random.PRNGKey(11)
    n = batch[0].shape[0]

    def with_dropout(p, batch, key):
        keep = jax.random.bernoulli(key, 0.7, (n, 3))  # one row per example
        return loss_fn(p, (jnp.where(keep, batch[0], 0.0) / 0.7,)), {"kept": keep.sum()}

    def oracle_loss(p, batch):  # the same mask, cut per example with the batch
        x, keep = batch
        return loss_fn(p, (jnp.where(keep, x, 0.0) / 0.7,))

    w = jnp.asarray(np.arange(1.0, n + 1, dtype=np.float32))
    engine = value_gram_and_combine(with_dropout, has_aux=True, chunk_size=3)

    @jax.jit
    def run(params, batch, key):
        keep = jax.random.bernoulli(key, 0.7, (n, 3))
        grads = per_example_grads(oracle_loss, params, (batch[0], keep))
        expected = jax.tree_util.tree_map(lambda g: jnp.tensordot(w, g, 1), grads)
        (_, aux), gram, combine = engine(params, batch, key)
        return mtl.task_gram(grads), expected, (aux["kept"], keep.sum()), gram, combine(w)

    expected_gram, expected_update, (kept, expected_kept), gram, update = run(params, batch, key)
    assert int(kept) == int(expected_kept)
    assert rel_err(gram, expected_gram) <= RTOL32
    assert rel_err(update, expected_update) <= RTOL32


# --------------------------------------------------------------------------- tasks
def task_losses(params, batch):
    """Three task losses of a shared trunk; the trunk centres its features over the batch
    (batch-coupled: allowed for task losses); the last task is a regulariser."""
    x, y = batch
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    h = h - h.mean(0)
    return jnp.stack(
        [
            jnp.mean((h @ params["w2"] - y) ** 2),
            jnp.mean(jnp.abs(h @ params["w3"])),
            0.1 * jnp.sum(params["w1"] ** 2),
        ]
    )


def test_task_gram_equals_tier_3():
    """Every strategy (one compiled program), against ``mtl.value_and_jacobian``."""
    rng = np.random.default_rng(12)
    params = {
        "w1": normal(rng, (4, 6)),
        "b1": normal(rng, (6,)),
        "w2": normal(rng, (6, 1)),
        "w3": normal(rng, (6, 2)),
    }
    batch = (normal(rng, (5, 4)), jnp.asarray(np.ones((5, 1), np.float32)))
    w = jnp.array([0.3, -1.0, 2.0])

    @jax.jit
    def run(params, batch):
        losses, task_grads = mtl.value_and_jacobian(task_losses)(params, batch)
        expected = jax.tree_util.tree_map(lambda g: jnp.tensordot(w, g, 1), task_grads.tree)
        got = {}
        for strategy in STRATEGIES:
            engine = value_gram_and_combine(task_losses, batch_dim=None, strategy=strategy)
            out_losses, gram, combine = engine(params, batch)
            got[strategy] = out_losses, gram, combine(w)
        return losses, mtl.task_gram(task_grads.tree), expected, got

    losses, expected_gram, expected, got = run(params, batch)
    for strategy, (out_losses, gram, update) in got.items():
        np.testing.assert_allclose(out_losses, losses, rtol=1e-6)
        assert rel_err(gram, expected_gram) <= RTOL32, strategy
        assert rel_err(update, expected) <= RTOL32, strategy
    plan = leaf_strategies(task_losses, params, batch, batch_dim=None, strategy="ghost")
    assert plan["['w2']"] == plan["['w3']"] == "ghost", plan


# --------------------------------------------------------------------------- coupling
class LinenBatchNormNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        h = nn.BatchNorm(use_running_average=not train)(nn.Dense(3)(x))
        return nn.Dense(2)(h)


def test_batchnorm_in_training_mode_is_rejected_naming_the_operation():
    model = LinenBatchNormNet()
    x = normal(np.random.default_rng(13), (4, 3))
    shapes = jax.eval_shape(lambda k, x: model.init(k, x, False), jax.random.PRNGKey(0), x)
    variables = {
        "params": random_like(shapes["params"], 14),
        "batch_stats": jax.tree_util.tree_map(
            lambda s: jnp.asarray(np.ones(s.shape, s.dtype)), shapes["batch_stats"]
        ),
    }

    def loss(params, batch, train):
        state = {"params": params, "batch_stats": variables["batch_stats"]}
        if train:
            out, _ = model.apply(state, batch[0], True, mutable=["batch_stats"])
        else:
            out = model.apply(state, batch[0], False)
        return jnp.sum(out**2, -1)

    with pytest.raises(BatchCouplingError, match=r"reduce_sum.*example axis.*normalization"):
        value_and_gram(loss)(variables["params"], (x,), True)
    assert_exact(loss, variables["params"], (x,), False)  # running averages: per-example


@pytest.mark.parametrize(
    "loss, pattern",
    [
        (lambda p, b: jnp.sum((b[0] - b[0].mean(0)) @ p, -1), "reduce_sum"),
        (lambda p, b: jnp.diag((b[0] @ p) @ (b[0] @ p).T), "dot_general.*different examples"),
        (lambda p, b: (b[0] @ p @ ((b[0] @ p).T @ (b[0] @ p)))[:, 0], "contracts over the example"),
        (lambda p, b: jnp.sort(b[0] @ p, axis=0)[:, 0], "sort"),
        (lambda p, b: jnp.cumsum(b[0] @ p, axis=0)[:, 0], "cumsum"),
        (lambda p, b: jnp.roll(b[0] @ p, 1, axis=0)[:, 0], "slice|concatenate"),
    ],
)
def test_other_batch_couplings_are_rejected(loss, pattern):
    params = jnp.asarray(np.ones((3, 2), np.float32))
    with pytest.raises(BatchCouplingError, match=pattern):
        jax.eval_shape(value_and_gram(loss), params, (jnp.asarray(np.ones((4, 3), np.float32)),))


# --------------------------------------------------------------------------- validation
def test_bad_arguments_raise_clear_errors():
    """At construction or at trace time (``jax.eval_shape``: nothing is compiled)."""
    loss_fn, params, batch = mlp_problem()
    shape_of = jax.eval_shape
    with pytest.raises(ValueError, match="strategy"):
        value_and_gram(loss_fn, strategy="fast")
    with pytest.raises(ValueError, match="chunk_size"):
        value_and_gram(loss_fn, chunk_size=0)
    with pytest.raises(ValueError, match="chunk_size"):
        value_and_gram(loss_fn, chunk_size=True)
    with pytest.raises(TypeError, match="batch_dim"):
        value_and_gram(loss_fn, batch_dim=True)
    with pytest.raises(TypeError, match="has_aux"):
        value_and_gram(loss_fn, has_aux=1)
    bad_params = {"w": jnp.asarray(np.ones(6, np.float32)), "step": jnp.asarray(np.int32(0))}
    with pytest.raises(TypeError, match="params.*'step'.*int32"):
        shape_of(value_and_gram(lambda p, b: b[0] @ p["w"]), bad_params, batch)
    with pytest.raises(TypeError, match="batch.*missing"):
        shape_of(value_and_gram(loss_fn), params)
    with pytest.raises(ValueError, match="one loss per example"):
        shape_of(value_and_gram(lambda p, b: mlp_loss(p, b)[:3]), params, batch)
    with pytest.raises(ValueError, match="1-D"):
        shape_of(value_and_gram(lambda p, b: mlp_loss(p, b).mean()), params, batch)
    with pytest.raises(ValueError, match="disagree"):
        shape_of(value_and_gram(loss_fn), params, (batch[0], np.asarray(batch[1])[:3]))
    with pytest.raises(ValueError, match="no axis batch_dim=2"):
        shape_of(value_and_gram(loss_fn, batch_dim=2), params, batch)
    with pytest.raises(ValueError, match="do not depend on the batch"):
        shape_of(value_and_gram(lambda p, b: jnp.ones(5) * jnp.sum(p[0]["w"])), params, batch)
    with pytest.raises(ValueError, match=r"one weight per example.*\(5,\)"):
        shape_of(lambda p, b: value_gram_and_combine(loss_fn)(p, b)[2](jnp.ones(4)), params, batch)


def test_value_and_gram_is_exported():
    assert mtl.value_and_gram is value_and_gram

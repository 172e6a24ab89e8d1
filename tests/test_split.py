"""The encoder/heads split against jax.jacrev, the full-model Jacobian and float64 Grams."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtl_optax as mtl
from mtl_optax import split
from mtl_optax.gram import linear_gram, times_power_of_two
from tests import models, zoo

K = models.K
GRAM_WEIGHTINGS = {name: make(K) for name, make in zoo.WEIGHTINGS.items() if make(K).needs_gram}

FORMS = {
    "sequence": (models.init_params, models.HEADS),
    "dict": (models.init_params, models.NAMED_HEADS),
    "stacked": (models.init_params, models.STACKED_HEADS),
    "separate": (models.init_separate_params, models.SEPARATE_HEADS),
}


def setup(seed=0, form="sequence"):
    init, heads = FORMS[form]
    params = init(jax.random.PRNGKey(seed))
    batch = models.make_batch(jax.random.PRNGKey(seed + 1))
    return params, batch, heads


def losses_of(params, batch):
    """The reference losses of either parameter layout."""
    heads = params["heads"]
    if isinstance(heads, list):
        heads = {"w": jnp.stack([h["w"] for h in heads]), "b": jnp.stack([h["b"] for h in heads])}
    return models.task_losses({"trunk": params["trunk"], "heads": heads}, batch)


def assert_tree_close(a, b, rtol=1e-5, atol=1e-6):
    jax.tree_util.tree_map(
        lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b
    )


@pytest.mark.parametrize("form", sorted(FORMS))
@pytest.mark.parametrize("strategy,chunk", [("map", None), ("vmap", None), ("chunked", 2)])
def test_every_head_form_gives_jacrev_per_task_gradients(form, strategy, chunk):
    params, batch, heads = setup(form=form)
    fn = jax.jit(
        mtl.split_value_and_jacobian(models.encode, heads, strategy=strategy, chunk_size=chunk)
    )
    losses, task_grads = fn(params, batch)
    np.testing.assert_allclose(losses, losses_of(params, batch), rtol=1e-6)
    jac = jax.jacrev(losses_of)(params, batch)
    assert_tree_close(task_grads["trunk"], jac["trunk"])  # encoder: stacked per task
    roles = dict(zip(["heads.b", "heads.w", "trunk.b", "trunk.w"], task_grads.roles))
    if form in ("sequence", "dict"):  # the stacked leaf is read by every head: stacked per task
        assert roles["heads.w"] == "task"
        assert_tree_close(task_grads["heads"], jac["heads"])
    elif form == "stacked":  # slice i belongs to task i
        assert roles["heads.w"] == "sliced"
        assert_tree_close(
            task_grads["heads"], jax.tree_util.tree_map(lambda j: j.sum(0), jac["heads"])
        )
    else:  # each head leaf belongs to one task
        assert task_grads.roles[: 2 * K] == tuple(i for i in range(K) for _ in range(2))
        for i in range(K):
            assert_tree_close(
                task_grads["heads"][i], jax.tree_util.tree_map(lambda j, i=i: j[i], jac["heads"][i])
            )
    assert task_grads.names == (models.NAMES if form == "dict" else None)


def both_paths(weighting, params, batch, heads):
    """``(split, full)`` aggregate updates and states, one jit."""
    shared = {"trunk": True, "heads": False}

    @jax.jit
    def run(params):
        losses, split_grads = mtl.split_value_and_jacobian(models.encode, heads)(params, batch)
        _, full_grads = mtl.value_and_jacobian(losses_of)(params, batch)
        a = mtl.aggregate(weighting, tasks=K)
        b = mtl.aggregate(weighting, tasks=K, shared=shared)
        return (
            a.update(split_grads, a.init(params), params, task_losses=losses),
            b.update(full_grads, b.init(params), params, task_losses=losses),
        )

    return run(params)


@pytest.mark.parametrize(
    "form,name",
    [("stacked", name) for name in sorted(GRAM_WEIGHTINGS)]
    + [(form, name) for form in ("sequence", "dict", "separate") for name in ("mgda", "upgrad")]
    + [(form, "constant") for form in sorted(FORMS)],
)
def test_aggregate_of_the_split_needs_no_mask_and_equals_the_masked_full_jacobian(form, name):
    """Weights and the whole update (heads by the head rule): every Gram weighting with
    stacked heads, representatives with the other forms, and a scalarization."""
    params, batch, heads = setup(2, form)
    weighting = (
        mtl.constant_weighting([0.5, 2.0, 1.0]) if name == "constant" else GRAM_WEIGHTINGS[name]
    )
    (ua, sa), (ub, sb) = both_paths(weighting, params, batch, heads)
    rtol = zoo.PATH_RTOL.get(name, 1e-5)
    np.testing.assert_allclose(sa.weights, sb.weights, rtol=rtol, atol=1e-6)
    assert_tree_close(ua, ub, rtol=rtol, atol=1e-6)


def test_feature_gram_is_the_gram_of_jacrev_at_the_features():
    params, batch, heads = setup(4)
    z = models.encode(params, batch)
    jz = np.asarray(jax.jacrev(lambda z_: models.heads(params, z_, batch))(z), np.float64)
    jz = jz.reshape(K, -1)
    summed = jax.grad(lambda p: jnp.sum(models.task_losses(p, batch)))(params)
    for name in ("mgda", "upgrad", "nash_mtl", "gradient_normalized", "imtl_g"):
        weighting = GRAM_WEIGHTINGS[name]
        grad_fn = mtl.split_value_and_grad(models.encode, heads, weighting)
        losses, grads, state = jax.jit(grad_fn)(params, batch, grad_fn.init(params))
        expected, _ = weighting.update(
            jnp.asarray(jz @ jz.T, jnp.float32), losses, weighting.init(K)
        )
        np.testing.assert_allclose(state.weights, expected, rtol=1e-5, atol=1e-6)
        w = jax.lax.stop_gradient(state.weights)
        direct = jax.grad(lambda p, w=w: w @ models.task_losses(p, batch))(params)
        assert_tree_close(grads["trunk"], direct["trunk"])  # encoder: Σ w_i g_i
        assert_tree_close(grads["heads"], summed["heads"])  # heads: their own task


@pytest.mark.parametrize("form", sorted(FORMS))
def test_tier1_through_the_split_is_the_weighted_sum_gradient(form):
    params, batch, heads = setup(6, form)
    grad_fn = mtl.split_value_and_grad(
        models.encode, heads, mtl.constant_weighting([0.5, 2.0, 1.0])
    )
    _, grads, state = grad_fn(params, batch, grad_fn.init(params))
    expected = jax.grad(lambda p: jnp.array([0.5, 2.0, 1.0]) @ losses_of(p, batch))(params)
    assert_tree_close(grads, expected)
    weights = mtl.task_weights(state)
    if form == "dict":
        assert list(weights) == list(models.NAMES)


def test_linear_gram_equals_the_float64_gram_of_the_encoder_jacobian():
    params, batch, heads = setup(8)
    forward = split.split_forward(split.plain_split(models.encode, heads), params, batch)
    _, feature_grads = forward.heads.backward(jnp.ones(K))
    jac = jax.jacrev(models.task_losses)(params, batch)["trunk"]
    flat = np.concatenate(
        [np.asarray(jac["w"], np.float64).reshape(K, -1), np.asarray(jac["b"], np.float64)], 1
    )

    def gram(**kw):
        g, e = linear_gram(forward.encoder_vjp, forward.encoder_jvp, feature_grads, **kw)
        return np.asarray(g, np.float64) * 4.0 ** int(e)

    for chunk in (None, 2):
        for exponent in (0, None):  # no scaling; each column scaled by its own power of two
            np.testing.assert_allclose(
                gram(diagonal_only=False, chunk_size=chunk, exponent=exponent),
                flat @ flat.T,
                rtol=1e-5,
                atol=1e-7,
            )
    scaled, e = linear_gram(
        forward.encoder_vjp,
        forward.encoder_jvp,
        feature_grads,
        diagonal_only=False,
        chunk_size=None,
        exponent=jnp.int32(3),
    )
    assert int(e) == 3
    np.testing.assert_allclose(scaled, flat @ flat.T / 64.0, rtol=1e-5, atol=1e-9)
    for exponent in (0, None):
        diag = gram(diagonal_only=True, chunk_size=None, exponent=exponent)
        np.testing.assert_allclose(np.diag(diag), (flat**2).sum(1), rtol=1e-5)


@pytest.mark.parametrize(
    "name,scale",
    [(name, 1.0) for name in sorted(GRAM_WEIGHTINGS)]
    + [(name, scale) for name in ("mgda", "gradient_normalized") for scale in (1e-30, 1e30)],
)
def test_bounded_memory_mode_equals_the_default_tier3(name, scale):
    """gram="parameters" gives the weights and update of split Jacobian + aggregate."""
    weighting = GRAM_WEIGHTINGS[name]
    params, batch, heads = setup(10)
    scaled_heads = [lambda p, z, b, h=h: scale * h(p, z, b) for h in heads]
    bounded = mtl.split_value_and_grad(
        models.encode, scaled_heads, weighting, gram="parameters", chunk_size=2
    )
    _, grads, bounded_state = jax.jit(bounded)(params, batch, bounded.init(params))
    losses, task_grads = mtl.split_value_and_jacobian(models.encode, scaled_heads)(params, batch)
    transform = mtl.aggregate(weighting, tasks=K)
    updates, state = transform.update(
        task_grads, transform.init(params), params, task_losses=losses
    )
    np.testing.assert_allclose(bounded_state.weights, state.weights, rtol=1e-5, atol=1e-6)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(
            a / scale, b / scale, rtol=1e-4, atol=1e-6 * float(jnp.max(jnp.abs(b / scale)))
        ),
        grads,
        updates,
    )


def test_the_old_k_copies_heads_are_rejected():
    """mtl_optax 0.1's heads(params, features, batch) let a head read another task's copy
    (features[0] for every task, features.mean(0), features[i + 1]) and train silently wrong.
    The form is gone: a single function is refused before anything is computed."""
    params, batch, _ = setup()

    def reads_copy_zero(p, features, b):
        return models.heads(p, features[0], b)

    def reads_the_mean(p, features, b):
        return models.heads(p, jnp.mean(features, axis=0), b)

    def reads_the_next_copy(p, features, b):
        return jnp.stack([models.heads(p, features[(i + 1) % K], b)[i] for i in range(K)])

    for miswired in (reads_copy_zero, reads_the_mean, reads_the_next_copy):
        with pytest.raises(TypeError, match=r"single function.*another task's copy"):
            mtl.split_value_and_jacobian(models.encode, miswired)
        with pytest.raises(TypeError, match=r"single function"):
            mtl.split_value_and_grad(models.encode, miswired, mtl.mgda())


@pytest.mark.parametrize("form", ["sequence", "stacked"])
def test_each_head_sees_only_its_own_copy(form):
    """The library routes copy i to head i: a head's feature cotangent lands on its task."""
    params, batch, heads = setup(0, form)
    forward = split.split_forward(split.plain_split(models.encode, heads), params, batch)
    _, features = forward.heads.backward(jnp.array([1.0, 0.0, 0.0]))
    z = models.encode(params, batch)
    expected = jax.grad(lambda z_: models.heads(params, z_, batch)[0])(z)
    np.testing.assert_allclose(features[0], expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(features[1:], 0.0)


@pytest.mark.parametrize("form", ["sequence", "stacked"])
def test_heads_backward_and_weighted_equal_jacrev(form):
    """``backward(c)``: rows ``c_i ∂L_i/∂z`` and ``Σ c_i ∇L_i`` on the heads; ``weighted(c)``:
    the same head gradients and ``Σ_i c_i ∂L_i/∂z`` (stacked heads: z is never copied)."""
    params, batch, heads = setup(2, form)
    forward = split.split_forward(split.plain_split(models.encode, heads), params, batch)
    c = jnp.array([0.5, -2.0, 3.0])
    z = models.encode(params, batch)
    rows = jax.jacrev(lambda z_: models.heads(params, z_, batch))(z)  # (K, B, d)
    heads_grad = jax.grad(lambda p: c @ models.task_losses(p, batch))(params)["heads"]
    expected_heads = jax.tree_util.tree_leaves(heads_grad)
    head_grads, features = forward.heads.backward(c)
    np.testing.assert_allclose(features, c[:, None, None] * rows, rtol=1e-5, atol=1e-6)
    assert_tree_close(head_grads, expected_heads)
    head_grads, z_cotangent = forward.heads.weighted(c)
    np.testing.assert_allclose(z_cotangent, jnp.tensordot(c, rows, 1), rtol=1e-5, atol=1e-6)
    assert_tree_close(head_grads, expected_heads)


def test_stacked_heads_selected_in_another_order():
    """Gradients land on the right leaves when ``head_params`` lists them in another order."""
    params, batch, _ = setup(3)
    reordered = mtl.stacked_heads(
        lambda hp, z, b, i: models.head_loss({"w": hp["a"], "b": hp["x"]}, z, b, i),
        head_params=lambda p: {"x": p["heads"]["b"], "a": p["heads"]["w"]},
    )
    same_order = mtl.stacked_heads(
        lambda hp, z, b, i: models.head_loss({"w": hp["x"], "b": hp["a"]}, z, b, i),
        head_params=lambda p: {"a": p["heads"]["b"], "x": p["heads"]["w"]},
    )
    weights = jnp.array([0.5, 2.0, 1.0])
    expected = jax.grad(lambda p: weights @ models.task_losses(p, batch))(params)
    for heads in (reordered, same_order):
        grad_fn = mtl.split_value_and_grad(
            models.encode, heads, mtl.constant_weighting([0.5, 2.0, 1.0])
        )
        _, grads, _ = grad_fn(params, batch, grad_fn.init(params))
        assert_tree_close(grads, expected)


def test_times_power_of_two_is_ldexp_for_every_exponent():
    """The Gram's exact rescaling equals ``np.ldexp`` wherever input and result are normal,
    for every exponent ``power_of_two_exponent`` can return in float32."""
    exponents = np.arange(-149, 129)
    x = np.random.default_rng(0).standard_normal((exponents.size, 64)).astype(np.float32)
    x = np.ldexp(x, (exponents[:, None] - 1) // 2).astype(np.float32)  # spread the magnitudes
    got = np.asarray(jax.jit(jax.vmap(times_power_of_two))(x, -exponents))
    want = np.ldexp(x, -exponents[:, None]).astype(np.float32)
    tiny = np.finfo(np.float32).tiny
    normal = (np.abs(x) >= tiny) & (np.abs(want) >= tiny) & np.isfinite(want)
    assert normal.sum() > 10_000
    np.testing.assert_array_equal(got[normal], want[normal])


def test_split_errors_name_the_problem():
    params, batch, heads = setup()
    tied = [lambda p, z, b, h=h: h(p, z, b) + jnp.sum(p["trunk"]["w"]) for h in heads]
    with pytest.raises(ValueError, match=r"\['trunk'\]\['w'\] are read by both"):
        mtl.split_value_and_jacobian(models.encode, tied)(params, batch)
    with pytest.raises(ValueError, match=r"head 1 must return one scalar loss, got shape \(8,\)"):
        bad = [heads[0], lambda p, z, b: z[:, 0], heads[2]]
        mtl.split_value_and_jacobian(models.encode, bad)(params, batch)
    with pytest.raises(ValueError, match="reads none of the params"):
        mtl.split_value_and_jacobian(lambda p, b: b[0], heads)(params, batch)
    with pytest.raises(TypeError, match="features of dtype int32"):
        mtl.split_value_and_jacobian(
            lambda p, b: (b[0] @ p["trunk"]["w"]).astype(jnp.int32), heads
        )(params, batch)
    with pytest.raises(ValueError, match="`heads` is empty"):
        mtl.split_value_and_jacobian(models.encode, [])
    with pytest.raises(TypeError, match="head 'b' must be callable"):
        mtl.split_value_and_jacobian(models.encode, {"a": heads[0], "b": 3})
    with pytest.raises(TypeError, match="keys are the task names"):
        mtl.split_value_and_jacobian(models.encode, {0: heads[0]})
    with pytest.raises(ValueError, match="`gram` must be one of"):
        mtl.split_value_and_grad(models.encode, heads, mtl.mgda(), gram="full")
    with pytest.raises(TypeError, match="optax GradientTransformation"):
        mtl.split_value_and_grad(models.encode, heads, optax.adam(1e-3))
    with pytest.raises(TypeError, match=r"trimmed_mean.*needs tier 3.*split_value_and_jacobian"):
        mtl.split_value_and_grad(models.encode, heads, mtl.trimmed_mean(trim=1))
    grad_fn = mtl.split_value_and_grad(models.encode, heads, mtl.mgda())
    with pytest.raises(ValueError, match=r"state=None.*grad_fn.init\(params\)"):
        grad_fn(params, batch, None)
    other = mtl.split_value_and_grad(models.encode, heads, mtl.upgrad())
    with pytest.raises(ValueError, match=r"state of 'upgrad'.*runs 'mgda'"):
        grad_fn(params, batch, other.init(params))


def test_stacked_heads_errors():
    params, batch, _ = setup()
    transposed = mtl.stacked_heads(
        models.head_loss, head_params=lambda p: {"w": p["heads"]["w"].T, "b": p["heads"]["b"]}
    )
    with pytest.raises(ValueError, match="a part of the parameters"):
        mtl.split_value_and_jacobian(models.encode, transposed)(params, batch)
    ragged = {**params, "heads": {"w": params["heads"]["w"], "b": jnp.zeros(K + 1)}}
    with pytest.raises(ValueError, match="same leading task axis"):
        mtl.split_value_and_jacobian(models.encode, models.STACKED_HEADS)(ragged, batch)
    with pytest.raises(TypeError, match="head_params"):
        mtl.stacked_heads(models.head_loss, head_params="heads")
    tied = mtl.stacked_heads(models.head_loss, head_params=lambda p: p["trunk"])
    with pytest.raises(ValueError, match=r"selects \['trunk'\]\['b'\], \['trunk'\]\['w'\], wh"):
        mtl.split_value_and_jacobian(models.encode, tied)(params, batch)

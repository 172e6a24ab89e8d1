"""The encoder/heads split against jax.jacrev, the full-model Jacobian and float64 Grams."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtl_optax as mtl
from mtl_optax import split
from tests import models, zoo

K = models.K
GRAM_WEIGHTINGS = {name: make(K) for name, make in zoo.WEIGHTINGS.items() if make(K).needs_gram}


def setup(seed=0):
    params = models.init_params(jax.random.PRNGKey(seed))
    batch = models.make_batch(jax.random.PRNGKey(seed + 1))
    return params, batch


def assert_tree_close(a, b, rtol=1e-5, atol=1e-6):
    jax.tree_util.tree_map(
        lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b
    )


@pytest.mark.parametrize("strategy,chunk", [("map", None), ("vmap", None), ("chunked", 2)])
def test_encoder_grads_are_jacrev_and_heads_the_summed_gradient(strategy, chunk):
    params, batch = setup()
    fn = jax.jit(
        mtl.split_value_and_jacobian(
            models.encode, models.split_heads, num_tasks=K, strategy=strategy, chunk_size=chunk
        )
    )
    losses, task_grads = fn(params, batch)
    np.testing.assert_allclose(losses, models.task_losses(params, batch), rtol=1e-6)
    assert task_grads.stacked == (False, False, True, True)  # heads b, w; trunk b, w
    jac = jax.jacrev(models.task_losses)(params, batch)
    assert_tree_close(task_grads["trunk"], jac["trunk"])
    summed = jax.grad(lambda p: jnp.sum(models.task_losses(p, batch)))(params)
    assert_tree_close(task_grads["heads"], summed["heads"])


def test_aggregate_of_the_split_needs_no_mask_and_equals_the_masked_full_jacobian():
    params, batch = setup(2)
    losses, split_grads = mtl.split_value_and_jacobian(
        models.encode, models.split_heads, num_tasks=K
    )(params, batch)
    _, full_grads = mtl.value_and_jacobian(models.task_losses)(params, batch)
    for weighting in GRAM_WEIGHTINGS.values():
        a = mtl.aggregate(weighting, num_tasks=K)
        b = mtl.aggregate(weighting, num_tasks=K, shared=models.SHARED)
        ua, sa = a.update(split_grads, a.init(params), params, task_losses=losses)
        ub, sb = b.update(full_grads, b.init(params), params, task_losses=losses)
        np.testing.assert_allclose(sa.weights, sb.weights, rtol=1e-5, atol=1e-6)
        assert_tree_close(ua, ub, rtol=1e-5, atol=1e-6)


def test_feature_gram_is_the_gram_of_jacrev_at_the_features():
    params, batch = setup(4)
    z = models.encode(params, batch)
    jz = np.asarray(jax.jacrev(lambda z_: models.heads(params, z_, batch))(z), np.float64).reshape(
        K, -1
    )
    for weighting in GRAM_WEIGHTINGS.values():
        out = jax.jit(
            split.split_value_and_grad(models.encode, models.split_heads, weighting, num_tasks=K)
        )(params, batch, weighting.init(K))
        expected, _ = weighting.update(
            jnp.asarray(jz @ jz.T, jnp.float32), out.losses, weighting.init(K)
        )
        np.testing.assert_allclose(out.weights, expected, rtol=1e-5, atol=1e-6)
        w = jax.lax.stop_gradient(out.weights)
        direct = jax.grad(lambda p, w=w: w @ models.task_losses(p, batch))(params)
        summed = jax.grad(lambda p: jnp.sum(models.task_losses(p, batch)))(params)
        assert_tree_close(out.grads["trunk"], direct["trunk"])  # encoder: Σ w_i g_i
        assert_tree_close(out.grads["heads"], summed["heads"])  # heads: their own task


def test_tier1_through_the_split_is_the_weighted_sum_gradient():
    params, batch = setup(6)
    weighting = mtl.constant_weighting([0.5, 2.0, 1.0])
    out = split.split_value_and_grad(models.encode, models.split_heads, weighting, num_tasks=K)(
        params, batch, weighting.init(K)
    )
    expected = jax.grad(lambda p: jnp.array([0.5, 2.0, 1.0]) @ models.task_losses(p, batch))(params)
    assert_tree_close(out.grads, expected)


def test_parameter_gram_equals_the_float64_gram_of_the_encoder_jacobian():
    params, batch = setup(8)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    forward = split.split_forward(
        split._plain_encode(models.encode),
        split._plain_heads(models.split_heads),
        params,
        batch,
        K,
    )
    _, feature_grads = forward.heads_vjp(jnp.ones(K))
    jac = jax.jacrev(models.task_losses)(params, batch)["trunk"]
    flat = np.concatenate(
        [np.asarray(jac["w"], np.float64).reshape(K, -1), np.asarray(jac["b"], np.float64)], 1
    )
    for chunk in (None, 2):
        gram = split.parameter_gram(forward, feature_grads, diagonal_only=False, chunk_size=chunk)
        np.testing.assert_allclose(gram, flat @ flat.T, rtol=1e-5, atol=1e-7)
    scaled = split.parameter_gram(
        forward, feature_grads, diagonal_only=False, chunk_size=None, exponent=jnp.int32(3)
    )
    np.testing.assert_allclose(scaled, flat @ flat.T / 64.0, rtol=1e-5, atol=1e-9)
    diag = split.parameter_gram(forward, feature_grads, diagonal_only=True, chunk_size=None)
    np.testing.assert_allclose(np.diag(diag), (flat**2).sum(1), rtol=1e-5)
    del leaves, treedef


@pytest.mark.parametrize(
    "name,scale",
    [(name, 1.0) for name in sorted(GRAM_WEIGHTINGS)]
    + [(name, scale) for name in ("mgda", "gradient_normalized") for scale in (1e-30, 1e30)],
)
def test_bounded_memory_mode_equals_the_default_tier3(name, scale):
    """gram="parameters" gives the weights and update of split Jacobian + aggregate."""
    weighting = GRAM_WEIGHTINGS[name]
    params, batch = setup(10)

    def scaled_heads(p, f, b):
        return scale * models.split_heads(p, f, b)

    bounded = jax.jit(
        split.split_value_and_grad(
            models.encode, scaled_heads, weighting, num_tasks=K, gram="parameters", chunk_size=2
        )
    )(params, batch, weighting.init(K))
    losses, task_grads = mtl.split_value_and_jacobian(models.encode, scaled_heads, num_tasks=K)(
        params, batch
    )
    transform = mtl.aggregate(weighting, num_tasks=K)
    updates, state = transform.update(
        task_grads, transform.init(params), params, task_losses=losses
    )
    np.testing.assert_allclose(bounded.weights, state.weights, rtol=1e-5, atol=1e-6)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(
            a / scale, b / scale, rtol=1e-4, atol=1e-6 * float(jnp.max(jnp.abs(b / scale)))
        ),
        bounded.grads,
        updates,
    )


def test_split_errors_name_the_problem():
    params, batch = setup()

    def tied_heads(p, f, b):  # reads the encoder's weight too
        return models.split_heads(p, f, b) + jnp.sum(p["trunk"]["w"])

    with pytest.raises(ValueError, match=r"\['trunk'\]\['w'\] are read by both"):
        mtl.split_value_and_jacobian(models.encode, tied_heads, num_tasks=K)(params, batch)
    with pytest.raises(ValueError, match=r"must return the 3 task losses.*got shape \(2,\)"):
        mtl.split_value_and_jacobian(
            models.encode, lambda p, f, b: models.split_heads(p, f, b)[:2], num_tasks=K
        )(params, batch)
    with pytest.raises(ValueError, match="reads none of the params"):
        mtl.split_value_and_jacobian(lambda p, b: b[0], models.split_heads, num_tasks=K)(
            params, batch
        )
    with pytest.raises(ValueError, match="`gram` must be one of"):
        mtl.split_value_and_grad(
            models.encode, models.split_heads, mtl.mgda(), num_tasks=K, gram="full"
        )
    with pytest.raises(TypeError, match="optax GradientTransformation"):
        mtl.split_value_and_grad(
            models.encode,
            models.split_heads,
            mtl.aggregate(mtl.mgda(), num_tasks=K, shared=True),
            num_tasks=K,
        )
    step = mtl.split_value_and_grad(models.encode, models.split_heads, mtl.mgda(), num_tasks=K)
    with pytest.raises(ValueError, match=r"`weighting_state` is None.*weighting.init\(3\)"):
        step(params, batch, None)

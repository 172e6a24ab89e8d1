"""aggregate: reduction of the task axis, optax composition, tier equivalence, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtl_optax as mtl
from tests import models


def setup():
    params = models.init_params(jax.random.PRNGKey(0))
    batch = models.make_batch(jax.random.PRNGKey(1))
    losses, task_grads = mtl.value_and_jacobian(models.task_losses)(params, batch)
    return params, batch, losses, task_grads


def shared_gram(task_grads):
    flat = jnp.concatenate(
        [task_grads["trunk"]["w"].reshape(models.K, -1), task_grads["trunk"]["b"]], axis=1
    )
    return flat @ flat.T, flat


def test_shared_leaves_weighted_heads_summed():
    params, _, losses, task_grads = setup()
    transform = mtl.aggregate(mtl.mgda(), tasks=models.K, shared=models.SHARED)
    updates, state = transform.update(
        task_grads, transform.init(params), params, task_losses=losses
    )
    gram, flat = shared_gram(task_grads)
    expected_w, _ = mtl.mgda().update(gram, None, mtl.mgda().init(models.K))
    np.testing.assert_allclose(state.weights, expected_w, atol=1e-6)
    np.testing.assert_allclose(
        updates["trunk"]["w"], jnp.tensordot(expected_w, task_grads["trunk"]["w"], 1), atol=1e-6
    )
    np.testing.assert_allclose(updates["heads"]["w"], task_grads["heads"]["w"].sum(0), atol=1e-6)
    u = np.asarray(expected_w) @ np.asarray(flat)  # non-conflicting on the shared parameters
    assert np.all(np.asarray(flat) @ u >= -1e-6)


def test_callable_mask_and_shared_true():
    params, _, losses, task_grads = setup()
    by_name = lambda p: {
        "trunk": jax.tree_util.tree_map(lambda _: True, p["trunk"]),
        "heads": jax.tree_util.tree_map(lambda _: False, p["heads"]),
    }
    a = mtl.aggregate(mtl.mgda(), tasks=models.K, shared=by_name)
    b = mtl.aggregate(mtl.mgda(), tasks=models.K, shared=models.SHARED)
    ua, _ = a.update(task_grads, a.init(params), params)
    ub, _ = b.update(task_grads, b.init(params), params)
    jax.tree_util.tree_map(np.testing.assert_array_equal, ua, ub)
    c = mtl.aggregate(mtl.mean_weighting(), tasks=models.K, shared=True)
    uc, _ = c.update(task_grads, c.init(params), params)
    jax.tree_util.tree_map(
        lambda u, g: np.testing.assert_allclose(u, g.mean(0), rtol=1e-6, atol=1e-7),
        uc,
        task_grads.tree,
    )


def test_chains_with_adam_under_jit_and_trains():
    params, batch, _, _ = setup()
    opt = optax.chain(
        mtl.aggregate(mtl.mgda(), tasks=models.K, shared=models.SHARED), optax.adam(1e-2)
    )
    state = opt.init(params)
    jac_fn = mtl.value_and_jacobian(models.task_losses)

    @jax.jit
    def step(params, state):
        losses, task_grads = jac_fn(params, batch)
        updates, state = opt.update(task_grads, state, params, task_losses=losses, unknown_extra=1)
        return optax.apply_updates(params, updates), state, losses

    first = None
    for _ in range(200):
        params, state, losses = step(params, state)
        first = losses if first is None else first
    # MGDA never increases a task's loss to first order; after training every loss went down.
    assert np.all(np.asarray(losses) < np.asarray(first))
    assert state[0].weights.shape == (models.K,) and abs(float(state[0].weights.sum()) - 1) < 1e-5


def test_bf16_task_gradients():
    params, _, losses, task_grads = setup()
    bf16 = jax.tree_util.tree_map(lambda g: g.astype(jnp.bfloat16), task_grads)
    transform = mtl.aggregate(mtl.mgda(), tasks=models.K, shared=models.SHARED)
    updates, state = transform.update(bf16, transform.init(params), params)
    assert updates["trunk"]["w"].dtype == jnp.bfloat16
    assert bool(jnp.all(jnp.isfinite(state.weights)))
    ref, _ = transform.update(task_grads, transform.init(params), params)
    np.testing.assert_allclose(
        updates["trunk"]["w"].astype(jnp.float32), ref["trunk"]["w"], atol=0.05
    )


def test_zero_and_single_task_gradients():
    params, _, _, task_grads = setup()
    zeros = jax.tree_util.tree_map(jnp.zeros_like, task_grads)
    transform = mtl.aggregate(mtl.gradient_normalized(), tasks=models.K, shared=models.SHARED)
    updates, state = transform.update(zeros, transform.init(params), params)
    assert all(bool(jnp.all(u == 0)) for u in jax.tree_util.tree_leaves(updates))
    one = jax.tree_util.tree_map(lambda g: g[:1], task_grads)
    transform = mtl.aggregate(mtl.mgda(), tasks=1, shared=True)
    updates, state = transform.update(one, transform.init(params), params)
    jax.tree_util.tree_map(
        lambda u, g: np.testing.assert_allclose(u, g[0], rtol=1e-6), updates, one.tree
    )


def test_errors_name_the_offending_leaf():
    params, _, _, task_grads = setup()
    transform = mtl.aggregate(mtl.mgda(), tasks=models.K, shared=models.SHARED)
    state = transform.init(params)
    bad = {**task_grads.tree, "heads": {**task_grads["heads"], "b": task_grads["heads"]["b"][:2]}}
    with pytest.raises(ValueError, match="disagree on the number of tasks"):
        transform.update(mtl.TaskGradients(bad), state, params)
    bad = {
        **task_grads.tree,
        "heads": {**task_grads["heads"], "b": task_grads["heads"]["b"][:, None]},
    }
    with pytest.raises(ValueError, match=r"\['heads'\]\['b'\].*not \(K, \*param.shape\)"):
        transform.update(mtl.TaskGradients(bad), state, params)
    with pytest.raises(
        TypeError, match=r"takes the TaskGradients.*mtl.TaskGradients\(stacked_tree\)"
    ):
        transform.update(task_grads.tree, state, params)
    with pytest.raises(ValueError, match="`shared` must be True, a callable"):
        wrong = mtl.aggregate(mtl.mgda(), tasks=models.K, shared=[True, False])
        wrong.update(task_grads, state, params)
    with pytest.raises(ValueError, match="task losses"):
        needs = mtl.aggregate(mtl.mgda(normalization="loss"), tasks=models.K, shared=True)
        needs.update(task_grads, needs.init(params), params)


def test_diagonal_only_gram_gives_the_same_update():
    """gradient_normalized reads diag(G) only; aggregate then skips the K² inner products."""
    params, _, _, task_grads = setup()
    assert mtl.gradient_normalized().needs_gram == "diagonal"
    transform = mtl.aggregate(mtl.gradient_normalized(), tasks=models.K, shared=models.SHARED)
    updates, state = transform.update(task_grads, transform.init(params), params)
    _, flat = shared_gram(task_grads)
    expected = 1.0 / np.linalg.norm(np.asarray(flat), axis=1)
    np.testing.assert_allclose(state.weights, expected, rtol=1e-5)


def test_callable_mask_without_params_sees_param_shapes():
    """Without params the callable mask gets the leaves without their task axis."""
    params, _, _, task_grads = setup()
    by_rank = lambda p: jax.tree_util.tree_map(lambda a: len(a.shape) > 1, p)
    transform = mtl.aggregate(mtl.mgda(), tasks=models.K, shared=by_rank)
    with_params, _ = transform.update(task_grads, transform.init(params), params)
    without, _ = transform.update(task_grads, transform.init(params))
    jax.tree_util.tree_map(np.testing.assert_array_equal, with_params, without)


def test_integer_leaf_and_misplaced_chunk_size_are_named():
    params, _, _, task_grads = setup()
    bad = {**task_grads.tree, "step": jnp.zeros((models.K,), jnp.int32)}
    transform = mtl.aggregate(mtl.mgda(), tasks=models.K, shared=True)
    with pytest.raises(TypeError, match=r"\['step'\].*real floating point"):
        transform.update(mtl.TaskGradients(bad), transform.init(None))
    complex_grads = jax.tree_util.tree_map(lambda g: g.astype(jnp.complex64), task_grads)
    with pytest.raises(TypeError, match=r"complex.*real and imaginary parts"):
        transform.update(complex_grads, transform.init(None))
    with pytest.raises(ValueError, match="only used by strategy='chunked'"):
        mtl.value_and_jacobian(models.task_losses, strategy="map", chunk_size=2)


@pytest.mark.parametrize(
    "before", [optax.adam(1e-3), optax.clip_by_global_norm(1.0), optax.add_decayed_weights(1e-4)]
)
def test_a_transform_before_aggregate_fails_loudly(before):
    """Any optax transform first would treat the task axis as parameters: a plain TypeError
    saying to put aggregate first, raised before JAX's own structure errors."""
    params, _, _, task_grads = setup()
    assert isinstance(task_grads, mtl.TaskGradients)
    wrong = optax.chain(before, mtl.aggregate(mtl.mgda(), tasks=models.K, shared=models.SHARED))
    with pytest.raises(TypeError, match=r"TaskGradients.*must come FIRST in optax.chain"):
        wrong.update(task_grads, wrong.init(params), params)
    with pytest.raises(TypeError, match=r"must come FIRST"):
        jax.jit(wrong.update)(task_grads, wrong.init(params), params)


@pytest.mark.parametrize(
    "wrapper,name",
    [
        (lambda t: optax.apply_if_finite(t, 3), "optax.apply_if_finite"),
        (lambda t: optax.MultiSteps(t, every_k_schedule=2), "optax.MultiSteps"),
    ],
)
def test_wrappers_around_aggregate_say_to_go_after_it(wrapper, name):
    params, _, losses, task_grads = setup()
    inner = optax.chain(
        mtl.aggregate(mtl.mgda(), tasks=models.K, shared=models.SHARED), optax.sgd(0.1)
    )
    wrapped = wrapper(inner)
    with pytest.raises(TypeError, match=rf"{name}.*Put it after aggregate"):
        wrapped.update(task_grads, wrapped.init(params), params)


# ---------------------------------------------------------------- guard rails, one per case
def test_none_state_says_to_call_init():
    params, _, losses, task_grads = setup()
    transform = mtl.aggregate(mtl.mgda(), tasks=models.K, shared=models.SHARED)
    with pytest.raises(ValueError, match=r"state=None.*opt.init\(params\)"):
        transform.update(task_grads, None, params, task_losses=losses)


def test_an_optax_transform_is_not_a_weighting():
    with pytest.raises(TypeError, match=r"`method` must be a multi-task method.*AFTER"):
        mtl.aggregate(optax.adam(1e-3), tasks=models.K, shared=True)
    with pytest.raises(TypeError, match=r"Call the constructor: mtl.mgda\(\)"):
        mtl.aggregate(mtl.mgda, tasks=models.K, shared=True)


def test_inject_hyperparams_needs_tasks_static():
    params, _, losses, task_grads = setup()
    wrong = optax.inject_hyperparams(mtl.aggregate)(
        mtl.mgda(), tasks=models.K, shared=models.SHARED
    )
    with pytest.raises(TypeError, match=r"static_args=\('tasks',\)"):
        wrong.init(params)
    right = optax.inject_hyperparams(mtl.aggregate, static_args=("tasks",))(
        mtl.mgda(), tasks=models.K, shared=models.SHARED
    )
    direct = mtl.aggregate(mtl.mgda(), tasks=models.K, shared=models.SHARED)
    ua, sa = right.update(task_grads, right.init(params), params)
    ub, _ = direct.update(task_grads, direct.init(params), params)
    jax.tree_util.tree_map(np.testing.assert_array_equal, ua, ub)
    np.testing.assert_array_equal(
        mtl.task_weights(sa), mtl.task_weights((optax.EmptyState(), (sa,)))
    )


def test_orbax_restore_without_target_is_explained(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    params, _, losses, task_grads = setup()
    opt = optax.chain(
        mtl.aggregate(mtl.mgda(), tasks=models.K, shared=models.SHARED), optax.adam(1e-3)
    )
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "state", opt.init(params))
    checkpointer.wait_until_finished()
    restored = checkpointer.restore(tmp_path / "state")  # no target: dicts and lists
    with pytest.raises(ValueError, match="orbax.*restore.*target"):
        opt.update(task_grads, restored, params, task_losses=losses)
    with_target = checkpointer.restore(tmp_path / "state", opt.init(params))
    opt.update(task_grads, with_target, params, task_losses=losses)  # works


@pytest.mark.parametrize("bad", [True, 3.0, 0, -1])
def test_tasks_must_be_a_positive_python_int(bad):
    with pytest.raises(ValueError, match="`tasks` must be a positive int"):
        mtl.aggregate(mtl.mgda(), tasks=bad, shared=True)


@pytest.mark.parametrize("bad", ["abc", ["a", 1], [], ["a", "a"]])
def test_task_names_must_be_distinct_strings(bad):
    with pytest.raises((TypeError, ValueError), match="`tasks`"):
        mtl.aggregate(mtl.mgda(), tasks=bad, shared=True)


def test_a_wrong_task_count_names_tasks_not_the_losses():
    params, _, losses, task_grads = setup()
    transform = mtl.aggregate(mtl.mgda(), tasks=4, shared=models.SHARED)
    with pytest.raises(ValueError, match=r"aggregate\(tasks=4\) got the gradients of 3 tasks"):
        transform.update(task_grads, transform.init(params), params)


def test_task_names_come_back_in_task_weights_and_must_match_the_gradients():
    params, batch, _, _ = setup()
    named = lambda p, b: dict(zip(models.NAMES, models.task_losses(p, b)))  # noqa: E731
    losses, task_grads = mtl.value_and_jacobian(named)(params, batch)
    assert task_grads.names == models.NAMES
    transform = mtl.aggregate(mtl.mgda(), tasks=list(models.NAMES), shared=models.SHARED)
    _, state = transform.update(task_grads, transform.init(params), params)
    weights = mtl.task_weights(state)
    assert list(weights) == list(models.NAMES)
    np.testing.assert_allclose(sum(float(w) for w in weights.values()), 1.0, rtol=1e-5)
    reordered = mtl.aggregate(mtl.mgda(), tasks=["b", "a", "c"], shared=models.SHARED)
    with pytest.raises(ValueError, match=r"holds? tasks \['a', 'b', 'c'\].*\['b', 'a', 'c'\]"):
        reordered.update(task_grads, reordered.init(params), params)


def test_the_state_of_another_method_is_refused():
    params, _, losses, task_grads = setup()
    mgda = mtl.aggregate(mtl.mgda(), tasks=models.K, shared=models.SHARED)
    primary = mtl.aggregate(mtl.primary_auxiliary(primary=0), tasks=models.K, shared=models.SHARED)
    with pytest.raises(ValueError, match=r"state of 'mgda'.*runs 'primary_auxiliary'"):
        primary.update(task_grads, mgda.init(params), params)


def test_zero_size_leaves_pass_through():
    params, batch, _, _ = setup()
    params = {**params, "empty": jnp.zeros((0, 3))}
    losses, task_grads = mtl.value_and_jacobian(
        lambda p, b: models.task_losses(p, b) + jnp.sum(p["empty"])
    )(params, batch)
    shared = {**models.SHARED, "empty": True}
    transform = mtl.aggregate(mtl.mgda(), tasks=models.K, shared=shared)
    updates, state = jax.jit(transform.update)(task_grads, transform.init(params), params)
    assert updates["empty"].shape == (0, 3)
    assert bool(jnp.all(jnp.isfinite(state.weights)))


def test_without_the_split_shared_is_required():
    """No silent head weighting: plain stacked gradients need shared= (or True)."""
    params, _, losses, task_grads = setup()
    transform = mtl.aggregate(mtl.mgda(), tasks=models.K)
    with pytest.raises(ValueError, match=r"pass shared=.*split_value_and_jacobian"):
        transform.update(task_grads, transform.init(params), params)


def test_mask_leaves_must_be_python_bools_but_a_prefix_is_fine():
    params, _, losses, task_grads = setup()
    arrays = jax.tree_util.tree_map(lambda _: jnp.array(True), models.SHARED)
    transform = mtl.aggregate(mtl.mgda(), tasks=models.K, shared=arrays)
    with pytest.raises(TypeError, match=r"mask leaf \['heads'\]\['b'\] must be a Python bool"):
        transform.update(task_grads, transform.init(params), params)
    prefix = mtl.aggregate(mtl.mgda(), tasks=models.K, shared={"trunk": True, "heads": False})
    full = mtl.aggregate(mtl.mgda(), tasks=models.K, shared=models.SHARED)
    ua, _ = prefix.update(task_grads, prefix.init(params), params)
    ub, _ = full.update(task_grads, full.init(params), params)
    jax.tree_util.tree_map(np.testing.assert_array_equal, ua, ub)


def test_losses_of_another_task_count_are_rejected():
    params, _, losses, task_grads = setup()
    transform = mtl.aggregate(mtl.mgda(), tasks=models.K, shared=models.SHARED)
    with pytest.raises(ValueError, match=r"`task_losses` must have shape \(3,\).*got \(2,\)"):
        transform.update(task_grads, transform.init(params), params, task_losses=losses[:2])


def test_nan_task_losses_poison_the_update_so_apply_if_finite_skips_it():
    params, _, losses, task_grads = setup()
    opt = optax.chain(
        mtl.aggregate(mtl.mgda(), tasks=models.K, shared=models.SHARED),
        optax.apply_if_finite(optax.sgd(0.1), 3),
    )
    state = opt.init(params)
    bad_losses = losses.at[1].set(jnp.nan)
    updates, state = jax.jit(opt.update)(task_grads, state, params, task_losses=bad_losses)
    assert bool(jnp.all(jnp.isnan(state[0].weights)))
    assert all(bool(jnp.all(u == 0)) for u in jax.tree_util.tree_leaves(updates))  # skipped
    assert int(state[1].notfinite_count) == 1


def test_whole_model_heads_follow_the_head_rule():
    """Non-shared leaves: Σ w_i g_i for a scalarization, Σ g_i for a Gram weighting."""
    params, _, losses, task_grads = setup()
    for weighting, scaled in ((mtl.constant_weighting([0.5, 2.0, 1.0]), True), (mtl.mgda(), False)):
        transform = mtl.aggregate(weighting, tasks=models.K, shared=models.SHARED)
        updates, state = transform.update(
            task_grads, transform.init(params), params, task_losses=losses
        )
        c = np.asarray(state.weights) if scaled else np.ones(models.K)
        np.testing.assert_allclose(
            updates["heads"]["w"],
            np.tensordot(c, task_grads["heads"]["w"], 1),
            rtol=1e-5,
            atol=1e-6,
        )


def test_task_gradients_behave_as_a_mapping():
    _, _, _, task_grads = setup()
    assert "trunk" in task_grads and "nope" not in task_grads
    assert sorted(task_grads) == ["heads", "trunk"] and len(task_grads) == 2
    assert dict(task_grads.items())["trunk"] is task_grads["trunk"]

"""Bad inputs at the entry points: a clear error naming the problem and the fix (or a
documented result), eagerly and under jit (where the errors are raised at trace time)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import mtl_optax as mtl
import mtl_optax.flax_nnx as mtl_nnx
from tests import models

K = models.K
PARAMS = models.init_params(jax.random.PRNGKey(0))
BATCH = models.make_batch(jax.random.PRNGKey(1))
MODES = {"eager": lambda f: f, "jit": jax.jit}


def grads():
    return mtl.value_and_jacobian(models.task_losses)(PARAMS, BATCH)


@pytest.mark.parametrize("mode", MODES)
def test_complex_gradients(mode):
    losses, task_grads = grads()
    complex_grads = jax.tree_util.tree_map(lambda g: g.astype(jnp.complex64), task_grads)
    t = mtl.aggregate(mtl.mgda(), tasks=K, shared=True)
    with pytest.raises(TypeError, match=r"complex.*real and imaginary parts"):
        MODES[mode](t.update)(complex_grads, t.init(PARAMS), PARAMS)


@pytest.mark.parametrize("mode", MODES)
def test_zero_size_leaves_are_a_documented_no_op(mode):
    params = {**PARAMS, "empty": jnp.zeros((0,))}
    losses, task_grads = mtl.value_and_jacobian(
        lambda p, b: models.task_losses(p, b) + jnp.sum(p["empty"])
    )(params, BATCH)
    t = mtl.aggregate(mtl.upgrad(), tasks=K, shared=True)
    updates, state = MODES[mode](t.update)(task_grads, t.init(params), params)
    assert updates["empty"].shape == (0,)
    assert np.all(np.isfinite(state.weights))


@pytest.mark.parametrize("mode", MODES)
def test_a_transform_before_aggregate_on_a_plain_stacked_dict(mode):
    """Adam before aggregate used to broadcast its moments against the task axis and train
    0.5 off; plain stacked pytrees are refused, TaskGradients say where aggregate goes."""
    _, task_grads = grads()
    opt = optax.chain(optax.adam(1e-3), mtl.aggregate(mtl.mgda(), tasks=K, shared=True))
    with pytest.raises(TypeError, match="takes the TaskGradients"):
        MODES[mode](mtl.aggregate(mtl.mgda(), tasks=K, shared=True).update)(
            task_grads.tree, mtl.aggregate(mtl.mgda(), tasks=K, shared=True).init(PARAMS), PARAMS
        )
    with pytest.raises(TypeError, match="must come FIRST"):
        MODES[mode](opt.update)(task_grads, opt.init(PARAMS), PARAMS)


@pytest.mark.parametrize("mode", MODES)
def test_integer_losses(mode):
    fn = mtl.value_and_jacobian(lambda p, b: models.task_losses(p, b).astype(jnp.int32))
    with pytest.raises(TypeError, match="integer losses have zero gradients"):
        MODES[mode](fn)(PARAMS, BATCH)


@pytest.mark.parametrize("mode", MODES)
def test_has_aux_misuse(mode):
    with_aux = mtl.value_and_jacobian(lambda p, b: (models.task_losses(p, b), {"x": 1.0}))
    with pytest.raises(TypeError, match="has_aux=True"):
        MODES[mode](with_aux)(PARAMS, BATCH)
    without = mtl.value_and_jacobian(models.task_losses, has_aux=True)
    with pytest.raises(TypeError, match="must return a pair"):
        MODES[mode](without)(PARAMS, BATCH)


@pytest.mark.parametrize("mode", MODES)
def test_a_wrong_task_count_for_the_split(mode):
    losses, task_grads = mtl.split_value_and_jacobian(models.encode, models.HEADS)(PARAMS, BATCH)
    t = mtl.aggregate(mtl.mgda(), tasks=K + 1)
    with pytest.raises(ValueError, match=r"tasks=4\) got the gradients of 3 tasks"):
        MODES[mode](t.update)(task_grads, t.init(PARAMS), PARAMS)
    with pytest.raises(ValueError, match=r"`task_losses` must have shape \(4,\)"):
        MODES[mode](t.update)(task_grads, t.init(PARAMS), PARAMS, task_losses=losses)


@pytest.mark.parametrize("mode", MODES)
def test_integer_features(mode):
    fn = mtl.split_value_and_jacobian(
        lambda p, b: jnp.round(models.encode(p, b)).astype(jnp.int32), models.HEADS
    )
    with pytest.raises(TypeError, match="features of dtype int32"):
        MODES[mode](fn)(PARAMS, BATCH)


@pytest.mark.parametrize("mode", ["eager", "jit"])
def test_nnx_state_instead_of_the_model(mode):
    model = nnx.Linear(5, K, rngs=nnx.Rngs(0))
    fn = mtl_nnx.value_and_jacobian(lambda m, b: jnp.mean((m(b[0]) - b[1]) ** 2, axis=0))
    call = fn if mode == "eager" else jax.jit(fn)
    with pytest.raises(TypeError, match="nnx.State: pass the model itself"):
        call(nnx.state(model), BATCH)


@pytest.mark.parametrize("mode", MODES)
def test_a_state_restored_as_a_plain_dict(mode):
    grad_fn = mtl.split_value_and_grad(models.encode, models.HEADS, mtl.mgda())
    state = grad_fn.init(PARAMS)
    as_dict = {"weights": state.weights, "method_state": dict(state.method_state._asdict())}
    with pytest.raises(ValueError, match="restore with the structure"):
        MODES[mode](grad_fn)(PARAMS, BATCH, as_dict)


@pytest.mark.parametrize("mode", MODES)
def test_a_state_of_another_method_of_the_same_type(mode):
    """UPGrad and DualProj share a state type; the state records which method made it."""
    losses, task_grads = grads()
    upgrad = mtl.aggregate(mtl.upgrad(), tasks=K, shared=models.SHARED)
    dualproj = mtl.aggregate(mtl.dualproj(), tasks=K, shared=models.SHARED)
    assert type(upgrad.init(PARAMS).method_state) is type(dualproj.init(PARAMS).method_state)
    with pytest.raises(ValueError, match=r"state of 'upgrad'.*runs 'dualproj'"):
        MODES[mode](dualproj.update)(task_grads, upgrad.init(PARAMS), PARAMS)


def test_flax_nnx_without_flax_says_how_to_install(tmp_path):
    """Importing mtl_optax.flax_nnx where flax is missing names the extra to install."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['flax'] = None\n"
        "try:\n    import mtl_optax.flax_nnx\nexcept ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path
    )
    assert 'pip install "mtl-optax[flax]"' in out.stdout


def per_example_loss(params, batch):
    return jnp.sum((batch["x"] @ params["w"] - batch["y"]) ** 2, axis=1)


EXAMPLES = (
    {"w": jnp.ones((4, 3))},
    {"x": jnp.ones((8, 4)), "y": jnp.zeros((8, 3))},
)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [jnp.int32, jnp.complex64])
def test_structured_gram_refuses_integer_and_complex_losses(mode, dtype):
    """Integer per-example losses gave an all-zero Gram and zero updates, silently."""

    def loss(params, batch):
        return per_example_loss(params, batch).astype(dtype)

    params, batch = EXAMPLES
    with pytest.raises(TypeError, match=f"dtype {jnp.dtype(dtype).name}.*real floating"):
        MODES[mode](mtl.value_and_gram(loss))(params, batch)
    grad_fn = mtl.instance_wise_value_and_grad(loss, mtl.upgrad(), batch_size=8)
    with pytest.raises(TypeError, match="real floating"):
        MODES[mode](grad_fn)(params, batch, grad_fn.init(params))


def test_structured_gram_refuses_an_empty_batch():
    params, batch = EXAMPLES
    empty = jax.tree_util.tree_map(lambda a: a[:0], batch)
    with pytest.raises(ValueError, match="batch is empty"):
        mtl.value_and_gram(per_example_loss)(params, empty)


def test_chunk_size_is_refused_where_it_would_be_ignored():
    with pytest.raises(ValueError, match="would be ignored"):
        mtl.split_value_and_grad(models.encode, models.HEADS, mtl.mgda(), chunk_size=2)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("method", [mtl.mgda, mtl.famo])
def test_whole_model_task_count_is_blamed_on_tasks(mode, method):
    """It used to blame the weighting state ("call init(3)") the user never called."""
    grad_fn = mtl.value_and_grad(models.task_losses, method(), tasks=K + 1, shared=models.SHARED)
    with pytest.raises(ValueError, match=rf"tasks={K + 1}\): task_losses_fn returned {K} losses"):
        MODES[mode](grad_fn)(PARAMS, BATCH, grad_fn.init(PARAMS))


def test_whole_model_mask_sharing_nothing_and_integer_leaves():
    nothing = jax.tree_util.tree_map(lambda _: False, models.SHARED)
    grad_fn = mtl.value_and_grad(models.task_losses, mtl.mgda(), tasks=K, shared=nothing)
    with pytest.raises(ValueError, match="marks no params leaf as shared"):
        grad_fn(PARAMS, BATCH, grad_fn.init(PARAMS))
    params = {**PARAMS, "count": jnp.array(3)}
    shared = {**models.SHARED, "count": False}
    grad_fn = mtl.value_and_grad(models.task_losses, mtl.mgda(), tasks=K, shared=shared)
    with pytest.raises(TypeError, match=r"params leaf \['count'\] has dtype int32"):
        grad_fn(params, BATCH, grad_fn.init(params))

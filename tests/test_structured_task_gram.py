"""``value_and_grad(gram="structured")``: the whole model's task Gram from the structured engine.

Oracles, every step of two (the second from the first's state): the default columns path
(``gram="columns"``) and tier 3 (``value_and_jacobian`` + ``aggregate`` with the same
``shared`` mask): the same weights and the same update, shared leaves and heads (head rule)
alike, on an MLP, a CNN and a flax nnx model with dropout (whose RNG counts must advance
as under the columns), float32 within 1e-5 relative and float64 within 1e-12. MGDA, UPGrad
and GradNorm (learned weights in its state; reads ``diag(G)``; its heads get ``w_i ∇L_i``).
``gram="auto"`` is checked to choose as its cost model says on two shapes. Gradient scales
1e±25 (a raw float32 Gram under- or overflows): the same weights as at scale 1 and the update
scaled, as the columns give (the engine rescales every Gram term by powers of two).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import mtl_optax as mtl
import mtl_optax.flax_nnx as mtl_nnx
from mtl_optax.structured_gram.engine import prepare
from mtl_optax.whole_model import GRAMS

RTOL32, RTOL64 = 1e-5, 1e-12
K = 3
NAMES = ("a", "b", "c")
WEIGHTINGS = {
    "mgda": mtl.mgda,
    "upgrad": lambda: mtl.upgrad(reg_eps=0.0),  # exact dual-cone projections
    "gradnorm": lambda: mtl.gradnorm(optimizer=optax.sgd(0.05)),  # state: learned weights
}
STEPS = 2


def rel_err(a, b) -> float:
    """max |a - b| / max |b| over all leaves."""
    a = [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(a)]
    b = [np.asarray(y, np.float64) for y in jax.tree_util.tree_leaves(b)]
    scale = max(max(np.max(np.abs(y)) for y in b), np.finfo(np.float64).tiny)
    return max(np.max(np.abs(x - y)) for x, y in zip(a, b)) / scale


def normal(rng, shape, dtype):
    return jnp.asarray((rng.standard_normal(shape) / np.sqrt(shape[0])).astype(dtype))


def head_losses(params, h, y):
    """The K named task losses from the shared features ``h`` (heads: not shared)."""
    pred = h @ params["heads"]["w"] + params["heads"]["b"]
    return {name: jnp.mean((pred[:, i] - y[:, i]) ** 2) for i, name in enumerate(NAMES)}


def mlp_problem(dtype):
    rng = np.random.default_rng(0)
    params = {
        "trunk": {
            "w0": normal(rng, (6, 32), dtype),
            "b0": normal(rng, (32,), dtype),
            "w1": normal(rng, (32, 32), dtype),
        },
        "heads": {"w": normal(rng, (32, K), dtype), "b": normal(rng, (K,), dtype)},
    }
    batch = (normal(rng, (4, 6), dtype), normal(rng, (4, K), dtype))

    def task_losses(params, batch):
        x, y = batch
        trunk = params["trunk"]
        h = jnp.tanh(jnp.tanh(x @ trunk["w0"] + trunk["b0"]) @ trunk["w1"])
        return head_losses(params, h, y)

    return task_losses, params, batch


def cnn_problem(dtype):
    rng = np.random.default_rng(1)
    params = {
        "trunk": {
            "conv": normal(rng, (3, 3, 2, 4), dtype),  # HWIO
            "conv_b": normal(rng, (4,), dtype),
            "dense": normal(rng, (64, 8), dtype),
        },
        "heads": {"w": normal(rng, (8, K), dtype), "b": normal(rng, (K,), dtype)},
    }
    batch = (normal(rng, (3, 6, 6, 2), dtype), normal(rng, (3, K), dtype))

    def task_losses(params, batch):
        x, y = batch
        trunk = params["trunk"]
        h = jax.lax.conv_general_dilated(
            x, trunk["conv"], (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        h = jax.nn.relu(h + trunk["conv_b"]).reshape(x.shape[0], -1)
        return head_losses(params, jnp.tanh(h @ trunk["dense"]), y)

    return task_losses, params, batch


SHARED = {"trunk": True, "heads": False}
PROBLEMS = {"mlp": mlp_problem, "cnn": cnn_problem}


def plain_paths(problem, weighting_factory, dtype):
    """``{path: [(weights, update) per step]}``: columns, structured, tier 3; one jit."""
    task_losses, params, batch = problem(dtype)
    weighting = weighting_factory()
    mask = jax.tree_util.tree_map(lambda _: True, params)
    mask["heads"] = jax.tree_util.tree_map(lambda _: False, params["heads"])

    @jax.jit
    def run(params, batch):
        out = {}
        for gram in ("columns", "structured"):
            grad_fn = mtl.value_and_grad(
                task_losses, weighting, tasks=list(NAMES), shared=mask, gram=gram
            )
            state, out[gram] = grad_fn.init(params), []
            for _ in range(STEPS):
                _, grads, state = grad_fn(params, batch, state)
                out[gram].append((state.weights, grads))
        tx = mtl.aggregate(weighting, tasks=list(NAMES), shared=mask)
        tx_state, out["tier 3"] = tx.init(params), []
        for _ in range(STEPS):
            losses, task_grads = mtl.value_and_jacobian(task_losses)(params, batch)
            updates, tx_state = tx.update(task_grads, tx_state, params, task_losses=losses)
            out["tier 3"].append((tx_state.weights, updates))
        return out

    return run(params, batch)


def assert_paths_agree(out, rtol, label):
    for path in ("columns", "tier 3"):
        for step, ((w, g), (w_ref, g_ref)) in enumerate(zip(out["structured"], out[path])):
            assert rel_err(w, w_ref) <= rtol, (label, path, step, w, w_ref)
            assert rel_err(g, g_ref) <= rtol, (label, path, step)


@pytest.mark.parametrize("weighting", list(WEIGHTINGS))
@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_structured_equals_columns_and_tier_3_float32(problem, weighting):
    out = plain_paths(PROBLEMS[problem], WEIGHTINGS[weighting], np.float32)
    assert out["structured"][0][0].dtype == jnp.float32
    assert_paths_agree(out, RTOL32, (problem, weighting))


@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_structured_equals_columns_and_tier_3_float64(problem):
    with jax.enable_x64(True):
        out = plain_paths(PROBLEMS[problem], WEIGHTINGS["upgrad"], np.float64)
        grads = out["structured"][0][1]
        assert all(leaf.dtype == jnp.float64 for leaf in jax.tree_util.tree_leaves(grads))
        assert_paths_agree(out, RTOL64, problem)


# Gradient scales where a float32 Gram of the raw gradients underflows (norms 1e-25: Gram
# entries 1e-50) or overflows (1e25: 1e50); the columns rescale by powers of two.
EXTREME_SCALES = (1e-25, 1.0, 1e25)


def test_structured_keeps_extreme_gradient_scales_as_the_columns_do():
    """Losses times ``c``: MGDA's and UPGrad's weights (scale-invariant) equal those at c = 1,
    and the update is ``c`` times it, on both paths (one program per path, ``c`` traced)."""
    task_losses, params, batch = mlp_problem(np.float32)

    def scaled(p, b, c):
        return {name: c * loss for name, loss in task_losses(p, b).items()}

    @jax.jit
    def step(c):
        out = {}
        for name in ("mgda", "upgrad"):
            for gram in ("columns", "structured"):
                grad_fn = mtl.value_and_grad(
                    lambda p, b: scaled(p, b, c),
                    WEIGHTINGS[name](),
                    tasks=list(NAMES),
                    shared=SHARED,
                    gram=gram,
                )
                _, grads, state = grad_fn(params, batch, grad_fn.init(params))
                out[name, gram] = (state.weights, jax.tree_util.tree_map(lambda g: g / c, grads))
        return out

    unit = step(1.0)
    for c in EXTREME_SCALES:
        got = step(c)
        for key, (weights, grads) in got.items():
            assert np.all(np.isfinite(weights)), (key, c, weights)
            assert rel_err(weights, unit[key][0]) <= RTOL32, (key, c, weights, unit[key][0])
            assert rel_err(grads, unit[key][1]) <= RTOL32, (key, c)


# --------------------------------------------------------------------------- flax nnx
class NnxModel(nnx.Module):
    def __init__(self, rngs):
        self.trunk = nnx.Linear(6, 32, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, rngs=rngs)
        self.mid = nnx.Linear(32, 32, rngs=rngs)
        self.heads = nnx.Linear(32, K, rngs=rngs)

    def __call__(self, x):
        return self.heads(jnp.tanh(self.mid(self.dropout(jnp.tanh(self.trunk(x))))))


def nnx_losses(model, batch):
    pred = model(batch[0])
    return {name: jnp.mean((pred[:, i] - batch[1][:, i]) ** 2) for i, name in enumerate(NAMES)}


def nnx_shared(state):
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "heads" not in jax.tree_util.keystr(path), state
    )


@pytest.mark.parametrize("weighting", ["mgda", "gradnorm"])
def test_nnx_structured_equals_columns_and_tier_3(weighting):
    rng = np.random.default_rng(2)
    batch = (normal(rng, (4, 6), np.float32), normal(rng, (4, K), np.float32))
    method = WEIGHTINGS[weighting]()
    out, models = {}, {}
    for gram in ("columns", "structured"):
        model = models[gram] = NnxModel(nnx.Rngs(3))
        grad_fn = mtl_nnx.value_and_grad(
            nnx_losses, method, tasks=list(NAMES), shared=nnx_shared, gram=gram
        )
        step, state, out[gram] = nnx.jit(grad_fn), grad_fn.init(model), []
        for _ in range(STEPS):
            _, grads, state = step(model, batch, state)
            out[gram].append((state.weights, nnx.as_pure(grads)))
    model = models["tier 3"] = NnxModel(nnx.Rngs(3))
    jac = nnx.jit(mtl_nnx.value_and_jacobian(nnx_losses))
    tx = mtl.aggregate(method, tasks=list(NAMES), shared=nnx_shared)
    params = nnx.state(model, nnx.Param)
    tx_state, out["tier 3"] = tx.init(params), []
    for _ in range(STEPS):
        losses, task_grads = jac(model, batch)
        updates, tx_state = tx.update(task_grads, tx_state, params, task_losses=losses)
        out["tier 3"].append((tx_state.weights, nnx.as_pure(updates)))
    assert_paths_agree(out, RTOL32, weighting)
    # the dropout masks differed between the steps, and the RNG counts advanced alike
    assert rel_err(out["structured"][0][1], out["structured"][1][1]) > 1e-3
    counts = {k: jax.tree_util.tree_leaves(nnx.state(m, nnx.RngCount)) for k, m in models.items()}
    assert [int(c) for c in counts["structured"]] == [STEPS]
    assert counts["structured"] == counts["columns"] == counts["tier 3"]


# --------------------------------------------------------------------------- auto
def wide_problem(batch_size, width):
    """A trunk of two ``width`` wide dense layers, a batch of ``batch_size``."""
    rng = np.random.default_rng(4)
    params = {
        "trunk": {"w0": normal(rng, (8, width), np.float32)},
        "mid": {"w1": normal(rng, (width, width), np.float32)},
        "heads": {"w": normal(rng, (width, K), np.float32), "b": normal(rng, (K,), np.float32)},
    }
    batch = (normal(rng, (batch_size, 8), np.float32), normal(rng, (batch_size, K), np.float32))

    def task_losses(params, batch):
        h = jnp.tanh(jnp.tanh(batch[0] @ params["trunk"]["w0"]) @ params["mid"]["w1"])
        return head_losses(params, h, batch[1])

    return task_losses, params, batch


def stated_costs(n, width):
    """The docstring's cost model by hand: (ghost, per-task gradients) over w0 and w1."""
    ghost = mat = 0
    for x, y in ((8, width), (width, width)):
        ghost += n * n * x + K * n * n * y + K * K * n * y
        mat += K * n * x * y + K * K * x * y
    return ghost, mat


@pytest.mark.parametrize("batch_size, width, chosen", [(4, 256, "structured"), (512, 8, "columns")])
def test_auto_chooses_as_the_cost_model_says(batch_size, width, chosen):
    task_losses, params, batch = wide_problem(batch_size, width)
    mask = {"trunk": True, "mid": True, "heads": False}
    ghost, mat = stated_costs(batch_size, width)
    assert (ghost < mat) == (chosen == "structured")

    def losses_of(leaves, b):
        tree = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), leaves)
        return jnp.stack(list(task_losses(tree, b).values())), None

    plan = prepare(
        losses_of,
        jax.tree_util.tree_leaves(params),
        (batch,),
        {},
        batch_dim=None,
        has_aux=True,
        strategy="auto",
        chunk_size=None,
    )[0]
    shared = [2, 3]  # heads/b, heads/w, mid/w1, trunk/w0 in key order
    np.testing.assert_allclose(plan.ghost_costs(shared), (ghost, mat))

    def jaxpr(gram):
        grad_fn = mtl.value_and_grad(
            task_losses, mtl.mgda(), tasks=list(NAMES), shared=mask, gram=gram
        )
        return str(jax.make_jaxpr(grad_fn)(params, batch, grad_fn.init(params)))

    assert jaxpr("columns") != jaxpr("structured")
    assert jaxpr("auto") == jaxpr(chosen)


def test_auto_falls_back_and_structured_names_the_fix_where_the_engine_refuses():
    """Losses of the parameters alone: the engine has no batch to meet (it refuses)."""
    params = {"w": jnp.arange(1.0, 4.0)}

    def task_losses(params, batch):
        return jnp.stack([jnp.sum(params["w"] ** 2), jnp.sum(params["w"]) ** 2])

    auto = mtl.value_and_grad(task_losses, mtl.mgda(), tasks=2, shared=True, gram="auto")
    columns = mtl.value_and_grad(task_losses, mtl.mgda(), tasks=2, shared=True)
    _, grads, state = jax.jit(auto)(params, jnp.zeros(2), auto.init(params))
    _, want, want_state = jax.jit(columns)(params, jnp.zeros(2), columns.init(params))
    np.testing.assert_allclose(state.weights, want_state.weights, rtol=1e-6)
    np.testing.assert_allclose(grads["w"], want["w"], rtol=1e-6)
    structured = mtl.value_and_grad(
        task_losses, mtl.mgda(), tasks=2, shared=True, gram="structured"
    )
    with pytest.raises(ValueError, match=re.escape("gram='structured'") + ".*gram='columns'"):
        jax.eval_shape(structured, params, jnp.zeros(2), structured.init(params))


# --------------------------------------------------------------------------- validation
def test_bad_gram_values_raise_naming_the_option():
    task_losses, params, batch = mlp_problem(np.float32)
    for bad in ("fast", "Structured", "", "parameters"):
        with pytest.raises(ValueError, match=r"`gram` must be one of .*'columns'"):
            mtl.value_and_grad(task_losses, mtl.mgda(), tasks=K, shared=SHARED, gram=bad)
    for bad in (True, None, 1, ("structured",)):
        with pytest.raises(
            TypeError, match=r"`gram` must be one of the strings.*gram='structured'"
        ):
            mtl.value_and_grad(task_losses, mtl.mgda(), tasks=K, shared=SHARED, gram=bad)
    with pytest.raises(ValueError, match="`gram`"):
        mtl_nnx.value_and_grad(nnx_losses, mtl.mgda(), tasks=K, shared=True, gram="ghost")
    assert GRAMS == ("columns", "structured", "auto")


def test_a_weighting_without_a_gram_ignores_the_option():
    """FAMO reads the losses only: one backward pass of the weighted loss, whatever ``gram``."""
    task_losses, params, batch = mlp_problem(np.float32)
    programs = set()
    for gram in GRAMS:
        grad_fn = mtl.value_and_grad(task_losses, mtl.famo(), tasks=K, shared=SHARED, gram=gram)
        programs.add(str(jax.make_jaxpr(grad_fn)(params, batch, grad_fn.init(params))))
    assert len(programs) == 1


def test_a_user_error_under_structured_is_the_users_own():
    """An error of task_losses_fn itself is not dressed as an engine refusal."""
    _, params, batch = mlp_problem(np.float32)
    grad_fn = mtl.value_and_grad(
        lambda p, b: (jnp.zeros(K), 0), mtl.mgda(), tasks=K, shared=SHARED, gram="structured"
    )
    with pytest.raises(TypeError, match="returned a tuple") as info:
        jax.eval_shape(grad_fn, params, batch, grad_fn.init(params))
    assert "gram=" not in str(info.value)

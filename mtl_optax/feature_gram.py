"""Tier 2's Gram of the feature gradients, from the heads' first products.

Tier 2 weighs the tasks by ``G_ij = ⟨∂L_i/∂z, ∂L_j/∂z⟩``, the Gram of the feature gradients
at the shared representation ``z``. Computed from the K materialised feature gradients it
costs ``K·R·C·F`` multiply-adds to form them and ``K²·R·C`` for their Gram (z of R rows and C
features, heads of F outputs), and writing, rescaling and reading back the (K, R, C) array:
at K = 40 ten-way heads on 512 features of 256 examples (``benchmarks/speed.py``) that took
2.7× the rest of the training step on a 2-core CPU.

Most heads read the features once, through a product with their own weights (a dense first
layer ``y_i = z W_i``, any ``dot_general`` contracting z's feature axes). Then the feature
gradient of task i is an outer product of two small factors,

    ∂L_i/∂z = P_i Q_iᵀ,   P_i = ∂L_i/∂y_i (R × F),   Q_i = W_i (C × F),

(several such products of one feature array stack their factors along F) and the Gram
follows without ever forming a feature gradient (the "ghost" identity of Goodfellow 2015,
here with both factors per task):

    G_ij = Σ_{f,g} (P_iᵀ P_j)_{fg} (Q_iᵀ Q_j)_{fg},

``(K·F)²·(R + C)`` multiply-adds, and the encoder's cotangent ``Σ_i w_i ∂L_i/∂z`` is one
product ``[w_i P_i]_i [Q_i]_iᵀ``. :func:`factor_features` takes this route when it costs
fewer multiply-adds than materialising, ``K·R·C·(F + K)`` (half as many for K = 40 linear
10-way heads on 512 features of 256 examples, and no (K, 256, 512) array to write and read
back; a head whose first layer is wide, e.g. 256 hidden units, keeps the materialised
route). Heads that use ``z`` any other way (a norm layer on z, a skip connection) keep it
too. Either way the Gram is the same up to rounding.

Both factors are scaled by powers of two (exact) before their products, so the Gram
neither overflows nor underflows in float32 where the true one would.

Checked in ``tests/test_feature_gram.py``: the Gram and the encoder cotangent equal those of
``jax.jacrev`` of the losses with respect to ``z`` (float64, 1e-12; float32, 1e-5) for dense
heads, heads reading z twice, multi-axis features, flax nnx heads; the route is chosen by
the multiply-add counts above; heads that use z otherwise fall back.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from mtl_optax.gram import HIGHEST, power_of_two_exponent, times_power_of_two
from mtl_optax.structured_gram.program import Lit, Program, evaluate, flatten, read


class Product(NamedTuple):
    """One use of a feature leaf: operation ``op`` with the leaf at operand ``pos``."""

    op: int
    pos: int


class LeafPlan(NamedTuple):
    """How one feature leaf enters the heads: its products, and its axes split into the
    rows (free axes, R) and the contracted features (C), each in the leaf's order."""

    products: tuple[Product, ...]
    rows: tuple[int, ...]
    features: tuple[int, ...]


def plan_products(program: Program, feature_vars: Sequence[int]) -> list[LeafPlan] | None:
    """Per feature leaf, the products it enters; None if any leaf is used another way.

    A feature leaf qualifies when every operation that reads it is a ``dot_general`` with
    the leaf on one side only, no batch axes on the leaf's side, the other operand computed
    without any feature leaf, and the same contracted axes in every product.
    """
    features = set(feature_vars)
    depends: set[int] = set(feature_vars)  # variables computed from the features
    for op in program.ops:
        if any(a in depends for a in op.ins if not isinstance(a, Lit)):
            depends.update(op.outs)
    uses: dict[int, list[Product]] = {v: [] for v in feature_vars}
    for i, op in enumerate(program.ops):
        sides = [p for p, a in enumerate(op.ins) if not isinstance(a, Lit) and a in features]
        if not sides:
            continue
        if op.name != "dot_general" or len(sides) != 1:
            return None
        pos = sides[0]
        other = op.ins[1 - pos]
        if not isinstance(other, Lit) and other in depends:
            return None
        (contract, batch) = op.params["dimension_numbers"]
        if batch[pos]:
            return None
        uses[op.ins[pos]].append(Product(i, pos))
    if any(v in features for v in program.outputs if not isinstance(v, Lit)):
        return None
    plans = []
    for var in feature_vars:
        contracted = {
            tuple(sorted(program.ops[u.op].params["dimension_numbers"][0][u.pos]))
            for u in uses[var]
        }
        if len(contracted) > 1:
            return None
        cols = contracted.pop() if contracted else ()
        rows = tuple(d for d in range(len(program.shape(var))) if d not in cols)
        plans.append(LeafPlan(tuple(uses[var]), rows, tuple(cols)))
    return plans


def _width(program: Program, product: Product) -> int:
    """F of a product: the number of output entries per row and feature."""
    op = program.ops[product.op]
    (contract, _), other = op.params["dimension_numbers"], op.ins[1 - product.pos]
    shape = program.shape(other)
    return math.prod(n for d, n in enumerate(shape) if d not in contract[1 - product.pos])


def ghost_is_cheaper(
    program: Program, feature_vars, plans: list[LeafPlan], k: int, diagonal_only: bool
) -> bool:
    """Whether the factored Gram costs fewer multiply-adds than the materialised one."""
    ghost = materialised = 0
    for var, plan in zip(feature_vars, plans):
        shape = program.shape(var)
        r = math.prod(shape[d] for d in plan.rows)
        c = math.prod(shape[d] for d in plan.features)
        f = sum(_width(program, u) for u in plan.products)
        pairs = k if diagonal_only else k * k
        ghost += pairs * f * f * (r + c)
        materialised += k * r * c * f + pairs * r * c
    return ghost < materialised


class Factored(NamedTuple):
    """The feature gradients as factors: per feature leaf ``P`` (K, R, F) and ``Q`` (K, C, F)
    with ``∂L_i/∂z = P_i Q_iᵀ`` (rows and features in the leaf's axis order)."""

    p: list[jax.Array]
    q: list[jax.Array]
    plans: list[LeafPlan]
    shapes: list[tuple[int, ...]]
    treedef: Any  # of z
    k: int


def product_factors(program: Program, other, cot: jax.Array, product: Product, plan):
    """``(P, Q)`` of one product for one task, (R, F) and (C, F), from the product's other
    operand and its output cotangent."""
    op = program.ops[product.op]
    (contract, _), pos = op.params["dimension_numbers"], product.pos
    other = jnp.asarray(other)
    pairs = dict(zip(contract[pos], contract[1 - pos]))
    other_free = [d for d in range(other.ndim) if d not in contract[1 - pos]]
    q = jnp.transpose(other, [pairs[d] for d in plan.features] + other_free)
    rows = len(plan.rows)  # the output: the lhs's free axes, then the rhs's
    if pos == 0:
        row_axes, other_axes = list(range(rows)), list(range(rows, cot.ndim))
    else:
        row_axes, other_axes = list(range(cot.ndim - rows, cot.ndim)), list(range(cot.ndim - rows))
    p = jnp.transpose(cot, row_axes + other_axes)
    width = math.prod(p.shape[rows:])
    return p.reshape(-1, width), q.reshape(-1, width)


def factor_features(
    call: Callable, head_leaves, z, k: int, carry, diagonal_only: bool
) -> tuple[list, Factored] | None:
    """``(head_grads, Factored)`` of the stacked heads, or None where materialising is due.

    ``call(head_leaves, carry, per_task)`` runs ``per_task(loss_of, hp_i, i)`` vmapped over
    the tasks (:func:`mtl_optax.heads.run_stacked`). ``head_grads`` are the gradients of the
    selected head leaves with cotangent 1 (each task its own), stacked over the tasks.
    """
    z_leaves, z_def = jax.tree_util.tree_flatten(z)

    def traced(loss_of, hp_i):
        hp_leaves, hp_def = jax.tree_util.tree_flatten(hp_i)

        def flat(hp, zs):
            return loss_of(
                jax.tree_util.tree_unflatten(hp_def, hp), jax.tree_util.tree_unflatten(z_def, zs)
            )

        program = flatten(jax.make_jaxpr(flat)(hp_leaves, z_leaves))
        n = len(hp_leaves)
        return program, program.inputs[n:], hp_leaves, hp_def

    found: list = []

    def analyse(loss_of, hp_i, i):
        program, feature_vars, _, _ = traced(loss_of, hp_i)
        plans = plan_products(program, feature_vars)
        ok = plans is not None and ghost_is_cheaper(program, feature_vars, plans, k, diagonal_only)
        found.append(ok)
        return jnp.zeros(())

    jax.eval_shape(lambda h: call(h, carry, analyse)[0], head_leaves)
    if not found or not all(found):
        return None
    plans_box: list = []

    def per_task(loss_of, hp_i, i):
        program, feature_vars, hp_leaves, hp_def = traced(loss_of, hp_i)
        plans = plan_products(program, feature_vars)
        plans_box.append(plans)
        products = {u.op: u for plan in plans for u in plan.products}
        probes = {
            op: jnp.zeros(
                program.shape(program.ops[op].outs[0]), program.dtype(program.ops[op].outs[0])
            )
            for op in products
        }

        def loss(hp, probes):
            def add_probe(op, outs):
                return [outs[0] + probes[op]] if op in probes else outs

            env = evaluate(program, [*hp, *z_leaves], on_outputs=add_probe)
            out = program.outputs[0]
            others = {op: read(env, program.ops[op].ins[1 - u.pos]) for op, u in products.items()}
            return (out.value if isinstance(out, Lit) else env[out]), others

        value, vjp, others = jax.vjp(loss, hp_leaves, probes, has_aux=True)
        head_grads, cots = vjp(jnp.ones_like(value))
        ps, qs = [], []
        for plan in plans:
            pieces = [
                product_factors(program, others[u.op], cots[u.op], u, plan) for u in plan.products
            ]
            ps.append([a for a, _ in pieces])
            qs.append([b for _, b in pieces])
        return jax.tree_util.tree_unflatten(hp_def, head_grads), ps, qs

    (head_grads, ps, qs), _ = call(head_leaves, carry, per_task)
    plans = plans_box[-1]
    p = [_stack(pieces, leaf, plan.rows, k) for pieces, leaf, plan in zip(ps, z_leaves, plans)]
    q = [_stack(pieces, leaf, plan.features, k) for pieces, leaf, plan in zip(qs, z_leaves, plans)]
    shapes = [tuple(jnp.shape(x)) for x in z_leaves]
    return head_grads, Factored(p, q, plans, shapes, z_def, k)


def _stack(pieces: list, leaf, axes: tuple[int, ...], k: int) -> jax.Array:
    """The per-product factors of one leaf side by side (K, R or C, F); zero width if unused."""
    if pieces:
        return jnp.concatenate(pieces, axis=-1)
    return jnp.zeros((k, math.prod(jnp.shape(leaf)[d] for d in axes), 0), jnp.result_type(leaf))


def factored_gram(factored: Factored, *, diagonal_only: bool) -> tuple[jax.Array, jax.Array]:
    """``(Ĝ, e)`` with ``G = 4^e Ĝ`` the Gram of the feature gradients (``diag(G)`` in a
    (K, K) matrix with ``diagonal_only``), from power-of-two scaled factors."""
    dtype = jnp.promote_types(jnp.result_type(*factored.p, *factored.q), jnp.float32)
    a = power_of_two_exponent(factored.p)
    b = power_of_two_exponent(factored.q)
    k = factored.k
    gram = jnp.zeros((k,) if diagonal_only else (k, k), dtype)
    for p, q in zip(factored.p, factored.q):
        if not p.size:
            continue
        p = times_power_of_two(p.astype(dtype), -a)
        q = times_power_of_two(q.astype(dtype), -b)
        if diagonal_only:
            pp = jnp.einsum("krf,krg->kfg", p, p, precision=HIGHEST)
            qq = jnp.einsum("kcf,kcg->kfg", q, q, precision=HIGHEST)
            gram = gram + jnp.einsum("kfg,kfg->k", pp, qq, precision=HIGHEST)
        else:
            width = p.shape[-1]
            pm = jnp.transpose(p, (1, 0, 2)).reshape(p.shape[1], k * width)
            qm = jnp.transpose(q, (1, 0, 2)).reshape(q.shape[1], k * width)
            pp = jnp.matmul(pm.T, pm, precision=HIGHEST)
            qq = jnp.matmul(qm.T, qm, precision=HIGHEST)
            gram = gram + (pp * qq).reshape(k, width, k, width).sum(axis=(1, 3))
    if diagonal_only:
        return jnp.diag(gram), a + b
    return 0.5 * (gram + gram.T), a + b


def factored_combine(factored: Factored, weights: jax.Array) -> Any:
    """``Σ_i w_i ∂L_i/∂z`` (shaped like z) from the factors."""
    leaves = []
    for p, q, plan, shape in zip(factored.p, factored.q, factored.plans, factored.shapes):
        if not p.size:
            leaves.append(jnp.zeros(shape, q.dtype))
            continue
        flat = jnp.einsum("k,krf,kcf->rc", weights.astype(p.dtype), p, q, precision=HIGHEST)
        axes = plan.rows + plan.features
        grouped = flat.reshape([shape[d] for d in axes])
        leaves.append(jnp.transpose(grouped, [axes.index(d) for d in range(len(shape))]))
    return jax.tree_util.tree_unflatten(factored.treedef, leaves)

"""The Gram engine: trace, find the parameter uses, one backward pass, assemble the Gram.

See :func:`mtl_optax.structured_gram.value_gram_and_combine` for the contract.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mtl_optax.gram import power_of_two_exponent, times_power_of_two
from mtl_optax.structured_gram import layers
from mtl_optax.structured_gram.example_axis import (
    ELEMENTWISE,
    BatchCouplingError,
    Coupled,
    Ex,
    analyse,
)
from mtl_optax.structured_gram.program import (
    Lit,
    Program,
    View,
    evaluate,
    flatten,
    ops_computing,
    orthogonal_view,
    read,
    tree_paths,
)
from mtl_optax.task_gradients import check_losses_dtype, map_over_tasks

STRATEGIES = ("auto", "ghost", "materialize")
FACTORED = ("dot", "conv", "gather")
DATA = "data"  # task mode: the marker of batch-dependent values
HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class Meet:
    """An operation where parameter-dependent, batch-independent operands meet the batch."""

    index: int
    params_at: tuple[int, ...]  # operand positions of the parameter-dependent operands
    kind: str  # dot | conv | gather (factored), separable, masked
    slicing: tuple  # per operand: Ex to cut it per example, or None (shared)
    out_axes: tuple  # per output: Ex / DATA, or None
    probed: tuple[int, ...]  # output positions that get a zero probe (float, batch-dependent)


@dataclasses.dataclass(frozen=True)
class Use:
    """Operand ``pos`` of ``meet``: variable ``var``, a function of the leaves ``deps``."""

    meet: Meet
    pos: int
    var: int
    deps: frozenset[int]
    view: View | None  # set when var is a permutation of one leaf's entries
    structure: layers.Structure | None  # set for factored uses


def check_options(batch_dim, has_aux, strategy, chunk_size) -> None:
    if batch_dim is not None and (not isinstance(batch_dim, int) or isinstance(batch_dim, bool)):
        raise TypeError(f"`batch_dim` must be an int or None, got {batch_dim!r}.")
    if not isinstance(has_aux, bool):
        raise TypeError(f"`has_aux` must be a bool, got {has_aux!r}.")
    if strategy not in STRATEGIES:
        raise ValueError(f"`strategy` must be one of {STRATEGIES}, got {strategy!r}.")
    if chunk_size is not None and (
        not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1
    ):
        raise ValueError(f"`chunk_size` must be None or a positive int, got {chunk_size!r}.")


def run(fn: Callable, params, args, kwargs, *, batch_dim, has_aux, strategy, chunk_size):
    """``(values, Ĝ, s, combine)`` of ``fn(params, *args, **kwargs)``, the Gram ``G = 2^s Ĝ``;
    see the package doc."""
    engine, inputs, treedef, aux_tree = prepare(
        fn,
        params,
        args,
        kwargs,
        batch_dim=batch_dim,
        has_aux=has_aux,
        strategy=strategy,
        chunk_size=chunk_size,
    )
    losses, rest, gram, log2_scale, combine = engine.compute(inputs, treedef)
    aux = jax.tree_util.tree_unflatten(aux_tree, rest)
    return ((losses, aux) if has_aux else losses), gram, log2_scale, combine


def leaf_strategies(
    fn: Callable, params, *args, batch_dim=0, has_aux=False, strategy="auto", **kwargs
) -> dict[str, str]:
    """How each parameter leaf enters the Gram: ``"ghost"``, ``"materialize"`` or ``"unused"``.

    Keys are ``jax.tree_util.keystr`` paths of ``params``. Tracing only; nothing is computed.
    """
    check_options(batch_dim, has_aux, strategy, None)
    engine, _, _, _ = prepare(
        fn,
        params,
        args,
        kwargs,
        batch_dim=batch_dim,
        has_aux=has_aux,
        strategy=strategy,
        chunk_size=None,
    )
    out = {}
    for leaf, path in enumerate(tree_paths(params)):
        uses = [u for u in engine.uses if leaf in u.deps]
        if not uses:
            out[path] = "unused"
        else:
            out[path] = "ghost" if engine._ghost_plan(leaf, uses) is not None else "materialize"
    return out


def prepare(fn: Callable, params, args, kwargs, *, batch_dim, has_aux, strategy, chunk_size):
    """Trace and plan: ``(engine, flat inputs, params treedef, aux treedef)``."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    paths = tree_paths(params)
    for path, leaf in zip(paths, leaves):
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
            raise TypeError(
                f"parameter leaf params{path} has dtype {jnp.result_type(leaf)}: every leaf of "
                "the first argument is differentiated, so it must be floating point (pass "
                "integer state through another argument)."
            )
    arg_leaves, arg_tree = jax.tree_util.tree_flatten((args, kwargs))
    n_batch, batch = _batch_leaves(args, batch_dim)
    dynamic = [k for k, a in enumerate(arg_leaves) if _is_array(a)]
    if any(k not in dynamic for k in range(n_batch)):
        raise TypeError("every leaf of the batch (second argument) must be an array.")

    def flat_fn(*values):
        p = jax.tree_util.tree_unflatten(treedef, values[: len(leaves)])
        merged = list(arg_leaves)
        for k, v in zip(dynamic, values[len(leaves) :]):
            merged[k] = v
        a, kw = jax.tree_util.tree_unflatten(arg_tree, merged)
        out = fn(p, *a, **kw)
        if has_aux:
            if not (isinstance(out, tuple) and len(out) == 2):
                raise TypeError("with has_aux=True the function must return (losses, aux).")
            return out
        return out, None

    inputs = [*leaves, *(arg_leaves[k] for k in dynamic)]
    closed, out_shapes = jax.make_jaxpr(flat_fn, return_shape=True)(*inputs)
    loss_shape, aux_shapes = out_shapes
    if not isinstance(loss_shape, jax.ShapeDtypeStruct) or len(loss_shape.shape) != 1:
        raise ValueError(
            "the function must return a 1-D array of losses (one per "
            f"{'example' if batch_dim is not None else 'task'}), got {loss_shape}."
        )
    check_losses_dtype(loss_shape, "the function")
    if batch_dim is not None and loss_shape.shape[0] != batch:
        raise ValueError(
            f"the function returned {loss_shape.shape[0]} losses for a batch of {batch} examples "
            "(axis batch_dim of the batch leaves): it must return one loss per example, "
            "without reduction."
        )
    program = flatten(closed)
    aux_tree = jax.tree_util.tree_structure(aux_shapes)
    loss_var = program.outputs[0]
    if isinstance(loss_var, Lit):
        raise ValueError("the losses are a constant: they depend on neither params nor batch.")

    input_axes: list[Any] = [None] * len(leaves)
    for k in dynamic:
        if batch_dim is None:
            input_axes.append(DATA)
        elif k < n_batch:
            input_axes.append(Ex(batch_dim % jnp.ndim(arg_leaves[k])))
        else:
            input_axes.append(None)
    analysis = analyse(program, input_axes, len(leaves), loss_var, batch)
    _check_losses(analysis.axes[loss_var], batch_dim)

    engine = _Engine(program, analysis, len(leaves), batch, strategy, chunk_size)
    return engine, inputs, treedef, aux_tree


def _is_array(x) -> bool:
    """Arrays become inputs of the trace; Python scalars and other leaves stay static (a
    ``train=True`` flag keeps steering Python control flow, as under ``jax.grad``)."""
    return isinstance(x, (jax.Array, np.ndarray, np.generic)) or hasattr(x, "__jax_array__")


def _batch_leaves(args, batch_dim) -> tuple[int, int | None]:
    if batch_dim is None:
        return 0, None
    if not args:
        raise TypeError(
            "with batch_dim set, the function is called as f(params, batch, ...): the batch "
            "(second argument) is missing."
        )
    batch_leaves = jax.tree_util.tree_leaves(args[0])
    if not batch_leaves:
        raise ValueError("the batch (second argument) has no array leaves.")
    sizes = set()
    for path, leaf in zip(tree_paths(args[0]), batch_leaves):
        shape = jnp.shape(leaf)
        if not -len(shape) <= batch_dim < len(shape):
            raise ValueError(
                f"batch leaf batch{path} has shape {shape}: it has no axis batch_dim="
                f"{batch_dim} to index the examples. Values shared by every example go in "
                "further arguments, f(params, batch, shared_value)."
            )
        sizes.add(shape[batch_dim])
    if len(sizes) != 1:
        raise ValueError(
            f"the batch leaves disagree on the number of examples (axis {batch_dim}): "
            f"{sorted(sizes)}."
        )
    if 0 in sizes:
        raise ValueError(
            f"the batch is empty: its leaves have 0 examples along axis batch_dim={batch_dim}."
        )
    return len(batch_leaves), sizes.pop()


def _check_losses(axis, batch_dim) -> None:
    if isinstance(axis, Coupled):
        raise BatchCouplingError(
            "the loss of one example depends on other examples of the batch: "
            f"{axis.reason}. Per-example gradients are not defined for batch-coupled "
            "computations (BatchNorm in training mode, batch means, contrastive losses "
            "over the batch). Use running statistics (e.g. use_running_average=True), "
            "compute batch statistics outside the loss function, or use batch_dim=None for "
            "the Gram of a few task losses."
        )
    if axis is None:
        raise ValueError(
            "the losses do not depend on the batch argument"
            + (
                f" (its axis {batch_dim} indexes the examples)"
                if batch_dim is not None
                else " (the arguments after params)"
            )
            + "."
        )
    if batch_dim is not None and axis != Ex(0, 1):
        raise BatchCouplingError(
            f"the losses' entries are not the examples in batch order (example axis {axis})."
        )


class _Engine:
    """One traced call: the plan (meets, uses, per-leaf strategy) and its evaluation."""

    def __init__(self, program: Program, analysis, n_leaves, batch, strategy, chunk_size):
        self.program = program
        self.analysis = analysis
        self.n_leaves = n_leaves
        self.batch = batch
        self.tasks = batch is None
        self.strategy = strategy
        self.chunk_size = chunk_size
        self.leaf_vars = {program.inputs[k]: k for k in range(n_leaves)}
        self.n_rows = program.shape(program.outputs[0])[0]  # B examples or K tasks
        self.meets = [m for i in range(len(program.ops)) if (m := self._meet(i)) is not None]
        self.uses = [u for m in self.meets for u in self._uses(m)]

    # ------------------------------------------------------------------ planning
    def _meet(self, i: int) -> Meet | None:
        program, analysis = self.program, self.analysis
        op = program.ops[i]
        if not any(o in analysis.live for o in op.outs):
            return None
        in_axes = [None if isinstance(a, Lit) else analysis.axes[a] for a in op.ins]
        if all(a is None for a in in_axes):
            return None
        params_at = tuple(
            k
            for k, a in enumerate(op.ins)
            if not isinstance(a, Lit)
            and in_axes[k] is None
            and analysis.deps.get(a)
            and jnp.issubdtype(program.dtype(a), jnp.inexact)
        )
        if not params_at:
            return None
        out_axes = tuple(analysis.axes[o] for o in op.outs)
        probed = tuple(
            k
            for k, o in enumerate(op.outs)
            if out_axes[k] is not None and jnp.issubdtype(program.dtype(o), jnp.inexact)
        )
        kind, slicing = self._classify(op, params_at, in_axes, out_axes)
        return Meet(i, params_at, kind, slicing, out_axes, probed)

    def _classify(self, op, params_at, in_axes, out_axes) -> tuple[str, tuple]:
        """The kind of a meet and, for per-example evaluation, how to cut its operands."""
        program, name = self.program, op.name
        shapes = [program.shape(a) for a in op.ins]
        none = (None,) * len(op.ins)
        single = len(params_at) == 1
        if name == "dot_general" and single:
            (lc, rc), (lb, rb) = op.params["dimension_numbers"]
            x = 1 - params_at[0]
            x_batch = (lb, rb)[x]
            if self.tasks:
                return "dot", none
            if in_axes[x].dim not in x_batch:
                return "dot", tuple(in_axes[k] if k == x else None for k in range(2))
            return "masked", none
        if name == "conv_general_dilated" and params_at == (1,):
            slicing = (in_axes[0], None)
            grouped = op.params["feature_group_count"] != 1 or op.params["batch_group_count"] != 1
            if not grouped:
                return "conv", slicing
            return ("masked", none) if self.tasks else ("separable", slicing)
        if name == "gather" and params_at == (0,) and in_axes[1] is not None:
            if self._embedding(op, shapes):
                return "gather", (None, in_axes[1])
            if not self.tasks and not op.params["dimension_numbers"].operand_batching_dims:
                return "separable", (None, in_axes[1])
            return "masked", none
        if self.tasks or name not in ELEMENTWISE or len(op.outs) != 1:
            return "masked", none
        ex = out_axes[0]
        n = program.shape(op.outs[0])[ex.dim]
        slicing = []
        for k, shape in enumerate(shapes):
            if len(shape) == 0 or shape[ex.dim] == 1:
                slicing.append(None)
            elif shape[ex.dim] == n and k not in params_at:
                slicing.append(ex)
            else:
                return "masked", none  # a parameter operand spans the examples
        return "separable", tuple(slicing)

    def _embedding(self, op, shapes) -> bool:
        """A gather of whole slices of a table at integer indices (an embedding lookup)."""
        dn = op.params["dimension_numbers"]
        table = shapes[0]
        sizes = op.params["slice_sizes"]
        if dn.operand_batching_dims or not set(dn.collapsed_slice_dims) <= set(dn.start_index_map):
            return False
        return all(
            sizes[d] == (1 if d in dn.start_index_map else table[d]) for d in range(len(table))
        )

    def _uses(self, meet: Meet) -> list[Use]:
        program, analysis = self.program, self.analysis
        op = program.ops[meet.index]
        shapes = [program.shape(a) for a in op.ins]
        out = []
        for pos in meet.params_at:
            var = op.ins[pos]
            deps = analysis.deps.get(var, frozenset())
            view = orthogonal_view(program, var, self.leaf_vars) if len(deps) == 1 else None
            st = None
            if meet.kind in FACTORED:
                x_pos = 1 - pos if meet.kind != "conv" else 0
                in_ex = None if self.tasks else analysis.axes[op.ins[x_pos]]
                st = layers.structure(
                    meet.kind,
                    op,
                    pos,
                    shapes,
                    program.shape(op.outs[0]),
                    in_ex,
                    None if view is None else view.labels,
                )
            out.append(Use(meet, pos, var, deps, view, st))
        return out

    def _ghost_plan(self, leaf: int, uses: list[Use]) -> list[tuple[int, int, bool]] | None:
        """Pairs (i, j, swapped) of the leaf's uses for a ghost Gram, or None to materialise."""
        if self.strategy == "materialize":
            return None
        pairs = self._ghost_pairs(leaf, uses)
        if pairs is None or self.strategy == "ghost":
            return pairs
        cheaper = self._ghost_cost(uses, pairs) <= self._materialize_cost(uses, self._size(leaf))
        return pairs if cheaper else None

    def _ghost_pairs(self, leaf: int, uses: list[Use]) -> list[tuple[int, int, bool]] | None:
        """The pairs of uses a ghost Gram of the leaf sums, or None where it has none."""
        if any(u.structure is None or u.view is None or u.deps != {leaf} for u in uses):
            return None
        if self.tasks and len(uses) > 1:
            return None
        pairs = []
        for i, u in enumerate(uses):
            for j in range(i, len(uses)):
                if i == j:
                    pairs.append((i, i, False))
                    continue
                a, b = u.structure.keys, uses[j].structure.keys
                if a is None or b is None or a[0] != b[0]:
                    return None
                if (a[1], a[2]) == (b[1], b[2]):
                    pairs.append((i, j, False))
                elif (a[1], a[2]) == (b[2], b[1]):
                    pairs.append((i, j, True))
                else:
                    return None
        return pairs

    def ghost_costs(self, leaves) -> tuple[float, float]:
        """``(ghost, materialize)``: multiply-adds of the ghost term and of materialised
        per-row gradients, summed over those of ``leaves`` (indices) that admit the ghost
        term (the two costs ``strategy="auto"`` compares leaf by leaf)."""
        ghost = materialize = 0.0
        for leaf in leaves:
            uses = [u for u in self.uses if leaf in u.deps]
            pairs = self._ghost_pairs(leaf, uses) if uses else None
            if pairs is not None:
                ghost += self._ghost_cost(uses, pairs)
                materialize += self._materialize_cost(uses, self._size(leaf))
        return ghost, materialize

    def _size(self, leaf: int) -> int:
        return int(np.prod(self.program.shape(self.program.inputs[leaf])))

    def _rows(self, st: layers.Structure) -> tuple[int, int]:
        """(examples or 1, rows per example or N)."""
        n = int(np.prod(st.rows))
        return (1, n) if self.tasks else (self.batch, n // self.batch)

    def _ghost_cost(self, uses, pairs) -> float:
        if self.tasks:
            st = uses[0].structure
            _, n = self._rows(st)
            k = self.n_rows
            x = 1 if st.index else st.x
            return st.h * n * n * x + k * st.h * n * n * st.y + k * k * st.h * n * st.y
        cost = 0.0
        for i, j, _ in pairs:
            si, sj = uses[i].structure, uses[j].structure
            b, ti = self._rows(si)
            _, tj = self._rows(sj)
            x = 1 if si.index else si.x
            cost += b * b * ti * tj * si.h * (x + si.y + 1)
        return cost

    def _materialize_cost(self, uses, size) -> float:
        rows = 0.0
        for u in uses:
            b, t = self._rows(u.structure)
            rows += b * t * u.structure.h * u.structure.x * u.structure.y
        k = self.n_rows
        if self.tasks:
            rows *= k
        return rows + k * k * size

    # ------------------------------------------------------------------ evaluation
    def compute(self, inputs, treedef, gram_leaves=None):
        """``(losses, aux outputs, Ĝ, s, combine)``, the Gram ``G = 2^s · Ĝ`` summed over the
        leaves ``gram_leaves`` (indices; None: every leaf); ``combine`` covers every leaf."""
        program = self.program
        probes = [(m.index, k) for m in self.meets for k in m.probed]
        zeros = [
            jnp.zeros(program.shape(program.ops[i].outs[k]), program.dtype(program.ops[i].outs[k]))
            for i, k in probes
        ]
        slot = {p: n for n, p in enumerate(probes)}
        recorded = sorted(
            {a for m in self.meets for a in program.ops[m.index].ins if not isinstance(a, Lit)}
        )
        meet_ops = {m.index for m in self.meets}

        def forward(probe_values):
            def add_probes(i, outs):
                if i not in meet_ops:
                    return outs
                return [
                    o + probe_values[slot[(i, k)]] if (i, k) in slot else o
                    for k, o in enumerate(outs)
                ]

            env = evaluate(program, inputs, on_outputs=add_probes)
            outs = [read(env, o) for o in program.outputs]
            return outs[0], (outs[1:], {v: env[v] for v in recorded})

        losses, vjp, (rest, values) = jax.vjp(forward, zeros, has_aux=True)
        if self.tasks:
            cot = jnp.eye(losses.shape[0], dtype=losses.dtype) + jnp.zeros_like(losses)
            strategy = "auto" if self.chunk_size is None else "chunked"
            deltas = map_over_tasks(lambda c: vjp(c)[0], cot, strategy, self.chunk_size)
        else:
            deltas = vjp(jnp.ones_like(losses))[0]
        state = _State(self, inputs, values, {p: deltas[n] for p, n in slot.items()}, losses)
        gram, log2_scale = state.gram(range(self.n_leaves) if gram_leaves is None else gram_leaves)
        return losses, rest, gram, log2_scale, state.combine_fn(treedef)


class _State:
    """Values of one call: operands, cotangents; the Gram and the combination from them."""

    def __init__(self, engine: _Engine, inputs, values, deltas, losses):
        self.e = engine
        self.inputs = inputs
        self.values = values
        self.deltas = deltas
        self.rows = losses.shape[0]
        self.dtype = jnp.promote_types(losses.dtype, jnp.float32)
        self._per_row: dict[int, tuple] = {}

    def invals(self, meet: Meet) -> list:
        op = self.e.program.ops[meet.index]
        return [read(self.values, a) for a in op.ins]

    def cots(self, meet: Meet) -> list:
        op = self.e.program.ops[meet.index]
        return [self.deltas.get((meet.index, k)) for k in range(len(op.outs))]

    # ------------------------------------------------------------------ Gram
    def gram(self, leaves) -> tuple[jax.Array, jax.Array]:
        """``(Ĝ, s)`` with the Gram ``G = 2^s · Ĝ`` (``s`` int32).

        Every term (a ghost product or a materialised leaf) is computed from factors or
        gradients rescaled by powers of two (:func:`layers.scaled`) and brought to the
        largest term's exponent ``s``: exact, and ``Ĝ`` stays in range where ``G`` would
        overflow or underflow float32, as the columns' power-of-two scaling does.
        """
        e = self.e
        terms: list[tuple[jax.Array, jax.Array]] = []
        for leaf in leaves:
            uses = [u for u in e.uses if leaf in u.deps]
            if not uses:
                continue
            pairs = e._ghost_plan(leaf, uses)
            terms += (
                self._ghost(uses, pairs) if pairs is not None else self._materialized(leaf, uses)
            )
        if not terms:
            return jnp.zeros((self.rows, self.rows), self.dtype), jnp.zeros((), jnp.int32)
        top = jnp.max(jnp.stack([exponent for _, exponent in terms]))
        gram = sum(jnp.ldexp(term, exponent - top) for term, exponent in terms)
        return gram, top

    def _factors(self, u: Use) -> layers.Factors:
        e, op = self.e, self.e.program.ops[u.meet.index]
        x_pos = 0 if u.meet.kind == "conv" else 1 - u.pos
        in_ex = None if e.tasks else e.analysis.axes[op.ins[x_pos]]
        return layers.factors(
            u.structure,
            op,
            u.pos,
            self.invals(u.meet),
            self.cots(u.meet)[0],
            u.view.labels,
            batch=e.batch,
            in_ex=in_ex,
            tasks=e.tasks,
        )

    def _ghost(self, uses: list[Use], pairs) -> list[tuple[jax.Array, jax.Array]]:
        """``[(term, exponent)]``: the leaf's Gram is ``Σ 2^exponent · term``."""
        facs = [layers.scaled(self._factors(u), self.dtype) for u in uses]
        if self.e.tasks:
            f, exponent = facs[0]
            return [(layers.ghost_tasks(f, self.dtype), 2 * exponent)]
        terms = []
        for i, j, swapped in pairs:
            (f1, e1), (f2, e2) = facs[i], facs[j]
            term = layers.ghost_pair(f1, f2, swapped, self.dtype)
            terms.append((term if i == j else term + term.T, e1 + e2))
        return terms

    def _per_row_grads(self, meet: Meet) -> tuple:
        """Per-example / per-task gradients of the meet's parameter operands (memoised)."""
        if meet.index not in self._per_row:
            e, op = self.e, self.e.program.ops[meet.index]
            invals, cots = self.invals(meet), self.cots(meet)
            if e.tasks:
                strategy = "auto" if e.chunk_size is None else "chunked"
                grads = layers.per_task(
                    op,
                    invals,
                    meet.params_at,
                    cots,
                    lambda f, xs: map_over_tasks(f, xs, strategy, e.chunk_size),
                )
            elif meet.kind == "masked":
                grads = layers.per_example_masked(
                    op, invals, meet.params_at, list(meet.out_axes), cots, e.batch, e.chunk_size
                )
            else:
                grads = layers.per_example(
                    op,
                    invals,
                    meet.params_at,
                    list(meet.slicing),
                    list(meet.out_axes),
                    cots,
                    e.batch,
                )
            self._per_row[meet.index] = grads
        return self._per_row[meet.index]

    def _materialized(self, leaf: int, uses: list[Use]) -> list[tuple[jax.Array, jax.Array]]:
        """``[(term, exponent)]`` of the leaf's per-row gradients, rescaled by a power of two."""
        rows = self.rows
        if len(uses) == 1 and uses[0].view is not None and uses[0].deps == {leaf}:
            u = uses[0]  # a permutation of the leaf: same Gram, no need to map back
            total = self._per_row_grads(u.meet)[u.meet.params_at.index(u.pos)]
        else:
            total = None
            for u in uses:
                g = self._per_row_grads(u.meet)[u.meet.params_at.index(u.pos)]
                contribution = jax.vmap(self._to_leaves(u))(g)[leaf]
                total = contribution if total is None else total + contribution
        exponent = power_of_two_exponent(total)
        flat = times_power_of_two(total.reshape(rows, -1).astype(self.dtype), -exponent)
        return [(jnp.matmul(flat, flat.T, precision=HIGHEST), 2 * exponent)]

    def _to_leaves(self, u: Use) -> Callable:
        """``g_v -> {leaf: g_leaf}``: the backward of the parameters-only map to ``u.var``."""
        program = self.e.program
        deps = sorted(u.deps)
        leaf_vars = [program.inputs[k] for k in deps]
        known = set(program.inputs)
        ops = ops_computing(program, [u.var], known)

        def phi(*leaf_values):
            env = dict(program.consts)
            env.update(zip(program.inputs, self.inputs))
            env.update(zip(leaf_vars, leaf_values))
            env = evaluate(program, [], ops=ops, env=env)
            return env[u.var]

        _, vjp = jax.vjp(phi, *[self.inputs[k] for k in deps])

        def to_leaves(g):
            return dict(zip(deps, vjp(g.astype(program.dtype(u.var)))))

        return to_leaves

    # ------------------------------------------------------------------ combination
    def combine_fn(self, treedef) -> Callable:
        e = self.e
        leaves = self.inputs[: e.n_leaves]
        rows = self.rows

        def combine(weights):
            weights = jnp.asarray(weights)
            if weights.shape != (rows,):
                raise ValueError(
                    f"combine expects one weight per {'task' if e.tasks else 'example'}, shape "
                    f"({rows},); got {weights.shape}."
                )
            grads = [jnp.zeros_like(leaf) for leaf in leaves]
            for meet in e.meets:
                op = e.program.ops[meet.index]
                cots = []
                for k, c in enumerate(self.cots(meet)):
                    if c is None:
                        cots.append(None)
                    elif e.tasks:
                        cots.append(jnp.tensordot(weights.astype(c.dtype), c, axes=1))
                    else:
                        cots.append(layers.weight_examples(c, meet.out_axes[k], weights))
                invals = self.invals(meet)
                for pos, g in zip(
                    meet.params_at, layers.combined(op, invals, meet.params_at, cots)
                ):
                    use = next(u for u in e.uses if u.meet is meet and u.pos == pos)
                    for leaf, gl in self._to_leaves(use)(g).items():
                        grads[leaf] = grads[leaf] + gl.astype(grads[leaf].dtype)
            return jax.tree_util.tree_unflatten(treedef, grads)

        return combine

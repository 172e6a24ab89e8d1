"""A traced function as one flat list of operations, evaluated operation by operation.

``flatten`` inlines nested calls (``jit``, ``closed_call``, ``checkpoint``) so that every
parameter use is visible at one level; ``custom_jvp`` / ``custom_vjp`` calls stay single
operations (their own derivative rules must apply). ``evaluate`` binds the operations one
by one, with a hook that may replace an operation's outputs (the engine adds its zero
probes there). ``orthogonal_view`` recognises a parameter reached through shape-only
operations (transpose, reshape, unit broadcast, dtype conversion), whose per-example
gradients have the same Gram as the parameter's own.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core as jcore

# Call primitives whose body is inlined (values and derivatives are those of the body).
CALLS = ("jit", "pjit", "closed_call", "core_call", "remat2", "checkpoint", "remat")
# Single-operand operations that only move or relabel entries (a permutation of the values).
VIEW_OPS = (
    "transpose",
    "reshape",
    "squeeze",
    "broadcast_in_dim",
    "convert_element_type",
    "copy",
    "copy_p",
    "sharding_constraint",
    "reshard",
    "mesh_cast",
)


@dataclasses.dataclass(frozen=True)
class Lit:
    """A literal operand (a Python or NumPy scalar baked into the jaxpr)."""

    value: Any


@dataclasses.dataclass(frozen=True)
class Op:
    """One operation: the original equation and the ids of its operand / result variables."""

    eqn: Any
    ins: tuple  # int (variable id) or Lit
    outs: tuple[int, ...]

    @property
    def name(self) -> str:
        return self.eqn.primitive.name

    @property
    def params(self) -> dict:
        return self.eqn.params


@dataclasses.dataclass
class Program:
    """A flat program: variable avals, constants, inputs, outputs and operations in order."""

    avals: list[Any]
    consts: dict[int, Any]
    inputs: list[int]
    outputs: list[int | Lit]
    ops: list[Op]

    def shape(self, atom) -> tuple[int, ...]:
        if isinstance(atom, Lit):
            return tuple(jnp.shape(atom.value))
        return tuple(self.avals[atom].shape)

    def dtype(self, atom):
        if isinstance(atom, Lit):
            return jnp.result_type(atom.value)
        return self.avals[atom].dtype

    def producers(self) -> dict[int, int]:
        """Variable id -> index of the operation that defines it."""
        return {out: i for i, op in enumerate(self.ops) for out in op.outs}


def flatten(closed: jcore.ClosedJaxpr) -> Program:
    """Flatten ``closed`` into a :class:`Program`, inlining nested call primitives."""
    program = Program(avals=[], consts={}, inputs=[], outputs=[], ops=[])

    def new(aval) -> int:
        program.avals.append(aval)
        return len(program.avals) - 1

    def inline(jaxpr, consts, env: dict) -> None:
        for var, value in zip(jaxpr.constvars, consts):
            env[var] = new(var.aval)
            program.consts[env[var]] = value
        for eqn in jaxpr.eqns:
            ins = tuple(Lit(a.val) if isinstance(a, jcore.Literal) else env[a] for a in eqn.invars)
            body = _call_body(eqn)
            if body is not None:
                sub_jaxpr, sub_consts = body
                sub_env = dict(zip(sub_jaxpr.invars, ins))
                # an operand that is a literal is re-materialised as a constant of the body
                for var, atom in list(sub_env.items()):
                    if isinstance(atom, Lit):
                        sub_env[var] = new(var.aval)
                        program.consts[sub_env[var]] = atom.value
                inline(sub_jaxpr, sub_consts, sub_env)
                for outer, inner in zip(eqn.outvars, sub_jaxpr.outvars):
                    if isinstance(inner, jcore.Literal):
                        env[outer] = new(outer.aval)
                        program.consts[env[outer]] = inner.val
                    else:
                        env[outer] = sub_env[inner]
                continue
            outs = tuple(new(v.aval) for v in eqn.outvars)
            for var, out in zip(eqn.outvars, outs):
                env[var] = out
            program.ops.append(Op(eqn, ins, outs))

    env: dict = {}
    program.inputs = [new(v.aval) for v in closed.jaxpr.invars]
    env.update(zip(closed.jaxpr.invars, program.inputs))
    inline(closed.jaxpr, closed.consts, env)
    program.outputs = [
        Lit(v.val) if isinstance(v, jcore.Literal) else env[v] for v in closed.jaxpr.outvars
    ]
    return program


def _call_body(eqn):
    """``(jaxpr, consts)`` of a call primitive to inline, or None."""
    if eqn.primitive.name not in CALLS:
        return None
    body = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
    if isinstance(body, jcore.ClosedJaxpr):
        return body.jaxpr, body.consts
    if isinstance(body, jcore.Jaxpr):
        return body, ()
    return None


def apply(op: Op, invals: Sequence[Any]) -> list[Any]:
    """Bind ``op``'s primitive on ``invals``; always returns a list of outputs."""
    eqn = op.eqn
    bind_params = eqn.primitive.get_bind_params(eqn.params)
    subfuns: Sequence[Any] = ()
    if isinstance(bind_params, tuple):  # older jax: (subfuns, params)
        subfuns, bind_params = bind_params
    with eqn.ctx.manager:
        out = eqn.primitive.bind(*subfuns, *invals, **bind_params)
    return list(out) if eqn.primitive.multiple_results else [out]


def evaluate(
    program: Program,
    inputs: Sequence[Any],
    *,
    on_outputs: Callable[[int, list[Any]], list[Any]] | None = None,
    ops: Sequence[int] | None = None,
    env: dict[int, Any] | None = None,
) -> dict[int, Any]:
    """Run the program (or the operations ``ops`` only); returns variable id -> value.

    ``on_outputs(i, outs)`` may replace the outputs of operation ``i`` before they are used.
    """
    env = dict(program.consts) if env is None else dict(env)
    env.update(zip(program.inputs, inputs))
    for i in range(len(program.ops)) if ops is None else ops:
        op = program.ops[i]
        outs = apply(op, [read(env, a) for a in op.ins])
        if on_outputs is not None:
            outs = on_outputs(i, outs)
        env.update(zip(op.outs, outs))
    return env


def read(env: dict[int, Any], atom) -> Any:
    return atom.value if isinstance(atom, Lit) else env[atom]


def ops_computing(program: Program, targets: Sequence[int], known: set[int]) -> list[int]:
    """Indices (in program order) of the operations needed for ``targets`` from ``known``."""
    producers = program.producers()
    needed: set[int] = set()
    stack = [t for t in targets if t not in known]
    seen: set[int] = set()
    while stack:
        var = stack.pop()
        if var in seen or var in known or var in program.consts:
            continue
        seen.add(var)
        i = producers[var]
        if i not in needed:
            needed.add(i)
            stack.extend(a for a in program.ops[i].ins if not isinstance(a, Lit))
    return sorted(needed)


@dataclasses.dataclass(frozen=True)
class View:
    """``var`` is a permutation of parameter leaf ``leaf``'s entries.

    ``labels[k]`` is the leaf axis that axis ``k`` of the view runs along (None for a unit
    axis); ``labels`` is None when reshapes merged or split axes (the view is still a
    permutation, but its axes do not correspond to the leaf's one by one).
    """

    leaf: int
    labels: tuple[int | None, ...] | None


def orthogonal_view(program: Program, var: int, leaf_vars: dict[int, int]) -> View | None:
    """The :class:`View` of a parameter leaf that ``var`` is, or None if it is not one."""
    producers = program.producers()
    chain: list[Op] = []
    while var not in leaf_vars:
        i = producers.get(var)
        if i is None:
            return None
        op = program.ops[i]
        variables = [a for a in op.ins if not isinstance(a, Lit)]
        if op.name not in VIEW_OPS or len(op.ins) != 1 or len(variables) != 1:
            return None
        if op.name == "broadcast_in_dim" and math.prod(program.shape(op.outs[0])) != math.prod(
            program.shape(variables[0])
        ):
            return None  # a true broadcast repeats entries: not a permutation
        if op.name == "reshape" and op.params.get("dimensions") is not None:
            return None
        if op.name == "convert_element_type" and not (
            jnp.issubdtype(program.dtype(op.outs[0]), jnp.floating)
            and jnp.issubdtype(program.dtype(variables[0]), jnp.floating)
        ):
            return None
        chain.append(op)
        var = variables[0]
    leaf = leaf_vars[var]
    shape = program.shape(var)
    labels: tuple | None = tuple(k if n != 1 else None for k, n in enumerate(shape))
    for op in reversed(chain):
        labels = _relabel(op, labels, program.shape(op.ins[0]), program.shape(op.outs[0]))
    return View(leaf, labels)


def _relabel(op: Op, labels, in_shape, out_shape):
    if labels is None:
        return None
    if op.name == "transpose":
        return tuple(labels[p] for p in op.params["permutation"])
    if op.name == "squeeze":
        drop = {d % len(in_shape) for d in op.params["dimensions"]}
        return tuple(label for k, label in enumerate(labels) if k not in drop)
    if op.name == "broadcast_in_dim":
        new: list = [None] * len(out_shape)
        for k, b in enumerate(op.params["broadcast_dimensions"]):
            new[b] = labels[k] if out_shape[b] != 1 else None
        return tuple(new)
    if op.name == "reshape":
        kept_in = [(n, lab) for n, lab in zip(in_shape, labels) if n != 1]
        kept_out = [k for k, n in enumerate(out_shape) if n != 1]
        if [n for n, _ in kept_in] != [out_shape[k] for k in kept_out]:
            return None  # axes merged or split
        new = [None] * len(out_shape)
        for k, (_, lab) in zip(kept_out, kept_in):
            new[k] = lab
        return tuple(new)
    return labels  # dtype conversion, copies, sharding annotations


def tree_paths(tree) -> list[str]:
    """``jax.tree_util.keystr`` of every leaf (for error messages)."""
    return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]

"""Gradients of a parameter at one operation where it meets the batch ("a use").

For ``y = op(x, v)`` with ``x`` batch-dependent and ``v`` a function of the parameters only,
everything is computed from the stored operands and the output cotangent ``Δ = ∂L/∂y``:

* **factors** (``dot_general``, convolution, embedding gather): the per-example gradient is
  ``g_b = Σ_t a_bt ⊗ d_bt`` with ``a`` the input rows (convolution: unfolded patches;
  gather: one-hot rows of the index) and ``d`` the matching rows of ``Δ``, so
  ``⟨g_b, g_c⟩ = Σ_{t,s} ⟨a_bt, a_cs⟩ ⟨d_bt, d_cs⟩`` (the "ghost" Gram, never forming
  ``g_b``). A dot's batch dimensions (per-head weights) add a sum over blocks ``h``.
* **per example**: ``op`` evaluated on one example at a time (``vmap`` over the example axis
  with ``v`` shared) and differentiated, giving ``g_b`` itself — for the factored
  operations and elementwise ones whose parameter operand is broadcast over the examples.
* **masked** (any other operation): ``op``'s backward with the cotangent restricted to one
  example, over the examples (``vmap``, or ``lax.map`` in chunks).
* **combine**: ``Σ_b w_b g_b`` is ``op``'s backward with cotangent ``w ⊙ Δ`` (for a dense
  layer ``Xᵀ diag(w) Δ``), one pass whatever the number of examples.

Over K tasks (no example axis) the same factors give ``G_ij = ⟨A Aᵀ, Δ_i Δ_jᵀ⟩``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mtl_optax.gram import power_of_two_exponent, times_power_of_two
from mtl_optax.structured_gram.example_axis import Ex
from mtl_optax.structured_gram.program import Op, apply

HIGHEST = lax.Precision.HIGHEST


# --------------------------------------------------------------------------- example digits
def examples_first(x: jax.Array, ex: Ex, batch: int) -> jax.Array:
    """Move the example digit of axis ``ex.dim`` to a new leading axis of size B.

    Axis ``ex.dim`` (size outer·B·inner) keeps the outer·inner remaining positions, so the
    result has shape ``(B, *x.shape[:d], outer·inner, *x.shape[d+1:])``.
    """
    d, inner = ex.dim, ex.inner
    outer = x.shape[d] // (batch * inner)
    x = x.reshape(x.shape[:d] + (outer, batch, inner) + x.shape[d + 1 :])
    x = jnp.moveaxis(x, d + 1, 0)
    return x.reshape((batch,) + x.shape[1 : d + 1] + (outer * inner,) + x.shape[d + 3 :])


def _digit_view(x: jax.Array, ex: Ex, batch: int) -> tuple[jax.Array, int]:
    """``x`` with axis ``ex.dim`` split into (outer, B, inner); returns it and the B axis."""
    d, inner = ex.dim, ex.inner
    outer = x.shape[d] // (batch * inner)
    return x.reshape(x.shape[:d] + (outer, batch, inner) + x.shape[d + 1 :]), d + 1


def weight_examples(x: jax.Array, ex: Ex, weights: jax.Array) -> jax.Array:
    """``x`` with every entry of example b multiplied by ``weights[b]``."""
    split, axis = _digit_view(x, ex, weights.shape[0])
    shape = [1] * split.ndim
    shape[axis] = weights.shape[0]
    return (split * weights.reshape(shape).astype(x.dtype)).reshape(x.shape)


def mask_example(x: jax.Array, ex: Ex, batch: int, b) -> jax.Array:
    """``x`` with every example other than ``b`` zeroed."""
    return weight_examples(x, ex, (jnp.arange(batch) == b).astype(x.dtype))


def zero_cotangent(value) -> Any:
    """The cotangent of a non-differentiable (integer or boolean) output."""
    if jnp.issubdtype(jnp.result_type(value), jnp.inexact):
        return jnp.zeros_like(value)
    return np.zeros(jnp.shape(value), jax.dtypes.float0)


# --------------------------------------------------------------------------- factor structure
@dataclasses.dataclass(frozen=True)
class Structure:
    """Static shape of a factored use.

    ``rows``: the row axes' sizes (the example digit among them at ``ex_row``); ``h``: block
    count (a dot's batch dimensions); ``x`` / ``y``: sizes of the two parameter groups
    (``x`` on the input side, ``y`` on the output side; ``index`` when the input side is a
    one-hot index); ``keys``: (h, x-side, y-side) identities of the groups in the leaf's
    axes, equal across two uses exactly when their factors line up entry by entry (None:
    the use pairs with nothing but itself).
    """

    kind: str
    rows: tuple[int, ...]
    ex_row: int | None
    h: int
    x: int
    y: int
    index: bool
    keys: tuple | None


def structure(kind: str, op: Op, pos: int, shapes: list, out_shape, in_ex, labels) -> Structure:
    """The :class:`Structure` of the factored use of operand ``pos`` of ``op``."""
    v_shape = shapes[pos]
    if kind == "dot":
        (xc, xb, xfree), (vc, vb, vfree) = _dot_dims(op, pos, shapes)
        rows = tuple(shapes[1 - pos][i] for i in xfree)
        ex_row = None if in_ex is None else xfree.index(in_ex.dim)
        groups = ([vb[i] for i in range(len(vb))], list(vc), list(vfree))
        sizes = [math.prod(v_shape[d] for d in g) for g in groups]
        return Structure(
            kind, rows, ex_row, sizes[0], sizes[1], sizes[2], False, _keys(groups, labels)
        )
    if kind == "gather":
        dn = op.params["dimension_numbers"]
        indexed = list(dn.start_index_map)
        rest = [d for d in range(len(v_shape)) if d not in indexed]
        rows = tuple(shapes[1][:-1])
        ex_row = None if in_ex is None else in_ex.dim
        return Structure(
            kind,
            rows,
            ex_row,
            1,
            math.prod(v_shape[d] for d in indexed),
            math.prod(v_shape[d] for d in rest),
            True,
            _keys(([], indexed, rest), labels),
        )
    # convolution: rows = (batch, *output spatial), x = in-features x window, y = out-features
    spec = op.params["dimension_numbers"]
    rows = (out_shape[spec.out_spec[0]],) + tuple(out_shape[d] for d in spec.out_spec[2:])
    x = shapes[0][spec.lhs_spec[1]] * math.prod(v_shape[d] for d in spec.rhs_spec[2:])
    return Structure(kind, rows, 0, 1, x, v_shape[spec.rhs_spec[0]], False, None)


def _keys(groups, labels) -> tuple | None:
    """The leaf axes of each group (unit axes carry no label and do not affect the order)."""
    if labels is None:
        return None
    return tuple(frozenset(labels[d] for d in g if labels[d] is not None) for g in groups)


def _dot_dims(op: Op, pos: int, shapes: list):
    """((x contract, x batch, x free), (v contract, v batch, v free)) for a dot with v at pos."""
    (lc, rc), (lb, rb) = op.params["dimension_numbers"]
    vc, vb = (lc, lb) if pos == 0 else (rc, rb)
    xc, xb = (rc, rb) if pos == 0 else (lc, lb)
    xfree = [i for i in range(len(shapes[1 - pos])) if i not in xc and i not in xb]
    vfree = [i for i in range(len(shapes[pos])) if i not in vc and i not in vb]
    return (list(xc), list(xb), xfree), (list(vc), list(vb), vfree)


# --------------------------------------------------------------------------- factor values
@dataclasses.dataclass
class Factors:
    """Row-major factors of a use: ``data`` (input side) and ``cot`` (output side).

    Example mode: ``data`` is (B, T, H, X) or an int index (B, T) (-1: dropped), ``cot`` is
    (B, T, H, Y). Task mode: rows are flattened to N and ``cot`` has a leading task axis.
    """

    data: jax.Array
    cot: jax.Array
    index: bool


def factors(
    st: Structure,
    op: Op,
    pos: int,
    invals: list,
    cot: jax.Array,
    labels,
    *,
    batch: int | None,
    in_ex: Ex | None,
    tasks: bool,
) -> Factors:
    """Compute the factors of a use from the operation's operands and output cotangent.

    ``cot`` has a leading task axis when ``tasks``; ``batch``/``in_ex`` locate the examples
    (example mode).
    """
    lead = 1 if tasks else 0
    if st.kind == "dot":
        (xc, xb, xfree), (vc, vb, vfree) = _dot_dims(op, pos, [jnp.shape(a) for a in invals])
        x = invals[1 - pos]
        nb = len(xb)
        if pos == 1:  # x is the lhs: its free dims come first in the output
            x_out = list(range(nb, nb + len(xfree)))
            v_out = list(range(nb + len(xfree), nb + len(xfree) + len(vfree)))
        else:
            v_out = list(range(nb, nb + len(vfree)))
            x_out = list(range(nb + len(vfree), nb + len(vfree) + len(xfree)))
        hx_order, cx_order = _sorted(vb, labels), _sorted(vc, labels)
        data = jnp.transpose(x, xfree + [xb[i] for i in hx_order] + [xc[i] for i in cx_order])
        f_order = _sorted(vfree, labels)
        perm = (
            list(range(lead))
            + [lead + a for a in x_out]
            + [lead + i for i in hx_order]
            + [lead + v_out[i] for i in f_order]
        )
        cot = jnp.transpose(cot, perm)
        row_ex = None if tasks else Ex(st.ex_row, in_ex.inner)
        data, cot = _rows(data, cot, st, batch, row_ex, tasks)
        return Factors(data, cot, False)
    if st.kind == "gather":
        return _gather_factors(st, op, invals, cot, labels, batch, in_ex, tasks)
    # convolution
    spec = op.params["dimension_numbers"]
    x, v = invals
    patches = conv_patches(
        jnp.transpose(x, spec.lhs_spec),
        [v.shape[d] for d in spec.rhs_spec[2:]],
        op.params,
    )
    data = jnp.moveaxis(patches, 1, -1)[..., None, :]  # (N, *spatial, H=1, X)
    out = jnp.transpose(cot, list(range(lead)) + [lead + d for d in spec.out_spec])
    out = jnp.moveaxis(out, lead + 1, -1)[..., None, :]  # (K?, N, *spatial, 1, O)
    row_ex = None if tasks else Ex(0, in_ex.inner)
    data, out = _rows(data, out, st, batch, row_ex, tasks)
    return Factors(data, out, False)


def conv_patches(lhs: jax.Array, window: list[int], params: dict) -> jax.Array:
    """Unfolded input patches (N, C·prod(window), *output spatial) of a convolution.

    ``lhs`` is in (N, C, *spatial) layout. Without input dilation the patches are strided
    slices of the padded input (no arithmetic); with it, ``conv_general_dilated_patches``.
    Feature order: channel-major, then the window positions.
    """
    strides, padding = params["window_strides"], params["padding"]
    lhs_dilation, rhs_dilation = params["lhs_dilation"], params["rhs_dilation"]
    if isinstance(padding, str) or any(d != 1 for d in lhs_dilation):
        return lax.conv_general_dilated_patches(
            lhs,
            window,
            strides,
            padding,
            lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation,
            precision=HIGHEST,
        )
    padded = jnp.pad(lhs, [(0, 0), (0, 0)] + [tuple(p) for p in padding])
    spatial = padded.shape[2:]
    out = [
        (n - (k - 1) * r - 1) // s + 1 for n, k, r, s in zip(spatial, window, rhs_dilation, strides)
    ]
    slices = []
    for offset in np.ndindex(*window):
        start = [0, 0] + [o * r for o, r in zip(offset, rhs_dilation)]
        limit = [padded.shape[0], padded.shape[1]] + [
            st + (m - 1) * s + 1 for st, m, s in zip(start[2:], out, strides)
        ]
        slices.append(lax.slice(padded, start, limit, [1, 1, *strides]))
    stacked = jnp.stack(slices, axis=2)  # (N, C, K, *out)
    return stacked.reshape((stacked.shape[0], -1) + stacked.shape[3:])


def _sorted(dims, labels) -> list[int]:
    """Order (positions into ``dims``) that sorts the dims by the leaf axis they run along."""
    if labels is None:
        return list(range(len(dims)))
    return sorted(range(len(dims)), key=lambda i: (labels[dims[i]] is None, labels[dims[i]] or 0))


def _rows(data, cot, st: Structure, batch, row_ex: Ex | None, tasks: bool):
    """Row axes to (B, T) (examples) or N (tasks); parameter groups to (H, X) / (H, Y).

    ``data`` is (*rows, *H axes, *X axes), ``cot`` (K?, *rows, *H axes, *Y axes).
    """
    if tasks:
        n = math.prod(st.rows)
        return data.reshape((n, st.h, st.x)), cot.reshape((cot.shape[0], n, st.h, st.y))
    data = examples_first(data, row_ex, batch).reshape((batch, -1, st.h, st.x))
    cot = examples_first(cot, row_ex, batch).reshape((batch, -1, st.h, st.y))
    return data, cot


def _gather_factors(st, op, invals, cot, labels, batch, in_ex, tasks) -> Factors:
    v, idx = invals
    dn = op.params["dimension_numbers"]
    indexed = list(dn.start_index_map)
    lead = 1 if tasks else 0
    order = _sorted(indexed, labels)
    valid = jnp.ones(idx.shape[:-1], bool)
    flat = jnp.zeros(idx.shape[:-1], jnp.int32)
    # An out-of-range index reads a clamped row in the forward pass; jax.grad's scatter-add
    # drops it (zero gradient) unless the mode is CLIP: the factors follow jax.grad.
    drop = "CLIP" not in str(op.params["mode"]).upper()
    for j in order:
        d = indexed[j]
        i = idx[..., j].astype(jnp.int32)
        if drop:
            valid = valid & (i >= 0) & (i < v.shape[d])
        flat = flat * v.shape[d] + jnp.clip(i, 0, v.shape[d] - 1)
    flat = jnp.where(valid, flat, -1)
    out_rank = cot.ndim - lead
    offset_dims = list(dn.offset_dims)
    batch_positions = [i for i in range(out_rank) if i not in offset_dims]
    window = [d for d in range(v.ndim) if d not in dn.collapsed_slice_dims]
    rest = [d for d in range(v.ndim) if d not in indexed]
    rest_positions = [offset_dims[window.index(d)] for d in rest]
    unit_positions = [offset_dims[k] for k, d in enumerate(window) if d in indexed]
    r_order = _sorted(rest, labels)
    perm = (
        list(range(lead))
        + [lead + p for p in batch_positions]
        + [lead + p for p in unit_positions]
        + [lead + rest_positions[i] for i in r_order]
    )
    out = jnp.transpose(cot, perm)
    out = out.reshape(out.shape[: lead + len(batch_positions)] + (1, -1))  # (K?, *rows, 1, Y)
    out = jnp.where(valid[..., None, None], out, 0)  # (a fill row's cotangent may be NaN)
    if tasks:
        n = math.prod(st.rows)
        return Factors(flat.reshape((n,)), out.reshape((out.shape[0], n, 1, st.y)), True)
    ex = Ex(st.ex_row, in_ex.inner)
    data = examples_first(flat, ex, batch).reshape((batch, -1))
    out = examples_first(out, ex, batch).reshape((batch, -1, 1, st.y))
    return Factors(data, out, True)


# --------------------------------------------------------------------------- ghost Grams
def _kernel(p: jax.Array, p_index: bool, q: jax.Array, q_index: bool) -> jax.Array:
    """``K[b,t,h,e,s] = ⟨p_bth, q_esh⟩`` for dense (B,T,H,X) or index (B,T) pieces."""
    if not p_index and not q_index:
        return jnp.einsum("bthx,eshx->bthes", p, q, precision=HIGHEST)
    if p_index and q_index:
        eq = (p[:, :, None, None] == q[None, None]) & (p[:, :, None, None] >= 0)
        return eq[:, :, None].astype(jnp.float32)
    if p_index:  # q dense with H = 1: q_es[p_bt]
        safe = jnp.maximum(p, 0)
        picked = jnp.take(q[:, :, 0, :], safe, axis=2)  # (E, S, B, T)
        picked = picked * (p >= 0).astype(picked.dtype)
        return jnp.transpose(picked, (2, 3, 0, 1))[:, :, None]
    return jnp.transpose(_kernel(q, q_index, p, p_index), (3, 4, 2, 0, 1))


def scaled(f: Factors, dtype) -> tuple[Factors, jax.Array]:
    """``(f̂, e)``: dense factors in the Gram's dtype (float32 or wider) divided by powers of
    two, ``2^-a`` on the input side (its largest entry in [0.5, 1); an index is left as it
    is) and ``2^-c`` on the output side, with ``e = a + c`` (int32).

    A gradient of this use is an input row times an output row, so ``f̂``'s gradients are
    ``2^-e`` times ``f``'s: exact (powers of two), and their products neither overflow nor
    underflow in float32 where the true ones would (gradient norms beyond ~1e±19).
    """
    a = jnp.zeros((), jnp.int32) if f.index else power_of_two_exponent(f.data)
    c = power_of_two_exponent(f.cot)
    data = f.data if f.index else times_power_of_two(f.data.astype(dtype), -a)
    return Factors(data, times_power_of_two(f.cot.astype(dtype), -c), f.index), a + c


def ghost_pair(f1: Factors, f2: Factors, swapped: bool, dtype) -> jax.Array:
    """``Σ_{t,h,s} ⟨·⟩⟨·⟩``: the (B, B) Gram cross term of two uses of one leaf, from factors
    already in ``dtype`` (:func:`scaled`).

    ``swapped``: use 2's output side lines up with use 1's input side (a transposed use, as
    a tied embedding's output projection is of its lookup table).
    """
    if swapped:
        k1 = _kernel(f1.data, f1.index, f2.cot, False)
        k2 = _kernel(f1.cot, False, f2.data, f2.index)
    else:
        k1 = _kernel(f1.data, f1.index, f2.data, f2.index)
        k2 = _kernel(f1.cot, False, f2.cot, False)
    return jnp.einsum("bthes,bthes->be", k1.astype(dtype), k2.astype(dtype), precision=HIGHEST)


def ghost_tasks(f: Factors, dtype) -> jax.Array:
    """``G_ij = Σ_h ⟨A_h A_hᵀ, Δ_ih Δ_jhᵀ⟩`` for K tasks over N rows (one use), from factors
    already in ``dtype`` (:func:`scaled`)."""
    if f.index:
        m = ((f.data[:, None] == f.data[None]) & (f.data[:, None] >= 0))[None].astype(dtype)
    else:
        m = jnp.einsum("nhx,mhx->hnm", f.data, f.data, precision=HIGHEST)
    md = jnp.einsum("hnm,jmhy->jnhy", m, f.cot, precision=HIGHEST)
    return jnp.einsum("inhy,jnhy->ij", f.cot, md, precision=HIGHEST)


# --------------------------------------------------------------------------- gradients
def _vjp_at(op: Op, invals: list, positions: tuple[int, ...], cots: list) -> tuple:
    """Gradients of ``op``'s operands at ``positions`` for output cotangents ``cots``."""

    def f(*values):
        ins = list(invals)
        for p, value in zip(positions, values):
            ins[p] = value
        return apply(op, ins)

    outs, vjp = jax.vjp(f, *[invals[p] for p in positions])
    full = [c if c is not None else zero_cotangent(o) for c, o in zip(cots, outs)]
    return vjp(full)


def per_example(
    op: Op,
    invals: list,
    positions: tuple[int, ...],
    slicing: list,
    out_axes: list,
    cots: list,
    batch: int,
) -> tuple:
    """Per-example gradients (B, *operand shape) of the operands at ``positions``.

    ``op`` runs on one example at a time: operands with ``slicing[k]`` an :class:`Ex` are
    cut along their example digit, the others (the parameters among them) are shared.
    """
    in_axes = [0 if s is not None else None for s in slicing]
    sliced = [examples_first(v, s, batch) if s is not None else v for s, v in zip(slicing, invals)]
    cut = [examples_first(c, ex, batch) if c is not None else None for c, ex in zip(cots, out_axes)]

    def one(ins, cs):
        return _vjp_at(op, ins, positions, cs)

    return jax.vmap(one, in_axes=(in_axes, 0))(sliced, cut)


def per_example_masked(
    op: Op,
    invals: list,
    positions: tuple[int, ...],
    out_axes: list,
    cots: list,
    batch: int,
    chunk_size: int | None,
) -> tuple:
    """Per-example gradients through ``op``'s backward with one example's cotangent at a time."""

    def one(b):
        masked = [
            mask_example(c, ex, batch, b) if c is not None else None
            for c, ex in zip(cots, out_axes)
        ]
        return _vjp_at(op, invals, positions, masked)

    examples = jnp.arange(batch)
    if chunk_size is None:
        return jax.vmap(one)(examples)
    return lax.map(one, examples, batch_size=chunk_size)


def per_task(op: Op, invals: list, positions: tuple[int, ...], cots: list, mapper) -> tuple:
    """Per-task gradients (K, *operand shape): ``op``'s backward for each task's cotangent."""
    present = [c for c in cots if c is not None]

    def one(cs):
        it = iter(cs)
        return _vjp_at(op, invals, positions, [next(it) if c is not None else None for c in cots])

    return mapper(one, present)


def combined(op: Op, invals: list, positions: tuple[int, ...], cots: list) -> tuple:
    """``Σ_rows w_row g_row`` of the operands at ``positions`` given weighted cotangents."""
    return _vjp_at(op, invals, positions, cots)

"""Which axis of every intermediate value indexes the examples, and whether they stay apart.

Starting from the batch inputs (example axis ``batch_dim``), every operation of the
flattened program maps the example axis of its operands to its results: elementwise
operations keep it, transposes and reshapes move it, ``dot_general`` keeps it on a free or
batch dimension, convolutions on the batch dimension, gathers on an index batch dimension.
An operation that mixes examples (a reduction, contraction, cumulative sum, sort,
concatenation, slice or window along the example axis — BatchNorm's batch mean is one)
gives a :class:`Coupled` value; if the losses depend on one, per-example gradients are not
defined and :func:`analyse` raises :class:`BatchCouplingError` naming the operation and its
source line. Values that do not depend on the batch carry no axis (``None``).

The example axis is a digit of one array axis: an axis of size ``outer · B · inner`` whose
index is ``(o · B + b) · inner + i`` for example ``b`` (reshapes that merge the batch with a
sequence axis, ``(B, T) -> (B·T,)``, give ``inner = T``).

Integer index arrays that provably equal ``arange`` along an axis are tracked too, so the
pattern ``logits[jnp.arange(B), labels]`` (a gather that picks one entry per example) is
recognised as per-example.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mtl_optax.structured_gram.program import Lit, Op, Program, flatten


@dataclasses.dataclass(frozen=True)
class Ex:
    """The example axis of a value: digit ``b`` of axis ``dim`` (size outer·B·inner)."""

    dim: int
    inner: int = 1


@dataclasses.dataclass(frozen=True)
class Coupled:
    """A value in which examples are mixed, and the first operation that mixed them."""

    reason: str


class BatchCouplingError(ValueError):
    """The per-example losses are not functions of one example each."""


ELEMENTWISE = frozenset(
    """abs acos acosh add add_any and asin asinh atan atan2 atanh bessel_i0e bessel_i1e cbrt
    ceil clamp clz complex conj convert_element_type copy copy_p cos cosh digamma div eq erf
    erf_inv erfc exp exp2 expm1 floor ge gt igamma igamma_grad_a igammac imag integer_pow
    is_finite le lgamma log log1p logistic lt max min mul ne neg nextafter not or polygamma
    population_count pow random_gamma_grad real reduce_precision regularized_incomplete_beta
    rem round rsqrt select_n shift_left shift_right_arithmetic shift_right_logical sign sin
    sinh sqrt square stop_gradient sub tan tanh xor zeta sharding_constraint reshard mesh_cast
    optimization_barrier device_put""".split()
)
REDUCTIONS = frozenset(
    "reduce_sum reduce_max reduce_min reduce_prod reduce_and reduce_or reduce_xor argmax "
    "argmin".split()
)
CUMULATIVE = frozenset("cumsum cumprod cummax cummin cumlogsumexp".split())
CUSTOM_CALLS = ("custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr")


def where(op: Op) -> str:
    """``file:line (function)`` of the code that created ``op`` and, when that is inside a
    library (flax, optax, ...), of the first calling line outside any installed package."""
    try:
        from jax._src import source_info_util

        frames = list(source_info_util.user_frames(op.eqn.source_info.traceback))
    except Exception:  # pragma: no cover - private API changed
        return "unknown location"
    if not frames:
        return "unknown location"

    def text(frame) -> str:
        return f"{frame.file_name}:{frame.start_line} ({frame.function_name})"

    def library(frame) -> bool:
        name = frame.file_name.replace("\\", "/")
        return "-packages/" in name or "/mtl_optax/structured_gram/" in name

    out = text(frames[0])
    if library(frames[0]):
        caller = next((f for f in frames if not library(f)), None)
        if caller is not None:
            out += f", called from {text(caller)}"
    return out


@dataclasses.dataclass
class Analysis:
    """Result of :func:`analyse`: per variable, its example axis and the leaves it uses."""

    axes: dict[int, Any]  # var -> None | Ex | Coupled
    deps: dict[int, frozenset[int]]  # var -> parameter leaf indices (batch-independent vars)
    live: set[int]  # vars the losses depend on
    batch_size: int | None


def analyse(
    program: Program,
    input_axes: list[Any],
    leaf_inputs: int,
    loss_var,
    batch_size: int | None,
) -> Analysis:
    """Propagate example axes (or, with ``batch_size=None``, batch dependence) and leaves.

    ``input_axes[k]`` is the axis of input ``k`` (``Ex`` for batch inputs; with
    ``batch_size=None`` any non-None marker means "depends on the data"); the first
    ``leaf_inputs`` inputs are the parameter leaves.
    """
    axes = propagate(program, input_axes, batch_size)
    deps: dict[int, frozenset[int]] = {}
    for k, var in enumerate(program.inputs):
        deps[var] = frozenset([k]) if k < leaf_inputs else frozenset()
    for op in program.ops:
        found = frozenset().union(
            *(deps.get(a, frozenset()) for a in op.ins if not isinstance(a, Lit))
        )
        for out in op.outs:
            deps[out] = found if axes[out] is None else frozenset()
    live = live_vars(program, [loss_var])
    return Analysis(axes, deps, live, batch_size)


def live_vars(program: Program, targets) -> set[int]:
    live = {t for t in targets if not isinstance(t, Lit)}
    for op in reversed(program.ops):
        if any(out in live for out in op.outs):
            live.update(a for a in op.ins if not isinstance(a, Lit))
    return live


def propagate(program: Program, input_axes: list[Any], batch_size: int | None) -> dict:
    """Axis of every variable of ``program`` given the axes of its inputs."""
    axes: dict[int, Any] = {var: None for var in program.consts}
    axes.update(zip(program.inputs, input_axes))
    iotas: dict[int, Any] = {}  # var -> IotaInfo
    for op in program.ops:
        in_axes = [None if isinstance(a, Lit) else axes[a] for a in op.ins]
        if batch_size is None:  # data dependence only
            marker = next((a for a in in_axes if a is not None), None)
            out_axes = [marker] * len(op.outs)
        else:
            coupled = next((a for a in in_axes if isinstance(a, Coupled)), None)
            if coupled is not None:
                out_axes = [coupled] * len(op.outs)
            elif all(a is None for a in in_axes):
                out_axes = [None] * len(op.outs)
            else:
                out_axes = _rule(program, op, in_axes, batch_size, iotas)
        axes.update(zip(op.outs, out_axes))
        if batch_size is not None:
            _track_iota(program, op, iotas)
    return axes


# --------------------------------------------------------------------------- rules
def _mixes(op: Op, what: str) -> Coupled:
    return Coupled(f"`{op.name}` {what} (at {where(op)})")


def _rule(program: Program, op: Op, in_axes: list, batch: int, iotas: dict) -> list:
    name = op.name
    n_out = len(op.outs)
    shapes = [program.shape(a) for a in op.ins]
    out_shapes = [program.shape(o) for o in op.outs]
    params = op.params
    ex = [a for a in in_axes if isinstance(a, Ex)]

    if name in ELEMENTWISE or name == "split" or name in CUMULATIVE or name == "sort":
        if name in ("optimization_barrier", "device_put"):  # identity on each operand
            return list(in_axes)
        if len({(a.dim, a.inner) for a in ex}) != 1:
            return [_mixes(op, "combines operands whose example axes differ")] * n_out
        axis = ex[0]
        if name == "split" and params["axis"] == axis.dim:
            return [_mixes(op, "splits along the example axis")] * n_out
        if name in CUMULATIVE and params["axis"] == axis.dim:
            return [_mixes(op, "accumulates along the example axis")] * n_out
        if name == "sort" and params["dimension"] == axis.dim:
            return [_mixes(op, "sorts along the example axis")] * n_out
        return [axis] * n_out
    if name in REDUCTIONS:
        (axis,) = ex
        reduced = tuple(params["axes"])
        if axis.dim in reduced:
            return [_mixes(op, f"reduces over the example axis (axis {axis.dim})")] * n_out
        return [Ex(axis.dim - sum(r < axis.dim for r in reduced), axis.inner)] * n_out
    if name == "broadcast_in_dim":
        axis = in_axes[0]
        return [Ex(params["broadcast_dimensions"][axis.dim], axis.inner)]
    if name == "transpose":
        axis = in_axes[0]
        return [Ex(list(params["permutation"]).index(axis.dim), axis.inner)]
    if name == "squeeze":
        axis = in_axes[0]
        dims = [d % len(shapes[0]) for d in params["dimensions"]]
        if axis.dim in dims:
            return [_mixes(op, "squeezes the example axis")]
        return [Ex(axis.dim - sum(d < axis.dim for d in dims), axis.inner)]
    if name == "reshape":
        if params.get("dimensions") is not None or in_axes[0] is None:
            return [_mixes(op, "reshapes a batch-dependent shape operand")]
        moved = reshape_axis(shapes[0], out_shapes[0], in_axes[0], batch)
        return [moved if moved is not None else _mixes(op, "splits the example axis")]
    if name == "concatenate":
        if len({(a.dim, a.inner) for a in ex}) != 1 or ex[0].dim == params["dimension"]:
            return [_mixes(op, "concatenates along the example axis")]
        return [ex[0]]
    if name == "pad":
        axis = in_axes[0]
        if not isinstance(axis, Ex) or tuple(params["padding_config"][axis.dim]) != (0, 0, 0):
            return [_mixes(op, "pads along the example axis")]
        return [axis]
    if name == "rev":
        axis = in_axes[0]
        if axis.dim in params["dimensions"]:
            return [_mixes(op, "reverses the example order")]
        return [axis]
    if name == "slice":
        axis = in_axes[0]
        d = axis.dim
        strides = params["strides"] or (1,) * len(shapes[0])
        if (params["start_indices"][d], params["limit_indices"][d], strides[d]) != (
            0,
            shapes[0][d],
            1,
        ):
            return [_mixes(op, "slices along the example axis")]
        return [axis]
    if name == "dynamic_slice":
        axis = in_axes[0]
        if not isinstance(axis, Ex) or any(a is not None for a in in_axes[1:]):
            return [_mixes(op, "slices at batch-dependent offsets")]
        if params["slice_sizes"][axis.dim] != shapes[0][axis.dim]:
            return [_mixes(op, "slices along the example axis")]
        return [axis]
    if name == "dynamic_update_slice":
        operand, update = in_axes[0], in_axes[1]
        if any(a is not None for a in in_axes[2:]):
            return [_mixes(op, "updates at batch-dependent offsets")]
        axis = operand if isinstance(operand, Ex) else update
        if (operand is not None and operand != axis) or (update is not None and update != axis):
            return [_mixes(op, "combines operands whose example axes differ")]
        if shapes[1][axis.dim] != shapes[0][axis.dim]:
            return [_mixes(op, "updates part of the example axis")]
        return [axis]
    if name in ("reduce_window_sum", "reduce_window_max", "reduce_window_min", "reduce_window"):
        if len({(a.dim, a.inner) for a in ex}) != 1:
            return [_mixes(op, "combines operands whose example axes differ")] * n_out
        d = ex[0].dim
        trivial = (
            params["window_dimensions"][d] == 1
            and params["window_strides"][d] == 1
            and tuple(params["padding"][d]) == (0, 0)
            and params.get("base_dilation", (1,) * len(shapes[0]))[d] == 1
            and params.get("window_dilation", (1,) * len(shapes[0]))[d] == 1
        )
        return [ex[0] if trivial else _mixes(op, "pools over the example axis")] * n_out
    if name == "dot_general":
        return [_dot_general(op, in_axes, shapes)]
    if name == "conv_general_dilated":
        lhs, rhs = in_axes
        spec = params["dimension_numbers"]
        if rhs is not None:
            return [_mixes(op, "convolves with a batch-dependent kernel")]
        if lhs.dim != spec.lhs_spec[0] or params["batch_group_count"] != 1:
            return [_mixes(op, "convolves over the example axis")]
        return [Ex(spec.out_spec[0], lhs.inner)]
    if name == "gather":
        return [_gather(op, in_axes, shapes, out_shapes[0], iotas)]
    if name.startswith("scatter"):
        return [_scatter(op, in_axes, shapes)]
    if name in CUSTOM_CALLS:
        body = op.params.get("call_jaxpr", op.params.get("fun_jaxpr"))
        if body is None:
            return [_mixes(op, "is an unsupported custom call")] * n_out
        inner = flatten(body)
        inner_axes = propagate(inner, in_axes, batch)
        outs = [None if isinstance(o, Lit) else inner_axes[o] for o in inner.outputs]
        return [o if o is not None else _mixes(op, "drops the example axis") for o in outs]
    return [_mixes(op, "is not supported on batch-dependent values")] * n_out


def reshape_axis(in_shape, out_shape, axis: Ex, batch: int) -> Ex | None:
    """Where a reshape puts the example digit, or None if it is split across axes."""
    stride = axis.inner * math.prod(in_shape[axis.dim + 1 :])
    span = stride * batch
    out_stride = 1
    for o in range(len(out_shape) - 1, -1, -1):
        size = out_shape[o]
        lo, hi = out_stride, out_stride * size
        if (size > 1 or batch == 1) and lo <= stride and span <= hi and stride % lo == 0:
            if hi % span == 0:
                return Ex(o, stride // lo)
        out_stride = hi
    return None


def _dot_general(op: Op, in_axes: list, shapes: list) -> Any:
    (lc, rc), (lb, rb) = op.params["dimension_numbers"]
    lfree = [i for i in range(len(shapes[0])) if i not in lc and i not in lb]
    rfree = [i for i in range(len(shapes[1])) if i not in rc and i not in rb]
    placed = []
    for side, (axis, contract, batch_dims, free) in enumerate(
        ((in_axes[0], lc, lb, lfree), (in_axes[1], rc, rb, rfree))
    ):
        if axis is None:
            continue
        if axis.dim in contract:
            return _mixes(op, "contracts over the example axis")
        if axis.dim in batch_dims:
            placed.append(("batch", list(batch_dims).index(axis.dim), axis.inner))
        else:
            offset = len(lb) + (0 if side == 0 else len(lfree))
            placed.append(("free", offset + free.index(axis.dim), axis.inner))
    if len(placed) == 2:
        if placed[0][0] != "batch" or placed[0] != placed[1]:
            return _mixes(op, "multiplies values of different examples")
    kind, position, inner = placed[0]
    return Ex(position, inner)


def _gather(op: Op, in_axes: list, shapes: list, out_shape, iotas: dict) -> Any:
    dn = op.params["dimension_numbers"]
    operand, indices = in_axes
    offset_dims = tuple(dn.offset_dims)
    batch_positions = [i for i in range(len(out_shape)) if i not in offset_dims]
    window = [
        i
        for i in range(len(shapes[0]))
        if i not in dn.collapsed_slice_dims and i not in dn.operand_batching_dims
    ]
    if isinstance(operand, Ex) and indices is None:
        d = operand.dim
        if d in dn.start_index_map or d not in window:
            return _mixes(op, "selects examples by index")
        if op.params["slice_sizes"][d] != shapes[0][d]:
            return _mixes(op, "slices along the example axis")
        return Ex(offset_dims[window.index(d)], operand.inner)
    if operand is None and isinstance(indices, Ex):
        if indices.dim == len(shapes[1]) - 1:
            return _mixes(op, "indexes with example-dependent index vectors")
        return Ex(batch_positions[indices.dim], indices.inner)
    d, di = operand.dim, indices.dim
    if di == len(shapes[1]) - 1:
        return _mixes(op, "indexes with example-dependent index vectors")
    out = Ex(batch_positions[di], indices.inner)
    if d in dn.operand_batching_dims:
        j = list(dn.operand_batching_dims).index(d)
        if dn.start_indices_batching_dims[j] == di and operand.inner == indices.inner:
            return out
    elif d in dn.start_index_map and d in dn.collapsed_slice_dims:
        j = list(dn.start_index_map).index(d)
        components = index_components(op.ins[1], shapes[1], iotas)
        if (
            components[j] == di
            and operand.inner == indices.inner == 1
            and shapes[0][d] == shapes[1][di]
        ):
            return out  # logits[arange(B), labels]: example b reads its own row
    return _mixes(op, "selects examples by index")


def _scatter(op: Op, in_axes: list, shapes: list) -> Any:
    dn = op.params["dimension_numbers"]
    operand, indices, updates = in_axes[0], in_axes[1], in_axes[2]
    window = [
        i
        for i in range(len(shapes[0]))
        if i not in dn.inserted_window_dims and i not in dn.operand_batching_dims
    ]
    if indices is None:
        d = operand.dim if isinstance(operand, Ex) else None
        if d is None:  # only the updates depend on the batch
            u = updates.dim
            if u not in dn.update_window_dims:
                return _mixes(op, "scatters examples to other positions")
            d = window[list(dn.update_window_dims).index(u)]
            if shapes[2][u] != shapes[0][d]:
                return _mixes(op, "scatters part of the example axis")
            return Ex(d, updates.inner)
        if d in dn.scatter_dims_to_operand_dims or d not in window:
            return _mixes(op, "scatters across examples")
        u = dn.update_window_dims[window.index(d)]
        if shapes[2][u] != shapes[0][d] or (
            updates is not None and updates != Ex(u, operand.inner)
        ):
            return _mixes(op, "scatters across examples")
        return operand
    if isinstance(operand, Ex) and operand.dim in dn.operand_batching_dims:
        j = list(dn.operand_batching_dims).index(operand.dim)
        di = dn.scatter_indices_batching_dims[j]
        scatter_dims = [i for i in range(len(shapes[2])) if i not in dn.update_window_dims]
        if indices == Ex(di, operand.inner) and (
            updates is None or updates == Ex(scatter_dims[di], operand.inner)
        ):
            return operand
    return _mixes(op, "scatters to example-dependent positions")


# --------------------------------------------------------------------------- arange tracking
@dataclasses.dataclass(frozen=True)
class IotaInfo:
    """``axis``: the value equals the index along this axis; ``never_true``: all False;
    ``components``: per entry of the last axis, the axis it is an arange along (or None)."""

    axis: int | None = None
    never_true: bool = False
    components: tuple | None = None


def index_components(atom, shape, iotas: dict) -> tuple:
    """Per entry of the index vector (last axis), the axis along which it is an arange."""
    info = None if isinstance(atom, Lit) else iotas.get(atom)
    n = shape[-1] if shape else 0
    if info is not None and info.components is not None:
        return info.components
    if info is not None and info.axis is not None and n == 1 and info.axis != len(shape) - 1:
        return (info.axis,)
    return (None,) * n


def _track_iota(program: Program, op: Op, iotas: dict) -> None:
    name = op.name
    if len(op.outs) != 1:
        return
    out = op.outs[0]
    info = [None if isinstance(a, Lit) else iotas.get(a) for a in op.ins]
    if name == "iota":
        iotas[out] = IotaInfo(axis=op.params["dimension"])
    elif name in ("convert_element_type", "copy", "copy_p") and info and info[0]:
        if jnp.issubdtype(program.dtype(out), jnp.integer):
            iotas[out] = info[0]
    elif name == "broadcast_in_dim" and info[0] and info[0].axis is not None:
        in_shape, out_shape = program.shape(op.ins[0]), program.shape(out)
        a = info[0].axis
        b = op.params["broadcast_dimensions"][a]
        if in_shape[a] == out_shape[b]:
            iotas[out] = IotaInfo(axis=b)
    elif name == "reshape" and info[0] and info[0].axis is not None:
        in_shape, out_shape = program.shape(op.ins[0]), program.shape(out)
        moved = reshape_axis(in_shape, out_shape, Ex(info[0].axis), in_shape[info[0].axis])
        if moved is not None and moved.inner == 1:
            iotas[out] = IotaInfo(axis=moved.dim)
    elif name == "lt" and info[0] and info[0].axis is not None and _is_zero(op.ins[1], program):
        iotas[out] = IotaInfo(never_true=True)  # arange < 0
    elif name == "select_n" and info[0] and info[0].never_true and len(op.ins) == 3:
        if info[1] is not None:
            iotas[out] = info[1]  # select_n(False, a, b) = a
    elif name == "concatenate":
        last = len(program.shape(out)) - 1
        if op.params["dimension"] != last:
            return
        components: list = []
        for atom in op.ins:
            components.extend(index_components(atom, program.shape(atom), iotas))
        iotas[out] = IotaInfo(components=tuple(components))


def _is_zero(atom, program: Program) -> bool:
    """Whether ``atom`` is a concrete scalar zero (a literal or a constant, not a tracer)."""
    value = atom.value if isinstance(atom, Lit) else program.consts.get(atom)
    if value is None or isinstance(value, jax.core.Tracer) or jnp.ndim(value) != 0:
        return False
    return bool(np.asarray(value) == 0)

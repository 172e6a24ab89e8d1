"""The encoder/heads split: per-task gradients only where the tasks share parameters.

Most multi-task models are a shared encoder ``z = encode(params, batch)`` followed by task
heads. Only the encoder's parameters need one gradient per task; the heads' gradients are
those of the summed loss. The user writes two functions:

* ``encode(params, batch) -> z`` (any pytree of features);
* ``heads(params, features, batch) -> (K,)`` task losses, where ``features`` is ``z`` with
  a leading task axis of size K on every leaf and **the loss of task i reads only
  ``features[i]``** (a list of heads reads ``features[i]`` in head i; stacked heads use
  ``jnp.einsum("kbd,kdc->kbc", features, w)`` instead of ``"bd,kdc->kbc"``). All K copies
  hold the same values, so the losses are those of the model; the copies only keep the
  tasks apart in the backward pass.

One backward pass of ``Σ_i L_i`` through the heads then gives, at once, the head gradients
and every feature gradient ``∂L_i/∂z`` (the cotangent of copy i): no K passes through the
heads at any K. From there:

* :func:`split_value_and_jacobian` (tier 3, exact): the per-task encoder gradients, one
  encoder backward pass per feature cotangent (``strategy`` as in
  :func:`mtl_optax.value_and_jacobian`), returned as :class:`mtl_optax.TaskGradients`
  whose encoder leaves are stacked ``(K, *shape)`` and whose head leaves are already summed
  over the tasks, so :func:`mtl_optax.aggregate` needs no ``shared`` mask;
* :func:`split_value_and_grad` (tiers 1 and 2, and tier 3 with bounded memory): the
  weights from the losses, the Gram of the feature gradients (``gram="features"``,
  MGDA-UB of Sener & Koltun, 2018) or the exact Gram of the encoder gradients computed
  column by column without holding the K × parameters Jacobian (``gram="parameters"``),
  then one backward pass of ``Σ_i w_i L_i``.

Which leaves belong to the encoder is read from the computation itself: a leaf is an
encoder leaf when ``encode`` reads it (its jaxpr uses it), every other leaf is a head leaf.
A leaf read by both (tied weights) is rejected with a pointer to
:func:`mtl_optax.value_and_jacobian`, which handles any model.

Checked in ``tests/test_split.py``: encoder gradients equal ``jax.jacrev`` of each task
loss, head gradients equal the summed-loss gradient, the split's aggregate equals
``aggregate`` on the full Jacobian with a hand-written mask, the feature Gram equals the
Gram of ``jax.jacrev`` of the losses with respect to ``z``, and the bounded-memory Gram,
weights and update equal the default tier 3 for every Gram weighting in ``tests/zoo.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.extend.core import Literal

from mtl_optax.gram import HIGHEST, apply_weighting, power_of_two_exponent, weights_from_gradients
from mtl_optax.jacobian import TaskGradients, check_strategy, map_over_tasks
from mtl_optax.weighted import WeightedGrads
from mtl_optax.weighting.base import Weighting, check_num_tasks

GRAMS = ("features", "parameters")


def reads_leaves(fn: Callable, leaves: Sequence[Any], treedef) -> list[bool]:
    """For each leaf, whether ``fn(tree)`` reads it (the leaf's variable is used in the jaxpr).

    Traces ``fn`` once more (trace time only, nothing runs). An input used only in code
    whose result is discarded still counts as read.
    """
    closed = jax.make_jaxpr(lambda xs: fn(jax.tree_util.tree_unflatten(treedef, xs)))(list(leaves))
    used = set()
    for eqn in closed.jaxpr.eqns:
        used.update(v for v in eqn.invars if not isinstance(v, Literal))
    used.update(v for v in closed.jaxpr.outvars if not isinstance(v, Literal))
    return [v in used for v in closed.jaxpr.invars]


class SplitForward(NamedTuple):
    """One forward pass through the split, with what the backward passes need."""

    losses: jax.Array  # (K,)
    carry: Any  # what the heads returned beside the losses (flax: the updated non-params)
    encoder_mask: list[bool]  # per leaf of params: read by the encoder
    encoder_vjp: Callable  # z-cotangent -> [encoder-leaf gradients]
    encoder_jvp: Callable  # [encoder-leaf tangents] -> z-tangent
    heads_vjp: Callable  # (K,) loss cotangent -> ([head-leaf gradients], feature cotangents)
    join: Callable  # (encoder leaves, head leaves) -> pytree like params


def split_forward(
    encode: Callable, heads: Callable, params: Any, batch: Any, num_tasks: int
) -> SplitForward:
    """Run the split once. Here ``encode(params, batch) -> (z, carry)`` and
    ``heads(params, features, batch, carry) -> (losses, carry)`` (the public functions wrap
    the plain forms; the carry threads state such as flax RNG counts from the encoder to the
    heads, in the order of the model's own forward pass)."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    if not leaves:
        raise ValueError("`params` has no array leaves to differentiate.")
    encoder_mask = reads_leaves(lambda p: encode(p, batch)[0], leaves, treedef)
    if not any(encoder_mask):
        raise ValueError(
            "`encode` reads none of the params leaves, so there is no shared encoder: use "
            "weighted_value_and_grad or value_and_jacobian for this model."
        )
    encoder_leaves = [x for x, m in zip(leaves, encoder_mask) if m]
    head_leaves = [x for x, m in zip(leaves, encoder_mask) if not m]

    def join(enc, head):
        enc, head = iter(enc), iter(head)
        return jax.tree_util.tree_unflatten(
            treedef, [next(enc) if m else next(head) for m in encoder_mask]
        )

    z, encoder_jvp, carry = jax.linearize(
        lambda enc: encode(join(enc, head_leaves), batch), encoder_leaves, has_aux=True
    )
    encoder_transpose = jax.linear_transpose(encoder_jvp, encoder_leaves)

    def encoder_vjp(z_cotangent):
        return encoder_transpose(z_cotangent)[0]

    features = jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a, (num_tasks, *a.shape)), z)
    tied = [
        i
        for i, (m, r) in enumerate(
            zip(
                encoder_mask,
                reads_leaves(lambda p: heads(p, features, batch, carry)[0], leaves, treedef),
            )
        )
        if m and r
    ]
    if tied:
        names = [
            jax.tree_util.keystr(path)
            for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]
        ]
        raise ValueError(
            f"Leaves {', '.join(names[i] for i in tied)} are read by both `encode` and "
            "`heads` (tied weights): their per-task gradients do not all pass through the "
            "features. Use value_and_jacobian(task_losses) with an explicit `shared` mask "
            "for this model."
        )
    losses, heads_vjp, carry = jax.vjp(
        lambda head, f: heads(join(encoder_leaves, head), f, batch, carry),
        head_leaves,
        features,
        has_aux=True,
    )
    if jnp.shape(losses) != (num_tasks,):
        raise ValueError(
            f"`heads` must return the {num_tasks} task losses as shape ({num_tasks},) "
            f"(num_tasks={num_tasks}), got shape {jnp.shape(losses)}."
        )
    return SplitForward(losses, carry, encoder_mask, encoder_vjp, encoder_jvp, heads_vjp, join)


def _plain_encode(encode: Callable) -> Callable:
    return lambda params, batch: (encode(params, batch), None)


def _plain_heads(heads: Callable) -> Callable:
    return lambda params, features, batch, carry: (heads(params, features, batch), carry)


def split_jacobian(
    forward: SplitForward, strategy: str = "auto", chunk_size: int | None = None
) -> TaskGradients:
    """Per-task encoder gradients (stacked) and summed head gradients from one forward."""
    head_grads, feature_grads = forward.heads_vjp(jnp.ones_like(forward.losses))
    encoder_grads = map_over_tasks(forward.encoder_vjp, feature_grads, strategy, chunk_size)
    return TaskGradients(forward.join(encoder_grads, head_grads), stacked=forward.encoder_mask)


def split_value_and_jacobian(
    encode: Callable,
    heads: Callable,
    *,
    num_tasks: int,
    strategy: str = "auto",
    chunk_size: int | None = None,
) -> Callable[[Any, Any], tuple[jax.Array, TaskGradients]]:
    """Build ``f(params, batch) -> (losses, task_grads)`` for a shared-encoder model (tier 3).

    Args:
      encode: ``encode(params, batch) -> z``.
      heads: ``heads(params, features, batch) -> (K,)``; ``features`` is ``z`` with a
        leading task axis and task i must read only ``features[i]`` (module docstring).
      num_tasks: K.
      strategy, chunk_size: how the K encoder backward passes run (as in
        :func:`mtl_optax.value_and_jacobian`; ``"auto"``: one after another on CPU,
        batched on accelerators).

    Returns ``task_grads``: a :class:`mtl_optax.TaskGradients` shaped like ``params`` whose
    encoder leaves are ``(K, *shape)`` and whose head leaves are the summed-loss gradient;
    feed it to ``aggregate(weighting, num_tasks=K)`` with no ``shared`` mask.

    Example::

        jac = mtl.split_value_and_jacobian(encode, heads, num_tasks=K)
        opt = optax.chain(mtl.aggregate(mtl.mgda(), num_tasks=K), optax.adam(1e-3))
        losses, task_grads = jac(params, batch)
        updates, opt_state = opt.update(task_grads, opt_state, params, task_losses=losses)
    """
    check_num_tasks(num_tasks)
    check_strategy(strategy, chunk_size)
    enc, hds = _plain_encode(encode), _plain_heads(heads)

    def fn(params, batch):
        forward = split_forward(enc, hds, params, batch, num_tasks)
        return forward.losses, split_jacobian(forward, strategy, chunk_size)

    return fn


def parameter_gram(
    forward: SplitForward,
    feature_grads: Any,
    *,
    diagonal_only: bool,
    chunk_size: int | None,
    exponent: jax.Array | int = 0,
) -> jax.Array:
    """Gram of the per-task encoder gradients without holding them (no K × params Jacobian).

    Column j: ``g_j = J_encᵀ ∂L_j/∂z`` (one encoder backward pass), then
    ``G_ij = ⟨∂L_i/∂z, J_enc g_j⟩`` (one forward-mode pass through the encoder), which
    equals ``⟨g_i, g_j⟩``. ``diagonal_only`` stops after the backward pass (``‖g_j‖²``).
    ``chunk_size`` columns are computed at a time (``None``: one). With ``exponent`` e the
    result is ``4^-e G``: each cotangent and each tangent is scaled by ``2^-e`` (exact),
    so the Gram of huge or tiny gradients neither overflows nor underflows, and no scaled
    copy of the K feature gradients is made. Memory: the K feature gradients (K × the
    features) plus ``chunk_size`` gradients.
    """
    leaves = jax.tree_util.tree_leaves(feature_grads)
    k = leaves[0].shape[0]
    dtype = jnp.promote_types(jnp.result_type(*leaves), jnp.float32)

    def column(cotangent):
        grads = forward.encoder_vjp(
            jax.tree_util.tree_map(lambda a: jnp.ldexp(a, -exponent), cotangent)
        )
        if diagonal_only:
            return sum(jnp.sum(jnp.square(g.astype(dtype))) for g in grads)
        tangent = jax.tree_util.tree_leaves(forward.encoder_jvp(grads))
        return sum(
            jnp.matmul(
                f.reshape(k, -1),
                jnp.ldexp(t.reshape(-1), -exponent).astype(f.dtype),
                precision=HIGHEST,
                preferred_element_type=dtype,
            )
            for f, t in zip(leaves, tangent)
        )

    columns = jax.lax.map(column, feature_grads, batch_size=chunk_size)
    if diagonal_only:
        return jnp.diag(columns)
    return 0.5 * (columns + columns.T)  # exact in exact arithmetic; removes rounding asymmetry


def split_value_and_grad(
    encode: Callable,
    heads: Callable,
    weighting: Weighting,
    *,
    num_tasks: int,
    gram: str = "features",
    chunk_size: int | None = None,
) -> Callable[..., WeightedGrads]:
    """Build ``f(params, batch, weighting_state, **extra) -> WeightedGrads`` (one backward).

    The weights come from the losses (a weighting with ``needs_gram=False``: tier 1), or
    from a Gram matrix chosen by ``gram``:

    * ``"features"`` (default, tier 2): ``G_ij = ⟨∂L_i/∂z, ∂L_j/∂z⟩``, all feature
      gradients from one backward pass through the heads: about one training step at any K.
      It approximates the parameter Gram (exact when the encoder Jacobian is orthogonal).
    * ``"parameters"`` (tier 3 with bounded memory): the exact Gram of the per-task encoder
      gradients, by :func:`parameter_gram` (K encoder backward + K forward-mode passes,
      ``chunk_size`` at a time), never holding more than ``chunk_size`` gradients: the same
      weights and update as :func:`split_value_and_jacobian` + :func:`mtl_optax.aggregate`
      for every weighting, in O(parameters) memory at any K.

    Then one backward pass: the encoder gets ``∇(Σ_i w_i L_i)`` (weights
    ``stop_gradient``-ed). The heads get the same with a losses-only weighting (tier 1: the
    gradient of the weighted loss); with a Gram weighting, which only sets the direction of
    the shared parameters, each head follows its own task's gradient (the summed-loss
    gradient), as in :func:`mtl_optax.aggregate` and MGDA-UB. Homogeneous
    weightings see the Gram of the feature gradients rescaled by a power of two (exact), so
    loss scales far outside float32's square range do not overflow the Gram.

    Args:
      encode, heads: the split (module docstring).
      weighting: any :class:`mtl_optax.Weighting`.
      num_tasks: K.
      gram: ``"features"`` or ``"parameters"`` (ignored by weightings without a Gram).
      chunk_size: Gram columns per batch for ``gram="parameters"`` (``None``: one by one).

    ``extra`` keyword arguments go to the weighting (unknown ones are ignored).

    Example::

        step = mtl.split_value_and_grad(encode, heads, mtl.mgda(), num_tasks=K)
        out = step(params, batch, weighting_state)
        updates, opt_state = adam.update(out.grads, opt_state, params)
    """
    check_num_tasks(num_tasks)
    check_weighting(weighting)
    check_gram_mode(gram, chunk_size)
    enc, hds = _plain_encode(encode), _plain_heads(heads)

    def fn(params, batch, weighting_state, **extra) -> WeightedGrads:
        check_weighting_state(weighting_state, weighting, num_tasks)
        forward = split_forward(enc, hds, params, batch, num_tasks)
        weights, weighting_state, backward = split_weights(
            forward, weighting, weighting_state, gram, chunk_size, **extra
        )
        grads = weighted_grads(forward, weights, backward)
        return WeightedGrads(forward.losses, grads, weighting_state, weights)

    return fn


def check_gram_mode(gram: Any, chunk_size: Any) -> None:
    """Validate ``gram`` and its ``chunk_size`` (construction time)."""
    if gram not in GRAMS:
        raise ValueError(f"`gram` must be one of {GRAMS}, got {gram!r}.")
    if chunk_size is not None and (
        not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1
    ):
        raise ValueError(f"`chunk_size` must be a positive int or None, got {chunk_size!r}.")


def split_weights(forward, weighting, weighting_state, gram, chunk_size, **extra):
    """``(weights, state, feature_grads)`` of ``weighting`` for one forward pass of the split.

    ``feature_grads`` (pair ``(head_grads, ∂L_i/∂z stacked)`` from one backward pass of the
    summed loss through the heads) for a Gram weighting, ``None`` for a losses-only one.
    """
    losses = forward.losses
    if not weighting.needs_gram:
        return (*weighting.update(None, losses, weighting_state, **extra), None)
    backward = forward.heads_vjp(jnp.ones_like(losses))
    feature_grads = backward[1]
    if gram == "features":
        weights, state = weights_from_gradients(
            weighting, feature_grads, losses, weighting_state, **extra
        )
        return weights, state, backward
    # J is linear: scaling the feature cotangents by 2^-e scales every g_i by 2^-e exactly.
    exponent = 0 if weighting.homogeneity is None else power_of_two_exponent(feature_grads)
    g = parameter_gram(
        forward,
        feature_grads,
        diagonal_only=weighting.needs_gram == "diagonal",
        chunk_size=chunk_size,
        exponent=exponent,
    )
    weights, state = apply_weighting(
        weighting, g, losses, weighting_state, log2_scale=2 * exponent, **extra
    )
    return weights, state, backward


def weighted_grads(forward: SplitForward, weights: jax.Array, backward=None) -> Any:
    """One update from the weights.

    Without ``backward`` (losses-only weighting): ``∇(Σ_i w_i L_i)``, one backward pass
    through the heads and one through the encoder. With ``backward = (head_grads,
    feature_grads)`` from :func:`split_weights` (Gram weighting): the encoder gets
    ``∇_enc(Σ_i w_i L_i)`` from the cotangent ``Σ_i w_i ∂L_i/∂z`` (one encoder backward
    pass, no second pass through the heads) and each head its own task gradient.
    """
    if backward is None:
        heads, feature_cotangents = forward.heads_vjp(weights.astype(forward.losses.dtype))
        z_cotangent = jax.tree_util.tree_map(lambda a: jnp.sum(a, axis=0), feature_cotangents)
    else:
        heads, feature_grads = backward
        z_cotangent = jax.tree_util.tree_map(
            lambda a: jnp.tensordot(weights.astype(a.dtype), a, axes=1, precision=HIGHEST),
            feature_grads,
        )
    return forward.join(forward.encoder_vjp(z_cotangent), heads)


def check_weighting(weighting: Any, name: str = "weighting") -> None:
    """``weighting`` must be a :class:`mtl_optax.Weighting` (not an optax transform)."""
    if isinstance(weighting, Weighting):
        return
    hint = ""
    if hasattr(weighting, "init") and hasattr(weighting, "update"):
        hint = (
            " It looks like an optax GradientTransformation: optimizers go AFTER the "
            "aggregation, e.g. optax.chain(mtl.aggregate(mtl.mgda(), num_tasks=K), "
            "optax.adam(1e-3))."
        )
    raise TypeError(
        f"`{name}` must be an mtl_optax Weighting such as mtl.mgda() or mtl.mean_weighting(), "
        f"got {type(weighting).__name__}.{hint}"
    )


def check_weighting_state(state: Any, weighting: Weighting, num_tasks: int) -> None:
    """A ``None`` (or missing) weighting state gets an error saying how to make one."""
    if state is None:
        raise ValueError(
            "`weighting_state` is None: create it once with "
            f"`weighting.init({num_tasks})` and pass the returned state of each step to "
            "the next."
        )
    expected = jax.tree_util.tree_structure(weighting.init(num_tasks))
    if jax.tree_util.tree_structure(state) != expected:
        raise ValueError(
            f"`weighting_state` has structure {jax.tree_util.tree_structure(state)}, but this "
            f"weighting's state is {expected} (from weighting.init({num_tasks})); pass the "
            "state returned by the previous step (restore checkpoints with a target)."
        )

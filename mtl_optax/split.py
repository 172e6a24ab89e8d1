"""The encoder/heads split: per-task gradients only where the tasks share parameters.

Most multi-task models are a shared encoder ``z = encoder(params, batch)`` followed by task
heads. Only the encoder's parameters need one gradient per task; each head only serves its
own task. The user gives:

* ``encoder(params, batch) -> z`` (any pytree of features);
* ``heads``: a sequence or a dict (task names) of per-task losses
  ``head_i(params, z, batch) -> scalar``, or ``mtl.stacked_heads(head, head_params=...)``
  (one vmapped head, parameters stacked on a task axis) — see :mod:`mtl_optax.heads`. The
  library gives head ``i`` its own copy of ``z``, so no head can read another task's features.

One backward pass through the heads gives, at once, the head gradients and every feature
gradient ``∂L_i/∂z``: no K passes through the heads at any K. From there:

* :func:`split_value_and_jacobian` (tier 3, exact): the per-task encoder gradients, one
  encoder backward pass per feature gradient (``strategy`` as in
  :func:`mtl_optax.value_and_jacobian`), returned as :class:`mtl_optax.TaskGradients` that
  know which leaves are shared and which head belongs to which task, for
  :func:`mtl_optax.aggregate` (no ``shared`` mask);
* :func:`split_value_and_grad` (tiers 1 and 2, and tier 3 with bounded memory): the weights
  from the losses, the Gram of the feature gradients (``gram="features"``, MGDA-UB of Sener &
  Koltun, 2018) or the exact Gram of the encoder gradients computed column by column without
  holding the K × parameters Jacobian (``gram="parameters"``), then one backward pass.

Both follow :func:`mtl_optax.aggregate`'s head rule: head ``i`` gets ``w_i ∇L_i`` from a
scalarization and ``∇L_i`` from a Gram weighting.

Which leaves belong to the encoder is read from the computation itself: a leaf is an
encoder leaf when ``encoder`` reads it (its jaxpr uses it); a head leaf belongs to the heads
that read it. A leaf read by both the encoder and a head (tied weights) is rejected with a
pointer to :func:`mtl_optax.value_and_jacobian`, which handles any model.

Checked in ``tests/test_split.py``: encoder gradients equal ``jax.jacrev`` of each task loss,
head gradients follow the head rule, the split's aggregate equals ``aggregate`` on the full
Jacobian with a hand-written mask, the feature Gram equals the Gram of ``jax.jacrev`` of the
losses with respect to ``z``, and the bounded-memory Gram, weights and update equal the
default tier 3 for every Gram weighting in ``tests/zoo.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from mtl_optax.feature_gram import factored_combine, factored_gram
from mtl_optax.gram import (
    HIGHEST,
    apply_weighting,
    linear_gram,
    power_of_two_exponent,
    weights_from_gradients,
)
from mtl_optax.heads import (
    HeadsForward,
    HeadsSpec,
    reads_leaves,
    resolve_heads,
    run_sequence,
    run_stacked,
    selected_positions,
    stacked_num_tasks,
)
from mtl_optax.task_gradients import (
    SHARED,
    TaskGradients,
    check_float_params,
    check_strategy,
    map_over_tasks,
)
from mtl_optax.weighted import WeightedGradFunction, check_weighting_method
from mtl_optax.weighting.base import scales_heads

GRAMS = ("features", "parameters")


class PureSplit(NamedTuple):
    """The split as pure functions of a params pytree (flax models are wrapped into this).

    ``encode(params, batch) -> (z, carry)``; ``head(i, params, z, batch, carry) -> (L_i,
    carry)`` for the sequence form; for the stacked form ``select(params)`` and
    ``stacked(params, batch, carry, per_task) -> (outputs, carry)``, which vmaps
    ``per_task(loss_of, hp_i, i)`` over the tasks (``loss_of(hp_i, z) -> L_i``, see
    :func:`mtl_optax.heads.run_stacked`). The carry threads state such as
    flax RNG counts from the encoder through the heads, in the order of one forward pass.
    """

    spec: HeadsSpec
    encode: Callable
    head: Callable | None
    stacked: Callable | None
    select: Callable | None


def plain_split(encoder: Callable, heads: Any) -> PureSplit:
    """The user's functions of a params pytree as a :class:`PureSplit`."""
    if not callable(encoder):
        raise TypeError(f"`encoder` must be callable, got {type(encoder).__name__}.")
    spec = resolve_heads(heads)
    if spec.stacked is None:
        return PureSplit(
            spec,
            lambda p, b: (encoder(p, b), None),
            lambda i, p, z, b, carry: (spec.fns[i](p, z, b), carry),
            None,
            None,
        )
    head, select = spec.stacked

    def stacked(params, batch, carry, per_task):
        head_params = select(params)
        k = stacked_num_tasks(jax.tree_util.tree_leaves(head_params))
        out = jax.vmap(lambda hp, i: per_task(lambda hp_i, z: head(hp_i, z, batch, i), hp, i))(
            head_params, jnp.arange(k)
        )
        return out, carry

    return PureSplit(spec, lambda p, b: (encoder(p, b), None), None, stacked, select)


class SplitForward(NamedTuple):
    """One forward pass through the split, with what the backward passes need."""

    losses: jax.Array  # (K,)
    carry: Any  # what the heads returned beside the losses (flax: the updated non-params)
    roles: list  # per leaf of params: "shared" (encoder) or the head leaf's role
    encoder_vjp: Callable  # z-cotangent -> [encoder-leaf gradients]
    encoder_jvp: Callable  # [encoder-leaf tangents] -> z-tangent
    heads: HeadsForward
    join: Callable  # (encoder leaves, head leaves) -> pytree like params
    names: tuple | None


def _leaf_names(params) -> list[str]:
    return [
        jax.tree_util.keystr(path) or "<root>"
        for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]
    ]


def split_forward(pure: PureSplit, params: Any, batch: Any) -> SplitForward:
    """Run the split once: losses, leaf roles, and the encoder and heads backward passes."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    if not leaves:
        raise ValueError("`params` has no array leaves to differentiate.")
    names = _leaf_names(params)
    check_float_params(names, leaves)

    def unflatten(xs):
        return jax.tree_util.tree_unflatten(treedef, xs)

    encoder_mask = reads_leaves(lambda xs: pure.encode(unflatten(xs), batch)[0], leaves)
    if not any(encoder_mask):
        raise ValueError(
            "`encoder` reads none of the params leaves, so there is no shared encoder: use "
            "mtl.value_and_grad or mtl.value_and_jacobian for this model."
        )
    encoder_leaves = [x for x, m in zip(leaves, encoder_mask) if m]
    head_leaves = [x for x, m in zip(leaves, encoder_mask) if not m]

    def join(enc, head):
        enc, head = iter(enc), iter(head)
        return unflatten([next(enc) if m else next(head) for m in encoder_mask])

    z, encoder_jvp, carry = jax.linearize(
        lambda enc: pure.encode(join(enc, head_leaves), batch), encoder_leaves, has_aux=True
    )
    for leaf in jax.tree_util.tree_leaves(z):
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            raise TypeError(
                f"`encoder` returned features of dtype {jnp.result_type(leaf)}; the features z "
                "must be real floating point (their gradients carry the tasks apart)."
            )
    encoder_transpose = jax.linear_transpose(encoder_jvp, encoder_leaves)

    def tied_error(leaf_ids):
        raise ValueError(
            f"Leaves {', '.join(names[i] for i in leaf_ids)} are read by both `encoder` and "
            "the heads (tied weights): their per-task gradients do not all pass through the "
            "features. Use mtl.value_and_jacobian(task_losses) with an explicit `shared` mask "
            "for this model."
        )

    spec = pure.spec
    if spec.fns is not None:
        reads = []
        for i in range(len(spec.fns)):
            r = reads_leaves(
                lambda xs, i=i: pure.head(i, unflatten(xs), z, batch, carry)[0], leaves
            )
            tied = [j for j, (m, x) in enumerate(zip(encoder_mask, r)) if m and x]
            if tied:
                tied_error(tied)
            reads.append([x for x, m in zip(r, encoder_mask) if not m])
        labels = (
            [repr(n) for n in spec.names] if spec.names else [str(i) for i in range(len(reads))]
        )
        heads = run_sequence(
            spec.fns,
            labels,
            head_leaves,
            lambda i, h, z_, c: pure.head(i, join(encoder_leaves, h), z_, batch, c),
            z,
            carry,
            reads,
        )
    else:
        chosen = selected_positions(pure.select(params), leaves, "head_params")
        tied = sorted({j for j in chosen if encoder_mask[j]})
        if tied:
            raise ValueError(
                f"stacked_heads: `head_params` selects {', '.join(names[i] for i in tied)}, "
                "which `encoder` reads: it must select only the heads' task-stacked "
                "parameters (e.g. `head_params=lambda params: params['heads']`, or "
                "`lambda model: model.heads` under mtl_optax.flax_nnx)."
            )
        # index among the head leaves of each selected leaf
        head_index = {j: n for n, j in enumerate(j for j, m in enumerate(encoder_mask) if not m)}
        positions = [head_index[j] for j in chosen]
        k = stacked_num_tasks([head_leaves[n] for n in positions])
        heads = run_stacked(
            head_leaves,
            positions,
            lambda h, c, per_task: pure.stacked(join(encoder_leaves, h), batch, c, per_task),
            z,
            k,
            carry,
        )
    head_roles = iter(heads.roles)
    roles = [SHARED if m else next(head_roles) for m in encoder_mask]
    return SplitForward(
        heads.losses,
        heads.carry,
        roles,
        lambda cot: encoder_transpose(cot)[0],
        encoder_jvp,
        heads,
        join,
        spec.names,
    )


def split_jacobian(
    forward: SplitForward, strategy: str = "auto", chunk_size: int | None = None
) -> TaskGradients:
    """Per-task encoder gradients (stacked) and the heads' own gradients from one forward."""
    head_grads, feature_grads = forward.heads.backward(
        jnp.ones_like(forward.losses), stack_shared=True
    )
    encoder_grads = map_over_tasks(forward.encoder_vjp, feature_grads, strategy, chunk_size)
    return TaskGradients(
        forward.join(encoder_grads, head_grads), roles=forward.roles, names=forward.names
    )


def split_value_and_jacobian(
    encoder: Callable,
    heads: Any,
    *,
    strategy: str = "auto",
    chunk_size: int | None = None,
) -> Callable[[Any, Any], tuple[jax.Array, TaskGradients]]:
    """Build ``f(params, batch) -> (losses, task_grads)`` for a split model (tier 3).

    Args:
      encoder: ``encoder(params, batch) -> z``.
      heads: a sequence or dict of ``head_i(params, z, batch) -> scalar``, or
        :func:`mtl_optax.stacked_heads` (module docstring). K is the number of heads.
      strategy, chunk_size: how the K encoder backward passes run (as in
        :func:`mtl_optax.value_and_jacobian`; ``"auto"``: one after another on CPU, batched
        on accelerators).

    Returns ``losses`` (K,) in the heads' order and ``task_grads``, a
    :class:`mtl_optax.TaskGradients` for ``aggregate(method, tasks=K)`` (no ``shared``
    mask): the encoder leaves stacked ``(K, *shape)``, each head leaf with its task.

    Example::

        jac = mtl.split_value_and_jacobian(encoder, {"left": head_left, "right": head_right})
        opt = optax.chain(mtl.aggregate(mtl.mgda(), tasks=["left", "right"]), optax.adam(1e-3))
        opt_state = opt.init(params)
        losses, task_grads = jac(params, batch)
        updates, opt_state = opt.update(task_grads, opt_state, params, task_losses=losses)
    """
    pure = plain_split(encoder, heads)
    check_strategy(strategy, chunk_size)

    def fn(params, batch):
        forward = split_forward(pure, params, batch)
        return forward.losses, split_jacobian(forward, strategy, chunk_size)

    return fn


def check_gram_mode(gram: Any, chunk_size: Any) -> None:
    """Validate ``gram`` and its ``chunk_size`` (construction time)."""
    if gram not in GRAMS:
        raise ValueError(f"`gram` must be one of {GRAMS}, got {gram!r}.")
    if chunk_size is not None and (
        not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1
    ):
        raise ValueError(f"`chunk_size` must be a positive int or None, got {chunk_size!r}.")
    if chunk_size is not None and gram != "parameters":
        raise ValueError(
            f"`chunk_size` sets the Gram columns per batch of gram='parameters'; with "
            f"gram={gram!r} it would be ignored. Drop it, or use gram='parameters'."
        )


def split_step(forward: SplitForward, weighting, weighting_state, gram, chunk_size, **extra):
    """``(grads, weights, weighting_state)`` of one tier-1/2 step on a split forward pass.

    A Gram weighting first runs the heads backward with cotangent 1 (the feature gradients
    ``∂L_i/∂z``, or their first-layer factors where ``mtl_optax.feature_gram`` applies, and
    the heads' own gradients); the encoder then gets ``Σ_i w_i ∂L_i/∂z`` through one encoder
    backward pass. A scalarization runs the heads backward with the
    weights themselves (head ``i`` gets ``w_i ∇L_i``, the features ``w_i ∂L_i/∂z``).
    """
    losses = forward.losses
    ones = jnp.ones_like(losses)
    unit = None  # (head grads, feature grads) of the cotangent 1
    factored = None  # (head grads, the feature gradients as factors) of the cotangent 1
    diagonal = weighting.needs_gram == "diagonal"
    if weighting.needs_gram and gram == "features" and not weighting.reads_gram_factor:
        factored = forward.heads.factored(diagonal)
    if factored is not None:
        g, exponent = factored_gram(factored[1], diagonal_only=diagonal)
        weights, state = apply_weighting(
            weighting, g, losses, weighting_state, log2_scale=2 * exponent, **extra
        )
    elif weighting.needs_gram:
        unit = forward.heads.backward(ones)
        feature_grads = unit[1]
        if gram == "features":
            weights, state = weights_from_gradients(
                weighting, feature_grads, losses, weighting_state, **extra
            )
        else:
            # J is linear: scaling the feature cotangents by 2^-e scales every g_i by 2^-e.
            exponent = 0 if weighting.homogeneity is None else power_of_two_exponent(feature_grads)
            g, _ = linear_gram(
                forward.encoder_vjp,
                forward.encoder_jvp,
                feature_grads,
                diagonal_only=diagonal,
                chunk_size=chunk_size,
                exponent=exponent,
            )
            weights, state = apply_weighting(
                weighting, g, losses, weighting_state, log2_scale=2 * exponent, **extra
            )
    else:
        weights, state = weighting.update(None, losses, weighting_state, **extra)
    if scales_heads(weighting):
        head_grads, z_cotangent = forward.heads.weighted(weights)
    elif factored is not None:
        head_grads, z_cotangent = factored[0], factored_combine(factored[1], weights)
    else:
        head_grads, feature_grads = unit if unit is not None else forward.heads.backward(ones)
        z_cotangent = jax.tree_util.tree_map(
            lambda a: jnp.tensordot(weights.astype(a.dtype), a, axes=1, precision=HIGHEST),
            feature_grads,
        )
    grads = forward.join(forward.encoder_vjp(z_cotangent), head_grads)
    return grads, weights, state


def split_value_and_grad(
    encoder: Callable,
    heads: Any,
    method,
    *,
    gram: str = "features",
    chunk_size: int | None = None,
) -> WeightedGradFunction:
    """Tiers 1 and 2 (and bounded-memory tier 3) for a split model.

    Returns ``grad_fn`` with ``grad_fn.init(params) -> state`` and
    ``grad_fn(params, batch, state, **extra) -> (losses, grads, state)``; ``grads`` is shaped
    like ``params`` and feeds any optax optimizer, ``mtl.task_weights(state)`` gives the
    weights used.

    The weights come from the losses (a weighting with ``needs_gram=False``: tier 1), or
    from a Gram matrix chosen by ``gram``:

    * ``"features"`` (default, tier 2): ``G_ij = ⟨∂L_i/∂z, ∂L_j/∂z⟩``, all feature
      gradients from one backward pass through the heads: about one training step at any K.
      Stacked heads whose first layer is a product with ``z`` (dense heads) give it from
      that layer's factors without forming the K feature gradients, where that costs less
      (``mtl_optax.feature_gram``). It approximates the parameter Gram (exact when the
      encoder Jacobian is orthogonal) and only makes sense when the tasks share input
      samples (with disjoint samples the feature gradients are orthogonal).
    * ``"parameters"`` (tier 3 with bounded memory): the exact Gram of the per-task encoder
      gradients, by ``mtl_optax.gram.linear_gram`` (K encoder backward + K forward-mode
      passes, ``chunk_size`` at a time), never holding more than ``chunk_size`` gradients: the
      same weights and update as :func:`split_value_and_jacobian` + :func:`mtl_optax.aggregate`
      for every weighting, in O(parameters) memory at any K.

    Then the encoder gets ``∇(Σ_i w_i L_i)`` (weights ``stop_gradient``-ed) and the heads
    follow the head rule (``w_i ∇L_i`` for a scalarization, ``∇L_i`` for a Gram weighting).
    Homogeneous weightings see the Gram rescaled by a power of two (exact), so loss scales
    far outside float32's square range do not overflow it.

    Args:
      encoder, heads: the split (module docstring).
      method: any :class:`mtl_optax.Weighting` (stacked aggregators need tier 3).
      gram: ``"features"`` or ``"parameters"`` (ignored by weightings without a Gram).
      chunk_size: Gram columns per batch for ``gram="parameters"`` (``None``: one by one).

    Example::

        grad_fn = mtl.split_value_and_grad(encoder, [head_a, head_b], mtl.mgda())
        state = grad_fn.init(params)
        losses, grads, state = grad_fn(params, batch, state)
        tx = optax.adam(1e-3)
        updates, opt_state = tx.update(grads, tx.init(params), params)
    """
    pure = plain_split(encoder, heads)
    return weighted_split(pure, method, gram, chunk_size, "split_value_and_grad")


def weighted_split(pure: PureSplit, method, gram, chunk_size, entry: str) -> WeightedGradFunction:
    """The :class:`WeightedGradFunction` of a :class:`PureSplit` (plain and flax)."""
    weighting = check_weighting_method(method, entry, "split_value_and_jacobian")
    check_gram_mode(gram, chunk_size)

    def init(params):
        if pure.spec.fns is not None:
            return len(pure.spec.fns), pure.spec.names
        return stacked_num_tasks(jax.tree_util.tree_leaves(pure.select(params))), None

    def step(params, batch, weighting_state, **extra):
        forward = split_forward(pure, params, batch)
        grads, weights, state = split_step(
            forward, weighting, weighting_state, gram, chunk_size, **extra
        )
        return forward.losses, grads, weights, state, forward.names

    return WeightedGradFunction(weighting, init, step, entry)

r"""Flooding: keep the training loss near a level ``b`` instead of driving it to zero.

* :func:`flood` — ``|L − b| + b`` (Ishida et al., 2020, "Do We Need Zero Training
  Loss After Achieving Zero Training Error?"), applied to the batch-mean loss.
  Below ``b`` the gradient is reversed (ascent), above it is unchanged.
* :func:`iflood` — the same per instance, ``mean(|ℓ_i − b| + b)`` (Xie et al.,
  2022, "iFlood: A Stable and Effective Regularizer").
* :func:`flooding` — the same as an ``optax`` transform: multiplies the updates by
  ``sign(value − b)`` where ``value`` is the batch loss passed as
  ``update(..., value=loss)``. Tie: at ``value == b`` the sign is +1; updates
  are flipped exactly when ``value < b`` (matching ``flood``'s gradient). A NaN
  ``value`` gives NaN updates (never a silent ascent), so ``optax.apply_if_finite``
  skips the step.
* :func:`gradient_penalty` — ``L + c‖∇L‖²`` as a new loss function.
* :func:`alternating_ascent` — a transform alternating a descent step of size
  ``ε₁`` and an ascent step of size ``ε₂``.

Why flooding is a gradient penalty. A descent step ``θ₁ = θ − ε₁g`` followed by an
ascent step ``θ₂ = θ₁ + ε₂ g(θ₁)`` with ``g(θ₁) = g − ε₁Hg + O(ε²)`` gives

``θ₂ = θ − (ε₁ − ε₂) g − ε₁ε₂ H g + O(ε³)``,

which is one gradient step of size ``ε₁ − ε₂`` on
``L + ε₁ε₂/(2(ε₁ − ε₂)) ‖∇L‖²`` (because ``∇‖∇L‖² = 2Hg``), for ``ε₁ > ε₂``.
With equal sizes ``ε`` (flooding oscillating around ``b``) the first-order terms
cancel and the pair is one gradient step on ``‖∇L‖²`` with rate ``ε²/2``. On a
quadratic ``L = ½θᵀAθ − bᵀθ`` both statements are exact; in general the error is
``O(ε³)`` (checked in ``tests/losses/test_flooding.py``).

Example::

    import jax, jax.numpy as jnp, optax
    from mtl_optax.losses import flooding

    loss_fn = lambda p: jnp.sum((p - 1.0) ** 2)
    opt = optax.chain(flooding(level=0.05), optax.sgd(0.1))
    params = jnp.zeros(3)
    state = opt.init(params)
    for _ in range(20):
        value, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = opt.update(grads, state, params, value=value)
        params = optax.apply_updates(params, updates)
    # the loss now oscillates around 0.05 instead of reaching 0
"""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from mtl_optax.losses import _common as C

__all__ = [
    "flood",
    "iflood",
    "flooding",
    "FloodingState",
    "gradient_penalty",
    "alternating_ascent",
    "AlternatingAscentState",
]


def _flood(name, loss, level):
    loss = C.promote(C.float_array(name, loss))
    ok = C.check_scalar("level", level, low=0)
    # |L − b| + b, written so the gradient at L == b is +1 (same tie as `flooding`).
    return C.nan_unless(jnp.where(loss >= level, loss, 2.0 * level - loss), ok)


def flood(loss, *, level) -> jax.Array:
    r"""``|L − b| + b`` elementwise; apply it to the batch-mean loss.

    Gradient: ``+∇L`` when ``L ≥ b``, ``−∇L`` when ``L < b``. ``level = b`` must be
    finite and ``≥ 0`` (a ``ValueError`` when concrete; a traced bad level gives NaN).
    A NaN loss gives NaN. Works on scalars or arrays of any floating dtype; the result
    is promoted to at least float32 (bfloat16 in → float32 out).

    Oracle: ``tests/losses/test_flooding.py::test_flood_and_iflood`` (NumPy formula
    and ``jax.grad`` signs).
    """
    return _flood("loss", loss, level)


def iflood(per_example_losses, *, level) -> jax.Array:
    r"""Individual flooding: ``|ℓ_i − b| + b`` per example (average it afterwards).

    Unlike :func:`flood` on the mean, each example is reversed separately once its
    own loss is below ``b``. Oracle: ``tests/losses/test_flooding.py::test_flood_and_iflood``.
    """
    return _flood("per_example_losses", per_example_losses, level)


class FloodingState(NamedTuple):
    """State of :func:`flooding`: the number of updates seen (int32 scalar)."""

    count: jax.Array


def flooding(*, level) -> optax.GradientTransformationExtraArgs:
    r"""Optax transform multiplying updates by ``sign(value − b)`` (+1 at ``value == b``).

    ``update(updates, state, params=None, *, value, **extra)`` requires the keyword
    ``value`` (the scalar batch loss before flooding); other extra keyword arguments
    are ignored, so it chains with any optimizer: ``optax.chain(flooding(level=b),
    optax.sgd(lr))`` and ``opt.update(grads, state, params, value=loss)``. Chain it
    first, so the optimizer sees the flooded gradient (equivalent to differentiating
    :func:`flood` of the loss).

    ``value`` must be a real scalar (a bool or a non-scalar is an error). A NaN
    ``value`` (or a traced level that is not finite and ``≥ 0``) gives NaN updates, which
    ``optax.apply_if_finite`` skips, instead of picking a direction.

    Oracle: ``tests/losses/test_flooding.py::test_flooding_transform_flips_below_level``
    and the descent/ascent-versus-‖∇L‖² check on a quadratic; bad inputs in
    ``tests/losses/test_bad_inputs.py``.
    """
    level_ok = C.check_scalar("level", level, low=0)

    def init_fn(params):
        del params
        return FloodingState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None, *, value=None, **extra_args):
        del params, extra_args
        if value is None:
            raise ValueError(
                "flooding.update requires the keyword argument `value=` (the scalar batch "
                "loss), e.g. opt.update(grads, state, params, value=loss)."
            )
        value = jnp.asarray(value)
        if value.dtype == jnp.bool_ or not jnp.issubdtype(value.dtype, jnp.number):
            raise TypeError(f"`value` must be the real scalar batch loss, got dtype {value.dtype}.")
        try:
            chex.assert_shape(value, ())
        except AssertionError as err:
            raise ValueError(f"`value` must be a scalar loss, got shape {value.shape}.") from err
        # NaN value (or level): neither comparison holds, so the sign is NaN, not -1.
        sign = jnp.where(value >= level, 1.0, jnp.where(value < level, -1.0, jnp.nan))
        sign = C.nan_unless(sign, level_ok)
        updates = jax.tree.map(lambda u: (sign * u).astype(u.dtype), updates)
        return updates, FloodingState(count=optax.safe_increment(state.count))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def gradient_penalty(loss_fn, *, coefficient):
    r"""Returns ``(params, *args) ↦ L(params, *args) + c·‖∇_params L(params, *args)‖²``.

    ``‖·‖²`` is the squared L2 norm over all leaves of the params pytree.
    ``loss_fn`` must return a scalar (``jax.grad`` says so otherwise). ``coefficient = c``
    finite and ``≥ 0`` (a ``ValueError`` when concrete, a NaN result when traced).
    Differentiating the result needs second derivatives (Hessian–vector products), which
    JAX provides.

    Oracle: ``tests/losses/test_flooding.py::test_gradient_penalty_matches_closed_form``
    (quadratic: ``∇L = Aθ − b``, penalty gradient ``2A(Aθ − b)``).
    """
    if not callable(loss_fn):
        raise TypeError(f"`loss_fn` must be a function params -> scalar loss, got {loss_fn!r}.")
    ok = C.check_scalar("coefficient", coefficient, low=0)

    def penalised(params, *args):
        value, grads = jax.value_and_grad(loss_fn)(params, *args)
        sq = sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads))
        return C.nan_unless(value + coefficient * sq, ok)

    return penalised


class AlternatingAscentState(NamedTuple):
    """State of :func:`alternating_ascent`: the number of updates seen (int32 scalar)."""

    count: jax.Array


def alternating_ascent(*, descent_rate, ascent_rate) -> optax.GradientTransformation:
    r"""Alternates ``−ε₁·g`` (even steps: 0, 2, ...) and ``+ε₂·g`` (odd steps).

    Returns final updates (use alone or at the end of a chain). Two consecutive
    steps with ``ε₁ > ε₂`` approximate one gradient step of size ``ε₁ − ε₂`` on
    ``L + ε₁ε₂/(2(ε₁ − ε₂))‖∇L‖²``; with ``ε₁ = ε₂ = ε`` one step on ``‖∇L‖²`` with
    rate ``ε²/2`` (see the module docstring). ``descent_rate > 0``,
    ``ascent_rate ≥ 0``, both finite (a ``ValueError`` when concrete, NaN updates when
    traced).

    Oracle: ``tests/losses/test_flooding.py::test_alternating_matches_penalty``
    (exact on a quadratic, error ``O(ε³)`` on a non-quadratic loss).
    """
    ok = C.all_ok(
        C.check_scalar("descent_rate", descent_rate, low=0, low_open=True),
        C.check_scalar("ascent_rate", ascent_rate, low=0),
    )

    def init_fn(params):
        del params
        return AlternatingAscentState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None):
        del params
        factor = C.nan_unless(jnp.where(state.count % 2 == 0, -descent_rate, ascent_rate), ok)
        updates = jax.tree.map(lambda u: (factor * u).astype(u.dtype), updates)
        return updates, AlternatingAscentState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init_fn, update_fn)

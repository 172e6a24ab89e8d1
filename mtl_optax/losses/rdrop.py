r"""R-Drop: consistency between two dropout passes, and helpers to run the two passes.

Two stochastic passes of the same input give distributions ``P¹, P²``; the loss
(Liang et al., 2021, "R-Drop: Regularized Dropout for Neural Networks") is, per
example,

``−log P¹(y) − log P²(y) + α·½[KL(P²‖P¹) + KL(P¹‖P²)]``

with no stop-gradient on either side. ``α = 4`` (with dropout 0.3) is a good
default; the paper uses 1–5. The symmetric KL is computed as
``½ Σ_c (p²_c − p¹_c)(log p²_c − log p¹_c)`` (an identity), from
``log_softmax`` so nothing overflows; classes whose logits are ``−inf`` in both
passes contribute 0 (no NaN).

* :func:`rdrop_consistency` — the KL term alone, for unlabelled data
  (semi-supervised use).
* :func:`rdrop_regression_loss` — the general-divergence form with squared error
  ``D(a, b) = (a − b)²``, which is symmetric, so the regulariser is ``α (p¹ − p²)²``.
* :func:`two_pass_vmap` — ``vmap`` the model over two dropout keys (two masks,
  one compiled forward of batch B, twice).
* :func:`two_pass_duplicated` — one forward on ``concatenate([x, x])`` with one
  key; dropout draws independent masks for the two copies (the paper's recipe).

Dtypes: inputs promoted to ≥ float32; results in that dtype.

Example with ``flax.linen`` dropout::

    import flax.linen as nn, jax, jax.numpy as jnp
    from mtl_optax.losses import rdrop_loss, two_pass_vmap

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x, *, train: bool):
            x = nn.relu(nn.Dense(32)(x))
            x = nn.Dropout(0.3, deterministic=not train)(x)
            return nn.Dense(3)(x)

    model = MLP()
    x, y = jnp.ones((4, 8)), jnp.array([0, 1, 2, 0])
    params = model.init(jax.random.key(0), x, train=False)

    def apply_fn(key, x):
        return model.apply(params, x, train=True, rngs={"dropout": key})

    logits = two_pass_vmap(apply_fn, jax.random.key(1), x)      # (2, 4, 3)
    loss = rdrop_loss(logits[0], logits[1], y, alpha=4.0).mean()
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mtl_optax.losses import _common as C

__all__ = [
    "rdrop_loss",
    "rdrop_regression_loss",
    "rdrop_consistency",
    "two_pass_vmap",
    "two_pass_duplicated",
]


def _check_pair(a, b, names=("logits1", "logits2")):
    a = C.float_array(names[0], a)
    b = C.float_array(names[1], b)
    C.check_min_rank(names[0], a, 1)
    C.check_shape(names[1], b, a.shape, hint=f"(`{names[0]}` has shape {a.shape}.)")
    return a, b


def _check_alpha(alpha):
    return C.check_scalar("alpha", alpha, low=0)


def _sym_kl(lp1, lp2):
    both = jnp.isfinite(lp1) & jnp.isfinite(lp2)
    lp1 = jnp.where(both, lp1, 0.0)
    lp2 = jnp.where(both, lp2, 0.0)
    diff = (jnp.exp(lp2) - jnp.exp(lp1)) * (lp2 - lp1)
    return 0.5 * jnp.sum(jnp.where(both, diff, 0.0), axis=-1)


@jax.jit
def _consistency(logits1, logits2):
    lp1 = jax.nn.log_softmax(C.promote(logits1), axis=-1)
    lp2 = jax.nn.log_softmax(C.promote(logits2), axis=-1)
    return _sym_kl(lp1, lp2)


@jax.jit
def _rdrop(logits1, logits2, labels, alpha):
    lp1 = jax.nn.log_softmax(C.promote(logits1), axis=-1)
    lp2 = jax.nn.log_softmax(C.promote(logits2), axis=-1)
    nll1 = -jnp.take_along_axis(lp1, labels[..., None], axis=-1)[..., 0]
    nll2 = -jnp.take_along_axis(lp2, labels[..., None], axis=-1)[..., 0]
    return nll1 + nll2 + alpha * _sym_kl(lp1, lp2)


def rdrop_loss(logits1, logits2, labels, *, alpha: float = 4.0) -> jax.Array:
    r"""R-Drop per example: ``CE¹ + CE² + α·½[KL(P²‖P¹) + KL(P¹‖P²)]``.

    Args:
      logits1, logits2: ``(..., C)`` logits of the two dropout passes.
      labels: ``(...)`` integer classes.
      alpha: ``α ≥ 0``, default 4 (paper range 1–5).

    No stop-gradient: both passes receive the KL gradient. A bad label or ``alpha``
    raises when concrete; under ``jit`` it gives NaN (per example for a label).

    Oracle: ``tests/losses/test_rdrop.py::test_rdrop_matches_numpy`` (float64 NumPy
    with ``scipy.special.rel_entr``) and the finite-difference gradient check.
    """
    logits1, logits2 = _check_pair(logits1, logits2)
    logits1, labels, ok = C.check_labelled_logits(logits1, labels, logits_name="logits1")
    ok = C.all_ok(ok, _check_alpha(alpha))
    return C.nan_unless(_rdrop(logits1, logits2, labels, alpha), ok)


def rdrop_consistency(logits1, logits2) -> jax.Array:
    r"""Symmetric KL term alone: ``½[KL(P²‖P¹) + KL(P¹‖P²)]`` per example (unlabelled data).

    Oracle: ``tests/losses/test_rdrop.py::test_rdrop_matches_numpy``; exactly 0 for
    identical passes (``test_flax_two_pass_helpers``).
    """
    logits1, logits2 = _check_pair(logits1, logits2)
    C.check_nonempty_last_axis("logits1", logits1)
    return _consistency(logits1, logits2)


@jax.jit
def _regression(pred1, pred2, targets, alpha):
    p1, p2, t = C.promote(pred1), C.promote(pred2), C.promote(targets)
    return (p1 - t) ** 2 + (p2 - t) ** 2 + alpha * (p1 - p2) ** 2


def rdrop_regression_loss(pred1, pred2, targets, *, alpha: float = 4.0, axis=None) -> jax.Array:
    r"""R-Drop with squared error: ``(p¹ − y)² + (p² − y)² + α·(p¹ − p²)²``.

    The general form is ``D(p¹, y) + D(p², y) + α·½[D(p¹, p²) + D(p², p¹)]``; for
    the squared error ``D(a, b) = (a − b)²`` the symmetrised term is ``(p¹ − p²)²``.
    Elementwise like ``optax.squared_error``; ``axis`` (int or tuple) sums over
    feature axes to give one value per example.

    Oracle: ``tests/losses/test_rdrop.py::test_rdrop_regression_matches_numpy``.
    """
    pred1, pred2 = _check_pair(pred1, pred2, names=("pred1", "pred2"))
    targets = C.float_array("targets", targets)
    C.check_shape("targets", targets, pred1.shape, hint=f"(`pred1` has shape {pred1.shape}.)")
    C.check_axis("axis", axis, pred1.ndim)
    out = C.nan_unless(_regression(pred1, pred2, targets, alpha), _check_alpha(alpha))
    return out if axis is None else jnp.sum(out, axis=axis)


def two_pass_vmap(apply_fn, key, *args):
    r"""Two stochastic passes by ``vmap`` over two keys split from ``key``.

    Calls ``apply_fn(k, *args)`` for ``k`` in ``jax.random.split(key, 2)`` (vmapped,
    ``args`` shared) and returns the output pytree with a leading axis of size 2.
    Works with typed (``jax.random.key``) and raw (``PRNGKey``) keys.

    Oracle: ``tests/losses/test_rdrop.py::test_flax_two_pass_helpers`` — the passes
    differ with dropout on, each equals ``apply_fn`` called with its key, and are
    identical (KL exactly 0) with dropout off.
    """
    if not callable(apply_fn):
        raise TypeError(f"`apply_fn` must be a function (key, *args) -> output, got {apply_fn!r}.")
    keys = jax.random.split(key, 2)
    return jax.vmap(lambda k: apply_fn(k, *args))(keys)


def two_pass_duplicated(apply_fn, key, x):
    r"""Two stochastic passes from one forward on ``concatenate([x, x])``.

    ``x`` is an array or pytree of arrays with a shared leading batch axis ``B``;
    ``apply_fn(key, x2)`` must return leaves with leading axis ``2B``. Returns the
    outputs reshaped to ``(2, B, ...)`` (first copy, second copy). Dropout draws an
    independent mask per element, so the two halves see different masks.

    Oracle: ``tests/losses/test_rdrop.py::test_flax_two_pass_helpers``.
    """
    if not callable(apply_fn):
        raise TypeError(f"`apply_fn` must be a function (key, x) -> output, got {apply_fn!r}.")
    leaves = jax.tree.leaves(x)
    if not leaves:
        raise ValueError("`x` must contain at least one array.")
    batch = {jnp.shape(leaf)[0] if jnp.ndim(leaf) else None for leaf in leaves}
    if len(batch) != 1 or None in batch:
        raise ValueError(
            "`x` leaves must share a leading batch axis; got shapes "
            f"{[jnp.shape(leaf) for leaf in leaves]}."
        )
    (b,) = batch
    x2 = jax.tree.map(lambda a: jnp.concatenate([a, a], axis=0), x)
    out = apply_fn(key, x2)

    def split(leaf):
        if jnp.ndim(leaf) == 0 or jnp.shape(leaf)[0] != 2 * b:
            raise ValueError(
                f"`apply_fn` outputs must have leading axis 2*B = {2 * b}, got shape "
                f"{jnp.shape(leaf)}."
            )
        return jnp.reshape(leaf, (2, b) + jnp.shape(leaf)[1:])

    return jax.tree.map(split, out)

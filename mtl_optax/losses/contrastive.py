r"""Contrastive losses: InfoNCE and FlatNCE computed in log space, SimCLR pair scores.

Scores ``s`` over ``N`` candidates with one positive ``t`` per row and
``ξ = Σ_{i≠t} exp(s_i − s_t)``:

* InfoNCE  ``= log(1 + ξ) = logsumexp(s) − s_t``  (van den Oord et al., 2018,
  "Representation Learning with Contrastive Predictive Coding").
* FlatNCE  ``l = log ξ = logsumexp_{i≠t}(s_i) − s_t``  (Chen et al., 2021,
  "Simpler, Faster, Stronger: Breaking The log-K Curse On Contrastive Learners
  With FlatNCE"). The paper writes the loss as ``exp(l − sg(l))``; its value is
  always 1 but its gradient is exactly ``∇l``, so we return ``l`` itself (it may be
  negative). The two gradients are related by ``∇l = (1 + ξ)/ξ · ∇InfoNCE``.

Why log space: when the positive dominates (``s_t`` far above every negative),
``softmax(s)_t`` rounds to 1 in float32 and the usual ``softmax − onehot``
gradient of InfoNCE collapses to exactly 0 for the positive, although the true
value is ``−ξ/(1+ξ) ≠ 0``. FlatNCE's gradient, ``softmax over the negatives`` and
``−1`` for the positive, has no such cancellation and stays accurate in float32
(checked against a float64 reference in ``tests/losses/test_contrastive.py``).

Masking: entries equal to ``−inf`` and entries where ``where`` is False are
excluded from every sum and receive zero gradient, without NaN. FlatNCE rows with
no unmasked negative (``ξ = 0``) return 0 with zero gradient rather than ``−inf``.

Bad inputs: a NaN score is *not* a mask — it makes its row's loss NaN (so does
``+inf``). A row whose positive is masked out, a boolean ``positives`` row without
exactly one True, or an integer positive outside ``[0, N)`` is a ``ValueError`` when
the values are concrete and gives a NaN loss for that row under ``jit``/``vmap``; a
traced ``temperature`` that is not finite and positive gives NaN scores. Checked in
``tests/losses/test_bad_inputs.py``.

Dtypes: inputs are promoted to at least float32 and the losses are returned in
that dtype (bfloat16 in → float32 out).

Example::

    import jax, jax.numpy as jnp
    from mtl_optax.losses import simclr_scores, info_nce, flat_nce
    k1, k2 = jax.random.split(jax.random.key(0))
    z1 = jax.random.normal(k1, (8, 16)); z2 = z1 + 0.1 * jax.random.normal(k2, (8, 16))
    scores, positives = simclr_scores(z1, z2, temperature=0.1)   # (16, 16), (16,)
    loss = flat_nce(scores, positives).mean()
    baseline = info_nce(scores, positives).mean()
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mtl_optax.losses import _common as C

__all__ = ["info_nce", "flat_nce", "simclr_scores"]


def _validate(scores, positives, where):
    """Trace-time shape/dtype checks and (when concrete) value checks."""
    scores = C.float_array("scores", scores)
    C.check_min_rank("scores", scores, 1)
    C.check_nonempty_last_axis("scores", scores)
    n = scores.shape[-1]
    positives = jnp.asarray(positives)
    if positives.dtype == jnp.bool_:
        C.check_shape(
            "positives",
            positives,
            scores.shape,
            hint="A boolean `positives` mask must match `scores` (one True per row).",
        )
        pos_value = C.concrete_value(positives)
        if pos_value is not None:
            counts = pos_value.sum(axis=-1)
            if np.any(counts != 1):
                raise ValueError(
                    "`positives` mask must have exactly one True per row; got row counts "
                    f"in [{int(counts.min())}, {int(counts.max())}] (shape {positives.shape})."
                )
    else:
        C.check_shape(
            "positives",
            positives,
            scores.shape[:-1],
            hint=f"Integer `positives` index the last axis of `scores` {scores.shape}.",
        )
        positives, _ = C.check_labels("positives", positives, n)  # traced: see _row_ok
        pos_value = C.concrete_value(positives)
        if pos_value is not None:
            pos_value = pos_value[..., None] == np.arange(n)
    if where is not None:
        where = C.bool_array("where", where)
        C.check_shape("where", where, scores.shape)
    s_value = C.concrete_value(scores)
    if pos_value is not None and s_value is not None:
        valid = s_value.astype(np.float32) != -np.inf
        w_value = None if where is None else C.concrete_value(where)
        if w_value is not None:
            valid &= w_value
        if np.any(pos_value & ~valid):
            raise ValueError(
                "`positives` points at an entry that is masked out (by `where` or a -inf "
                "score); every row's positive must be a valid entry."
            )
    return scores, positives, where


def _masks(scores, positives, where):
    """(promoted scores with masked entries set to 0, positive mask, valid mask).

    Only ``−inf`` and ``where=False`` mask an entry; NaN stays valid and propagates.
    An out-of-range integer positive gives an all-False row of ``pos_mask``.
    """
    s = C.promote(scores)
    if positives.dtype == jnp.bool_:
        pos_mask = positives
    else:
        pos_mask = jax.nn.one_hot(positives, s.shape[-1], dtype=jnp.bool_)
    valid = s != -jnp.inf
    if where is not None:
        valid = valid & where
    return jnp.where(valid, s, 0.0), pos_mask, valid


def _row_ok(pos_mask, valid):
    """Exactly one positive per row and it is a valid entry (checked eagerly when concrete)."""
    return (jnp.sum(pos_mask, axis=-1) == 1) & jnp.any(pos_mask & valid, axis=-1)


@jax.jit
def _info_nce(scores, positives, where):
    s, pos_mask, valid = _masks(scores, positives, where)
    lse = jax.nn.logsumexp(s, axis=-1, where=valid)
    loss = lse - jnp.sum(jnp.where(pos_mask, s, 0.0), axis=-1)
    return C.nan_unless(loss, _row_ok(pos_mask, valid))


@jax.jit
def _flat_nce(scores, positives, where):
    s, pos_mask, valid = _masks(scores, positives, where)
    neg = valid & ~pos_mask
    has_neg = jnp.any(neg, axis=-1, keepdims=True)
    # A row without negatives sums over the positive only, giving l = 0 exactly.
    lse_neg = jax.nn.logsumexp(s, axis=-1, where=jnp.where(has_neg, neg, pos_mask))
    loss = lse_neg - jnp.sum(jnp.where(pos_mask, s, 0.0), axis=-1)
    return C.nan_unless(loss, _row_ok(pos_mask, valid))


def _move_axis(scores, positives, where, axis):
    """Moves the candidate ``axis`` last (boolean positives and ``where`` follow it)."""
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise TypeError(f"`axis` must be an int (the candidate axis), got {axis!r}.")
    if axis == -1:
        return scores, positives, where
    scores = jnp.asarray(scores)
    if not -scores.ndim <= axis < scores.ndim:
        raise ValueError(f"`axis`={axis} is out of range for `scores` of shape {scores.shape}.")
    scores = jnp.moveaxis(scores, axis, -1)
    positives = jnp.asarray(positives)
    if positives.dtype == jnp.bool_ and positives.ndim == scores.ndim:
        positives = jnp.moveaxis(positives, axis, -1)
    if where is not None and jnp.ndim(where) == scores.ndim:
        where = jnp.moveaxis(jnp.asarray(where), axis, -1)
    return scores, positives, where


def info_nce(scores, positives, *, where=None, axis: int = -1) -> jax.Array:
    r"""InfoNCE per row: ``logsumexp_i(s_i) − s_t`` over the unmasked entries.

    Args:
      scores: ``(..., N)`` floating scores (e.g. similarities / temperature).
        ``−inf`` entries are treated as masked.
      positives: integer indices ``(...)`` of the positive, or a boolean mask
        ``(..., N)`` with exactly one True per row (a ``ValueError`` when concrete, a NaN
        row under ``jit``).
      where: optional boolean ``(..., N)``; False marks entries that do not exist.
      axis: the candidate axis of ``scores`` (default last); boolean ``positives``
        and ``where`` share it, integer ``positives`` have ``scores``' shape without it.

    Returns:
      ``(...)`` losses (>= 0) in the promoted dtype (>= float32); NaN for rows with a
      NaN score or (under ``jit``) an invalid positive.

    Oracle: ``tests/losses/test_contrastive.py::test_values_match_numpy`` (float64
    SciPy ``logsumexp``, with ``where`` and ``−inf`` masks) and ``check_grads``.
    """
    return _info_nce(*_validate(*_move_axis(scores, positives, where, axis)))


def flat_nce(scores, positives, *, where=None, axis: int = -1) -> jax.Array:
    r"""FlatNCE per row: ``l = logsumexp_{i≠t}(s_i) − s_t = log ξ`` (may be negative).

    ``∇l`` equals the gradient of the paper's ``exp(l − sg(l))`` and equals
    ``(1 + ξ)/ξ · ∇InfoNCE``; it is computed without the ``softmax − onehot``
    cancellation, so it stays accurate in float32 when the positive dominates.
    Rows without any unmasked negative return 0 with zero gradient.

    Args: as :func:`info_nce`.

    Oracle: ``tests/losses/test_contrastive.py`` — value vs float64 SciPy, gradient
    vs ``exp(l − sg(l))`` and vs ``(1+ξ)/ξ · ∇InfoNCE``, and the float32-vs-float64
    precision test with the positive 30 above the negatives.
    """
    return _flat_nce(*_validate(*_move_axis(scores, positives, where, axis)))


def simclr_scores(z1, z2, *, temperature: float = 0.1, eps: float = 1e-12):
    r"""SimCLR pair scores for two views of a batch.

    With ``z = normalise(concat([z1, z2]))`` (``2B`` rows, L2 norm 1), returns
    ``scores = z zᵀ / temperature`` with the diagonal (self-similarity) set to
    ``−inf``, and ``positives[i] = i + B (mod 2B)`` (the other view of the same
    example). Feed both to :func:`info_nce` (NT-Xent, Chen et al., 2020, "A Simple
    Framework for Contrastive Learning of Visual Representations") or
    :func:`flat_nce`; both treat the ``−inf`` diagonal as masked without NaN.

    Normalisation is ``z · rsqrt(max(‖z‖², eps))`` so an all-zero embedding gives
    a zero vector (cosine 0) with finite gradients. ``temperature`` must be finite and
    > 0 (a ``ValueError`` when concrete, NaN scores when traced); 0.1 is a common SimCLR
    default.

    Returns:
      ``(scores (2B, 2B), positives (2B,) int32)``.

    Oracle: ``tests/losses/test_contrastive.py::test_simclr_scores_matches_numpy``.
    """
    z1 = C.float_array("z1", z1)
    z2 = C.float_array("z2", z2)
    C.check_rank("z1", z1, 2)
    C.check_nonempty_last_axis("z1", z1)
    C.check_shape("z2", z2, z1.shape, hint=f"(`z1` has shape {z1.shape}.)")
    ok = C.all_ok(
        C.check_scalar("temperature", temperature, low=0, low_open=True),
        C.check_scalar("eps", eps, low=0, low_open=True),
    )
    scores, positives = _simclr_scores(z1, z2, temperature, eps)
    return C.nan_unless(scores, ok), positives


@jax.jit
def _simclr_scores(z1, z2, temperature, eps):
    b = z1.shape[0]
    z = C.promote(jnp.concatenate([z1, z2], axis=0))
    z = z * jax.lax.rsqrt(jnp.maximum(jnp.sum(z * z, axis=-1, keepdims=True), eps))
    sims = (z @ z.T) / jnp.asarray(temperature, z.dtype)
    scores = jnp.where(jnp.eye(2 * b, dtype=jnp.bool_), -jnp.inf, sims)
    positives = jnp.concatenate([jnp.arange(b) + b, jnp.arange(b)]).astype(jnp.int32)
    return scores, positives

"""Every public loss and transform under malformed or hostile inputs, eagerly and under jit.

Three outcomes, one table each:

* ``ALWAYS``: wrong types, dtypes, shapes, bools posing as numbers, empty class axes,
  non-callables. The same error, naming the argument, eagerly and under ``jax.jit``
  (these are trace-time checks).
* ``VALUES``: wrong values (labels out of range, non-positive or NaN hyper-parameters,
  priors with zeros, ±1 labels for a 0/1 loss, cosines outside [-1, 1], ...). Eagerly a
  ``ValueError`` naming the problem; under ``jit`` the values are tracers, and the
  documented answer is NaN exactly where the bad value acts (its row, or everything), so
  ``optax.apply_if_finite`` catches it. The other entries are finite, and for per-row
  cases equal the rows of the same call with the bad value corrected.
* ``DOCUMENTED``: inputs with a documented finite or NaN result (NaN data propagates, NaN
  scores are not masks, empty batches, priors that do not sum to 1), checked against the
  definition, eagerly and under ``jit``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtl_optax as mtl
from mtl_optax import losses as L

RNG = np.random.default_rng(0)
LOGITS = jnp.asarray(RNG.normal(size=(4, 3)), jnp.float32)
LABELS = jnp.array([0, 1, 2, 1])
COS = jnp.tanh(LOGITS)
SCORES = jnp.asarray(RNG.normal(size=(4, 5)), jnp.float32)
POS = jnp.array([0, 1, 2, 3])
Z = jnp.asarray(RNG.normal(size=(4, 6)), jnp.float32)
PRIORS = jnp.array([0.5, 0.3, 0.2])
COUNTS = jnp.array([50, 30, 20])
BIN = jnp.array([[0, 1, 1], [1, 0, 0], [0, 0, 1], [1, 1, 0]], jnp.float32)


# name: (function of the traced arrays, traced arrays, exception type, message regex)
ALWAYS = {
    # contrastive
    "info_nce int scores": (
        lambda s: L.info_nce(s, POS),
        (SCORES.astype(jnp.int32),),
        ValueError,
        r"`scores` must be a floating array, got dtype int32; cast",
    ),
    "info_nce float positives": (
        lambda p: L.info_nce(SCORES, p),
        (POS.astype(jnp.float32),),
        ValueError,
        r"`positives` must be an integer array",
    ),
    "info_nce positives shape": (
        lambda p: L.info_nce(SCORES, p),
        (POS[:3],),
        ValueError,
        r"`positives` must have shape \(4,\)",
    ),
    "info_nce bool mask shape": (
        lambda p: L.info_nce(SCORES, p),
        (jnp.eye(4, 4, dtype=bool),),
        ValueError,
        r"`positives` must have shape \(4, 5\)",
    ),
    "info_nce where dtype": (
        lambda w: L.info_nce(SCORES, POS, where=w),
        (jnp.ones((4, 5), jnp.int32),),
        ValueError,
        r"`where` must be a boolean array, got dtype int32",
    ),
    "flat_nce where shape": (
        lambda w: L.flat_nce(SCORES, POS, where=w),
        (jnp.ones((4, 4), bool),),
        ValueError,
        r"`where` must have shape \(4, 5\)",
    ),
    "flat_nce no candidates": (
        lambda s: L.flat_nce(s, jnp.zeros(4, jnp.int32)),
        (jnp.zeros((4, 0)),),
        ValueError,
        r"`scores` must have at least one entry along its last",
    ),
    "flat_nce scalar scores": (
        lambda s: L.flat_nce(s, jnp.zeros((), jnp.int32)),
        (jnp.zeros(()),),
        ValueError,
        r"`scores` must have at least 1 dimension",
    ),
    "info_nce bool axis": (
        lambda s: L.info_nce(s, POS, axis=True),
        (SCORES,),
        TypeError,
        r"`axis` must be an int",
    ),
    "info_nce axis range": (
        lambda s: L.info_nce(s, POS, axis=2),
        (SCORES,),
        ValueError,
        r"`axis`=2 is out of range",
    ),
    "simclr bool temperature": (
        lambda z: L.simclr_scores(z, z, temperature=True),
        (Z,),
        TypeError,
        r"`temperature` must be a real number, got the boolean True",
    ),
    "simclr str temperature": (
        lambda z: L.simclr_scores(z, z, temperature="0.1"),
        (Z,),
        TypeError,
        r"`temperature` must be a real number, got str",
    ),
    "simclr array temperature": (
        lambda z: L.simclr_scores(z, z, temperature=jnp.ones(2)),
        (Z,),
        ValueError,
        r"`temperature` must be a scalar, got shape \(2,\)",
    ),
    "simclr rank-1 z": (
        lambda z: L.simclr_scores(z[0], z[0]),
        (Z,),
        ValueError,
        r"`z1` must have rank 2",
    ),
    "simclr no features": (
        lambda z: L.simclr_scores(z[:, :0], z[:, :0]),
        (Z,),
        ValueError,
        r"`z1` must have at least one entry",
    ),
    # margin
    "cosface float labels": (
        lambda y: L.cosface_loss(COS, y),
        (LABELS.astype(jnp.float32),),
        ValueError,
        r"`labels` must be an integer array.*astype\(jnp.int32\)",
    ),
    "cosface bool labels": (
        lambda y: L.cosface_loss(COS[:, :2], y),
        (LABELS > 0,),
        ValueError,
        r"`labels` must be an integer array of class indices, got dtype bool",
    ),
    "cosface int cos": (
        lambda c: L.cosface_loss(c, LABELS),
        (jnp.zeros((4, 3), jnp.int32),),
        ValueError,
        r"`cos` must be a floating array",
    ),
    "cosface no classes": (
        lambda c: L.cosface_loss(c, jnp.zeros(4, jnp.int32)),
        (jnp.zeros((4, 0)),),
        ValueError,
        r"`cos` must have at least one entry",
    ),
    "cosface bool scale": (
        lambda c: L.cosface_loss(c, LABELS, scale=True),
        (COS,),
        TypeError,
        r"`scale` must be a real number",
    ),
    "arcface None margin": (
        lambda c: L.arcface_loss(c, LABELS, margin=None),
        (COS,),
        TypeError,
        r"`margin` must be a real number, got NoneType",
    ),
    "arcface complex margin": (
        lambda c: L.arcface_loss(c, LABELS, margin=0.5j),
        (COS,),
        TypeError,
        r"`margin` must be a real number",
    ),
    "sphereface bool margin": (
        lambda c: L.sphereface_loss(c, LABELS, margin=True),
        (COS,),
        ValueError,
        r"`margin` must be a positive Python int",
    ),
    "sphereface float margin": (
        lambda c: L.sphereface_loss(c, LABELS, margin=4.0),
        (COS,),
        ValueError,
        r"`margin` must be a positive Python int",
    ),
    "metric_margin metric": (
        lambda c: L.metric_margin_loss(c, LABELS, metric="cosine"),
        (COS,),
        ValueError,
        r"`metric` must be one of",
    ),
    "estimate_margin bool num_classes": (
        lambda z: L.estimate_margin(z, LABELS, num_classes=True),
        (Z,),
        TypeError,
        r"`num_classes` must be a Python int, got bool",
    ),
    "estimate_margin numpy num_classes": (
        lambda z: L.estimate_margin(z, LABELS, num_classes=np.int64(3)),
        (Z,),
        TypeError,
        r"`num_classes` must be a Python int.*int\(\.\.\.\)",
    ),
    "estimate_margin zero num_classes": (
        lambda z: L.estimate_margin(z, LABELS, num_classes=0),
        (Z,),
        ValueError,
        r"`num_classes` must be an int >= 1, got 0",
    ),
    "cosine_logits D mismatch": (
        lambda z: L.cosine_logits(z, jnp.ones((5, 3))),
        (Z,),
        ValueError,
        r"`class_weights` must have shape \(D, C\)",
    ),
    "cosine_logits int embeddings": (
        lambda z: L.cosine_logits(z.astype(jnp.int32), jnp.ones((6, 3))),
        (Z,),
        ValueError,
        r"`embeddings` must be a floating array",
    ),
    # imbalance
    "class_priors bool num_classes": (
        lambda y: L.class_priors(y, num_classes=True),
        (LABELS,),
        TypeError,
        r"`num_classes` must be a Python int, got bool",
    ),
    "logit_adjusted int priors": (
        lambda x: L.logit_adjusted_cross_entropy(x, LABELS, class_priors=jnp.array([1, 1, 1])),
        (LOGITS,),
        ValueError,
        r"`class_priors` must be a floating array",
    ),
    "logit_adjusted priors shape": (
        lambda x: L.logit_adjusted_cross_entropy(x, LABELS, class_priors=PRIORS[:2]),
        (LOGITS,),
        ValueError,
        r"`class_priors` must have shape \(3,\)",
    ),
    "logit_adjusted bool tau": (
        lambda x: L.logit_adjusted_cross_entropy(x, LABELS, class_priors=PRIORS, tau=False),
        (LOGITS,),
        TypeError,
        r"`tau` must be a real number, got the boolean False",
    ),
    "posthoc empty priors": (
        lambda x: L.posthoc_logit_adjustment(x[:, :0], class_priors=jnp.zeros(0)),
        (LOGITS,),
        ValueError,
        r"`class_priors` must have at least one entry",
    ),
    "f1 labels shape": (
        lambda y: L.f1_weighted_binary_cross_entropy(BIN, y),
        (BIN[:, :2],),
        ValueError,
        r"`labels` must have shape \(4, 3\)",
    ),
    "f1 complex labels": (
        lambda y: L.f1_weighted_binary_cross_entropy(BIN, y),
        (BIN.astype(jnp.complex64),),
        ValueError,
        r"`labels` must be 0/1 labels \(bool, int or float\), got dtype complex64",
    ),
    "f1 where dtype": (
        lambda w: L.f1_weighted_binary_cross_entropy(BIN, BIN, where=w),
        (BIN,),
        ValueError,
        r"`where` must be a boolean array, got dtype float32",
    ),
    "f1 axis range": (
        lambda x: L.f1_weighted_binary_cross_entropy(x, BIN, axis=2),
        (BIN,),
        ValueError,
        r"`axis`=2 is out of range for an array of rank 2",
    ),
    "f1 float axis": (
        lambda x: L.f1_weighted_binary_cross_entropy(x, BIN, axis=1.0),
        (BIN,),
        TypeError,
        r"`axis` must be None, an int or a tuple of ints",
    ),
    "focal str gamma": (
        lambda x: L.softmax_focal_loss(x, LABELS, gamma="2"),
        (LOGITS,),
        TypeError,
        r"`gamma` must be a real number, got str",
    ),
    "class_balanced bool counts": (
        lambda n: L.class_balanced_weights(n),
        (COUNTS > 0,),
        ValueError,
        r"`class_counts` must be an integer or floating array of counts, got dtype bool",
    ),
    "class_balanced 2-D counts": (
        lambda n: L.class_balanced_weights(n),
        (COUNTS[None],),
        ValueError,
        r"`class_counts` must have rank 1",
    ),
    "class_balanced bool beta": (
        lambda n: L.class_balanced_weights(n, beta=True),
        (COUNTS,),
        TypeError,
        r"`beta` must be a real number",
    ),
    "ldam counts shape": (
        lambda x: L.ldam_loss(x, LABELS, class_counts=COUNTS[:2]),
        (LOGITS,),
        ValueError,
        r"`class_counts` must have shape \(3,\)",
    ),
    # rdrop
    "rdrop logits2 shape": (
        lambda a: L.rdrop_loss(a, a[:, :2], LABELS),
        (LOGITS,),
        ValueError,
        r"`logits2` must have shape \(4, 3\)",
    ),
    "rdrop None alpha": (
        lambda a: L.rdrop_loss(a, a, LABELS, alpha=None),
        (LOGITS,),
        TypeError,
        r"`alpha` must be a real number, got NoneType",
    ),
    "rdrop_consistency no classes": (
        lambda a: L.rdrop_consistency(a[:, :0], a[:, :0]),
        (LOGITS,),
        ValueError,
        r"`logits1` must have at least one entry",
    ),
    "rdrop_regression int targets": (
        lambda a: L.rdrop_regression_loss(a, a, jnp.zeros((4, 3), jnp.int32)),
        (LOGITS,),
        ValueError,
        r"`targets` must be a floating array",
    ),
    "rdrop_regression axis": (
        lambda a: L.rdrop_regression_loss(a, a, a, axis=3),
        (LOGITS,),
        ValueError,
        r"`axis`=3 is out of range",
    ),
    "two_pass_vmap apply_fn": (
        lambda x: L.two_pass_vmap("model", jax.random.PRNGKey(0), x),
        (LOGITS,),
        TypeError,
        r"`apply_fn` must be a function",
    ),
    "two_pass_duplicated apply_fn": (
        lambda x: L.two_pass_duplicated(None, jax.random.PRNGKey(0), x),
        (LOGITS,),
        TypeError,
        r"`apply_fn` must be a function",
    ),
    # flooding
    "flood int loss": (
        lambda v: L.flood(v, level=0.1),
        (jnp.array(1),),
        ValueError,
        r"`loss` must be a floating array",
    ),
    "iflood bool level": (
        lambda v: L.iflood(v, level=True),
        (LOGITS,),
        TypeError,
        r"`level` must be a real number",
    ),
    "flooding bool value": (
        lambda g: L.flooding(level=0.1).update(g, L.FloodingState(jnp.int32(0)), value=True),
        (LOGITS,),
        TypeError,
        r"`value` must be the real scalar batch loss, got dtype bool",
    ),
    "flooding vector value": (
        lambda g: L.flooding(level=0.1).update(g, L.FloodingState(jnp.int32(0)), value=g[0]),
        (LOGITS,),
        ValueError,
        r"`value` must be a scalar loss, got shape \(3,\)",
    ),
    "flooding missing value": (
        lambda g: L.flooding(level=0.1).update(g, L.FloodingState(jnp.int32(0))),
        (LOGITS,),
        ValueError,
        r"requires the keyword argument `value=`",
    ),
    "gradient_penalty loss_fn": (
        lambda p: L.gradient_penalty(3.0, coefficient=0.1)(p),
        (LOGITS,),
        TypeError,
        r"`loss_fn` must be a function",
    ),
    "gradient_penalty vector loss": (
        lambda p: L.gradient_penalty(lambda q: q, coefficient=0.1)(p),
        (LOGITS,),
        TypeError,
        r"scalar",
    ),
    "alternating_ascent None rate": (
        lambda g: L.alternating_ascent(descent_rate=None, ascent_rate=0.1),
        (LOGITS,),
        TypeError,
        r"`descent_rate` must be a real number",
    ),
    # weight decay as a constraint
    "weight_decay structure": (
        lambda w: mtl.weight_decay_constraint().update({"w": w}, optax.EmptyState(), {"v": w}),
        (LOGITS,),
        ValueError,
        r"`params` and the updates have different structures",
    ),
    "weight_decay shapes": (
        lambda w: mtl.weight_decay_constraint().update({"w": w}, optax.EmptyState(), {"w": w.T}),
        (LOGITS,),
        ValueError,
        r"leaf \['w'\] has update shape \(4, 3\) but parameter shape \(3, 4\)",
    ),
    "weight_decay int weight": (
        lambda w: mtl.weight_decay_constraint().update(
            {"w": w, "n": jnp.int32(1)}, optax.EmptyState(), {"w": w, "n": jnp.int32(3)}
        ),
        (LOGITS,),
        ValueError,
        r"leaf \['n'\] is selected as a weight but has dtype int32.*`mask`",
    ),
    "weight_decay int mask leaf": (
        lambda w: mtl.weight_decay_constraint(mask={"w": 1}).update(
            {"w": w}, optax.EmptyState(), {"w": w}
        ),
        (LOGITS,),
        TypeError,
        r"`mask` mask leaf \['w'\] must be a Python bool",
    ),
}


@pytest.mark.parametrize("name", ALWAYS)
@pytest.mark.parametrize("mode", ["eager", "jit"])
def test_always_an_error(name, mode):
    fn, arrays, exc, message = ALWAYS[name]
    with pytest.raises(exc, match=message):
        (jax.jit(fn) if mode == "jit" else fn)(*arrays)


def _bool_positives_two_in_row_2():
    mask = np.eye(4, 5, dtype=bool)
    mask[2, 4] = True
    return jnp.asarray(mask)


def _where_hiding_positive_of_row_1():
    where = np.ones((4, 5), bool)
    where[1, 1] = False
    return jnp.asarray(where)


_NEG_INF_POSITIVE = SCORES.at[3, 3].set(-jnp.inf)
_RAW_LOGIT_ROW_0 = COS.at[0, 1].set(4.0)

# name: (function of the traced arrays, traced arrays, eager message regex,
#        rows expected NaN under jit: a tuple of indices into the leading axis, or "all").
# For row cases, VALID_TWINS holds the same call's arrays with the bad value made valid:
# the other rows must equal that call's rows (rows are independent).
VALUES = {
    "info_nce positive out of range": (
        lambda p: L.info_nce(SCORES, p),
        (POS.at[3].set(7),),
        r"`positives` must lie in \[0, 5\), got values in \[0, 7\]",
        (3,),
    ),
    "flat_nce negative positive": (
        lambda p: L.flat_nce(SCORES, p),
        (POS.at[0].set(-1),),
        r"`positives` must lie in \[0, 5\)",
        (0,),
    ),
    "info_nce two positives in a row": (
        lambda p: L.info_nce(SCORES, p),
        (_bool_positives_two_in_row_2(),),
        r"exactly one True per row",
        (2,),
    ),
    "flat_nce positive masked by where": (
        lambda w: L.flat_nce(SCORES, POS, where=w),
        (_where_hiding_positive_of_row_1(),),
        r"positive.*masked out",
        (1,),
    ),
    "info_nce positive score -inf": (
        lambda s: L.info_nce(s, POS),
        (_NEG_INF_POSITIVE,),
        r"positive.*masked out",
        (3,),
    ),
    "simclr temperature 0": (
        lambda t: L.simclr_scores(Z, Z, temperature=t)[0],
        (jnp.float32(0.0),),
        r"`temperature` must be finite and positive, got 0.0",
        "all",
    ),
    "simclr temperature nan": (
        lambda t: L.simclr_scores(Z, Z, temperature=t)[0],
        (jnp.float32(jnp.nan),),
        r"`temperature` must be finite and positive, got nan",
        "all",
    ),
    "simclr eps negative": (
        lambda e: L.simclr_scores(Z, Z, eps=e)[0],
        (jnp.float32(-1.0),),
        r"`eps` must be finite and positive",
        "all",
    ),
    "cosface label out of range": (
        lambda y: L.cosface_loss(COS, y),
        (LABELS.at[1].set(3),),
        r"`labels` must lie in \[0, 3\), got values in \[0, 3\]",
        (1,),
    ),
    "arcface raw logits": (
        lambda c: L.arcface_loss(c, LABELS),
        (_RAW_LOGIT_ROW_0,),
        r"`cos` must hold cosines in \[-1, 1\].*cosine_logits",
        (0,),
    ),
    "arcface margin pi": (
        lambda m: L.arcface_loss(COS, LABELS, margin=m),
        (jnp.float32(4.0),),
        r"`margin` must be finite and in \[0, 3.14",
        "all",
    ),
    "arcface eps 0": (
        lambda e: L.arcface_loss(COS, LABELS, eps=e),
        (jnp.float32(0.0),),
        r"`eps` must be finite and positive",
        "all",
    ),
    "cosface scale inf": (
        lambda s: L.cosface_loss(COS, LABELS, scale=s),
        (jnp.float32(jnp.inf),),
        r"`scale` must be finite and positive, got inf",
        "all",
    ),
    "sphereface blend negative": (
        lambda b: L.sphereface_loss(COS, LABELS, blend=b),
        (jnp.float32(-1.0),),
        r"`blend` must be finite and non-negative",
        "all",
    ),
    "metric_margin margin nan": (
        lambda m: L.metric_margin_loss(COS, LABELS, margin=m),
        (jnp.float32(jnp.nan),),
        r"`margin` must be finite and non-negative, got nan",
        "all",
    ),
    "estimate_margin label out of range": (
        lambda y: L.estimate_margin(Z, y, num_classes=3),
        (LABELS.at[0].set(5),),
        r"`labels` must lie in \[0, 3\)",
        "all",
    ),
    "cosine_logits eps 0": (
        lambda e: L.cosine_logits(Z, jnp.ones((6, 3)), eps=e),
        (jnp.float32(0.0),),
        r"`eps` must be finite and positive",
        "all",
    ),
    "class_priors label out of range": (
        lambda y: L.class_priors(y, num_classes=3),
        (LABELS.at[2].set(-1),),
        r"`labels` must lie in \[0, 3\)",
        "all",
    ),
    "logit_adjusted zero prior": (
        lambda p: L.logit_adjusted_cross_entropy(LOGITS, LABELS, class_priors=p),
        (PRIORS.at[2].set(0.0),),
        r"`class_priors` must be finite and positive",
        "all",
    ),
    "logit_adjusted nan prior": (
        lambda p: L.logit_adjusted_cross_entropy(LOGITS, LABELS, class_priors=p),
        (PRIORS.at[0].set(jnp.nan),),
        r"`class_priors` must be finite and positive",
        "all",
    ),
    "logit_adjusted negative tau": (
        lambda t: L.logit_adjusted_cross_entropy(LOGITS, LABELS, class_priors=PRIORS, tau=t),
        (jnp.float32(-1.0),),
        r"`tau` must be finite and non-negative",
        "all",
    ),
    "logit_adjusted label out of range": (
        lambda y: L.logit_adjusted_cross_entropy(LOGITS, y, class_priors=PRIORS),
        (LABELS.at[3].set(9),),
        r"`labels` must lie in \[0, 3\)",
        (3,),
    ),
    "posthoc negative prior": (
        lambda p: L.posthoc_logit_adjustment(LOGITS, class_priors=p),
        (PRIORS.at[1].set(-0.3),),
        r"`class_priors` must be finite and positive",
        "all",
    ),
    "prior_bias_init zero prior": (
        lambda p: L.prior_bias_init(p),
        (PRIORS.at[1].set(0.0),),
        r"`class_priors` must be finite and positive",
        "all",
    ),
    "f1 labels in {-1, 1}": (
        lambda y: L.f1_weighted_binary_cross_entropy(LOGITS, y),
        (2 * BIN - 1,),
        r"`labels` must lie in \[0, 1\].*\(labels \+ 1\) / 2",
        "all",
    ),
    "f1 int label 2": (
        lambda y: L.f1_weighted_binary_cross_entropy(LOGITS, y),
        (BIN.astype(jnp.int32).at[0, 0].set(2),),
        r"`labels` must lie in \[0, 1\]",
        "all",
    ),
    "f1 nan label": (
        lambda y: L.f1_weighted_binary_cross_entropy(LOGITS, y),
        (BIN.at[1, 1].set(jnp.nan),),
        r"`labels` must lie in \[0, 1\]",
        "all",
    ),
    "f1 eps 0": (
        lambda e: L.f1_weighted_binary_cross_entropy(LOGITS, BIN, eps=e),
        (jnp.float32(0.0),),
        r"`eps` must be finite and positive",
        "all",
    ),
    "focal gamma nan": (
        lambda g: L.softmax_focal_loss(LOGITS, LABELS, gamma=g),
        (jnp.float32(jnp.nan),),
        r"`gamma` must be finite and non-negative, got nan",
        "all",
    ),
    "focal label out of range": (
        lambda y: L.softmax_focal_loss(LOGITS, y),
        (LABELS.at[0].set(3),),
        r"`labels` must lie in \[0, 3\)",
        (0,),
    ),
    "class_balanced negative count": (
        lambda n: L.class_balanced_weights(n),
        (COUNTS.at[1].set(-1),),
        r"`class_counts` must be finite and non-negative",
        "all",
    ),
    "class_balanced all zero": (
        lambda n: L.class_balanced_weights(n),
        (jnp.zeros(3, jnp.int32),),
        r"`class_counts` must contain at least one positive count",
        "all",
    ),
    "class_balanced beta 1": (
        lambda b: L.class_balanced_weights(COUNTS, beta=b),
        (jnp.float32(1.0),),
        r"`beta` must be finite and in \[0, 1\), got 1.0",
        "all",
    ),
    "ldam nan count": (
        lambda n: L.ldam_loss(LOGITS, LABELS, class_counts=n),
        (COUNTS.astype(jnp.float32).at[0].set(jnp.nan),),
        r"`class_counts` must be finite and non-negative",
        "all",
    ),
    "ldam scale 0": (
        lambda s: L.ldam_loss(LOGITS, LABELS, class_counts=COUNTS, scale=s),
        (jnp.float32(0.0),),
        r"`scale` must be finite and positive",
        "all",
    ),
    "rdrop label out of range": (
        lambda y: L.rdrop_loss(LOGITS, LOGITS + 1.0, y),
        (LABELS.at[2].set(3),),
        r"`labels` must lie in \[0, 3\)",
        (2,),
    ),
    "rdrop alpha negative": (
        lambda a: L.rdrop_loss(LOGITS, LOGITS, LABELS, alpha=a),
        (jnp.float32(-1.0),),
        r"`alpha` must be finite and non-negative",
        "all",
    ),
    "rdrop_regression alpha nan": (
        lambda a: L.rdrop_regression_loss(LOGITS, LOGITS, LOGITS, alpha=a),
        (jnp.float32(jnp.nan),),
        r"`alpha` must be finite and non-negative",
        "all",
    ),
    "flood level negative": (
        lambda b: L.flood(LOGITS, level=b),
        (jnp.float32(-0.1),),
        r"`level` must be finite and non-negative, got -0.1",
        "all",
    ),
    "iflood level inf": (
        lambda b: L.iflood(LOGITS, level=b),
        (jnp.float32(jnp.inf),),
        r"`level` must be finite and non-negative, got inf",
        "all",
    ),
    "flooding level nan": (
        lambda b: L.flooding(level=b).update(LOGITS, L.FloodingState(jnp.int32(0)), value=1.0)[0],
        (jnp.float32(jnp.nan),),
        r"`level` must be finite and non-negative, got nan",
        "all",
    ),
    "gradient_penalty coefficient negative": (
        lambda c: L.gradient_penalty(lambda p: jnp.sum(p**2), coefficient=c)(LOGITS)[None],
        (jnp.float32(-1.0),),
        r"`coefficient` must be finite and non-negative",
        "all",
    ),
    "alternating_ascent descent 0": (
        lambda r: L.alternating_ascent(descent_rate=r, ascent_rate=0.1).update(
            LOGITS, L.AlternatingAscentState(jnp.int32(0))
        )[0],
        (jnp.float32(0.0),),
        r"`descent_rate` must be finite and positive",
        "all",
    ),
    "alternating_ascent ascent nan": (
        lambda r: L.alternating_ascent(descent_rate=0.1, ascent_rate=r).update(
            LOGITS, L.AlternatingAscentState(jnp.int32(1))
        )[0],
        (jnp.float32(jnp.nan),),
        r"`ascent_rate` must be finite and non-negative",
        "all",
    ),
}


VALID_TWINS = {
    "info_nce positive out of range": (POS,),
    "flat_nce negative positive": (POS,),
    "info_nce two positives in a row": (jnp.eye(4, 5, dtype=bool),),
    "flat_nce positive masked by where": (jnp.ones((4, 5), bool),),
    "info_nce positive score -inf": (SCORES,),
    "cosface label out of range": (LABELS,),
    "arcface raw logits": (COS,),
    "logit_adjusted label out of range": (LABELS,),
    "focal label out of range": (LABELS,),
    "rdrop label out of range": (LABELS,),
}


@pytest.mark.parametrize("name", VALUES)
def test_bad_value_raises_eagerly(name):
    fn, arrays, message, _ = VALUES[name]
    with pytest.raises(ValueError, match=message):
        fn(*arrays)


@pytest.mark.parametrize("name", VALUES)
def test_bad_value_is_nan_under_jit(name):
    """NaN exactly where the bad value acts; every other entry finite."""
    fn, arrays, _, nan_rows = VALUES[name]
    out = np.asarray(jax.jit(fn)(*arrays))
    expected = np.zeros(out.shape, bool)
    if nan_rows == "all":
        expected[...] = True
    else:
        expected[list(nan_rows)] = True
    np.testing.assert_array_equal(np.isnan(out), expected)
    assert np.all(np.isfinite(out[~expected]))
    if name in VALID_TWINS:
        reference = np.asarray(fn(*VALID_TWINS[name]))
        np.testing.assert_allclose(out[~expected], reference[~expected], rtol=1e-6)


def test_nan_under_jit_is_caught_by_apply_if_finite():
    """A label out of range inside a jitted step: the step is skipped, params unchanged."""
    params = {"w": jnp.ones((6, 3))}
    opt = optax.apply_if_finite(optax.sgd(0.1), max_consecutive_errors=3)

    @jax.jit
    def step(params, state, labels):
        loss_fn = lambda p: jnp.mean(L.cosface_loss(L.cosine_logits(Z, p["w"]), labels))
        grads = jax.grad(loss_fn)(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = opt.init(params)
    bad, state = step(params, state, LABELS.at[0].set(7))
    np.testing.assert_array_equal(bad["w"], params["w"])
    assert int(state.notfinite_count) == 1
    good, _ = step(params, state, LABELS)
    assert not np.array_equal(good["w"], params["w"])


# ---- documented results ------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["eager", "jit"])
@pytest.mark.parametrize("loss", [L.info_nce, L.flat_nce])
def test_nan_score_is_not_a_mask(mode, loss):
    """A NaN score makes its row NaN (it used to be silently dropped like a mask)."""
    scores = SCORES.at[1, 4].set(jnp.nan)
    fn = jax.jit(loss) if mode == "jit" else loss
    out = np.asarray(fn(scores, POS))
    np.testing.assert_array_equal(np.isnan(out), [False, True, False, False])
    np.testing.assert_allclose(np.delete(out, 1), np.delete(np.asarray(loss(SCORES, POS)), 1))


@pytest.mark.parametrize("mode", ["eager", "jit"])
def test_flooding_nan_value_gives_nan_updates_not_ascent(mode):
    t = L.flooding(level=0.5)
    g = jnp.array([1.0, -2.0])
    update = jax.jit(t.update) if mode == "jit" else t.update
    for value, expected in ((jnp.nan, [np.nan, np.nan]), (0.2, [-1.0, 2.0]), (0.5, [1.0, -2.0])):
        out, _ = update(g, t.init(g), value=jnp.float32(value))
        np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("mode", ["eager", "jit"])
def test_nan_data_propagates(mode):
    """NaN in the data gives NaN in the entries it reaches, never a finite number."""
    wrap = jax.jit if mode == "jit" else (lambda f: f)
    bad_logits = LOGITS.at[2, 0].set(jnp.nan)
    rows = {
        "cosface": wrap(lambda c: L.cosface_loss(c, LABELS))(jnp.tanh(bad_logits)),
        "focal": wrap(lambda x: L.softmax_focal_loss(x, LABELS))(bad_logits),
        "ldam": wrap(lambda x: L.ldam_loss(x, LABELS, class_counts=COUNTS))(bad_logits),
        "rdrop": wrap(lambda x: L.rdrop_loss(x, LOGITS, LABELS))(bad_logits),
        "logit_adjusted": wrap(
            lambda x: L.logit_adjusted_cross_entropy(x, LABELS, class_priors=PRIORS)
        )(bad_logits),
    }
    for name, out in rows.items():
        np.testing.assert_array_equal(np.isnan(out), [False, False, True, False], err_msg=name)
    assert np.isnan(wrap(lambda v: L.flood(v, level=0.1))(jnp.float32(jnp.nan)))
    # the F1 weight couples the batch: one NaN logit makes every entry NaN
    assert np.all(np.isnan(wrap(L.f1_weighted_binary_cross_entropy)(bad_logits, BIN)))
    params = {"w": jnp.array([1.0, jnp.nan]), "b": jnp.ones(2)}
    t = mtl.weight_decay_constraint(mask={"w": True, "b": False})
    u, _ = wrap(t.update)({"w": -jnp.ones(2), "b": jnp.ones(2)}, t.init(params), params)
    assert np.all(np.isnan(u["w"])) and np.all(u["b"] == 1.0)


@pytest.mark.parametrize("mode", ["eager", "jit"])
def test_priors_need_not_sum_to_one(mode):
    """A constant factor on the priors is a constant shift of the logits: same losses."""
    wrap = jax.jit if mode == "jit" else (lambda f: f)
    fn = wrap(lambda p: L.logit_adjusted_cross_entropy(LOGITS, LABELS, class_priors=p))
    np.testing.assert_allclose(fn(PRIORS * 7.0), fn(PRIORS), rtol=1e-6)
    bias = wrap(L.prior_bias_init)(PRIORS * 7.0)
    np.testing.assert_allclose(jax.nn.softmax(bias), PRIORS, rtol=1e-6)


@pytest.mark.parametrize("mode", ["eager", "jit"])
def test_empty_batch_gives_empty_losses(mode):
    wrap = jax.jit if mode == "jit" else (lambda f: f)
    none = jnp.zeros(0, jnp.int32)
    outs = [
        wrap(L.info_nce)(jnp.zeros((0, 5)), none),
        wrap(L.flat_nce)(jnp.zeros((0, 5)), none),
        wrap(L.cosface_loss)(jnp.zeros((0, 3)), none),
        wrap(L.arcface_loss)(jnp.zeros((0, 3)), none),
        wrap(L.softmax_focal_loss)(jnp.zeros((0, 3)), none),
        wrap(L.rdrop_loss)(jnp.zeros((0, 3)), jnp.zeros((0, 3)), none),
        wrap(L.logit_adjusted_cross_entropy)(jnp.zeros((0, 3)), none, class_priors=PRIORS),
    ]
    for out in outs:
        assert out.shape == (0,) and out.dtype == jnp.float32
    priors = wrap(lambda y: L.class_priors(y, num_classes=3))(none)
    np.testing.assert_array_equal(priors, np.zeros(3))


GRAD_CASES = {
    "info_nce": lambda x, y: L.info_nce(jnp.pad(x, ((0, 0), (0, 2))), y),
    "cosface": lambda x, y: L.cosface_loss(jnp.tanh(x), y),
    "sphereface": lambda x, y: L.sphereface_loss(jnp.tanh(x), y),
    "logit_adjusted": lambda x, y: L.logit_adjusted_cross_entropy(x, y, class_priors=PRIORS),
    "focal": lambda x, y: L.softmax_focal_loss(x, y),
    "ldam": lambda x, y: L.ldam_loss(x, y, class_counts=COUNTS),
    "rdrop": lambda x, y: L.rdrop_loss(x, 2.0 * x, y),
}


@pytest.mark.parametrize("name", GRAD_CASES)
def test_bad_traced_label_makes_its_gradient_nan(name):
    """The NaN reaches the gradient of the bad example only (a masked NaN would not)."""
    fn = GRAD_CASES[name]
    grad = jax.jit(jax.grad(lambda x, y: jnp.sum(fn(x, y))))(LOGITS, LABELS.at[1].set(-2))
    np.testing.assert_array_equal(np.isnan(grad).any(axis=1), [False, True, False, False])
    np.testing.assert_allclose(
        np.delete(grad, 1, axis=0),
        np.delete(jax.grad(lambda x: jnp.sum(fn(x, LABELS)))(LOGITS), 1, axis=0),
        rtol=1e-6,
    )

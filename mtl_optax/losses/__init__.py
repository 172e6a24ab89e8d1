"""Per-example loss functions (no reduction) and the optax transforms that belong with them.

Modules: ``contrastive`` (InfoNCE, FlatNCE, SimCLR scores), ``margin`` (CosFace,
ArcFace, SphereFace, metric-margin softmax), ``rdrop`` (R-Drop and two-pass helpers),
``imbalance`` (logit adjustment, F1-weighted BCE, focal, class-balanced, LDAM) and
``flooding`` (flooding, iFlood, gradient penalty, alternating ascent transforms).

Bad inputs, for every function here: a wrong type, dtype or shape is an error at trace
time (eagerly and under ``jit``) naming the argument and the fix; a wrong value (label
out of range, non-positive temperature, prior of zero, NaN hyper-parameter, ...) is a
``ValueError`` when the value is concrete and, under ``jit``, makes the affected losses
and their gradients NaN, so ``optax.apply_if_finite`` skips the step. NaN data propagates
as NaN. Checked in ``tests/losses/test_bad_inputs.py``.
"""

from mtl_optax.losses.contrastive import flat_nce, info_nce, simclr_scores
from mtl_optax.losses.flooding import (
    AlternatingAscentState,
    FloodingState,
    alternating_ascent,
    flood,
    flooding,
    gradient_penalty,
    iflood,
)
from mtl_optax.losses.imbalance import (
    class_balanced_weights,
    class_priors,
    f1_weighted_binary_cross_entropy,
    ldam_loss,
    logit_adjusted_cross_entropy,
    posthoc_logit_adjustment,
    prior_bias_init,
    softmax_focal_loss,
)
from mtl_optax.losses.margin import (
    arcface_loss,
    cosface_loss,
    cosine_logits,
    estimate_margin,
    metric_margin_loss,
    sphereface_loss,
)
from mtl_optax.losses.rdrop import (
    rdrop_consistency,
    rdrop_loss,
    rdrop_regression_loss,
    two_pass_duplicated,
    two_pass_vmap,
)

__all__ = [
    "AlternatingAscentState",
    "FloodingState",
    "alternating_ascent",
    "arcface_loss",
    "class_balanced_weights",
    "class_priors",
    "cosface_loss",
    "cosine_logits",
    "estimate_margin",
    "f1_weighted_binary_cross_entropy",
    "flat_nce",
    "flood",
    "flooding",
    "gradient_penalty",
    "iflood",
    "info_nce",
    "ldam_loss",
    "logit_adjusted_cross_entropy",
    "metric_margin_loss",
    "posthoc_logit_adjustment",
    "prior_bias_init",
    "rdrop_consistency",
    "rdrop_loss",
    "rdrop_regression_loss",
    "simclr_scores",
    "softmax_focal_loss",
    "sphereface_loss",
    "two_pass_duplicated",
    "two_pass_vmap",
]

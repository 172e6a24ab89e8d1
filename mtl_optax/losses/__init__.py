"""Per-example loss functions (no reduction) and the optax transforms that belong with them.

Modules: ``contrastive`` (InfoNCE, FlatNCE, SimCLR scores), ``margin`` (CosFace,
ArcFace, SphereFace, metric-margin softmax), ``rdrop`` (R-Drop and two-pass helpers),
``imbalance`` (logit adjustment, F1-weighted BCE, focal, class-balanced, LDAM) and
``flooding`` (flooding, iFlood, gradient penalty, alternating ascent transforms).
"""

from mtl_optax.losses.contrastive import flat_nce, info_nce, simclr_scores

__all__ = [
    "flat_nce",
    "info_nce",
    "simclr_scores",
]

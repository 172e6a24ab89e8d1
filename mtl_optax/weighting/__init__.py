"""Weightings: ``(gram, losses, state) -> (weights, state)``, one module per family."""

from mtl_optax.weighting.base import EmptyWeightingState, Weighting
from mtl_optax.weighting.basic import constant_weighting, mean_weighting, sum_weighting
from mtl_optax.weighting.cagrad import cagrad
from mtl_optax.weighting.dual_cone import DualConeState, dualproj, upgrad
from mtl_optax.weighting.min_norm import MinNormState, mgda, primary_auxiliary
from mtl_optax.weighting.normalized import gradient_normalized

__all__ = [
    "DualConeState",
    "cagrad",
    "dualproj",
    "upgrad",
    "EmptyWeightingState",
    "MinNormState",
    "Weighting",
    "constant_weighting",
    "gradient_normalized",
    "mean_weighting",
    "mgda",
    "primary_auxiliary",
    "sum_weighting",
]

"""Weightings: ``(gram, losses, state) -> (weights, state)``, one module per family."""

from mtl_optax.weighting.alignment import aligned_mtl, config, imtl_g
from mtl_optax.weighting.bargaining import fairgrad, nash_mtl
from mtl_optax.weighting.base import EmptyWeightingState, Weighting
from mtl_optax.weighting.basic import constant_weighting, mean_weighting, sum_weighting
from mtl_optax.weighting.min_norm import MinNormState, mgda, primary_auxiliary
from mtl_optax.weighting.normalized import gradient_normalized
from mtl_optax.weighting.projection import GradVacState, RandomOrderState, gradvac, pcgrad
from mtl_optax.weighting.robust import krum
from mtl_optax.weighting.two_batch import SimplexWeightsState, cross_task_gram, modo, sdmgrad

__all__ = [
    "EmptyWeightingState",
    "MinNormState",
    "Weighting",
    "constant_weighting",
    "gradient_normalized",
    "mean_weighting",
    "mgda",
    "primary_auxiliary",
    "sum_weighting",
    "GradVacState",
    "RandomOrderState",
    "SimplexWeightsState",
    "aligned_mtl",
    "config",
    "cross_task_gram",
    "fairgrad",
    "gradvac",
    "imtl_g",
    "krum",
    "modo",
    "nash_mtl",
    "pcgrad",
    "sdmgrad",
]

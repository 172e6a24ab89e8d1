"""Weightings: ``(gram, losses, state) -> (weights, state)``, one module per family."""

from mtl_optax.weighting.alignment import aligned_mtl, config, imtl_g
from mtl_optax.weighting.bargaining import fairgrad, nash_mtl
from mtl_optax.weighting.base import EmptyWeightingState, Weighting
from mtl_optax.weighting.basic import constant_weighting, mean_weighting, sum_weighting
from mtl_optax.weighting.cagrad import cagrad
from mtl_optax.weighting.dual_cone import DualConeState, dualproj, upgrad
from mtl_optax.weighting.dynamic import DWAState, STCHState, dwa, stch
from mtl_optax.weighting.learned import (
    FAMOState,
    GradNormState,
    LogScaleState,
    famo,
    gradnorm,
    imtl_l,
    uncertainty_weighting,
)
from mtl_optax.weighting.loss_scale import (
    WarmupMeanState,
    cross_entropy_initial_loss,
    cross_entropy_prior_loss,
    generalized_mean,
    geometric_mean,
    initial_loss_weighting,
    prior_loss_weighting,
    real_time_weighting,
    squared_error_initial_loss,
    squared_error_prior_loss,
)
from mtl_optax.weighting.min_norm import MinNormState, mgda, primary_auxiliary
from mtl_optax.weighting.normalized import gradient_normalized
from mtl_optax.weighting.preference import cosmos, pbi
from mtl_optax.weighting.projection import GradVacState, RandomOrderState, gradvac, pcgrad
from mtl_optax.weighting.randomized import RandomWeightingState, random_weighting, rlw
from mtl_optax.weighting.robust import krum
from mtl_optax.weighting.smoothing import CRMOGMState, cr_mogm
from mtl_optax.weighting.two_batch import SimplexWeightsState, cross_task_gram, modo, sdmgrad

__all__ = [
    "CRMOGMState",
    "DWAState",
    "DualConeState",
    "EmptyWeightingState",
    "FAMOState",
    "GradNormState",
    "GradVacState",
    "LogScaleState",
    "MinNormState",
    "RandomOrderState",
    "RandomWeightingState",
    "STCHState",
    "SimplexWeightsState",
    "WarmupMeanState",
    "Weighting",
    "aligned_mtl",
    "cagrad",
    "config",
    "constant_weighting",
    "cosmos",
    "cr_mogm",
    "cross_entropy_initial_loss",
    "cross_entropy_prior_loss",
    "cross_task_gram",
    "dualproj",
    "dwa",
    "fairgrad",
    "famo",
    "generalized_mean",
    "geometric_mean",
    "gradient_normalized",
    "gradnorm",
    "gradvac",
    "imtl_g",
    "imtl_l",
    "initial_loss_weighting",
    "krum",
    "mean_weighting",
    "mgda",
    "modo",
    "nash_mtl",
    "pbi",
    "pcgrad",
    "primary_auxiliary",
    "prior_loss_weighting",
    "random_weighting",
    "real_time_weighting",
    "rlw",
    "sdmgrad",
    "squared_error_initial_loss",
    "squared_error_prior_loss",
    "stch",
    "sum_weighting",
    "uncertainty_weighting",
    "upgrad",
]

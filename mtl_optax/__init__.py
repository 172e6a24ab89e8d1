"""mtl_optax: multi-task gradient aggregation, loss weighting and multi-objective losses.

The public API is flat: ``import mtl_optax as mtl`` then ``mtl.mgda()``, ``mtl.aggregate``,
``mtl.value_and_jacobian``, ``mtl.flat_nce`` ...
"""

from mtl_optax.aggregate import AggregateState, aggregate
from mtl_optax.gram import task_gram
from mtl_optax.jacobian import TaskGradients, value_and_jacobian
from mtl_optax.losses import *  # flat public API
from mtl_optax.solvers import frank_wolfe_simplex, min_norm_weights
from mtl_optax.stacked import (
    DBMTLState,
    ExcessMTLState,
    GradDropState,
    db_mtl,
    excess_mtl,
    graddrop,
    trimmed_mean,
)
from mtl_optax.weight_decay import weight_decay_constraint
from mtl_optax.weighted import WeightedGrads, weighted_value_and_grad
from mtl_optax.weighting import (
    EmptyWeightingState,
    MinNormState,
    Weighting,
    constant_weighting,
    gradient_normalized,
    mean_weighting,
    mgda,
    primary_auxiliary,
    sum_weighting,
)
from mtl_optax.weighting.alignment import aligned_mtl, config, imtl_g
from mtl_optax.weighting.bargaining import fairgrad, nash_mtl
from mtl_optax.weighting.projection import GradVacState, RandomOrderState, gradvac, pcgrad
from mtl_optax.weighting.robust import krum
from mtl_optax.weighting.two_batch import SimplexWeightsState, cross_task_gram, modo, sdmgrad

__version__ = "0.1.0"

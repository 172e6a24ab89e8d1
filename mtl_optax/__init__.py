"""mtl_optax: multi-task gradient aggregation, loss weighting and multi-objective losses.

The public API is flat: ``import mtl_optax as mtl`` then ``mtl.mgda()``, ``mtl.aggregate``,
``mtl.value_and_jacobian``, ``mtl.flat_nce`` ...
"""

from mtl_optax.aggregate import AggregateState, aggregate
from mtl_optax.gram import task_gram
from mtl_optax.jacobian import TaskGradients, value_and_jacobian
from mtl_optax.losses import *  # flat public API
from mtl_optax.solvers import frank_wolfe_simplex, lower_bounded_qp, min_norm_weights
from mtl_optax.weight_decay import weight_decay_constraint
from mtl_optax.weighted import WeightedGrads, weighted_value_and_grad
from mtl_optax.weighting import (
    DualConeState,
    EmptyWeightingState,
    MinNormState,
    Weighting,
    cagrad,
    constant_weighting,
    dualproj,
    gradient_normalized,
    mean_weighting,
    mgda,
    primary_auxiliary,
    sum_weighting,
    upgrad,
)

__version__ = "0.1.0"

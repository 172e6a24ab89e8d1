"""mtl_optax: multi-task gradient aggregation, loss weighting and multi-objective losses.

The public API is flat: ``import mtl_optax as mtl`` then ``mtl.mgda()``, ``mtl.aggregate``,
``mtl.value_and_jacobian``, ``mtl.flat_nce`` ...
"""

from mtl_optax.aggregate import aggregate
from mtl_optax.gram import task_gram
from mtl_optax.heads import StackedHeads, stacked_heads
from mtl_optax.losses import *  # flat public API
from mtl_optax.solvers import frank_wolfe_simplex, lower_bounded_qp, min_norm_weights
from mtl_optax.split import split_value_and_grad, split_value_and_jacobian
from mtl_optax.stacked import (
    DBMTLState,
    ExcessMTLState,
    GradDropState,
    MoCoState,
    StackedAggregator,
    TrimmedMeanState,
    db_mtl,
    excess_mtl,
    graddrop,
    moco,
    trimmed_mean,
)
from mtl_optax.state import AggregateState, task_weights
from mtl_optax.structured_gram import (
    BatchCouplingError,
    instance_wise_value_and_grad,
    value_and_gram,
)
from mtl_optax.task_gradients import TaskGradients
from mtl_optax.train_state import apply_task_gradients
from mtl_optax.weight_decay import weight_decay_constraint
from mtl_optax.weighted import WeightedGradFunction, WeightedGrads
from mtl_optax.weighting import *  # flat public API: every weighting and its state type
from mtl_optax.whole_model import value_and_grad, value_and_jacobian

__version__ = "0.2.0"

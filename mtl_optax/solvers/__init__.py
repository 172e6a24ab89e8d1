"""Exact, jittable and vmappable solvers for the small problems of multi-task learning.

One module per problem family; every weighting of the same family shares its solver.

* :mod:`.active_set`: min-norm quadratic programs on the Gram matrix (simplex, orthant,
  with an offset: lower-bounded and linear-term QPs).
* :mod:`.newton`: damped Newton for ``G w = w^{−p}``, ``w > 0`` (Nash-MTL, FairGrad).
"""

from mtl_optax.solvers.active_set import (
    check_gram,
    check_iters,
    check_nonnegative,
    frank_wolfe_simplex,
    lower_bounded_qp,
    min_norm_weights,
)
from mtl_optax.solvers.newton import power_balance_weights

__all__ = [
    "check_gram",
    "check_iters",
    "check_nonnegative",
    "frank_wolfe_simplex",
    "lower_bounded_qp",
    "min_norm_weights",
    "power_balance_weights",
]

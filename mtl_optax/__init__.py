"""mtl_optax: multi-task gradient aggregation, loss weighting and multi-objective losses."""

from mtl_optax.losses import *  # noqa: F401,F403  (flat public API)

"""Every shipped method, built for K tasks: the registry the generic tests iterate over.

Add each new weighting to ``WEIGHTINGS`` (name -> ``factory(num_tasks) -> Weighting``) and
each direct aggregator on stacked gradients to ``STACKED`` (name -> ``factory(num_tasks)
-> optax.GradientTransformation``); the property, vmap and checkpoint tests pick them up.
"""

import jax
import numpy as np

import mtl_optax as mtl

WEIGHTINGS = {
    "mean": lambda k: mtl.mean_weighting(),
    "sum": lambda k: mtl.sum_weighting(),
    "constant": lambda k: mtl.constant_weighting(np.arange(1.0, k + 1.0)),
    "gradient_normalized": lambda k: mtl.gradient_normalized(),
    "mgda": lambda k: mtl.mgda(),
    "mgda_l2": lambda k: mtl.mgda(normalization="l2"),
    "mgda_frank_wolfe": lambda k: mtl.mgda(solver="frank_wolfe"),
    "primary_auxiliary": lambda k: mtl.primary_auxiliary(primary=0),
    "pcgrad": lambda k: mtl.pcgrad(key=jax.random.PRNGKey(0)),
    "gradvac": lambda k: mtl.gradvac(key=jax.random.PRNGKey(0)),
    "imtl_g": lambda k: mtl.imtl_g(),
    "aligned_mtl": lambda k: mtl.aligned_mtl(),
    "aligned_mtl_rmse": lambda k: mtl.aligned_mtl(scale_mode="rmse"),
    "config": lambda k: mtl.config(),
    "nash_mtl": lambda k: mtl.nash_mtl(),
    "nash_mtl_unclipped": lambda k: mtl.nash_mtl(max_norm=0.0),
    "fairgrad": lambda k: mtl.fairgrad(),
    "fairgrad_alpha2": lambda k: mtl.fairgrad(alpha=2.0),
    "krum": lambda k: mtl.krum(n_byzantine=max(k - 3, 0) // 2),
    "sdmgrad": lambda k: mtl.sdmgrad(),
    "modo": lambda k: mtl.modo(),
}

STACKED = {
    "trimmed_mean": lambda k: mtl.trimmed_mean(num_tasks=k, trim=min(1, (k - 1) // 2)),
    "graddrop": lambda k: mtl.graddrop(num_tasks=k, key=jax.random.PRNGKey(0)),
    "db_mtl": lambda k: mtl.db_mtl(num_tasks=k),
    "excess_mtl": lambda k: mtl.excess_mtl(num_tasks=k),
}

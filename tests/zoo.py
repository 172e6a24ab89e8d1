"""Every shipped method, built for K tasks: the registry the generic tests iterate over.

Add each new weighting to ``WEIGHTINGS`` (name -> ``factory(num_tasks) -> Weighting``) and
each direct aggregator on stacked gradients to ``STACKED`` (name -> ``factory(num_tasks)
-> optax.GradientTransformation``); the property, vmap and checkpoint tests pick them up.
"""

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
    "upgrad": lambda k: mtl.upgrad(),
    "dualproj": lambda k: mtl.dualproj(),
    "cagrad": lambda k: mtl.cagrad(),
}

STACKED = {}

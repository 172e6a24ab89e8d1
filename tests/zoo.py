"""Every shipped method, built for K tasks: the registry the generic tests iterate over.

Add each new weighting to ``WEIGHTINGS`` (name -> ``factory(num_tasks) -> Weighting``) and
each method on stacked gradients to ``STACKED`` (name -> ``factory(num_tasks) ->
StackedAggregator``); the property, vmap and checkpoint tests pick them up. Every entry runs
through ``mtl.aggregate(METHODS[name](k), tasks=k, ...)``.
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
    "initial_loss": lambda k: mtl.initial_loss_weighting(steps=3),
    "initial_loss_given": lambda k: mtl.initial_loss_weighting(initial=np.arange(1.0, k + 1.0)),
    "prior_loss": lambda k: mtl.prior_loss_weighting(np.linspace(0.5, 2.0, k)),
    "real_time": lambda k: mtl.real_time_weighting(),
    "generalized_mean": lambda k: mtl.generalized_mean(gamma=2.0),
    "generalized_mean_max": lambda k: mtl.generalized_mean(gamma=np.inf),
    "geometric_mean": lambda k: mtl.geometric_mean(),
    "uncertainty": lambda k: mtl.uncertainty_weighting(),
    "imtl_l": lambda k: mtl.imtl_l(),
    "gradnorm": lambda k: mtl.gradnorm(),
    "famo": lambda k: mtl.famo(),
    "dwa": lambda k: mtl.dwa(window=2),
    "stch": lambda k: mtl.stch(warmup=1, nadir_steps=1),
    "random": lambda k: mtl.random_weighting(key=jax.random.PRNGKey(0)),
    "upgrad": lambda k: mtl.upgrad(reg_eps=0.0),  # exact dual-cone projections (no ridge)
    "dualproj": lambda k: mtl.dualproj(reg_eps=0.0),
    "cagrad": lambda k: mtl.cagrad(),
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
    "sdmgrad": lambda k: mtl.sdmgrad(single_batch=True),  # the generic tests pass no cross_gram
    "modo": lambda k: mtl.modo(single_batch=True),
    # from uniform weights, so the first call already mixes in weights of another Gram
    "cr_mogm": lambda k: mtl.cr_mogm(mtl.upgrad(reg_eps=0.0), initial_weights=np.full(k, 1.0 / k)),
    "cosmos": lambda k: mtl.cosmos(),
    "pbi": lambda k: mtl.pbi(),
}

STACKED = {
    "trimmed_mean": lambda k: mtl.trimmed_mean(trim=min(1, (k - 1) // 2)),
    "graddrop": lambda k: mtl.graddrop(key=jax.random.PRNGKey(0)),
    "db_mtl": lambda k: mtl.db_mtl(),
    "excess_mtl": lambda k: mtl.excess_mtl(),
    "moco": lambda k: mtl.moco(),
}

METHODS = {**WEIGHTINGS, **STACKED}

# Relative tolerance when two gradient paths (split vs whole model, bounded vs stacked) are
# compared: 1e-5 for every method but plain Frank-Wolfe, which stops after 250 iterations,
# sublinearly converged on a face of the simplex (its documented limitation): its weights
# carry an error of ~1e-4 that turns the float32 rounding differences of two paths into
# ~1e-4 differences.
PATH_RTOL = {"mgda_frank_wolfe": 1e-3}

# %% [markdown]
# # Trajectories on the two-objective toy
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/@GITHUB_REPO@/blob/main/notebooks/two_objective_toy.ipynb)
#
# The classic non-convex two-task problem used to illustrate CAGrad (Liu et al., 2021,
# "Conflict-Averse Gradient Descent for Multi-task Learning") and Nash-MTL (Navon et al.,
# 2022, "Multi-Task Learning as a Bargaining Game"). Two losses of a 2-D parameter
# `x = (x₁, x₂)`:
#
# * for `x₂ > 0` (weight `max(tanh(x₂/2), 0)`): `log max(|½(−x₁ − 7) − tanh(−x₂)|, 5·10⁻⁶) + 6`
#   and `log max(|½(−x₁ + 3) + tanh(−x₂) + 2|, 5·10⁻⁶) + 6`, two narrow valleys;
# * for `x₂ < 0` (weight `max(tanh(−x₂/2), 0)`): the quadratics
#   `((x₁ − 7)² + 0.1 (x₂ + 8)²)/10 − 20` and `((x₁ + 7)² + 0.1 (x₂ + 8)²)/10 − 20`.
#
# Nash-MTL also scales the first loss by 0.1, so that one task's gradients are much smaller
# than the other's; both versions are below. Every method starts from the same five points
# and runs Adam on the aggregated update: every gradient aggregator and weighting of
# `mtl_optax` that applies to two tasks. The papers run 35,000 Adam steps of learning rate
# 10⁻³; here it is 3,500 steps of 10⁻² (about the same path length, coarser steps), so that
# the thirty methods run in a couple of minutes. **To add a method, add one line to
# `METHODS`.**
#
# The toy's losses go down to about −20. The gradients do not care, but several weightings
# read the losses themselves (logarithms, ratios): every method is handed the losses plus
# `OFFSET = 21` as `task_losses`, which makes them positive and leaves every gradient as it
# is. Krum is left out (it needs at least three tasks), and so are the sum, constant
# weightings and the trimmed mean, which with two tasks and Adam move exactly like equal
# weights.

# %% [setup]  (the shared first code cell: Colab install, SMALL flag)

# %%
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import mtl_optax as mtl

print("JAX", jax.__version__, "on", jax.devices())

KEY = jax.random.PRNGKey(0)  # the random methods
METHODS = {  # name -> method (a weighting or a stacked aggregator); one line per method
    # baselines
    "equal weights": mtl.mean_weighting(),
    "primary/auxiliary (task 1 primary)": mtl.primary_auxiliary(primary=0),
    # loss weightings (from the losses alone)
    "geometric mean": mtl.geometric_mean(),
    "generalized mean (γ=2)": mtl.generalized_mean(gamma=2.0),
    "real-time weighting": mtl.real_time_weighting(),
    "initial-loss weighting": mtl.initial_loss_weighting(),
    "DWA": mtl.dwa(),
    "STCH": mtl.stch(),
    "random weighting": mtl.random_weighting(key=KEY),
    "uncertainty weighting": mtl.uncertainty_weighting(),
    "IMTL-L": mtl.imtl_l(),
    "FAMO": mtl.famo(),
    # gradient weightings (from the Gram matrix of the task gradients)
    "gradient-normalized": mtl.gradient_normalized(),
    "GradNorm": mtl.gradnorm(),
    "MGDA": mtl.mgda(),
    "UPGrad": mtl.upgrad(),
    "DualProj": mtl.dualproj(),
    "CAGrad": mtl.cagrad(),
    "Nash-MTL": mtl.nash_mtl(),
    "FairGrad": mtl.fairgrad(),
    "PCGrad": mtl.pcgrad(key=KEY),
    "GradVac": mtl.gradvac(key=KEY),
    "IMTL-G": mtl.imtl_g(),
    "Aligned-MTL": mtl.aligned_mtl(),
    "ConFIG": mtl.config(),
    "SDMGrad": mtl.sdmgrad(single_batch=True),
    "MoDo": mtl.modo(single_batch=True),
    # direct aggregators on the stacked gradients
    "GradDrop": mtl.graddrop(key=KEY),
    "DB-MTL": mtl.db_mtl(),
    "ExcessMTL": mtl.excess_mtl(),
}
if SMALL:  # the test suite's reduced size: one method of each kind
    METHODS = {name: METHODS[name] for name in ("equal weights", "FAMO", "MGDA", "DB-MTL")}
OFFSET = 21.0  # added to the losses handed to the methods (all positive); gradients unchanged
STARTS = jnp.array([[-8.5, 7.5], [0.0, 0.0], [9.0, 9.0], [-7.5, -0.5], [9.0, -1.0]])
STEPS, LEARNING_RATE = (300 if SMALL else 3_500), 1e-2
FLOOR = 5e-6


def toy_losses(x, scale_first=1.0):
    """(2,) losses of the toy at x = (x1, x2)."""
    x1, x2 = x[0], x[1]
    valley_1 = jnp.log(jnp.maximum(jnp.abs(0.5 * (-x1 - 7) - jnp.tanh(-x2)), FLOOR)) + 6
    valley_2 = jnp.log(jnp.maximum(jnp.abs(0.5 * (-x1 + 3) + jnp.tanh(-x2) + 2), FLOOR)) + 6
    bowl_1 = ((x1 - 7) ** 2 + 0.1 * (x2 + 8) ** 2) / 10 - 20
    bowl_2 = ((x1 + 7) ** 2 + 0.1 * (x2 + 8) ** 2) / 10 - 20
    up, down = jnp.maximum(jnp.tanh(x2 / 2), 0), jnp.maximum(jnp.tanh(-x2 / 2), 0)
    f1 = valley_1 * up + bowl_1 * down
    f2 = valley_2 * up + bowl_2 * down
    return jnp.stack([scale_first * f1, f2])


# %% [markdown]
# One optimisation run: per-task gradients of the 2-D parameter (`value_and_jacobian`),
# combined by the method (`aggregate(method, tasks=2, shared=True)`, weighting or stacked
# aggregator alike) in front of Adam; `lax.scan` over the steps and `vmap` over the
# starting points, all in one jit-compiled call per method.


# %%
def trajectories(method, steps=STEPS):
    """Jitted ``run(scale_first) -> (points (5, steps, 2), losses (5, steps, 2))`` from STARTS
    (the scale is an argument, so each method compiles once for both scales)."""
    opt = optax.chain(mtl.aggregate(method, tasks=2, shared=True), optax.adam(LEARNING_RATE))
    value_and_jac = mtl.value_and_jacobian(toy_losses)

    def step(state, scale_first):
        x, opt_state = state
        losses, grads = value_and_jac(x, scale_first)
        updates, opt_state = opt.update(grads, opt_state, x, task_losses=losses + OFFSET)
        return (optax.apply_updates(x, updates), opt_state), (x, losses)

    def run(x0, scale_first):
        scales = jnp.full(steps, scale_first)
        return jax.lax.scan(step, (x0, opt.init(x0)), scales)[1]

    return jax.jit(lambda scale_first: jax.vmap(run, (0, None))(STARTS, scale_first))


def pareto_front(scale_first=1.0, n=800):
    """The non-dominated loss pairs among those of a fine grid over the plotted square."""
    grid = jnp.stack(jnp.meshgrid(jnp.linspace(-10, 10, n), jnp.linspace(-10, 10, n)), -1)
    f = np.asarray(jax.vmap(jax.vmap(lambda x: toy_losses(x, scale_first)))(grid)).reshape(-1, 2)
    f = f[np.argsort(f[:, 0])]
    keep = f[:, 1] < np.minimum.accumulate(np.concatenate([[np.inf], f[:-1, 1]]))
    return f[keep]


runs = {1.0: {}, 0.1: {}}
for name, method in METHODS.items():
    run = trajectories(method)
    for scale in runs:
        runs[scale][name] = run(scale)


# %%
COLS = 6
GRID = jnp.stack(jnp.meshgrid(jnp.linspace(-10, 10, 200), jnp.linspace(-10, 10, 200)), -1)


def panels(title):
    rows = -(-len(METHODS) // COLS)
    fig, axes = plt.subplots(rows, COLS, figsize=(3.2 * COLS, 3.0 * rows), squeeze=False)
    for ax in axes.ravel()[len(METHODS) :]:
        ax.axis("off")
    fig.suptitle(title, y=1.0)
    return fig, axes.ravel()


def plot_parameter_space(scale_first):
    f = np.asarray(jax.vmap(jax.vmap(lambda x: toy_losses(x, scale_first)))(GRID))
    fig, axes = panels(
        f"task 1 scaled by {scale_first:g}: paths in parameter space over the contours of the "
        f"summed loss (black dots: starts, red stars: after {STEPS} steps)"
    )
    for ax, (name, (points, _)) in zip(axes, runs[scale_first].items()):
        ax.contourf(GRID[..., 0], GRID[..., 1], f.sum(-1), levels=30, cmap="Greys", alpha=0.6)
        for p in np.asarray(points):
            ax.plot(p[:, 0], p[:, 1], lw=1.2)
            ax.plot(*p[0], "ko", ms=3)
            ax.plot(*p[-1], "r*", ms=8)
        ax.set(title=name, xlim=(-10, 10), ylim=(-10, 10), xticks=[], yticks=[])
    plt.tight_layout()
    plt.show()


def plot_loss_space(scale_first):
    front = pareto_front(scale_first)
    fig, axes = panels(
        f"task 1 scaled by {scale_first:g}: paths in loss space (x: task 1, y: task 2) and "
        "the Pareto front (black)"
    )
    for ax, (name, (_, losses)) in zip(axes, runs[scale_first].items()):
        ax.plot(front[:, 0], front[:, 1], "k-", lw=2)
        for l in np.asarray(losses):
            ax.plot(l[:, 0], l[:, 1], lw=1.2)
            ax.plot(*l[-1], "r*", ms=8)
        ax.set(title=name)
    plt.tight_layout()
    plt.show()


plot_parameter_space(1.0)

# %%
plot_loss_space(1.0)

# %%
plot_parameter_space(0.1)

# %%
plot_loss_space(0.1)

# %% [markdown]
# ## Which runs reach the front, which stall, which diverge?
#
# A final point is counted as *on the front* when no grid point of the front improves
# both of its losses by more than 0.05 (the grid is coarse, so this is a loose test); as
# *diverged* when it is not finite or has left the plotted square `[−10, 10]²` (where
# every loss only keeps falling along the bowls); every other run *stalled* short of the
# front (in a valley, or still moving slowly when the steps ran out).


# %%
def outcomes(points, losses, front, tol=0.05):
    final_x, final = np.asarray(points[:, -1]), np.asarray(losses[:, -1])
    dominated = (front[None, :, 0] < final[:, None, 0] - tol) & (
        front[None, :, 1] < final[:, None, 1] - tol
    )
    diverged = ~np.isfinite(final_x).all(1) | (np.abs(final_x) > 10).any(1)
    on_front = ~dominated.any(1) & ~diverged
    return on_front.sum(), diverged.sum(), len(final) - on_front.sum() - diverged.sum()


fronts = {scale: pareto_front(scale) for scale in runs}
print(f"{'method':>36} | {'scale 1: front / stalled / diverged':>36} | scale 0.1")
for name in METHODS:
    cells = []
    for scale in runs:
        front_n, diverged_n, stalled_n = outcomes(*runs[scale][name], fronts[scale])
        cells.append(f"{front_n} / {stalled_n} / {diverged_n}")
    print(f"{name:>36} | {cells[0]:>36} | {cells[1]}")

# %% [markdown]
# Reading the pictures and the table (3,500 steps of 10⁻²):
#
# * **No run diverges.** The failures are stalls in the upper half (`x₂ > 0`): in a narrow
#   valley (the run from (9, 9) of several loss weightings, PCGrad, MoDo and ExcessMTL
#   with both tasks at their own scale; of most methods with task 1 scaled by 0.1,
#   where it ends oscillating across the valley at losses near (0.5, 3)), or where the
#   valleys flatten out near `x₂ = 0` (the run from (−8.5, 7.5) of several loss weightings).
# * **Scale-invariant gradient methods reach the front from every start at both scales**:
#   gradient-normalized, MGDA, Nash-MTL, FairGrad, IMTL-G, Aligned-MTL and DB-MTL, at
#   points spread along the front. GradNorm, UPGrad, (single-batch) SDMGrad and GradDrop do
#   so at one of the two scales.
# * **With task 1 scaled by 0.1**, equal weights and most loss weightings, which follow a
#   weighted sum of the losses, end at the task-2 end of the front (task 1 near 0 of its
#   range down to −2): on the front by the loose test, but with the small task neglected.
#   The methods built to resist that (MGDA, Nash-MTL, FairGrad, IMTL-G, Aligned-MTL,
#   gradient-normalized) end along the whole front.
# * **Primary/auxiliary** lowers task 1 only while task 2 does not rise, so it stops at the
#   first point of the front it reaches.
# * Single runs near a valley's edge are fragile: the valleys are narrow and the dynamics
#   chaotic, so a difference in the last bit of the arithmetic (another XLA fusion of the
#   same step) can move a run from "stalled" to "on the front" after a few thousand steps.
#   Read one method's count against another's as indicative, not as a ranking.
# * Step size matters on this toy: with the papers' 35,000 steps of 10⁻³, equal weights stop
#   in the valleys from both upper starts; with the coarser steps used here they cross
#   them. Set `STEPS, LEARNING_RATE = 35_000, 1e-3` to reproduce the papers' setting (about
#   ten times longer to run).

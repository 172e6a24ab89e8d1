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
# and runs Adam (learning rate 10⁻³) on the aggregated update. **To add a method, add one
# line to `METHODS`.**

# %% [setup]  (the shared first code cell: Colab install, SMALL flag)

# %%
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import mtl_optax as mtl

print("JAX", jax.__version__, "on", jax.devices())

METHODS = {  # name -> weighting; one line per method
    "equal weights": mtl.mean_weighting(),
    "gradient-normalized": mtl.gradient_normalized(),
    "MGDA": mtl.mgda(),
    "primary/auxiliary (task 1 primary)": mtl.primary_auxiliary(primary=0),
}
STARTS = jnp.array([[-8.5, 7.5], [0.0, 0.0], [9.0, 9.0], [-7.5, -0.5], [9.0, -1.0]])
STEPS = 2_000 if SMALL else 35_000
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
# aggregated by the weighting (`aggregate`) in front of Adam; `lax.scan` over the steps and
# `vmap` over the starting points, all in one jit-compiled call per method.


# %%
def trajectories(weighting, scale_first=1.0, steps=STEPS):
    opt = optax.chain(mtl.aggregate(weighting, num_tasks=2, shared=True), optax.adam(1e-3))
    value_and_jac = mtl.value_and_jacobian(lambda x: toy_losses(x, scale_first))

    def step(state, _):
        x, opt_state = state
        losses, grads = value_and_jac(x)
        updates, opt_state = opt.update(grads, opt_state, x, task_losses=losses)
        return (optax.apply_updates(x, updates), opt_state), (x, losses)

    def run(x0):
        return jax.lax.scan(step, (x0, opt.init(x0)), None, length=steps)[1]

    return jax.jit(jax.vmap(run))(STARTS)  # (points (5, steps, 2), losses (5, steps, 2))


def pareto_front(scale_first=1.0, n=800):
    """The non-dominated loss pairs among those of a fine grid over the plotted square."""
    grid = jnp.stack(jnp.meshgrid(jnp.linspace(-10, 10, n), jnp.linspace(-10, 10, n)), -1)
    f = np.asarray(jax.vmap(jax.vmap(lambda x: toy_losses(x, scale_first)))(grid)).reshape(-1, 2)
    f = f[np.argsort(f[:, 0])]
    keep = f[:, 1] < np.minimum.accumulate(np.concatenate([[np.inf], f[:-1, 1]]))
    return f[keep]


runs = {
    scale: {name: trajectories(w, scale) for name, w in METHODS.items()} for scale in (1.0, 0.1)
}


# %%
def plot_runs(scale_first):
    fig, axes = plt.subplots(2, len(METHODS), figsize=(4.2 * len(METHODS), 8))
    xs = jnp.stack(jnp.meshgrid(jnp.linspace(-10, 10, 200), jnp.linspace(-10, 10, 200)), -1)
    f = np.asarray(jax.vmap(jax.vmap(lambda x: toy_losses(x, scale_first)))(xs))
    front = pareto_front(scale_first)
    for col, (name, (points, losses)) in enumerate(runs[scale_first].items()):
        top, bottom = axes[0, col], axes[1, col]
        top.contourf(xs[..., 0], xs[..., 1], f.sum(-1), levels=30, cmap="Greys", alpha=0.6)
        bottom.plot(front[:, 0], front[:, 1], "k-", lw=2, label="Pareto front")
        for p, l in zip(np.asarray(points), np.asarray(losses)):
            top.plot(p[:, 0], p[:, 1], lw=1.5)
            top.plot(*p[0], "ko", ms=4)
            top.plot(*p[-1], "r*", ms=9)
            bottom.plot(l[:, 0], l[:, 1], lw=1.5)
            bottom.plot(*l[-1], "r*", ms=9)
        top.set(title=name, xlabel="x₁", ylabel="x₂", xlim=(-10, 10), ylim=(-10, 10))
        bottom.set(
            xlabel="task 1 loss" + (" (×0.1)" if scale_first != 1 else ""), ylabel="task 2 loss"
        )
    axes[1, 0].legend()
    fig.suptitle(
        f"task 1 scaled by {scale_first:g}: parameter space (top, contours of the "
        f"sum) and loss space (bottom); red stars: after {STEPS} steps"
    )
    plt.tight_layout()
    plt.show()


plot_runs(1.0)

# %%
plot_runs(0.1)

# %% [markdown]
# ## Which runs reach the front?
#
# A final point is counted as *on the front* when no grid point of the front improves
# both of its losses by more than 0.05 (the grid is coarse, so this is a loose test).


# %%
def reaches_front(losses, front, tol=0.05):
    final = np.asarray(losses[:, -1])
    dominated = (front[None, :, 0] < final[:, None, 0] - tol) & (
        front[None, :, 1] < final[:, None, 1] - tol
    )
    return ~dominated.any(1)


for scale in runs:
    front = pareto_front(scale)
    print(f"task 1 scaled by {scale:g}:")
    for name, (_, losses) in runs[scale].items():
        on = reaches_front(losses, front)
        print(f"  {name:>36}: {on.sum()}/{len(on)} starting points end on the front")

# %% [markdown]
# Reading the pictures (at the full 35,000 steps):
#
# * **Equal weights** follow the sum. From the two upper starting points they stop in the
#   narrow valleys of the sum (x₂ ≈ 3), far from the front; from the others they all end at
#   one point, the minimiser of the sum, whatever the start. With task 1 scaled by 0.1 that
#   point moves to the task-2 end of the front: the small task is neglected.
# * **Gradient-normalized** and **MGDA** reach the front from all five starts at both scales,
#   at different points of it. The normalised sum does not see the 0.1 scaling at all (its
#   parameter-space paths are the same in both figures).
# * **Primary/auxiliary** lowers task 1 only while task 2 does not rise, so it stops at the
#   first point of the front it reaches (the task-1 end from (0, 0), (9, 9) and (9, −1));
#   from (−8.5, 7.5) it stalls near x₂ = 0 before reaching the front.

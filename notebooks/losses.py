# %% [markdown]
# # The losses: FlatNCE precision, margin losses, logit adjustment
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/@GITHUB_REPO@/blob/main/notebooks/losses.ipynb)
#
# `mtl_optax` ships per-example losses (no reduction, like `optax.losses`). This notebook
# looks at three of them on small problems:
#
# 1. **FlatNCE vs InfoNCE in float32**: the gradient error against a float64 reference as
#    the positive's score pulls away from the negatives.
# 2. **Margin losses for retrieval of unseen classes**: train an embedding on digits 0–4
#    and retrieve digits 5–9, which training never saw.
# 3. **Logit adjustment on long-tailed digits**: balanced accuracy when the rare classes
#    have a handful of training examples.
#
# Everything here runs unchanged on CPU, GPU or TPU.

# %% [setup]  (the shared first code cell: Colab install, SMALL flag)

# %%
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import mtl_optax as mtl
from mtl_optax import datasets

print("JAX", jax.__version__, "on", jax.devices())

# %% [helpers]  (a plain-JAX MLP and training loop, shared with the other MNIST notebooks)

# %%


def fit_adam(objective, params, *, steps, seed=0, lr=1e-3):
    """Parameters after ``steps`` Adam steps on ``objective(params, key) -> (loss, {})``."""
    optimizer = optax.adam(lr)
    step = make_step(objective, optimizer)
    state, _ = train(
        step,
        TrainState(params, optimizer.init(params)),
        jax.random.PRNGKey(100 + seed),
        steps=steps,
    )
    return state.params


# %% [markdown]
# ## 1. FlatNCE keeps its gradient in float32
#
# Scores `s` over `N` candidates, positive `t`, `ξ = Σ_{i≠t} exp(s_i − s_t)`:
#
# * InfoNCE `= log(1 + ξ)`; its gradient is `softmax(s) − onehot(t)`. Its positive
#   component is `−ξ/(1+ξ)`, but float32 computes it as `softmax(s)_t − 1`, a difference
#   of two numbers close to 1: its relative error is about `ε/ξ` (`ε` the float32
#   epsilon), growing exponentially with the margin, and it is exactly 0 once
#   `softmax(s)_t` rounds to 1. Past a margin of ~100 every other component underflows too.
# * FlatNCE `= log ξ`; its gradient is `−1` at the positive and the softmax over the
#   negatives elsewhere: nothing cancels.
#
# Both gradients point the same way (`∇FlatNCE = (1+ξ)/ξ · ∇InfoNCE`). Below, the
# float32 gradients of `mtl.info_nce` and `mtl.flat_nce` are compared with the closed forms
# above evaluated in float64 NumPy (an independent reference), for one row of 16 candidates
# whose positive sits `margin` above Gaussian negatives.

# %%
rng = np.random.default_rng(0)
negatives = rng.normal(size=15)
margins = np.linspace(0.0, 120.0, 241)
scores64 = np.concatenate([margins[:, None], np.broadcast_to(negatives, (len(margins), 15))], 1)
positives = np.zeros(len(margins), int)  # the positive is candidate 0 of every row


def reference_gradients(s):
    """float64 closed forms: (InfoNCE gradient, FlatNCE gradient), positive at index 0."""
    neg = s[:, 1:]
    top = neg.max(1, keepdims=True)
    q = np.exp(neg - top) / np.exp(neg - top).sum(1, keepdims=True)  # softmax over negatives
    xi = np.exp(top[:, 0] + np.log(np.exp(neg - top).sum(1)) - s[:, 0])
    share = (xi / (1 + xi))[:, None]
    info = np.concatenate([-share, share * q], 1)
    flat = np.concatenate([-np.ones_like(share), q], 1)
    return info, flat


def float32_gradient(loss):
    return np.asarray(jax.grad(lambda s: loss(s, positives).sum())(jnp.float32(scores64)))


def relative_error(approx, exact):
    return np.linalg.norm(approx - exact, axis=1) / np.linalg.norm(exact, axis=1)


info64, flat64 = reference_gradients(scores64)
errors = {
    "InfoNCE (float32)": relative_error(float32_gradient(mtl.info_nce), info64),
    "FlatNCE (float32)": relative_error(float32_gradient(mtl.flat_nce), flat64),
}
for name, err in errors.items():
    at = {m: err[np.searchsorted(margins, m)] for m in (5, 10, 20, 110)}
    print(f"{name}: relative error " + ", ".join(f"{e:.1e} at margin {m}" for m, e in at.items()))

# %%
fig, ax = plt.subplots(figsize=(7, 4))
for name, err in errors.items():
    ax.semilogy(margins, np.maximum(err, 1e-10), label=name)
ax.axhline(np.finfo(np.float32).eps, color="gray", ls=":", label="float32 epsilon")
ax.set(
    xlabel="margin of the positive over the negatives (nats)",
    ylabel="relative gradient error vs float64",
    title="16 candidates, one positive",
)
ax.legend()
plt.show()

# %% [markdown]
# The InfoNCE error grows with the margin until the positive component is lost entirely
# (the error is then the positive's share of the gradient norm, between 0.7 and 1) and
# past ~100 the whole gradient is zero; FlatNCE's stays at float32 round-off all the way. In training this matters when the
# positives are already well separated (small batches, low temperature); on the
# `benchmarks/contrastive.py` SimCLR runs it almost never happens.

# %% [markdown]
# ## 2. Margin losses on classes never seen in training
#
# An MLP embedding is trained to classify the train digits 0–4 only; retrieval is
# evaluated on the test digits 5–9 (each one queries all the others, cosine similarity).
# Cross-entropy with a linear classifier against margin losses on cosine logits:
# CosFace (`s = 30, m = 0.35`), ArcFace (`s = 64, m = 0.5`) and the margin derived from the
# triangle inequality on the chord metric `√(2 − 2 cos)` (`s = 30, m = 0.5`).

# %%
SEEN = 5
x_train, y_train = datasets.mnist_split("train")
x_test, y_test = datasets.mnist_split("test")
seen = y_train < SEEN
x_seen, y_seen = jnp.asarray(x_train[seen]), jnp.asarray(y_train[seen])
unseen = y_test >= SEEN
RETRIEVAL_STEPS = 40 if SMALL else 800
EMBEDDING = (784, 64, 16) if SMALL else (784, 256, 64)


def margin_loss(name, z, class_weights, bias, y):
    if name == "cross-entropy":
        logits = z @ class_weights + bias
        return optax.losses.softmax_cross_entropy_with_integer_labels(logits, y)
    cos = mtl.cosine_logits(z, class_weights)
    if name == "CosFace":
        return mtl.cosface_loss(cos, y, scale=30.0, margin=0.35)
    if name == "ArcFace":
        return mtl.arcface_loss(cos, y, scale=64.0, margin=0.5)
    return mtl.metric_margin_loss(cos, y, metric="chord", scale=30.0, margin=0.5)


def retrieval_metrics(embeddings, labels):
    """Recall@1 and mAP with cosine similarity, every item querying all the others."""
    z = np.asarray(embeddings, np.float64)
    z = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    sims = z @ z.T
    np.fill_diagonal(sims, -np.inf)
    order = np.argsort(-sims, axis=1)[:, :-1]  # drop the query itself (ranked last)
    relevant = labels[order] == labels[:, None]
    precision = np.cumsum(relevant, axis=1) / np.arange(1, relevant.shape[1] + 1)
    ap = (precision * relevant).sum(1) / np.maximum(relevant.sum(1), 1)
    return {"recall_at_1": float(relevant[:, 0].mean()), "map": float(ap.mean())}


def train_embedding(name, *, steps=RETRIEVAL_STEPS, batch_size=128, seed=0):
    k_net, k_cls = jax.random.split(jax.random.PRNGKey(seed))
    params = {
        "net": init_mlp(k_net, EMBEDDING),
        "classes": jax.random.normal(k_cls, (EMBEDDING[-1], SEEN)) / 8.0,
        "bias": jnp.zeros(SEEN),
    }

    def objective(params, key):
        x, y = sample_batch(key, (x_seen, y_seen), batch_size)
        z = mlp(params["net"], x)
        return margin_loss(name, z, params["classes"], params["bias"], y).mean(), {}

    trained = fit_adam(objective, params, steps=steps, seed=seed)
    embeddings = mlp(trained["net"], jnp.asarray(x_test[unseen]))
    return retrieval_metrics(np.asarray(embeddings), y_test[unseen])


retrieval_results = {
    name: train_embedding(name) for name in ("cross-entropy", "CosFace", "ArcFace", "chord margin")
}
for name, r in retrieval_results.items():
    print(f"{name:>14}: unseen digits 5-9 Recall@1 {r['recall_at_1']:.1%}, mAP {r['map']:.1%}")

# %%
fig, ax = plt.subplots(figsize=(7, 3.5))
names = list(retrieval_results)
for offset, metric in ((-0.2, "recall_at_1"), (0.2, "map")):
    ax.bar(
        np.arange(len(names)) + offset,
        [100 * retrieval_results[n][metric] for n in names],
        width=0.4,
        label={"recall_at_1": "Recall@1", "map": "mAP"}[metric],
    )
ax.set_xticks(np.arange(len(names)), names)
ax.set(ylabel="%", title="retrieval of the unseen digits 5–9 (one seed)")
ax.legend()
plt.show()

# %% [markdown]
# One seed at a small size: read the ranking, not the decimals. The three-seed comparison
# (with the adaptive margin of `mtl.estimate_margin`) is `python -m benchmarks.retrieval`.

# %% [markdown]
# ## 3. Logit adjustment on long-tailed digits
#
# The train digits are cut to an exponential profile (imbalance ratio 100: class 0 keeps
# 360 digits, class 9 keeps 4); the test set stays balanced. Plain cross-entropy learns the
# training prior and under-predicts the rare classes. Logit adjustment corrects for it,
# either in the loss (`mtl.logit_adjusted_cross_entropy`, `CE(logits + τ log π)`) or after
# training (`mtl.posthoc_logit_adjustment`, `logits − τ log π`), with `τ = 1`.

# %%
keep = datasets.long_tailed_indices(y_train)
x_lt, y_lt = jnp.asarray(x_train[keep]), jnp.asarray(y_train[keep])
counts = np.bincount(y_train[keep], minlength=10)
priors = jnp.asarray(counts / counts.sum(), jnp.float32)
print("train digits per class:", counts.tolist())
LT_STEPS = 40 if SMALL else 1000
CLASSIFIER = (784, 64, 10) if SMALL else (784, 256, 256, 10)


def train_long_tailed(adjusted, *, steps=LT_STEPS, batch_size=128, seed=0):
    def objective(params, key):
        x, y = sample_batch(key, (x_lt, y_lt), batch_size)
        logits = mlp(params, x)
        if adjusted:
            return mtl.logit_adjusted_cross_entropy(logits, y, class_priors=priors).mean(), {}
        return optax.losses.softmax_cross_entropy_with_integer_labels(logits, y).mean(), {}

    params = init_mlp(jax.random.PRNGKey(seed), CLASSIFIER)
    return mlp(fit_adam(objective, params, steps=steps, seed=seed), jnp.asarray(x_test))


ce_logits = train_long_tailed(adjusted=False)
per_class = {
    "cross-entropy": per_class_accuracy(ce_logits, y_test),
    "CE + post-hoc adjustment": per_class_accuracy(
        mtl.posthoc_logit_adjustment(ce_logits, class_priors=priors), y_test
    ),
    "logit-adjusted loss": per_class_accuracy(train_long_tailed(adjusted=True), y_test),
}
for name, acc in per_class.items():
    print(f"{name:>25}: balanced accuracy {acc.mean():.1%}, rarest three {acc[7:].mean():.1%}")

# %%
fig, ax = plt.subplots(figsize=(7, 3.5))
for i, (name, acc) in enumerate(per_class.items()):
    ax.bar(np.arange(10) + 0.27 * (i - 1), 100 * acc, width=0.27, label=name)
ax.set_xticks(range(10), [f"{c}\n({n})" for c, n in enumerate(counts)])
ax.set(xlabel="class (train digits)", ylabel="test accuracy (%)", title="long-tailed digits")
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# The adjustment moves accuracy from the frequent classes to the rare ones, which is what
# balanced accuracy rewards. `python -m benchmarks.imbalance` compares it over three seeds
# with focal loss, class-balanced weights and LDAM.

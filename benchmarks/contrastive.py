"""Small-batch contrastive learning: InfoNCE versus FlatNCE.

SimCLR-style pretraining of an MLP encoder (784 -> 256 -> 128 features, then a 128 -> 64
projection head) on the MNIST train split, labels unused. Each image gets two random
views: a translation of up to 4 pixels (zero-pad and crop), 20% of the pixels dropped and
Gaussian noise (sigma 0.1). Both losses use the same views, steps, optimizer and
temperature (two temperatures, 0.1 and 0.05, at batch sizes 16 and 128); the 2B x 2B
cosine-score matrix with the self-similarity masked comes from ``mtl.simclr_scores``.

Metric: linear-probe accuracy -- a logistic regression (scikit-learn) trained on the frozen
128-d encoder features of the train split (standardised, C = 1, not tuned), reported on
the test split. For context the
table also shows the probe on raw pixels and on the untrained (random) encoder.

Also logged every step: the fraction of rows whose float32 InfoNCE gradient with respect to
the positive score, ``p_t - 1`` with ``p = softmax(scores)``, is exactly zero (``p_t``
rounded to 1). Where that happens InfoNCE gives that row no learning signal at all, while
FlatNCE's gradient ``(1 + xi) / xi * grad(InfoNCE)`` is computed in log space and does not
vanish. A float32 ``p_t`` rounds to 1 only once ``xi = sum_{i != t} exp(s_i - s_t)`` drops
below about 2^-25, i.e. once every negative is about 17 + log(2B - 2) logits below the
positive: with cosine scores (range 2 / temperature) this needs a low temperature.

    python -m benchmarks.contrastive            # default size
    python -m benchmarks.contrastive --smoke    # seconds
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mtl_optax as mtl
from benchmarks import common

LOSSES = {"InfoNCE": "info_nce", "FlatNCE": "flat_nce"}


def augment(key: jax.Array, images: jax.Array, *, shift: int = 4) -> jax.Array:
    """Random view of (B, 28, 28) images, flattened to (B, 784)."""
    batch, height, width = images.shape
    k_shift, k_drop, k_noise = jax.random.split(key, 3)
    padded = jnp.pad(images, ((0, 0), (shift, shift), (shift, shift)))
    offsets = jax.random.randint(k_shift, (batch, 2), 0, 2 * shift + 1)
    views = jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1]), (height, width)))(
        padded, offsets
    )
    views = views * jax.random.bernoulli(k_drop, 0.8, views.shape)
    views = views + 0.1 * jax.random.normal(k_noise, views.shape)
    return jnp.clip(views, 0.0, 1.0).reshape(batch, -1)


def encode(params, x):
    """Encoder features (the probe's input)."""
    return common.mlp(params["encoder"], x, activate_last=True)


def positive_grad_underflow(scores: jax.Array, positives: jax.Array) -> jax.Array:
    """Fraction of rows where the float32 softmax gradient at the positive is exactly 0."""
    p = jax.nn.softmax(scores.astype(jnp.float32), axis=-1)
    p_t = jnp.take_along_axis(p, positives[:, None], axis=-1)[:, 0]
    return jnp.mean((p_t - 1.0) == 0.0)


def linear_probe(train_feats, train_y, test_feats, test_y) -> float:
    """Test accuracy of a logistic regression on standardised frozen features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    probe.fit(np.asarray(train_feats), np.asarray(train_y))
    return float(probe.score(np.asarray(test_feats), np.asarray(test_y)))


def run_one(loss_name, batch_size, temperature, seed, *, images, args):
    key_init, key_head, key_train = jax.random.split(jax.random.PRNGKey(seed), 3)
    params = {
        "encoder": common.init_mlp(key_init, [784, *args.hidden]),
        "head": common.init_mlp(key_head, [args.hidden[-1], args.hidden[-1], args.proj_dim]),
    }
    loss_fn = getattr(mtl, LOSSES[loss_name])
    optimizer = optax.adam(args.lr)

    def objective(params, key):
        k_idx, k1, k2 = jax.random.split(key, 3)
        idx = jax.random.choice(k_idx, images.shape[0], (batch_size,), replace=False)
        views = jnp.concatenate([augment(k1, images[idx]), augment(k2, images[idx])])
        z = common.mlp(params["head"], encode(params, views))  # normalised by simclr_scores
        scores, positives = mtl.simclr_scores(
            z[:batch_size], z[batch_size:], temperature=temperature
        )
        loss = jnp.mean(loss_fn(scores, positives))
        underflow = positive_grad_underflow(jax.lax.stop_gradient(scores), positives)
        info = jnp.mean(mtl.info_nce(jax.lax.stop_gradient(scores), positives))
        return loss, {"underflow": underflow, "info_nce": info}

    state, history = common.train(
        common.make_step(objective, optimizer),
        common.init_state(params, optimizer),
        key_train,
        steps=args.steps,
        desc=f"{loss_name} B={batch_size} t={temperature} seed {seed}",
        progress=not args.no_progress,
    )
    return state.params, history


def main(argv=None):
    parser = common.base_parser(__doc__.splitlines()[0], steps=800)
    parser.add_argument("--batch-sizes", type=common.count, nargs="+", default=[16, 128])
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.1, 0.05])
    parser.add_argument("--hidden", type=common.count, nargs="+", default=[256, 128])
    parser.add_argument("--proj-dim", type=common.count, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args(argv)
    if args.smoke:
        args.seeds, args.steps, args.batch_sizes, args.hidden = 1, 100, [16], [64, 32]
        args.temperatures = [0.1]
    clock = common.Stopwatch()

    x_tr, y_tr = common.mnist_split("train")
    x_te, y_te = common.mnist_split("test")
    images = jnp.asarray(x_tr.reshape(-1, 28, 28))

    results: common.Results = {}
    curves: dict[str, list[np.ndarray]] = {}
    if not args.smoke:  # reference rows: probe on raw pixels and on the untrained encoder
        raw = linear_probe(x_tr, y_tr, x_te, y_te)
        common.add_result(results, "raw pixels (no training)", {"probe": raw})
        for seed in range(args.seeds):
            init = {"encoder": common.init_mlp(jax.random.PRNGKey(seed), [784, *args.hidden])}
            f_tr, f_te = (encode(init, jnp.asarray(x)) for x in (x_tr, x_te))
            probe = linear_probe(f_tr, y_tr, f_te, y_te)
            common.add_result(results, "random encoder (no training)", {"probe": probe})
    configs = [(t, b, n) for t in args.temperatures for b in args.batch_sizes for n in LOSSES]
    for temperature, batch_size, loss_name in configs:
        row = f"{loss_name}, B={batch_size}, τ={temperature}"
        for seed in range(args.seeds):
            params, history = run_one(
                loss_name, batch_size, temperature, seed, images=images, args=args
            )
            f_tr = encode(params, jnp.asarray(x_tr))
            f_te = encode(params, jnp.asarray(x_te))
            common.add_result(
                results,
                row,
                {
                    "probe": linear_probe(f_tr, y_tr, f_te, y_te),
                    "underflow": float(history["underflow"].mean()),
                    "info_first": float(history["info_nce"][:50].mean()),
                    "info_last": float(history["info_nce"][-50:].mean()),
                },
            )
            curves.setdefault(row, []).append(history["info_nce"])

    table = common.markdown_table(
        results,
        {
            "probe": ("linear probe test acc. (%)", 100, 1),
            "underflow": ("InfoNCE grad. underflow at positive (% of rows)", 100, 3),
            "info_last": ("final InfoNCE (last 50 steps)", 1, 3),
        },
    )
    text = (
        common.header(
            "Small-batch contrastive pretraining on MNIST (linear probe)",
            args,
            clock(),
            f"Adam lr {args.lr}, probe: sklearn LogisticRegression (C=1)",
        )
        + "\n"
        + table
        + "\n"
    )
    print(text)

    fig, (ax,) = common.figure(width=6.0)
    for row, runs in curves.items():
        runs = np.stack(runs)
        window = max(1, runs.shape[1] // 50)
        smooth = np.convolve(runs.mean(0), np.ones(window) / window, mode="valid")
        ax.plot(smooth, label=row)
    ax.set_xlabel("step")
    ax.set_ylabel("InfoNCE of the batch (mean over seeds)")
    ax.set_yscale("log")
    ax.set_title("SimCLR on MNIST")
    ax.legend(fontsize=8)
    common.write_results(args.out, "contrastive", text, fig, smoke=args.smoke)
    return {"results": results, "curves": curves, "table": table}


if __name__ == "__main__":
    main()

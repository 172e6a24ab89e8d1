"""The multi-task leaderboard: its data, metrics and summary numbers against independent
oracles, and a smoke run of each problem that really trains.

Oracles: MULAN's published Yeast statistics (2,417 genes, label cardinality 4.237, density
0.303, 198 distinct label sets), scikit-learn's F1 and Hamming loss, scipy's paired t-test,
hand-computed Δm and ranks, and XLA's own convolution for the im2col LeNet layer. The smoke
runs assert that training happened (loss down, better than chance), never a tuned number.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import f1_score, hamming_loss

from benchmarks import leaderboard as lb
from benchmarks import leaderboard_problems as problems
from benchmarks.data import load_yeast, yeast_splits
from benchmarks.leaderboard_summary import (
    delta_m,
    lr_scores,
    mean_ranks,
    paired_comparison,
)


# --------------------------------------------------------------------------- data
def test_yeast_matches_mulan_statistics_and_split():
    x, y = load_yeast()
    assert x.shape == (2417, 103) and y.shape == (2417, 14)
    assert set(np.unique(y)) == {0, 1}
    assert y.sum(1).mean() == pytest.approx(4.237, abs=5e-4)  # label cardinality
    assert y.mean() == pytest.approx(0.303, abs=5e-4)  # label density
    assert len({tuple(row) for row in y}) == 198  # distinct label sets
    splits = yeast_splits()
    assert [len(s) for s in splits] == [1200, 300, 917]
    everything = np.concatenate(splits)
    assert len(np.unique(everything)) == 2417  # disjoint and complete
    assert np.array_equal(splits.test, np.arange(917))  # MULAN's test genes
    assert np.array_equal(yeast_splits().val, splits.val)  # fixed


def test_im2col_convolution_equals_xla_convolution():
    params = problems.init_lenet(0)["encoder"]["conv2"]
    params["b"] = jnp.linspace(-1.0, 1.0, 20)
    x = np.random.default_rng(0).normal(size=(3, 12, 12, 10)).astype(np.float32)
    expected = jax.jit(jax.lax.conv_general_dilated, static_argnums=(2, 3, 4, 5, 6))(
        x, params["w"], (1, 1), "VALID", None, None, ("NHWC", "HWIO", "NHWC")
    )
    np.testing.assert_allclose(
        jax.jit(problems._conv)(x, params), expected + params["b"], rtol=1e-5, atol=1e-5
    )


# --------------------------------------------------------------------------- metrics
def test_multilabel_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    labels = rng.random((200, 6)) < [0.5, 0.3, 0.1, 0.02, 0.0, 0.9]
    pred = rng.random((200, 6)) < 0.3
    pred[:, 4] = False  # never predicted and never present: F1 = 0 by convention
    out = problems.multilabel_metrics(pred, labels)
    f1 = f1_score(labels, pred, average=None, zero_division=0)
    np.testing.assert_allclose([out[f"f1/Class{i + 1}"] for i in range(6)], f1)
    assert out["macro_f1"] == pytest.approx(
        f1_score(labels, pred, average="macro", zero_division=0)
    )
    assert out["hamming"] == pytest.approx(hamming_loss(labels, pred))
    assert out["acc_mean"] == pytest.approx(1 - hamming_loss(labels, pred))
    np.testing.assert_allclose(
        [out[f"acc/Class{i + 1}"] for i in range(6)], np.mean(pred == labels, 0)
    )


def test_delta_m_by_hand():
    # accuracy 0.9 vs 0.8 (higher is better), RMSE 2.0 vs 2.5 (lower is better): both better
    value = delta_m(np.array([0.9, 2.0]), np.array([0.8, 2.5]), [True, False])
    assert value == pytest.approx(100 / 2 * (-(0.9 - 0.8) / 0.8 + (2.0 - 2.5) / 2.5))
    assert value < 0  # better than single-task is negative
    per_seed = delta_m(np.array([[0.8, 2.5], [0.4, 5.0]]), np.array([0.8, 2.5]), [True, False])
    np.testing.assert_allclose(per_seed, [0.0, 100 / 2 * (0.5 + 1.0)])
    with pytest.raises(ValueError, match="task axis"):
        delta_m(np.ones(3), np.ones(2), [True, True])
    with pytest.raises(ValueError, match="is 0"):
        delta_m(np.ones(2), np.array([1.0, 0.0]), [True, True])


def test_mean_ranks_by_hand_with_ties():
    scores = {"A": {"x": -1.0, "y": 0.0, "z": 0.0}, "B": {"x": 2.0, "y": 1.0, "z": -3.0}}
    # A: x 1, y 2.5, z 2.5; B: z 1, y 2, x 3
    assert mean_ranks(scores) == {"x": 2.0, "y": 2.25, "z": 1.75}


def test_paired_comparison_matches_scipy():
    rng = np.random.default_rng(1)
    for _ in range(20):
        a, b = rng.normal(size=4), rng.normal(size=4)
        c = paired_comparison(a, b)
        ref = stats.ttest_rel(a, b)
        assert c.t == pytest.approx(ref.statistic) and c.p == pytest.approx(ref.pvalue)
    assert paired_comparison([0.0, -0.1, -0.2], [1.0, 1.1, 1.2]).verdict == "better"
    assert paired_comparison([1.0, 1.1, 1.3], [0.0, 0.1, 0.2]).verdict == "worse"
    assert paired_comparison([1.0, -1.0, 0.5], [0.0, 0.0, 0.0]).verdict == "within noise"
    assert paired_comparison([1.0, 1.0], [1.0, 1.0]).verdict == "within noise"  # identical
    with pytest.raises(ValueError, match="two or more"):
        paired_comparison([1.0], [0.0])


def test_lr_scores_pick_the_grid_point_best_on_every_task():
    # rows: grid points; columns: accuracy (higher better), RMSE (lower better)
    means = np.array([[0.70, 3.0], [0.80, 2.0], [0.75, 2.5]])
    scores = lr_scores(means, [True, False])
    assert scores[1] == 0.0 and min(scores) == scores[1]
    # invariant to the unit of each metric (relative differences)
    np.testing.assert_allclose(lr_scores(means * [1, 1000], [True, False]), scores)


# --------------------------------------------------------------------------- protocol
def test_single_task_models_are_scored_task_by_task():
    problem = lb.PROBLEMS["yeast"]()
    params = lb.seed_params(problem, [0, 1])
    k = problem.num_tasks
    # model (s, t): the seed's parameters with head t's weights shifted by t
    shift = jnp.arange(k, dtype=jnp.float32)[None, :, None, None]
    per_task = jax.tree_util.tree_map(lambda x: jnp.repeat(x[:, None], k, axis=1), params)
    per_task["heads"]["w"] = per_task["heads"]["w"] + 0.1 * shift
    out = lb.evaluate_run(problem, per_task, problem.test, single_task=True)
    for s in (0, 1):
        for t in (0, 5, 13):
            model = jax.tree_util.tree_map(lambda x, s=s, t=t: x[s, t], per_task)
            key = problem.metrics[t].key
            assert out[s][key] == problem.evaluate(model, problem.test)[key]


# --------------------------------------------------------------------------- smoke runs
SMOKE_METHODS = {
    # a Gram weighting at tier 3 through the stacked heads; the report and both plots
    "yeast": (lb.EQUAL, "MGDA"),
    # the conv encoder costs the most to compile: equal weighting (and single-task) only
    "multimnist-lenet": (lb.EQUAL,),
    "scale-disparity": (lb.EQUAL,),
}


@pytest.mark.parametrize("name", list(lb.PROBLEMS))
def test_smoke_run_trains(name, tmp_path):
    methods = SMOKE_METHODS[name]
    write = name == "yeast"  # the report and plots once (they are problem-independent code)
    jobs = "2" if write else "1"  # the worker pool once, in-process runs otherwise
    out = lb.main(
        ["--smoke", "--no-progress", "--seeds", "2", "--lr", "3e-3", "--problems", name,
         "--methods", *methods, "--jobs", jobs, "--out", str(tmp_path) if write else ""]
    )  # fmt: skip
    (result,) = out["results"]
    problem, steps = result.problem, lb.SMOKE[name].steps
    assert set(result.test) == {lb.SINGLE_TASK, *methods}
    for method in methods:
        assert result.histories[method]["weights"].shape == (steps, 2, problem.num_tasks)
    history = result.histories[lb.EQUAL]
    assert history["losses"].shape == (steps, 2, problem.num_tasks)
    first, last = history["loss"][:5].mean(), history["loss"][-5:].mean()
    assert last < first, (first, last)
    for method, per_seed in result.test.items():
        assert len(per_seed) == 2
        for values in per_seed:
            for metric in problem.metrics:
                assert np.isfinite(values[metric.key]), (method, metric)
    np.testing.assert_allclose(np.mean(result.delta[lb.SINGLE_TASK]), 0.0, atol=1e-9)
    if write:
        for file in ("leaderboard.md", "leaderboard_delta_m.png", "leaderboard_weights.png"):
            assert (tmp_path / file).exists(), file


def test_library_equal_weighting_trains_like_plain_autodiff():
    """Tier-1 equal weighting through the library = autodiff of the mean loss (oracle)."""
    import optax

    problem = lb.PROBLEMS["yeast"]()
    k, optimizer = problem.num_tasks, optax.adam(1e-2)
    library, init_library = lb.make_step(lb.METHODS[lb.EQUAL], problem, optimizer, None, 16)
    plain, init_plain = lb.fixed_weights_step(problem, optimizer, jnp.full((k,), 1.0 / k), 16)
    run = lambda step, state: jax.lax.scan(step, state, jax.random.split(jax.random.PRNGKey(3), 5))
    params = problem.init_params(0)
    (got, *_), metrics = jax.jit(run, static_argnums=0)(library, init_library(params))
    (want, _), _ = jax.jit(run, static_argnums=0)(plain, init_plain(params))
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), got, want)
    np.testing.assert_allclose(metrics["weights"], np.full((5, k), 1.0 / k), rtol=1e-6)

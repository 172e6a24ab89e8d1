"""The multi-task field's summary numbers: Δm %, mean rank, and a paired test over seeds.

* :func:`delta_m` -- Maninis et al. (2019), "Attentive single-tasking of multiple tasks",
  in the sign convention of the Nash-MTL (Navon et al., 2022) and FAMO (Liu et al., 2023)
  tables::

      Δm = (100 / K) Σ_k (-1)^{l_k} (M_k - S_k) / S_k

  with ``M_k`` a method's metric on task k, ``S_k`` the single-task model's, and
  ``l_k = 1`` when higher is better: a method better than the single-task models on every
  task has a negative Δm, a worse one a positive Δm.
* :func:`lr_scores` -- the learning-rate rule: each grid point's Δm on validation against
  the grid's best value of each task (0 for a point best on every task; lower is better),
  so the choice weighs the tasks by relative, unit-free differences.
* :func:`mean_ranks` -- rank the methods on each data set by their mean Δm (1 = lowest;
  ties share the average rank), then average the ranks over the data sets.
* :func:`paired_comparison` -- whether a method's Δm differs from a reference method's
  beyond the seed-to-seed noise. Every seed gives both methods the same initialisation and
  the same minibatches, so the per-seed differences ``d_s = Δm_method(s) - Δm_ref(s)`` are
  paired; the rule is a two-sided paired t-test on them at level ``alpha`` (default 0.05):
  ``t = mean(d) / (std(d, ddof=1) / √n)`` against Student's t with ``n - 1`` degrees of
  freedom. With 3 seeds that needs ``|t| > 4.30``: a difference counts only when it is
  large against how much it varies from seed to seed. Zero variance with a non-zero mean
  counts as a difference; zero mean never does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np


def delta_m(
    metrics: np.ndarray, single_task: np.ndarray, higher_is_better: Sequence[bool]
) -> np.ndarray:
    """Δm % (module doc) of ``metrics`` (..., K) against ``single_task`` (K,)."""
    metrics = np.asarray(metrics, dtype=np.float64)
    single_task = np.asarray(single_task, dtype=np.float64)
    sign = np.where(np.asarray(higher_is_better, dtype=bool), -1.0, 1.0)
    if single_task.shape != sign.shape or metrics.shape[-1:] != sign.shape:
        raise ValueError(
            f"delta_m: metrics {metrics.shape}, single_task {single_task.shape} and "
            f"higher_is_better ({sign.size},) must share the task axis (last)"
        )
    if np.any(single_task == 0):
        raise ValueError("delta_m: a single-task metric is 0; the relative difference is undefined")
    return 100.0 * np.mean(sign * (metrics - single_task) / single_task, axis=-1)


def lr_scores(means: np.ndarray, higher_is_better: Sequence[bool]) -> np.ndarray:
    """Δm of each grid point (rows of ``means``, (grid, K)) against the per-task best row."""
    means = np.asarray(means, dtype=np.float64)
    hib = np.asarray(higher_is_better, dtype=bool)
    best = np.where(hib, means.max(0), means.min(0))
    return delta_m(means, best, hib)


def mean_ranks(scores: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Mean over data sets of each method's rank by score (lower score = rank 1).

    ``scores`` maps a data set to ``{method: score}``; a method missing from a data set is
    ranked over the data sets where it has a score. Ties share their average rank.
    """
    from scipy.stats import rankdata

    ranks: dict[str, list[float]] = {}
    for per_method in scores.values():
        names = list(per_method)
        for name, rank in zip(names, rankdata([per_method[n] for n in names])):
            ranks.setdefault(name, []).append(float(rank))
    return {name: float(np.mean(r)) for name, r in ranks.items()}


class Comparison(NamedTuple):
    mean_difference: float  # mean over seeds of method - reference
    t: float  # paired t statistic (±inf for a constant non-zero difference)
    p: float  # two-sided p-value
    verdict: str  # "better", "worse" or "within noise" (lower is better)


def paired_comparison(
    method: Sequence[float], reference: Sequence[float], *, alpha: float = 0.05
) -> Comparison:
    """Two-sided paired t-test of per-seed scores where lower is better (module doc)."""
    from scipy.stats import t as student_t

    d = np.asarray(method, dtype=np.float64) - np.asarray(reference, dtype=np.float64)
    if d.ndim != 1 or d.size < 2:
        raise ValueError(f"paired_comparison: need two or more paired seeds, got {d.shape}")
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    if mean == 0.0:
        t, p = 0.0, 1.0
    elif sd == 0.0:
        t, p = float(np.sign(mean) * np.inf), 0.0
    else:
        t = mean / (sd / np.sqrt(d.size))
        p = float(2 * student_t.sf(abs(t), d.size - 1))
    verdict = "within noise" if p >= alpha else ("better" if mean < 0 else "worse")
    return Comparison(mean, float(t), p, verdict)

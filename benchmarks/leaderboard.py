"""Multi-task leaderboard: every method on real data, against single-task models (Δm %).

Problems (:mod:`benchmarks.leaderboard_problems`): **Yeast** (14 binary tasks, MLP encoder,
per-task logistic heads), **MultiMNIST-LeNet** (2 tasks, the conv encoder of Sener & Koltun,
2018) and the 3-task **scale-disparity** MultiMNIST (one loss 10⁵ times the others).

Protocol, the same for every method on a problem:

* fixed train / validation / test splits; nothing is tuned on test;
* the same encoder and heads, optimizer (Adam), batch size, number of steps and learning
  rate; the learning rate is chosen once per problem, on the validation split, for equal
  weighting, from :data:`LR_GRID` (the rule: the grid point with the lowest Δm on
  validation against the grid's best value of each task; the scores are recorded in the
  results) and then used by every method and by the single-task models;
* seed ``s`` gives every method the same initial parameters and the same minibatches (the
  seeds are trained side by side in one compiled program, ``vmap`` over seeds);
* each method's own hyper-parameters at their documented defaults;
* single-task baselines: the same architecture, one model per task trained on that task
  alone (the same initialisation of the encoder and of that task's head, the same
  minibatches), ``vmap`` over tasks and seeds.

Reported, mean ± std over seeds: Δm % against the single-task models
(:func:`benchmarks.leaderboard_summary.delta_m`; negative is better), per-task metrics, the
mean rank over problems, and for each method whether its Δm differs from equal weighting's
(and from the single-task models') beyond the seed-to-seed noise: a two-sided paired t-test
over seeds at 5 % (:func:`benchmarks.leaderboard_summary.paired_comparison`).

    python -m benchmarks.leaderboard            # default (see DEFAULT for its run time)
    python -m benchmarks.leaderboard --full     # longer training (see FULL: hours)
    python -m benchmarks.leaderboard --smoke    # seconds (tests)

Each (problem, method) is a job; ``--jobs N`` worker processes run them (default: one per
core, at most 4; ``--jobs 1`` runs them in this process, with progress bars). The results
do not depend on the number of workers.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import itertools
import multiprocessing
import os
import resource
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mtl_optax as mtl
from benchmarks import common
from benchmarks import leaderboard_problems as problems
from benchmarks.leaderboard_summary import delta_m, lr_scores, mean_ranks, paired_comparison
from benchmarks.scale_disparity import over_seeds

LR_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)


class Budget(NamedTuple):
    """Training budget and data sizes of one problem (the same for every method)."""

    steps: int
    batch_size: int
    sizes: dict[str, int]  # keyword arguments of the problem's constructor


PROBLEMS: dict[str, Callable[..., problems.Problem]] = {
    "yeast": problems.yeast,
    "multimnist-lenet": problems.multimnist_lenet,
    "scale-disparity": problems.scale_disparity,
}
PAIRS = dict(train_pairs=10_000, val_pairs=2_000, test_pairs=3_000)
DEFAULT = {
    "yeast": Budget(steps=600, batch_size=64, sizes={}),
    "multimnist-lenet": Budget(steps=300, batch_size=32, sizes=PAIRS),
    "scale-disparity": Budget(steps=300, batch_size=128, sizes=PAIRS),
}
"""Default budgets. Measured (results file, *Run time*): 2,705 s of CPU time for all three
problems, three quarters of it compiling one training program per method and problem (one
thread each, hence the worker processes): about 23 minutes on 2 idle cores with the default
``--jobs``. ``--problems`` and ``--methods`` run a part."""
FULL = {
    "yeast": Budget(steps=3_000, batch_size=64, sizes={}),
    "multimnist-lenet": Budget(
        steps=3_000,
        batch_size=256,
        sizes=dict(train_pairs=20_000, val_pairs=2_000, test_pairs=5_000),
    ),
    "scale-disparity": Budget(
        steps=2_000,
        batch_size=256,
        sizes=dict(train_pairs=20_000, val_pairs=2_000, test_pairs=5_000),
    ),
}
"""Longer training. Estimated from the default run's per-step times (results file, *Run
time*): about 17 hours of CPU time, 15 of them on MultiMNIST-LeNet."""
SMOKE = {
    "yeast": Budget(steps=60, batch_size=32, sizes={}),
    "multimnist-lenet": Budget(
        steps=40, batch_size=32, sizes=dict(train_pairs=500, val_pairs=200, test_pairs=200)
    ),
    "scale-disparity": Budget(
        steps=40, batch_size=32, sizes=dict(train_pairs=500, val_pairs=200, test_pairs=200)
    ),
}


# --------------------------------------------------------------------------- methods
class Method(NamedTuple):
    """A method of the library and how it runs.

    ``build(problem, key)`` returns the method object (a ``Weighting`` or a stacked
    aggregator; ``key`` feeds its own randomness, one per seed). ``tier``: ``"1"`` (a
    weighting of the losses, :func:`mtl_optax.split_value_and_grad`), ``"2"`` (the same with
    the Gram of the feature gradients), ``"3"`` (per-task encoder gradients,
    :func:`mtl_optax.split_value_and_jacobian` + :func:`mtl_optax.aggregate`).
    ``balanced=False``: one task is the goal (shown apart, not ranked). ``min_tasks``: the
    fewest tasks the method is defined for (it is skipped on smaller problems).
    """

    family: str
    tier: str
    build: Callable[[problems.Problem, jax.Array], Any]
    balanced: bool = True
    min_tasks: int = 2


def sample(problem: problems.Problem, key: jax.Array, batch_size: int):
    return common.sample_batch(key, problem.train, batch_size)


def _metrics(losses: jax.Array, weights: jax.Array) -> dict[str, jax.Array]:
    return {"loss": jnp.sum(losses), "losses": losses, "weights": weights}


def heads_of(problem: problems.Problem):
    """The heads in one of the library's safe forms: the per-task sequence, or the stacked
    head vmapped over ``params["heads"]``."""
    if problem.heads is not None:
        return problem.heads
    return mtl.stacked_heads(problem.stacked_head, head_params=lambda params: params["heads"])


def make_step(method: Method, problem: problems.Problem, optimizer, key, batch_size: int):
    """Pure ``step(state, batch_key) -> (state, metrics)`` and ``init(params) -> state`` of a
    library method; ``batch_key`` draws the minibatch (the same keys for every method)."""
    built = method.build(problem, key)
    if method.tier in ("1", "2"):
        grad_fn = mtl.split_value_and_grad(problem.encoder, heads_of(problem), built)

        def step(state, batch_key):
            params, opt_state, method_state = state
            batch = sample(problem, batch_key, batch_size)
            losses, grads, method_state = grad_fn(params, batch, method_state)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            state = (optax.apply_updates(params, updates), opt_state, method_state)
            return state, _metrics(losses, mtl.task_weights(method_state))

        return step, lambda params: (params, optimizer.init(params), grad_fn.init(params))

    jacobian_fn = mtl.split_value_and_jacobian(problem.encoder, heads_of(problem))
    chain = optax.chain(mtl.aggregate(built, tasks=problem.num_tasks), optimizer)

    def step(state, batch_key):
        params, opt_state = state
        losses, task_grads = jacobian_fn(params, sample(problem, batch_key, batch_size))
        updates, opt_state = chain.update(task_grads, opt_state, params, task_losses=losses)
        state = (optax.apply_updates(params, updates), opt_state)
        return state, _metrics(losses, mtl.task_weights(opt_state))

    return step, lambda params: (params, chain.init(params))


def fixed_weights_step(problem, optimizer, weights: jax.Array, batch_size: int):
    """Plain autodiff of ``Σ_k c_k L_k`` with fixed weights ``c`` (no library code).

    A one-hot ``c`` trains the single-task model of its task (the other heads get zero
    gradients, so Adam leaves them untouched); ``c = 1/K`` is equal weighting (the tests
    check that the library's equal weighting trains exactly like it).
    """

    def step(state, key):
        params, opt_state = state
        batch = sample(problem, key, batch_size)
        losses, vjp = jax.vjp(lambda p: problem.task_losses(p, batch), params)
        (grads,) = vjp(weights.astype(losses.dtype))
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), _metrics(losses, weights)

    return step, lambda params: (params, optimizer.init(params))


def _plain(constructor: Callable[[], Any]) -> Callable[[problems.Problem, jax.Array], Any]:
    return lambda problem, key: constructor()


def _keyed(constructor: Callable[..., Any]) -> Callable[[problems.Problem, jax.Array], Any]:
    return lambda problem, key: constructor(key=key)


LOSS, LEARNED, GRADIENT, STACKED = (
    "loss weighting",
    "learned loss weighting",
    "gradient weighting",
    "stacked aggregator",
)
METHODS: dict[str, Method] = {
    "equal weights": Method("baseline", "1", _plain(mtl.mean_weighting)),
    # weightings of the losses alone (tier 1)
    "geometric mean": Method(LOSS, "1", _plain(mtl.geometric_mean)),
    "generalized mean (γ=2)": Method(LOSS, "1", _plain(lambda: mtl.generalized_mean(gamma=2.0))),
    "real-time weighting": Method(LOSS, "1", _plain(mtl.real_time_weighting)),
    "initial-loss weighting": Method(LOSS, "1", _plain(mtl.initial_loss_weighting)),
    "prior-loss weighting": Method(
        LOSS, "1", lambda problem, key: mtl.prior_loss_weighting(problem.prior_losses)
    ),
    "DWA": Method(LOSS, "1", _plain(mtl.dwa)),
    "STCH": Method(LOSS, "1", _plain(mtl.stch)),
    "random weighting (RLW)": Method(LOSS, "1", _keyed(mtl.random_weighting)),
    "COSMOS": Method(LOSS, "1", _plain(mtl.cosmos)),
    "PBI": Method(LOSS, "1", _plain(mtl.pbi)),
    "uncertainty weighting": Method(LEARNED, "1", _plain(mtl.uncertainty_weighting)),
    "IMTL-L": Method(LEARNED, "1", _plain(mtl.imtl_l)),
    "FAMO": Method(LEARNED, "1", _plain(mtl.famo)),
    # weightings of the Gram matrix of the task gradients
    "MGDA (tier 2)": Method(GRADIENT, "2", _plain(mtl.mgda)),
    "MGDA": Method(GRADIENT, "3", _plain(mtl.mgda)),
    "gradient-normalized": Method(GRADIENT, "3", _plain(mtl.gradient_normalized)),
    "GradNorm": Method(GRADIENT, "3", _plain(mtl.gradnorm)),
    "UPGrad": Method(GRADIENT, "3", _plain(mtl.upgrad)),
    "DualProj": Method(GRADIENT, "3", _plain(mtl.dualproj)),
    "CAGrad": Method(GRADIENT, "3", _plain(mtl.cagrad)),
    "Nash-MTL": Method(GRADIENT, "3", _plain(mtl.nash_mtl)),
    "FairGrad": Method(GRADIENT, "3", _plain(mtl.fairgrad)),
    "PCGrad": Method(GRADIENT, "3", _keyed(mtl.pcgrad)),
    "GradVac": Method(GRADIENT, "3", _keyed(mtl.gradvac)),
    "IMTL-G": Method(GRADIENT, "3", _plain(mtl.imtl_g)),
    "Aligned-MTL": Method(GRADIENT, "3", _plain(mtl.aligned_mtl)),
    "ConFIG": Method(GRADIENT, "3", _plain(mtl.config)),
    "SDMGrad (one batch)": Method(GRADIENT, "3", _plain(lambda: mtl.sdmgrad(single_batch=True))),
    "MoDo (one batch)": Method(GRADIENT, "3", _plain(lambda: mtl.modo(single_batch=True))),
    "CR-MOGM (MGDA)": Method(GRADIENT, "3", _plain(lambda: mtl.cr_mogm(mtl.mgda()))),
    "Krum (f=1)": Method(GRADIENT, "3", _plain(lambda: mtl.krum(n_byzantine=1)), min_tasks=4),
    # aggregators of the stacked per-task gradients (tier 3, through aggregate)
    "trimmed mean (1)": Method(STACKED, "3", _plain(lambda: mtl.trimmed_mean(trim=1)), min_tasks=3),
    "GradDrop": Method(STACKED, "3", _keyed(mtl.graddrop)),
    "DB-MTL": Method(STACKED, "3", _plain(mtl.db_mtl)),
    "ExcessMTL": Method(STACKED, "3", _plain(mtl.excess_mtl)),
    "MoCo": Method(STACKED, "3", _plain(mtl.moco)),
    # one task is the goal, the others only help
    "primary/auxiliary (task 1 primary)": Method(
        "primary/auxiliary", "3", _plain(lambda: mtl.primary_auxiliary(primary=0)), balanced=False
    ),
}
"""Every method of the library at its documented defaults; where a method requires a
choice, the one in its name (γ = 2; Krum tolerates f = 1 adversarial task, so it needs
K ≥ 4; the trimmed mean drops one value at each end, so it needs K ≥ 3). MGDA runs at
tiers 2 and 3; SDMGrad and MoDo run their one-batch variant (no second minibatch for the
cross Gram); CR-MOGM smooths MGDA's weights. Left out: ``sum_weighting`` and
``constant_weighting`` (equal weighting up to a constant factor, which Adam removes)."""
SINGLE_TASK = "single-task"
EQUAL = "equal weights"


# --------------------------------------------------------------------------- training
class Run(NamedTuple):
    """One method on one problem, every seed: final parameters (leading seed axis),
    per-step history (arrays ``(steps, seeds, ...)``), wall and CPU seconds."""

    params: Any
    history: dict[str, np.ndarray]
    wall: float
    cpu: float


def seed_params(problem: problems.Problem, seeds: int):
    """Per-seed initial parameters, stacked on a leading seed axis (the same for every
    method)."""
    inits = [problem.init_params(s) for s in seeds]
    return jax.tree_util.tree_map(lambda *x: jnp.stack(x), *inits)


DATA_KEY = jax.random.PRNGKey(1)  # minibatch order: the same for every method


def train_method(
    problem: problems.Problem,
    method: Method,
    lr: float,
    budget: Budget,
    seeds: Sequence[int],
    *,
    progress: bool = False,
    desc: str = "",
) -> Run:
    """Train ``method`` for every seed at once (``vmap`` over seeds)."""
    optimizer = optax.adam(lr)
    clock, cpu = common.Stopwatch(), time.process_time()
    keys = [jax.random.fold_in(jax.random.PRNGKey(s), 2) for s in seeds]
    built = [make_step(method, problem, optimizer, key, budget.batch_size) for key in keys]
    step = built[0][0]  # every seed's step is the same code; the method's key is in its state
    params = seed_params(problem, seeds)
    states = [
        init(jax.tree_util.tree_map(lambda x, i=i: x[i], params))
        for i, (_, init) in enumerate(built)
    ]
    states = jax.tree_util.tree_map(lambda *x: jnp.stack(x), *states)
    states, history = common.train(
        over_seeds(step), states, DATA_KEY, steps=budget.steps, desc=desc, progress=progress
    )
    history["loss"] = history.pop("loss_per_seed")
    return Run(states[0], history, clock(), time.process_time() - cpu)


def train_single_task(
    problem: problems.Problem,
    lr: float,
    budget: Budget,
    seeds: Sequence[int],
    *,
    progress: bool = False,
) -> Run:
    """One model per task and seed (``vmap`` over tasks inside ``vmap`` over seeds).

    Model ``(s, k)`` starts from seed ``s``'s parameters and sees seed ``s``'s minibatches,
    and is trained on task ``k`` alone. The returned parameters have a leading ``(seed,
    task)`` axis pair.
    """
    k = problem.num_tasks
    optimizer = optax.adam(lr)
    clock, cpu = common.Stopwatch(), time.process_time()
    onehots = jnp.eye(k)
    step_k = lambda state, key, c: fixed_weights_step(problem, optimizer, c, budget.batch_size)[0](
        state, key
    )
    init = fixed_weights_step(problem, optimizer, onehots[0], budget.batch_size)[1]

    def step(states, key):  # states: leading task axis; every task sees the same batch
        states, metrics = jax.vmap(step_k, in_axes=(0, None, 0))(states, key, onehots)
        diag = jnp.diagonal(metrics["losses"])  # task k's own loss
        return states, {"loss": jnp.sum(diag), "losses": diag, "weights": jnp.ones(k)}

    params = seed_params(problem, seeds)
    per_task = jax.tree_util.tree_map(lambda x: jnp.repeat(x[:, None], k, axis=1), params)
    states = jax.vmap(jax.vmap(init))(per_task)
    states, history = common.train(
        over_seeds(step),
        states,
        DATA_KEY,
        steps=budget.steps,
        desc=f"{problem.name}: single-task",
        progress=progress,
    )
    history["loss"] = history.pop("loss_per_seed")
    return Run(states[0], history, clock(), time.process_time() - cpu)


# --------------------------------------------------------------------------- evaluation
def evaluate_run(
    problem: problems.Problem, params, split: problems.Split, *, single_task: bool = False
) -> list[dict[str, float]]:
    """Per-seed metrics on ``split``. The single-task models of a seed are scored as one
    model: task k's output comes from the model trained on task k."""
    seeds = jax.tree_util.tree_leaves(params)[0].shape[0]
    pick = lambda *index: jax.tree_util.tree_map(lambda x: x[index], params)
    out = []
    for s in range(seeds):
        if single_task:
            outputs = [problem.predict(pick(s, k), split.x)[k] for k in range(problem.num_tasks)]
        else:
            outputs = problem.predict(pick(s), split.x)
        out.append(problem.score(outputs, split.y))
    return out


def metric_matrix(problem: problems.Problem, per_seed: list[dict[str, float]]) -> np.ndarray:
    """(seeds, K) values of the Δm metrics."""
    return np.array([[values[m.key] for m in problem.metrics] for values in per_seed])


class Job(NamedTuple):
    """One training run: ``method`` (or the single-task models) on one problem, every seed."""

    problem: str
    sizes: tuple[tuple[str, int], ...]  # the problem constructor's keyword arguments
    method: str  # a key of METHODS, or SINGLE_TASK
    lr: float
    budget: Budget
    seeds: tuple[int, ...]
    validation: bool = False  # also score on the validation split (learning-rate selection)


class Outcome(NamedTuple):
    """What a job returns: per-seed test metrics, the (seeds, K) validation metrics of Δm
    (``None`` unless asked), the training history, wall and CPU seconds."""

    test: list[dict[str, float]]
    val: np.ndarray | None
    history: dict[str, np.ndarray]
    wall: float
    cpu: float


@functools.cache
def load_problem(name: str, sizes: tuple[tuple[str, int], ...]) -> problems.Problem:
    """The problem, built once per process (its data splits are fixed)."""
    return PROBLEMS[name](**dict(sizes))


def run_job(job: Job, progress: bool = False) -> Outcome:
    """Train one job and score it (runs in a worker process, or inline with one job)."""
    problem = load_problem(job.problem, job.sizes)
    single = job.method == SINGLE_TASK
    desc = f"{problem.name}: {job.method}" + (f" (lr {job.lr:g})" if job.validation else "")
    if single:
        run = train_single_task(problem, job.lr, job.budget, job.seeds, progress=progress)
    else:
        method = METHODS[job.method]
        run = train_method(
            problem, method, job.lr, job.budget, job.seeds, progress=progress, desc=desc
        )
    test = evaluate_run(problem, run.params, problem.test, single_task=single)
    val = None
    if job.validation:
        val = metric_matrix(problem, evaluate_run(problem, run.params, problem.val))
    return Outcome(test, val, run.history, run.wall, run.cpu)


def choose_lr(problem: problems.Problem, val: dict[float, np.ndarray]) -> tuple[float, dict]:
    """The module doc's rule on equal weighting's validation metrics at each grid point."""
    grid = list(val)
    means = np.array([val[lr].mean(0) for lr in grid])  # (grid, K), mean over seeds
    hib = [m.higher_is_better for m in problem.metrics]
    scores = dict(zip(grid, map(float, lr_scores(means, hib))))
    return min(grid, key=lambda lr: scores[lr]), scores


class ProblemResult(NamedTuple):
    problem: problems.Problem
    lr: float
    lr_scores: dict[float, float]
    test: dict[str, list[dict[str, float]]]  # method -> per-seed test metrics
    delta: dict[str, np.ndarray]  # method -> per-seed Δm
    histories: dict[str, dict[str, np.ndarray]]
    seconds: dict[str, tuple[float, float]]  # method -> (wall, cpu)


def problem_result(
    problem: problems.Problem, lr: float, scores: dict, outcomes: dict[str, Outcome]
) -> ProblemResult:
    """Δm of every method (``outcomes`` in table order, single-task first) on one problem."""
    test = {m: o.test for m, o in outcomes.items()}
    histories = {m: o.history for m, o in outcomes.items() if m != SINGLE_TASK}
    seconds = {m: (o.wall, o.cpu) for m, o in outcomes.items()}
    reference = metric_matrix(problem, test[SINGLE_TASK]).mean(0)
    hib = [m.higher_is_better for m in problem.metrics]
    delta = {m: delta_m(metric_matrix(problem, v), reference, hib) for m, v in test.items()}
    return ProblemResult(problem, lr, scores, test, delta, histories, seconds)


class InlineExecutor(concurrent.futures.Executor):
    """Runs each job as it is submitted, in this process (``--jobs 1``: progress bars)."""

    def __init__(self, progress: bool):
        self.progress = progress

    def submit(self, fn, /, *args, **kwargs):
        future = concurrent.futures.Future()
        future.set_result(fn(*args, progress=self.progress, **kwargs))
        return future


def run_all(args, budgets: dict[str, Budget], seeds: Sequence[int]) -> list[ProblemResult]:
    """Every problem: learning-rate selection, single-task models and every method.

    The jobs run in ``args.jobs`` worker processes (compiling a training program is
    single-threaded, so the workers keep every core busy). Every problem's selection runs
    are queued first; a problem's methods are queued once its learning rate is known, the
    slowest kind (tier 3) first.
    """
    seeds = tuple(seeds)
    grid = [args.lr] if args.lr is not None else list(LR_GRID)

    def jobs_of(name: str) -> dict[str, Any]:
        sizes = tuple(sorted(budgets[name].sizes.items()))
        return dict(problem=name, sizes=sizes, budget=budgets[name], seeds=seeds)

    if args.jobs == 1:
        pool = InlineExecutor(progress=not args.no_progress)
    else:
        context = multiprocessing.get_context("spawn")  # no fork of an initialised JAX
        pool = concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=context)
    finished = itertools.count(1)

    def submit(job: Job) -> concurrent.futures.Future:
        future = pool.submit(run_job, job)
        if args.jobs > 1 and not args.no_progress:

            def report_done(f, job=job):
                if f.exception() is None:
                    lr = f" (lr {job.lr:g})" if job.validation else ""
                    print(
                        f"[{next(finished)}] {job.problem}: {job.method}{lr}, "
                        f"{f.result().wall:.0f} s",
                        flush=True,
                    )

            future.add_done_callback(report_done)
        return future

    with pool:
        selection = {
            name: {
                lr: submit(Job(method=EQUAL, lr=lr, validation=True, **jobs_of(name)))
                for lr in grid
            }
            for name in args.problems
        }
        chosen, queued = {}, {}
        for name in args.problems:
            problem = load_problem(name, jobs_of(name)["sizes"])
            val = {lr: f.result().val for lr, f in selection[name].items()}
            lr, scores = (args.lr, {}) if args.lr is not None else choose_lr(problem, val)
            chosen[name] = (problem, lr, scores)
            methods = [m for m in args.methods if METHODS[m].min_tasks <= problem.num_tasks]
            slowest_first = lambda m: m != SINGLE_TASK and METHODS[m].tier != "3"
            order = sorted([SINGLE_TASK, *methods], key=slowest_first)
            queued[name] = {
                m: selection[name][lr]
                if m == EQUAL
                else submit(Job(method=m, lr=lr, **jobs_of(name)))
                for m in order
            }
        results = []
        for name in args.problems:
            problem, lr, scores = chosen[name]
            order = [SINGLE_TASK, *(m for m in args.methods if m in queued[name])]
            outcomes = {m: queued[name][m].result() for m in order}
            results.append(problem_result(problem, lr, scores, outcomes))
    return results


# --------------------------------------------------------------------------- reporting
def verdict(result: ProblemResult, method: str, reference: str) -> str:
    if method == reference or reference not in result.delta:
        return "–"
    c = paired_comparison(result.delta[method], result.delta[reference])
    mark = {"better": "better", "worse": "worse", "within noise": "≈"}[c.verdict]
    return f"{mark} (p={c.p:.2f})"


def problem_table(result: ProblemResult) -> str:
    """Per-method Δm, verdicts against equal weighting and single-task, the problem's
    columns (mean ± std over seeds) and the training time of all seeds."""
    problem = result.problem
    headers = ["method", "tier", "Δm % ↓", "vs equal weights", "vs single-task"]
    headers += [h for h, _, _ in problem.columns.values()] + ["train s (wall / CPU)"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for method, per_seed in result.test.items():
        tier = "–" if method == SINGLE_TASK else METHODS[method].tier
        cells = [method, tier, common.mean_std(result.delta[method], digits=2)]
        cells += [verdict(result, method, EQUAL), verdict(result, method, SINGLE_TASK)]
        for key, (_, scale, digits) in problem.columns.items():
            cells.append(common.mean_std([v[key] for v in per_seed], scale, digits))
        wall, cpu = result.seconds[method]
        cells.append(f"{wall:.0f} / {cpu:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_task_table(result: ProblemResult) -> str:
    """Test value of every Δm metric per task (mean over seeds, in %, or raw for RMSE)."""
    problem = result.problem
    headers = ["method", *problem.tasks]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for method, per_seed in result.test.items():
        values = metric_matrix(problem, per_seed).mean(0)
        cells = [
            f"{100 * v:.1f}" if m.key.startswith("acc") else f"{v:.3f}"
            for v, m in zip(values, problem.metrics)
        ]
        lines.append("| " + " | ".join([method, *cells]) + " |")
    return "\n".join(lines)


def summary_table(results: Sequence[ProblemResult]) -> tuple[str, dict[str, float]]:
    """Δm % per problem (mean ± std) and the mean rank over problems of the balanced
    methods and the single-task models; methods with one goal task are listed apart."""
    balanced = lambda m: m == SINGLE_TASK or METHODS[m].balanced
    scores = {
        r.problem.name: {m: float(np.mean(d)) for m, d in r.delta.items() if balanced(m)}
        for r in results
    }
    ranks = mean_ranks(scores)
    names = sorted(ranks, key=lambda m: ranks[m])
    names += [m for r in results for m in r.delta if not balanced(m)]
    names = list(dict.fromkeys(names))
    headers = ["method", *(r.problem.name + " Δm %" for r in results), "mean rank"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for method in names:
        cells = [method]
        for r in results:
            cells.append(common.mean_std(r.delta[method], digits=2) if method in r.delta else "–")
        cells.append(f"{ranks[method]:.1f}" if method in ranks else "(not ranked)")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines), ranks


def lr_table(results: Sequence[ProblemResult]) -> str:
    headers = ["problem", *(f"lr {lr:g}" for lr in LR_GRID), "chosen"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in results:
        cells = [f"{r.lr_scores[lr]:.2f}" if lr in r.lr_scores else "–" for lr in LR_GRID]
        lines.append("| " + " | ".join([r.problem.name, *cells, f"{r.lr:g}"]) + " |")
    return "\n".join(lines)


def plot_delta_m(results: Sequence[ProblemResult]):
    """One panel per problem: Δm % per method (mean ± std over seeds), best at the top."""
    fig, axes = common.figure(len(results), width=4.6, height=0.28 * _rows(results) + 1.2)
    for ax, r in zip(axes, results):
        names = sorted(r.delta, key=lambda m: -np.mean(r.delta[m]))
        means = [np.mean(r.delta[m]) for m in names]
        stds = [np.std(r.delta[m], ddof=1) if len(r.delta[m]) > 1 else 0.0 for m in names]
        colors = [
            "gray" if m == SINGLE_TASK else ("tab:red" if m == EQUAL else "tab:blue") for m in names
        ]
        ax.barh(range(len(names)), means, xerr=stds, color=colors, capsize=2)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.axvline(0.0, color="gray", lw=0.6)
        ax.set(title=r.problem.name, xlabel="Δm % vs single-task (lower is better)")
    fig.tight_layout()
    return fig


def _rows(results: Sequence[ProblemResult]) -> int:
    return max(len(r.delta) for r in results)


def plot_weights(result: ProblemResult, methods: Sequence[str]):
    """Each method's task weights over training (seed 0, normalised to sum 1)."""
    import matplotlib

    shown = [m for m in methods if m in result.histories]
    fig, axes = common.figure(len(shown), width=4.0, height=3.2)
    colors = matplotlib.colormaps["tab20"].colors[: result.problem.num_tasks]  # one per task
    for ax, method in zip(axes, shown):
        w = np.abs(result.histories[method]["weights"][:, 0])  # (steps, K)
        share = w / np.maximum(w.sum(-1, keepdims=True), 1e-30)
        ax.set_prop_cycle(color=colors)
        lines = ax.plot(share, lw=0.8)
        ax.set(title=method, xlabel="step", ylabel="weight share")
    if shown:
        axes[len(shown) - 1].legend(lines, result.problem.tasks, fontsize=6, ncol=2)
    fig.suptitle(f"{result.problem.name}: task weights over training (one line per task)")
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- command line
def parse_args(argv: Sequence[str] | None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=common.count, default=3, help="number of seeds (0..n-1)")
    parser.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=list(PROBLEMS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), metavar="METHOD")
    parser.add_argument("--lr", type=float, default=None, help="skip the selection, use this")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_true", help="longer training (FULL budgets)")
    size.add_argument("--smoke", action="store_true", help="tiny budgets, seconds (tests)")
    parser.add_argument(
        "--out", default=None, help="results folder ('' writes nothing; default: results/)"
    )
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "--jobs",
        type=common.count,
        default=min(os.cpu_count() or 1, 4),
        help="worker processes (default: the CPU cores, at most 4); 1 runs in this process",
    )
    args = parser.parse_args(argv)
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
    if EQUAL not in args.methods:
        args.methods.insert(0, EQUAL)  # the reference of every comparison
    if args.seeds < 2:
        parser.error("--seeds must be at least 2 (the noise rule compares seeds)")
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    return args


FINDINGS_START, FINDINGS_END = "<!-- findings -->", "<!-- /findings -->"
WEIGHT_PLOT = ("FAMO", "uncertainty weighting", "DWA", "GradNorm", "MGDA", "Nash-MTL")
"""Methods whose weights over training are plotted on Yeast (those that ran)."""


def noise_lines(results: Sequence[ProblemResult]) -> str:
    """Per problem: the methods better / worse than equal weighting and better than the
    single-task models beyond the seed-to-seed noise (the paired rule)."""
    lines = []
    for r in results:
        groups: dict[str, list[str]] = {}
        for method in r.delta:
            for reference, label in ((EQUAL, "equal weighting"), (SINGLE_TASK, "single-task")):
                if method in (reference, SINGLE_TASK):
                    continue
                c = paired_comparison(r.delta[method], r.delta[reference])
                if c.verdict != "within noise":
                    groups.setdefault(f"{c.verdict} than {label}", []).append(method)
        text = "; ".join(f"{k}: {', '.join(v)}" for k, v in groups.items()) or "none"
        lines.append(f"* **{r.problem.name}** (beyond noise) -- {text}.")
    return "\n".join(lines)


def kept_findings(path) -> str:
    """The hand-written findings block of an existing results file (kept on rewrite)."""
    from pathlib import Path

    path = Path(path)
    if not path.exists():
        return ""
    text = path.read_text()
    if FINDINGS_START in text and FINDINGS_END in text:
        return text[text.index(FINDINGS_START) : text.index(FINDINGS_END) + len(FINDINGS_END)]
    return ""


def report(results: Sequence[ProblemResult], args, budgets, timing: dict, findings: str) -> str:
    """The markdown results file."""
    summary, _ = summary_table(results)
    config = "; ".join(
        f"{r.problem.name}: {budgets[n].steps} steps, batch {budgets[n].batch_size}, "
        f"Adam lr {r.lr:g}"
        + (f", {budgets[n].sizes['train_pairs']} train pairs" if budgets[n].sizes else "")
        for n, r in zip(args.problems, results)
    )
    load = ", ".join(f"{x:.1f}" for x in timing["load"])
    parts = [
        "# Multi-task leaderboard: every method against single-task models",
        f"{args.seeds} seeds; {config}. Wall time {timing['wall']:.0f} s, CPU time "
        f"{timing['cpu']:.0f} s (all processes and threads), {timing['jobs']} worker processes "
        f"on {os.cpu_count()} CPU cores, load average "
        f"(1 min) before / after {load} (JAX {jax.__version__}, {jax.default_backend()})."
        + (f" {timing['note']}" if timing.get("note") else ""),
        "Δm % (Maninis et al., 2019) is the mean over tasks of the relative difference to "
        "the single-task models, signed so that **negative is better** (the Nash-MTL / FAMO "
        "convention); mean ± std over seeds. *vs equal weights* / *vs single-task*: a "
        "two-sided paired t-test of the per-seed Δm at 5 % (every seed gives every method "
        "the same initialisation and minibatches); ≈ means within the seed-to-seed noise. "
        "Mean rank: over the problems, by mean Δm, of the methods that treat the tasks "
        "alike (primary/auxiliary methods are listed apart, not ranked).",
        findings or f"{FINDINGS_START}\n{FINDINGS_END}",
        "## Beyond the noise\n\n" + noise_lines(results),
        "## Summary\n\n" + summary,
        "![Δm per method](leaderboard_delta_m.png)",
    ]
    for r in results:
        parts.append(f"## {r.problem.name}\n\n" + problem_table(r))
        parts.append("Per task (test; accuracy in %, RMSE in digits):\n\n" + per_task_table(r))
    parts.append(
        "## Learning rate (equal weighting, validation)\n\nScore of each grid point: Δm % "
        "on validation against the grid's best value of each task (0 = best on every "
        "task); the lowest score is chosen and used by every method.\n\n" + lr_table(results)
    )
    if any(r.problem.name == "Yeast" for r in results):
        parts.append("## Task weights on Yeast\n\n![weights](leaderboard_weights.png)")
    return "\n\n".join(parts) + "\n"


def children_cpu() -> float:
    """CPU seconds of this process's ended child processes (the workers)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the leaderboard and write its results; returns them (for tests)."""
    from pathlib import Path

    args = parse_args(argv)
    budgets = FULL if args.full else SMOKE if args.smoke else DEFAULT
    load_before, clock, cpu = os.getloadavg()[0], common.Stopwatch(), time.process_time()
    workers = children_cpu()
    results = run_all(args, budgets, range(args.seeds))
    timing = {
        "wall": clock(),
        "cpu": time.process_time() - cpu + children_cpu() - workers,  # the pool has ended
        "load": (load_before, os.getloadavg()[0]),
        "jobs": args.jobs,
    }
    summary, ranks = summary_table(results)
    print(summary)
    out = args.out if args.out is not None else ("" if args.smoke else common.RESULTS_DIR)
    if out:
        out = Path(out)
        findings = kept_findings(out / "leaderboard.md")
        text = report(results, args, budgets, timing, findings)
        figures = {"leaderboard_delta_m": plot_delta_m(results)}
        yeast = [r for r in results if r.problem.name == "Yeast"]
        if yeast and any(m in yeast[0].histories for m in WEIGHT_PLOT):
            figures["leaderboard_weights"] = plot_weights(yeast[0], WEIGHT_PLOT)
        written = common.write_results(out, "leaderboard", text)
        for name, fig in figures.items():
            fig.savefig(out / f"{name}.png", dpi=120, bbox_inches="tight")
            written.append(out / f"{name}.png")
        for path in written:
            print(f"wrote {path}")
    return {"results": results, "summary": summary, "ranks": ranks, "timing": timing}


if __name__ == "__main__":
    main()

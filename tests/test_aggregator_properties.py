"""Generic properties of every method in ``tests/zoo.py``, each claim tied to a declaration.

``PROPERTIES`` declares, per zoo entry, what the documentation table claims:
non-conflicting (``⟨u, g_i⟩ ≥ 0``), linear under scaling (``u(cJ) = c·u(J)``; for weightings
exactly ``homogeneity == 0``), permutation equivariance (deterministic, symmetric methods:
permuting the tasks leaves ``u`` unchanged), random (a PRNG key in the state) and stateful.
Each claim is checked, and each "no" for non-conflicting is backed by a counterexample.
To keep compilation at one per method and test, cases are batched with ``vmap``.
"""

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtl_optax as mtl
from tests import models, zoo

K = 4
DIM = 12

# name: (non_conflicting, linear, equivariant, random, stateful)
PROPERTIES = {
    "mean": (False, True, True, False, False),
    "sum": (False, True, True, False, False),
    "constant": (False, True, False, False, False),
    "gradient_normalized": (False, False, True, False, False),
    "mgda": (True, True, True, False, True),  # state: warm-start support
    "mgda_l2": (True, False, True, False, True),
    "mgda_frank_wolfe": (False, True, True, False, True),  # approximate: not guaranteed
    "primary_auxiliary": (True, True, False, False, True),
    "pcgrad": (False, True, False, True, True),
    "gradvac": (False, True, False, True, True),
    "imtl_g": (False, True, True, False, False),
    "aligned_mtl": (False, True, True, False, False),
    "aligned_mtl_rmse": (False, True, True, False, False),
    "config": (True, True, True, False, False),
    "nash_mtl": (True, False, True, False, False),
    "nash_mtl_unclipped": (True, True, True, False, False),
    "fairgrad": (True, False, True, False, False),
    "fairgrad_alpha2": (True, False, True, False, False),
    "krum": (False, True, True, False, False),
    "sdmgrad": (False, True, True, False, True),
    "modo": (False, False, True, False, True),
    "trimmed_mean": (False, True, True, False, False),
    "graddrop": (False, True, False, True, True),
    "db_mtl": (False, True, True, False, True),
    "excess_mtl": (False, False, True, False, True),
}
NAMES = list(zoo.WEIGHTINGS) + list(zoo.STACKED)
NON_CONFLICTING, LINEAR, EQUIVARIANT, RANDOM, STATEFUL = range(5)


def jacobians(seeds, k=K, spread=30.0, common=0.5, dim=DIM):
    """Random Jacobians: a common direction (weight ``common``) plus task-specific parts,
    row norms spread over a factor ``spread``; zero-padded to DIM columns."""
    out = []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        jac = rng.normal(size=(k, dim)) - common * rng.normal(size=dim)
        jac = np.pad(jac, ((0, 0), (0, DIM - dim)))
        out.append(jac * np.exp(rng.uniform(0, np.log(spread), size=(k, 1))))
    return np.stack(out)


LOSSES = np.linspace(0.5, 2.0, K)


def make(name, k=K):
    return zoo.WEIGHTINGS[name](k) if name in zoo.WEIGHTINGS else zoo.STACKED[name](k)


def transform(name, k=K):
    """Every method as a stacked-gradient transform (weightings through ``aggregate``)."""
    method = make(name, k)
    return mtl.aggregate(method, num_tasks=k) if name in zoo.WEIGHTINGS else method


def batched_updates(name, jacs, losses=LOSSES, steps=1):
    """``u`` for a batch of Jacobians (B, K, DIM): one jit(vmap) per method; returns (B, DIM)."""
    k = jacs.shape[1]
    t = transform(name, k)
    params = jnp.zeros(DIM, jnp.float32)
    state = t.init(params)
    states = jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (len(jacs), *x.shape)), state)
    losses = jnp.broadcast_to(jnp.asarray(losses, jnp.float32), (len(jacs), k))

    def one(jac, st, loss):
        return t.update(jac, st, params, task_losses=loss)

    run = jax.jit(jax.vmap(one))
    for _ in range(steps):
        u, states = run(jnp.asarray(jacs, jnp.float32), states, losses)
    return np.asarray(u, np.float64)


def test_every_zoo_entry_is_declared():
    """New zoo entries need a row above; Gram weightings: linear exactly when h == 0."""
    assert set(NAMES) - set(PROPERTIES) == set()
    for name, weighting in ((n, zoo.WEIGHTINGS[n](K)) for n in zoo.WEIGHTINGS):
        if weighting.needs_gram:
            assert PROPERTIES[name][LINEAR] == (weighting.homogeneity == 0), name


@pytest.mark.parametrize("name", NAMES)
def test_non_conflicting_claim(name):
    """Claimed: ``⟨u, g_i⟩ ≥ −tol`` on linearly independent gradients (norms up to 10³ apart).
    Not claimed: a counterexample exists (then also among dependent gradients in 3-D)."""
    independent = np.concatenate([jacobians(range(8)), jacobians(range(4), spread=1e3, common=0.0)])
    jacs = independent
    if not PROPERTIES[name][NON_CONFLICTING]:
        jacs = np.concatenate([jacs, jacobians(range(8), spread=1e3, common=0.0, dim=3)])
    u = batched_updates(name, jacs)
    inner = np.einsum("bkd,bd->bk", jacs, u)
    norms = np.linalg.norm(jacs, axis=2)
    tol = norms * (1e-4 * np.linalg.norm(u, axis=1) + 1e-6 * norms.max(axis=1))[:, None]
    if PROPERTIES[name][NON_CONFLICTING]:
        assert np.all(inner >= -tol)
    else:
        assert np.any(inner < -tol)


@pytest.mark.parametrize("name", [n for n in NAMES if PROPERTIES[n][LINEAR]])
def test_linear_under_scaling(name):
    jac = jacobians([3])[0]
    scales = np.array([1.0, 3.0e-6, 7.0e4])
    u = batched_updates(name, scales[:, None, None] * jac[None])
    for c, u_c in zip(scales[1:], u[1:]):
        np.testing.assert_allclose(u_c / c, u[0], rtol=2e-4, atol=2e-5 * np.abs(u[0]).max())


@pytest.mark.parametrize("name", [n for n in NAMES if PROPERTIES[n][EQUIVARIANT]])
def test_permutation_equivariance(name):
    jac = jacobians([5])[0]
    perm = np.array([2, 0, 3, 1])
    u = batched_updates(name, np.stack([jac, jac[perm]]), losses=LOSSES)
    u_perm = batched_updates(name, jac[perm][None], losses=LOSSES[perm])[0]
    np.testing.assert_allclose(u_perm, u[0], rtol=1e-4, atol=1e-5 * np.abs(u[0]).max())


@pytest.mark.parametrize("name", [n for n in NAMES if PROPERTIES[n][RANDOM]])
def test_random_methods_reproducible_from_their_key(name):
    jac = jnp.asarray(jacobians([6], k=6)[0], jnp.float32)
    params = jnp.zeros(DIM)
    outs = []
    for _ in range(2):
        t = transform(name, 6)
        update, state, run = jax.jit(t.update), t.init(params), []
        for _ in range(3):
            u, state = update(jac, state, params)
            run.append(np.asarray(u))
        outs.append(run)
    np.testing.assert_array_equal(np.stack(outs[0]), np.stack(outs[1]))
    assert any(not np.array_equal(outs[0][0], u) for u in outs[0][1:])  # the key advances


@pytest.mark.parametrize("name", [n for n in NAMES if PROPERTIES[n][STATEFUL]])
def test_state_survives_flax_serialization(name):
    jacs = jacobians(range(3))
    t = transform(name)
    params = jnp.zeros(DIM)
    update = jax.jit(t.update)
    state = t.init(params)
    _, state = update(jnp.asarray(jacs[0], jnp.float32), state, params, task_losses=LOSSES)
    restored = flax.serialization.from_bytes(t.init(params), flax.serialization.to_bytes(state))
    for jac in jacs[1:]:
        a, state = update(jnp.asarray(jac, jnp.float32), state, params, task_losses=LOSSES)
        b, restored = update(jnp.asarray(jac, jnp.float32), restored, params, task_losses=LOSSES)
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", list(zoo.WEIGHTINGS))
def test_weightings_in_tier_two(name):
    weighting = zoo.WEIGHTINGS[name](models.K)
    params = models.init_params(jax.random.PRNGKey(0))
    batch = models.make_batch(jax.random.PRNGKey(1))
    step = jax.jit(mtl.weighted_value_and_grad(models.encode, models.heads, weighting))
    out = step(params, batch, weighting.init(models.K))
    assert out.weights.shape == (models.K,)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(out.grads))


def degenerate_cases():
    jac = jacobians([8])[0]
    zero_row = jac.copy()
    zero_row[1] = 0.0
    duplicated = jac.copy()
    duplicated[3] = duplicated[0]
    return np.stack([zero_row, np.zeros_like(jac), duplicated])


@pytest.mark.parametrize("name", NAMES)
def test_degenerate_inputs_are_finite(name):
    """A zero gradient, all zero, duplicated tasks (batched), bf16 and K = 1 (or K too small)."""
    u = batched_updates(name, degenerate_cases())
    assert np.all(np.isfinite(u))
    t = transform(name)
    params = jnp.zeros(DIM, jnp.bfloat16)
    bf16 = jnp.asarray(jacobians([9])[0], jnp.bfloat16)
    out, _ = jax.jit(t.update)(bf16, t.init(params), params, task_losses=LOSSES)
    assert out.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(out)))
    if name == "krum":  # needs K >= n_byzantine + 3: a clear error, documented
        with pytest.raises(ValueError, match="n_byzantine"):
            mtl.krum(n_byzantine=0).init(1)
        return
    single = batched_updates(name, jacobians([10], k=1), losses=[1.0])
    assert np.all(np.isfinite(single))


@pytest.mark.parametrize(
    "build",
    [
        lambda: mtl.fairgrad(alpha=float("nan")),
        lambda: mtl.fairgrad(alpha=-1.0),
        lambda: mtl.nash_mtl(max_norm=float("nan")),
        lambda: mtl.gradvac(key=jax.random.PRNGKey(0), beta=float("nan")),
        lambda: mtl.krum(n_byzantine=-1),
        lambda: mtl.sdmgrad(lr=float("inf")),
        lambda: mtl.modo(rho=-0.1),
        lambda: mtl.trimmed_mean(num_tasks=3, trim=1.0),
        lambda: mtl.trimmed_mean(num_tasks=2, trim=1),
        lambda: mtl.graddrop(num_tasks=3, key=jax.random.PRNGKey(0), leak=[0.1, 0.2]),
        lambda: mtl.db_mtl(num_tasks=3, beta=2.0),
        lambda: mtl.excess_mtl(num_tasks=3, n_warmup_steps=-1),
        lambda: mtl.excess_mtl(num_tasks=True),
    ],
)
def test_bad_hyper_parameters_raise(build):
    with pytest.raises((ValueError, TypeError)):
        build()

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
    "upgrad": (True, True, True, False, True),  # state: warm-start supports
    "dualproj": (True, True, True, False, True),
    "cagrad": (False, True, True, False, False),
    # loss weightings read no gradients: the update is linear in J for fixed losses
    "initial_loss": (False, True, True, False, True),
    "initial_loss_given": (False, True, False, False, False),
    "prior_loss": (False, True, False, False, False),
    "real_time": (False, True, True, False, False),
    "generalized_mean": (False, True, True, False, False),
    "generalized_mean_max": (False, True, True, False, False),
    "geometric_mean": (False, True, True, False, False),
    "uncertainty": (False, True, True, False, True),
    "imtl_l": (False, True, True, False, True),
    "gradnorm": (False, False, True, False, True),
    "famo": (False, True, True, False, True),
    "dwa": (False, True, True, False, True),
    "stch": (False, True, True, False, True),
    "random": (False, True, False, True, True),
    "pcgrad": (False, True, False, True, True),
    "gradvac": (False, True, False, True, True),
    "imtl_g": (False, True, True, False, False),
    "aligned_mtl": (False, True, True, False, False),
    "aligned_mtl_rmse": (False, True, True, False, False),
    "config": (True, True, True, False, False),
    "nash_mtl": (True, False, True, False, False),
    "nash_mtl_unclipped": (True, False, True, False, False),  # u(cJ) = u(J): scale-free
    "fairgrad": (True, False, True, False, False),
    "fairgrad_alpha2": (True, False, True, False, False),
    "krum": (False, True, True, False, False),
    "sdmgrad": (False, True, True, False, True),
    "modo": (False, False, True, False, True),
    "cr_mogm": (False, True, True, False, True),  # past weights on current gradients
    "cosmos": (False, True, True, False, False),
    "pbi": (False, True, True, False, False),
    "trimmed_mean": (False, True, True, False, False),
    "graddrop": (False, True, False, True, True),
    "db_mtl": (False, True, True, False, True),
    "excess_mtl": (False, False, True, False, True),
    "moco": (False, False, True, False, True),
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


def transform(name, k=K):
    """Every method through ``aggregate`` (all leaves shared)."""
    return mtl.aggregate(zoo.METHODS[name](k), tasks=k, shared=True)


class Batched:
    """One jit(vmap(update)) per method, reused by every batched check (same batch size)."""

    SIZE = 32

    def __init__(self, name, k=K, dtype=jnp.float32):
        self.k, self.dtype = k, dtype
        self.t = transform(name, k)
        self.params = jnp.zeros(DIM, dtype)
        self.run = jax.jit(
            jax.vmap(
                lambda j, s, l: self.t.update(mtl.TaskGradients(j), s, self.params, task_losses=l)
            )
        )

    def fresh_states(self):
        state = self.t.init(self.params)
        return jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (self.SIZE, *x.shape)), state)

    def __call__(self, jacs, losses=None, states=None):
        """``(u, states)`` for up to SIZE Jacobians (padded with copies of the first)."""
        n = len(jacs)
        jacs = np.concatenate([jacs, np.repeat(jacs[:1], self.SIZE - n, axis=0)])
        losses = LOSSES[: self.k] if losses is None else np.asarray(losses)
        losses = np.broadcast_to(losses, (self.SIZE, self.k)) if losses.ndim == 1 else losses
        losses = np.concatenate([losses, np.repeat(losses[:1], self.SIZE - len(losses), axis=0)])
        states = self.fresh_states() if states is None else states
        u, states = self.run(jnp.asarray(jacs, self.dtype), states, jnp.asarray(losses, self.dtype))
        return np.asarray(u, np.float64)[:n], states


def test_every_zoo_entry_is_declared():
    """New zoo entries need a row above; Gram weightings: linear exactly when h == 0."""
    assert set(NAMES) - set(PROPERTIES) == set()
    for name, weighting in ((n, zoo.WEIGHTINGS[n](K)) for n in zoo.WEIGHTINGS):
        if weighting.needs_gram:
            assert PROPERTIES[name][LINEAR] == (weighting.homogeneity == 0), name


def degenerate_cases():
    jac = jacobians([8])[0]
    zero_row = jac.copy()
    zero_row[1] = 0.0
    duplicated = jac.copy()
    duplicated[3] = duplicated[0]
    return np.stack([zero_row, np.zeros_like(jac), duplicated])


@pytest.mark.parametrize("name", NAMES)
def test_properties(name):
    """All float32 checks of one method through one compiled, vmapped update.

    * non-conflicting: ``⟨u, g_i⟩ ≥ −tol`` on linearly independent gradients (norms up to
      10³ apart) where claimed; otherwise a counterexample exists (also among dependent
      gradients in 3-D);
    * linear under scaling (where claimed): ``u(cJ) = c·u(J)`` at c = 3e-6 and 7e4;
    * permutation equivariance (deterministic symmetric methods);
    * degenerate inputs (a zero gradient, all zero, duplicated tasks): finite;
    * stateful: a flax ``to_bytes``/``from_bytes`` round trip continues identically;
    * random: reproducible from the key, and the key advances.
    """
    claims = PROPERTIES[name]
    batched = Batched(name)
    independent = np.concatenate([jacobians(range(8)), jacobians(range(4), spread=1e3, common=0.0)])
    dependent = jacobians(range(8), spread=1e3, common=0.0, dim=3)
    base = jacobians([3])[0]
    scales = np.array([3.0e-6, 7.0e4])
    perm = np.array([2, 0, 3, 1])
    jacs = np.concatenate(
        [independent, dependent, base[None], scales[:, None, None] * base, base[perm][None]]
    )
    jacs = np.concatenate([jacs, degenerate_cases()])
    losses = np.broadcast_to(LOSSES, (len(jacs), K)).copy()
    losses[len(independent) + len(dependent) + 3] = LOSSES[perm]
    u, states = batched(jacs, losses)
    n_ind, n_dep = len(independent), len(dependent)
    u_base, u_scaled, u_perm = (
        u[n_ind + n_dep],
        u[n_ind + n_dep + 1 : n_ind + n_dep + 3],
        u[n_ind + n_dep + 3],
    )

    cases = jacs[: n_ind + (0 if claims[NON_CONFLICTING] else n_dep)]
    inner = np.einsum("bkd,bd->bk", cases, u[: len(cases)])
    norms = np.linalg.norm(cases, axis=2)
    tol = (
        norms * (1e-4 * np.linalg.norm(u[: len(cases)], axis=1) + 1e-6 * norms.max(axis=1))[:, None]
    )
    if claims[NON_CONFLICTING]:
        assert np.all(inner >= -tol), "non-conflicting claimed"
    else:
        assert np.any(inner < -tol), "no counterexample for a 'no'"
    if claims[LINEAR]:
        for c, u_c in zip(scales, u_scaled):
            np.testing.assert_allclose(u_c / c, u_base, rtol=2e-4, atol=2e-5 * np.abs(u_base).max())
    if claims[EQUIVARIANT]:
        np.testing.assert_allclose(u_perm, u_base, rtol=1e-4, atol=1e-5 * np.abs(u_base).max())
    assert np.all(np.isfinite(u[-3:])), "degenerate inputs"

    if claims[STATEFUL]:
        restored = flax.serialization.from_bytes(
            batched.fresh_states(), flax.serialization.to_bytes(states)
        )
        a, _ = batched(jacs[::-1].copy(), losses, states)
        b, _ = batched(jacs[::-1].copy(), losses, restored)
        np.testing.assert_array_equal(a, b)
    if claims[RANDOM]:
        again, _ = batched(jacs, losses)
        np.testing.assert_array_equal(again, u)
        second, _ = batched(jacs, losses, states)
        assert not np.array_equal(second[:n_ind], u[:n_ind]), "the key advances"


@pytest.mark.parametrize("name", list(zoo.WEIGHTINGS))
def test_weightings_in_tier_two(name):
    weighting = zoo.WEIGHTINGS[name](models.K)
    params = models.init_params(jax.random.PRNGKey(0))
    batch = models.make_batch(jax.random.PRNGKey(1))
    grad_fn = mtl.split_value_and_grad(models.encode, models.HEADS, weighting)
    _, grads, state = jax.jit(grad_fn)(params, batch, grad_fn.init(params))
    assert mtl.task_weights(state).shape == (models.K,)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(grads))


@pytest.mark.parametrize("name", NAMES)
def test_bf16_and_single_task(name):
    """bf16 gradients (degenerate cases included) and K = 1 give finite updates."""
    u, _ = Batched(name, dtype=jnp.bfloat16)(np.concatenate([jacobians([9]), degenerate_cases()]))
    assert np.all(np.isfinite(u))
    if name == "krum":  # needs K >= n_byzantine + 3: a clear error, documented
        with pytest.raises(ValueError, match="n_byzantine"):
            mtl.krum(n_byzantine=0).init(1)
        return
    single, _ = Batched(name, k=1)(jacobians([10], k=1), losses=[1.0])
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
        lambda: mtl.trimmed_mean(trim=1.0),
        lambda: mtl.aggregate(mtl.trimmed_mean(trim=1), tasks=2, shared=True).init(jnp.zeros(2)),
        lambda: mtl.aggregate(
            mtl.graddrop(key=jax.random.PRNGKey(0), leak=[0.1, 0.2]), tasks=3, shared=True
        ).init(jnp.zeros(2)),
        lambda: mtl.graddrop(key=jax.random.PRNGKey(0), leak="0.1"),
        lambda: mtl.db_mtl(beta=2.0),
        lambda: mtl.excess_mtl(n_warmup_steps=-1),
        lambda: mtl.aggregate(mtl.excess_mtl(), tasks=True, shared=True),
    ],
)
def test_bad_hyper_parameters_raise(build):
    with pytest.raises((ValueError, TypeError)):
        build()

"""PCGrad and GradVac against NumPy transcriptions on the Jacobian with the same orders."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtl_optax as mtl
from mtl_optax.weighting.projection import task_orders


def jacobian(seed, k=4, dim=10):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(k, dim)) * np.exp(rng.uniform(0, 3, size=(k, 1)))


def pcgrad_numpy(jac, orders):
    out = np.zeros(jac.shape[1])
    for i, order in enumerate(orders):
        g = jac[i].copy()
        for j in order:
            if j != i and g @ jac[j] < 0:
                g -= (g @ jac[j]) / (jac[j] @ jac[j]) * jac[j]
        out += g
    return out


def gradvac_numpy(jac, orders, targets, beta=0.5):
    out, targets = np.zeros(jac.shape[1]), targets.copy()
    for i, order in enumerate(orders):
        g = jac[i].copy()
        for j in order:
            if j == i:
                continue
            phi = g @ jac[j] / (np.linalg.norm(g) * np.linalg.norm(jac[j]))
            hat = targets[i, j]
            if phi < hat:
                g += (
                    jac[j]
                    * np.linalg.norm(g)
                    * (hat * np.sqrt(1 - phi**2) - phi * np.sqrt(1 - hat**2))
                    / (np.linalg.norm(jac[j]) * np.sqrt(1 - hat**2))
                )
            targets[i, j] = (1 - beta) * hat + beta * phi
        out += g
    return out, targets


def test_pcgrad_matches_transcription_with_same_orders():
    key = jax.random.PRNGKey(5)
    w = mtl.pcgrad(key=key)
    state = w.init(4)
    update = jax.jit(w.update)
    for seed in range(3):
        jac = jacobian(seed)
        _, orders = task_orders(state.key, 4)
        weights, state = update(jnp.asarray(jac @ jac.T, jnp.float32), None, state)
        ref = pcgrad_numpy(jac, np.asarray(orders))
        np.testing.assert_allclose(np.asarray(weights) @ jac, ref, rtol=2e-4, atol=1e-4)


def test_pcgrad_worked_example_and_two_task_non_conflict():
    jac = np.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
    w = mtl.pcgrad(key=jax.random.PRNGKey(0))
    weights, _ = w.update(jnp.asarray(jac @ jac.T, jnp.float32), None, w.init(2))
    np.testing.assert_allclose(np.asarray(weights) @ jac, [0.5848, 3.8012, 3.8012], atol=1e-4)
    u = np.asarray(weights) @ jac
    assert np.all(jac @ u >= -1e-5)


def test_gradvac_matches_transcription_over_steps():
    w = mtl.gradvac(key=jax.random.PRNGKey(1), beta=0.3)
    state = w.init(4)
    targets = np.zeros((4, 4))
    update = jax.jit(w.update)
    for seed in range(4):
        jac = jacobian(10 + seed)
        _, orders = task_orders(state.key, 4)
        weights, state = update(jnp.asarray(jac @ jac.T, jnp.float32), None, state)
        ref, targets = gradvac_numpy(jac, np.asarray(orders), targets, beta=0.3)
        np.testing.assert_allclose(np.asarray(weights) @ jac, ref, rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(state.targets, targets, atol=1e-4)


def test_gradvac_first_step_is_pcgrad():
    jac = jacobian(20)
    gram = jnp.asarray(jac @ jac.T, jnp.float32)
    key = jax.random.PRNGKey(2)
    vac, _ = mtl.gradvac(key=key).update(gram, None, mtl.gradvac(key=key).init(4))
    pc, _ = mtl.pcgrad(key=key).update(gram, None, mtl.pcgrad(key=key).init(4))
    np.testing.assert_allclose(vac, pc, rtol=1e-4, atol=1e-5)


def test_bad_arguments():
    with pytest.raises(TypeError, match="key"):
        mtl.pcgrad(key=0)
    with pytest.raises(ValueError, match="beta"):
        mtl.gradvac(key=jax.random.PRNGKey(0), beta=1.5)
    w = mtl.gradvac(key=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="init"):
        w.update(jnp.eye(3), None, w.init(2))

"""IMTL-G, Aligned-MTL, ConFIG: float64 NumPy transcriptions, defining properties, example."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtl_optax as mtl

WORKED = np.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])


def jacobian(seed, k=4, dim=12, rank=None):
    rng = np.random.default_rng(seed)
    if rank is not None:
        return rng.normal(size=(k, rank)) @ rng.normal(size=(rank, dim))
    return rng.normal(size=(k, dim)) * np.exp(rng.uniform(0, 2, size=(k, 1)))


def update(weighting, jac):
    gram = jnp.asarray(jac, jnp.float32) @ jnp.asarray(jac, jnp.float32).T
    k = jac.shape[0]
    return np.asarray(jax.jit(weighting.update)(gram, None, weighting.init(k))[0], np.float64) @ jac


def imtl_g_numpy(jac):
    gram = jac @ jac.T
    v = np.linalg.pinv(gram) @ np.sqrt(np.diag(gram))
    return v / v.sum() @ jac


def aligned_numpy(jac, mode):
    gram = jac @ jac.T
    lam, vec = np.linalg.eigh(gram)
    keep = lam > lam.max() * len(gram) * 1e-7  # float32-level cutoff, ample for these cases
    lam, vec = lam[keep], vec[:, keep]
    sigma = {"min": lam.min(), "median": np.sort(lam)[(len(lam) - 1) // 2], "rmse": lam.mean()}
    balance = np.sqrt(sigma[mode]) * vec @ np.diag(lam**-0.5) @ vec.T
    return balance @ np.full(len(gram), 1 / len(gram)) @ jac


def config_numpy(jac):
    units = jac / np.linalg.norm(jac, axis=1, keepdims=True)
    v = np.linalg.pinv(units) @ np.ones(len(jac))
    v_hat = v / np.linalg.norm(v)
    return np.sum(jac @ v_hat) * v_hat


@pytest.mark.parametrize("rank", [None, 2])
def test_against_numpy_transcriptions(rank):
    for seed in range(2):
        jac = jacobian(seed, rank=rank)
        np.testing.assert_allclose(
            update(mtl.imtl_g(), jac), imtl_g_numpy(jac), rtol=1e-4, atol=1e-5
        )
        np.testing.assert_allclose(
            update(mtl.config(), jac), config_numpy(jac), rtol=1e-4, atol=1e-5
        )
        for mode in ("min", "median", "rmse"):
            np.testing.assert_allclose(
                update(mtl.aligned_mtl(scale_mode=mode), jac),
                aligned_numpy(jac, mode),
                rtol=1e-3,
                atol=1e-4,
            )


def test_defining_properties():
    jac = jacobian(3)
    units = jac / np.linalg.norm(jac, axis=1, keepdims=True)
    projections = units @ update(mtl.imtl_g(), jac)  # equal projections on unit gradients
    np.testing.assert_allclose(projections, projections[0], rtol=1e-4)
    cosines = units @ update(mtl.config(), jac)  # equal cosines, positive: non-conflicting
    assert np.all(cosines > 0)
    np.testing.assert_allclose(cosines, cosines[0], rtol=1e-4)


def test_worked_examples():
    np.testing.assert_allclose(update(mtl.imtl_g(), WORKED), [0.0767, 1, 1], atol=1e-4)
    np.testing.assert_allclose(
        update(mtl.aligned_mtl(), WORKED), [0.2133, 0.9673, 0.9673], atol=1e-4
    )
    np.testing.assert_allclose(update(mtl.config(), WORKED), [0.1588, 2.0706, 2.0706], atol=1e-4)


def test_preferences_and_errors():
    jac = jacobian(4)
    pref = np.array([1.0, 2.0, 0.5, 1.0])
    u = update(mtl.config(pref_vector=pref), jac)
    cosines = jac @ u / np.linalg.norm(jac, axis=1)
    np.testing.assert_allclose(cosines / pref, cosines[0] / pref[0], rtol=1e-4)
    with pytest.raises(ValueError, match="scale_mode"):
        mtl.aligned_mtl(scale_mode="max")
    with pytest.raises(ValueError, match="pref_vector"):
        mtl.config(pref_vector=[1.0, float("nan")])
    with pytest.raises(ValueError, match="pref_vector"):
        update(mtl.aligned_mtl(pref_vector=[1.0, 2.0]), jac)

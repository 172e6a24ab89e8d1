"""Krum / Multi-Krum against a NumPy transcription with explicit pairwise distances."""

import jax.numpy as jnp
import numpy as np
import pytest

import mtl_optax as mtl


def krum_numpy(jac, f, m):
    k = len(jac)
    dist = np.linalg.norm(jac[:, None] - jac[None], axis=2)
    scores = [np.sort(np.delete(dist[i], i))[: k - f - 2].sum() for i in range(k)]
    return jac[np.argsort(scores, kind="stable")[:m]].mean(axis=0)


@pytest.mark.parametrize(("k", "f", "m"), [(5, 1, 1), (7, 2, 3), (3, 0, 1)])
def test_against_transcription_and_outlier_rejection(k, f, m):
    rng = np.random.default_rng(k)
    jac = rng.normal(size=(k, 8)) + 3.0
    jac[0] = -100.0  # an adversarial row is never selected
    w = mtl.krum(n_byzantine=f, n_selected=m)
    weights, _ = w.update(jnp.asarray(jac @ jac.T, jnp.float32), None, w.init(k))
    weights = np.asarray(weights, np.float64)
    np.testing.assert_allclose(weights @ jac, krum_numpy(jac, f, m), rtol=1e-5)
    assert weights[0] == 0.0


def test_errors():
    with pytest.raises(ValueError, match="n_byzantine"):
        mtl.krum(n_byzantine=2).init(4)
    with pytest.raises(ValueError, match="n_selected"):
        mtl.krum(n_byzantine=0, n_selected=4).init(3)
    with pytest.raises(TypeError, match="n_byzantine"):
        mtl.krum(n_byzantine=True)
    with pytest.raises(ValueError, match="n_byzantine"):
        w = mtl.krum(n_byzantine=1)
        w.update(jnp.eye(3), None, ())

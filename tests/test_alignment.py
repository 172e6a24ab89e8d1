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


def test_task_gram_factor_is_the_r_factor_of_the_gradients():
    """Leaf by leaf then stacked (tall-skinny QR): ``R`` upper triangular, ``RᵀR`` the float64
    Gram, ``|diag R|`` numpy's for the concatenated gradients; a masked leaf (NaN here) and a
    zero-size one are left out, leaves shorter than K and K above the total size are padded."""
    from mtl_optax.gram import task_gram_factor

    rng = np.random.default_rng(0)
    leaves = [
        rng.normal(size=(5, 3, 4)),
        rng.normal(size=(5, 2)),
        np.zeros((5, 0)),
        np.full((5, 7), np.nan),
    ]
    mask = [True, True, True, False]
    factor = np.asarray(task_gram_factor([jnp.asarray(x, jnp.float32) for x in leaves], mask))
    flat = np.concatenate([x.reshape(5, -1) for x, use in zip(leaves, mask) if use], axis=1)
    assert factor.shape == (5, 5) and np.all(np.tril(factor, -1) == 0)
    np.testing.assert_allclose(factor.T @ factor, flat @ flat.T, atol=1e-5 * np.sum(flat**2))
    expected = np.abs(np.diag(np.linalg.qr(flat.T, mode="r")))
    np.testing.assert_allclose(np.abs(np.diag(factor)), expected, atol=1e-5)
    short = np.asarray(task_gram_factor([jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)]))
    assert short.shape == (5, 5) and np.all(short[3:] == 0)


@pytest.mark.parametrize("kappa", [1e3, 1e4])
def test_config_from_the_gradients_loses_kappa_digits_not_kappa_squared(kappa):
    """Held gradients give ConFIG the QR factor: float32 within 1e-3 of float64 on unit rows
    of condition number ``κ`` = 1e3 … 1e4, where the float32 Gram (its rounding ``κ² eps``
    ≥ 0.1) cannot tell the small singular values from zero and the Gram path moves by > 1e-2."""
    from mtl_optax.gram import weights_from_gradients

    def run(weighting, jac):
        def weights(j):
            return weights_from_gradients(weighting, [j], None, weighting.init(len(jac)))[0]

        return np.asarray(jax.jit(weights)(jnp.asarray(jac)), np.float64) @ jac.astype(np.float64)

    for seed in range(3):
        rng = np.random.default_rng(seed)
        left, _ = np.linalg.qr(rng.normal(size=(5, 5)))
        right, _ = np.linalg.qr(rng.normal(size=(40, 5)))
        jac = (left * np.geomspace(1.0, 1.0 / kappa, 5)) @ right.T
        jac = (jac * np.exp(rng.uniform(0.0, 1.0, size=(5, 1)))).astype(np.float32)
        reference = config_numpy(jac.astype(np.float64))
        scale = np.linalg.norm(reference)
        assert np.linalg.norm(run(mtl.config(), jac) - reference) <= 1e-3 * scale
        from_gram = run(mtl.config()._replace(reads_gram_factor=False), jac)
        assert np.linalg.norm(from_gram - reference) > 1e-2 * scale


def test_config_gram_factor_shape_is_checked():
    w = mtl.config()
    for bad in (jnp.eye(2), jnp.eye(3, dtype=jnp.complex64), jnp.eye(3, dtype=jnp.int32), "R"):
        with pytest.raises(ValueError, match=r"`gram_factor` must be the real \(3, 3\) factor"):
            w.update(jnp.eye(3), None, w.init(3), gram_factor=bad)


def test_cr_mogm_hands_the_factor_to_a_wrapped_config():
    """The wrapper forwards ``gram_factor``: its first step is ConFIG's own, bit for bit."""
    from mtl_optax.gram import weights_from_gradients

    jac = jnp.asarray(jacobian(5, k=4, dim=30), jnp.float32)
    inner, wrapped = mtl.config(), mtl.cr_mogm(mtl.config())
    assert wrapped.reads_gram_factor
    expected = weights_from_gradients(inner, [jac], None, inner.init(4))[0]
    got = weights_from_gradients(wrapped, [jac], None, wrapped.init(4))[0]
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))


@pytest.mark.parametrize("spread", [1e20, 1e30])
def test_config_from_the_gradients_at_norm_spreads_beyond_the_gram(spread):
    """Gradient norms ``spread`` apart: their squares leave float32's range (the Gram sees
    the small gradient as zero), the QR factor does not. Float32 within 1e-5 of float64."""
    from mtl_optax.gram import weights_from_gradients

    jac = np.array([[spread, 3.0, 0.0], [1.0, -1.0, 1.0], [2.0, 0.0, 0.5]], np.float32)
    w = mtl.config()
    weights = weights_from_gradients(w, [jnp.asarray(jac)], None, w.init(3))[0]
    u = np.asarray(weights, np.float64) @ jac.astype(np.float64)
    reference = config_numpy(jac.astype(np.float64))
    np.testing.assert_allclose(u, reference, rtol=1e-5, atol=1e-5 * np.linalg.norm(reference))

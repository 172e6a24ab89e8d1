"""COSMOS and PBI against torchjd 0.18, finite differences and their closed-form geometry.

The reference weights (the gradient of torchjd's ``COSMOS`` / ``PBI`` output with respect to
the losses) come from ``tests/fixtures/make_new_method_fixtures.py``; torch is never imported
here. Independent of torchjd: central finite differences of the scalarizations written out
in NumPy (float64), and the geometry each weighting must have for any input.
"""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mtl_optax as mtl

FIXTURES = np.load(pathlib.Path(__file__).parent / "fixtures" / "new_methods.npz")


def cases(method):
    return sorted({key.split("/")[1] for key in FIXTURES.files if key.startswith(f"{method}/")})


def build(method, case, **overrides):
    prefix = f"{method}/{case}"
    kwargs = {"preference": FIXTURES[f"{prefix}/preference"]}
    if method == "cosmos":
        kwargs["lambda_"] = float(FIXTURES[f"{prefix}/param"])
        return mtl.cosmos(**{**kwargs, **overrides})
    kwargs["theta"] = float(FIXTURES[f"{prefix}/param"])
    if f"{prefix}/reference" in FIXTURES.files:
        kwargs["reference"] = FIXTURES[f"{prefix}/reference"]
    return mtl.pbi(**{**kwargs, **overrides})


def weights_of(weighting, losses, dtype=jnp.float32, **extra):
    losses = jnp.asarray(losses, dtype)
    return np.asarray(weighting.update(None, losses, weighting.init(losses.shape[0]), **extra)[0])


# ``near_line``: ‖p‖ ≈ 1e-7, inside PBI's 1e-12 smoothing; float32 cannot place the losses
# that close to the line (1 + 1e-7 rounds), so that case is compared in float64 only.
FLOAT32_CASES = [
    (method, case)
    for method in ("cosmos", "pbi")
    for case in cases(method)
    if case != "near_line_k2"
]


@pytest.mark.parametrize(("method", "case"), FLOAT32_CASES)
def test_float32_matches_torchjd(method, case):
    ref = FIXTURES[f"{method}/{case}/weights"]
    weights = weights_of(build(method, case), FIXTURES[f"{method}/{case}/losses"])
    np.testing.assert_allclose(weights, ref, rtol=2e-5, atol=2e-6 * np.abs(ref).max())


def test_float64_matches_torchjd_on_every_case():
    """1e-8: the near-line case loses ~1e-9 to cancellation in p = f − d₁r̂ (‖p‖ ≈ 1e-7)."""
    with jax.enable_x64(True):
        for method in ("cosmos", "pbi"):
            for case in cases(method):
                ref = FIXTURES[f"{method}/{case}/weights"]
                weights = weights_of(
                    build(method, case), FIXTURES[f"{method}/{case}/losses"], jnp.float64
                )
                np.testing.assert_allclose(weights, ref, rtol=1e-8, err_msg=f"{method}/{case}")


def cosmos_value(losses, pref, lam):
    """``rᵀL − λ cos(r, L)`` in float64 (norms above torch's 1e-8 floor)."""
    return pref @ losses - lam * pref @ losses / (np.linalg.norm(pref) * np.linalg.norm(losses))


def pbi_value(losses, pref, theta, reference):
    f = losses - reference
    unit = pref / np.linalg.norm(pref)
    d1 = f @ unit
    return d1 + theta * np.linalg.norm(f - d1 * unit)


def central_differences(fn, x, h=1e-6):
    return np.array([(fn(x + h * e) - fn(x - h * e)) / (2 * h) for e in np.eye(len(x))])


@pytest.mark.parametrize("seed", range(4))
def test_weights_are_finite_differences_of_the_scalarizations(seed):
    rng = np.random.default_rng(seed)
    k = 2 + seed
    losses, pref = rng.uniform(0.3, 3.0, k), rng.dirichlet(np.ones(k))
    reference = rng.uniform(-0.5, 0.1, k)
    with jax.enable_x64(True):
        cosmos = weights_of(mtl.cosmos(lambda_=1.5, preference=pref), losses, jnp.float64)
        pbi = weights_of(
            mtl.pbi(theta=4.0, preference=pref, reference=reference), losses, jnp.float64
        )
    np.testing.assert_allclose(
        cosmos, central_differences(lambda x: cosmos_value(x, pref, 1.5), losses), rtol=1e-7
    )
    np.testing.assert_allclose(
        pbi,
        central_differences(lambda x: pbi_value(x, pref, 4.0, reference), losses),
        rtol=1e-6,
    )


finite_losses = st.lists(st.floats(0.05, 50.0), min_size=2, max_size=6)


@settings(max_examples=40, deadline=None)
@given(losses=finite_losses, lam=st.floats(0.0, 10.0), data=st.data())
def test_cosmos_geometry(losses, lam, data):
    """``(w − r)ᵀL = 0`` (the cosine is scale-free in L) and ``‖w − r‖ = λ sin∠(r, L)/‖L‖``."""
    losses = np.array(losses)
    pref = np.array(
        data.draw(st.lists(st.floats(0.01, 1.0), min_size=len(losses), max_size=len(losses)))
    )
    w = weights_of(mtl.cosmos(lambda_=lam, preference=pref), losses).astype(np.float64)
    norm = np.linalg.norm(losses)
    cosine = pref @ losses / (np.linalg.norm(pref) * norm)
    scale = np.abs(pref).max() + lam / norm
    assert abs((w - pref) @ losses) <= 1e-5 * scale * norm
    expected = lam * np.sqrt(max(1.0 - cosine**2, 0.0)) / norm
    assert abs(np.linalg.norm(w - pref) - expected) <= 1e-5 * scale + 1e-3 * expected


@settings(max_examples=40, deadline=None)
@given(losses=finite_losses, theta=st.floats(0.0, 20.0), shift=st.floats(-5.0, 5.0), data=st.data())
def test_pbi_boundary_geometry(losses, theta, shift, data):
    """``w − r̂ ⊥ r̂``; ``‖w − r̂‖ = θ‖p‖/√(‖p‖² + 1e-12)``; moving L along r changes nothing."""
    losses = np.array(losses)
    k = len(losses)
    pref = np.array(data.draw(st.lists(st.floats(0.01, 1.0), min_size=k, max_size=k)))
    weighting = mtl.pbi(theta=theta, preference=pref)
    w = weights_of(weighting, losses).astype(np.float64)
    unit = pref / np.linalg.norm(pref)
    off_line = losses - (losses @ unit) * unit
    assert abs((w - unit) @ unit) <= 1e-5 * (1 + theta)
    distance = np.linalg.norm(off_line)
    if distance > 1e-3 * np.linalg.norm(losses):  # off the line by more than float32 noise
        np.testing.assert_allclose(np.linalg.norm(w - unit), theta, rtol=1e-4, atol=1e-5)
        shifted = weights_of(weighting, losses + shift * unit)
        np.testing.assert_allclose(shifted, w, rtol=1e-3, atol=1e-4 * (1 + theta))
    elif distance < 1e-9 * np.linalg.norm(losses):  # on the line up to the inputs' rounding
        np.testing.assert_allclose(w, unit, atol=1e-6)


def test_pbi_on_the_line_and_single_task():
    pref = np.array([1.0, 2.0, 2.0])
    for scale in (0.7, 3.1, 1e-3, 1e4):  # float32 rounding of L keeps it within noise of the line
        on_line = weights_of(mtl.pbi(theta=5.0, preference=pref), scale * pref)
        np.testing.assert_allclose(on_line, pref / 3.0, atol=1e-6)
    assert weights_of(mtl.pbi(), [2.5]) == pytest.approx([1.0])
    assert weights_of(mtl.cosmos(), [2.5]) == pytest.approx([1.0])


def test_zero_parameters_give_the_linear_scalarizations():
    losses, pref = np.array([0.3, 1.2, 2.0]), np.array([0.2, 0.5, 0.3])
    np.testing.assert_allclose(weights_of(mtl.cosmos(lambda_=0.0, preference=pref), losses), pref)
    np.testing.assert_allclose(
        weights_of(mtl.pbi(theta=0.0, preference=pref), losses),
        pref / np.linalg.norm(pref),
        rtol=1e-6,
    )


def test_defaults_are_uniform_preferences():
    losses = np.array([0.4, 1.0, 2.2])
    np.testing.assert_allclose(
        weights_of(mtl.cosmos(), losses),
        weights_of(mtl.cosmos(lambda_=2.0, preference=np.full(3, 1 / 3)), losses),
    )
    np.testing.assert_allclose(
        weights_of(mtl.pbi(), losses),
        weights_of(mtl.pbi(theta=5.0, preference=np.ones(3), reference=np.zeros(3)), losses),
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.parametrize("method", ["cosmos", "pbi"])
def test_per_call_preference_under_jit_and_vmap(method):
    """A traced per-call preference (the COSMOS training loop) equals a fixed one."""
    make = getattr(mtl, method)
    rng = np.random.default_rng(0)
    prefs = rng.dirichlet(np.ones(3), size=5).astype(np.float32)
    losses = rng.uniform(0.2, 3.0, (5, 3)).astype(np.float32)
    weighting = make()

    @jax.jit
    @jax.vmap
    def batched(loss, pref):
        return weighting.update(None, loss, weighting.init(3), preference=pref)[0]

    out = np.asarray(batched(losses, prefs))
    for row, loss, pref in zip(out, losses, prefs):
        np.testing.assert_allclose(row, weights_of(make(preference=pref), loss), rtol=1e-5)


def test_pbi_per_call_reference():
    losses, reference = np.array([1.0, 2.0, 0.5]), np.array([0.2, -0.1, 0.3])
    direct = weights_of(mtl.pbi(reference=reference), losses)
    np.testing.assert_allclose(weights_of(mtl.pbi(), losses, reference=reference), direct)
    traced = jax.jit(lambda z: mtl.pbi().update(None, jnp.asarray(losses), (), reference=z)[0])
    np.testing.assert_allclose(traced(jnp.asarray(reference)), direct, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["cosmos", "pbi"])
@pytest.mark.parametrize(
    "pref", [[-0.1, 0.6, 0.5], [0.0, 0.0, 0.0], [np.nan, 0.5, 0.5]], ids=["neg", "zero", "nan"]
)
def test_bad_per_call_preference(method, pref):
    """Concrete: a ValueError naming it; traced (under jit): NaN weights."""
    weighting = getattr(mtl, method)()
    losses = jnp.array([0.5, 1.0, 2.0])
    with pytest.raises(ValueError, match="preference"):
        weighting.update(None, losses, weighting.init(3), preference=np.array(pref))
    run = jax.jit(lambda p: weighting.update(None, losses, weighting.init(3), preference=p)[0])
    assert np.all(np.isnan(run(jnp.asarray(pref, jnp.float32))))


@pytest.mark.parametrize("method", ["cosmos", "pbi"])
def test_wrong_lengths_and_bad_losses(method):
    weighting = getattr(mtl, method)(preference=[0.5, 0.5])
    with pytest.raises(ValueError, match="preference.*3 tasks"):
        weighting.update(None, jnp.ones(3), weighting.init(3))
    with pytest.raises(ValueError, match="preference.*3 tasks"):
        getattr(mtl, method)().update(None, jnp.ones(3), (), preference=np.ones(2))
    with pytest.raises(ValueError, match="losses"):
        weighting.update(None, jnp.ones((2, 2)), weighting.init(2))
    assert np.all(np.isnan(weights_of(weighting, [np.inf, 1.0])))
    assert np.all(np.isnan(jax.jit(weighting.update)(None, jnp.array([np.nan, 1.0]), ())[0]))
    if method == "pbi":
        with pytest.raises(ValueError, match="reference.*2 tasks"):
            mtl.pbi(reference=[0.0, 0.0, 0.0]).update(None, jnp.ones(2), ())


@pytest.mark.parametrize(
    ("build", "error"),
    [
        (lambda: mtl.cosmos(lambda_=-0.5), ValueError),
        (lambda: mtl.cosmos(lambda_=float("nan")), ValueError),
        (lambda: mtl.cosmos(lambda_=float("inf")), ValueError),
        (lambda: mtl.cosmos(lambda_=True), TypeError),
        (lambda: mtl.cosmos(lambda_="2"), TypeError),
        (lambda: mtl.cosmos(lambda_=1 + 2j), TypeError),
        (lambda: mtl.cosmos(lambda_=jnp.array(2.0)), TypeError),
        (lambda: mtl.cosmos(preference=[0.5, -0.5]), ValueError),
        (lambda: mtl.cosmos(preference=[0.0, 0.0]), ValueError),
        (lambda: mtl.cosmos(preference=[[0.5, 0.5]]), ValueError),
        (lambda: mtl.cosmos(preference=[]), ValueError),
        (lambda: mtl.cosmos(preference=["a", "b"]), TypeError),
        (lambda: mtl.cosmos(preference=[True, False]), TypeError),
        (lambda: mtl.cosmos(preference=[0.5, float("nan")]), ValueError),
        (lambda: mtl.cosmos(preference=[0.5, 1j]), ValueError),
        (lambda: mtl.pbi(theta=-1.0), ValueError),
        (lambda: mtl.pbi(theta=float("nan")), ValueError),
        (lambda: mtl.pbi(theta=False), TypeError),
        (lambda: mtl.pbi(theta=None), TypeError),
        (lambda: mtl.pbi(preference=[1.0, float("inf")]), ValueError),
        (lambda: mtl.pbi(preference="0.5"), TypeError),
        (lambda: mtl.pbi(reference=[0.0, float("nan")]), ValueError),
        (lambda: mtl.pbi(reference=[[0.0]]), ValueError),
        (lambda: mtl.pbi(reference=["x"]), TypeError),
    ],
)
def test_bad_constructor_arguments(build, error):
    with pytest.raises(error):
        build()


def test_traced_constructor_preference_is_refused():
    with pytest.raises(TypeError, match="update"):
        jax.jit(lambda p: mtl.cosmos(preference=p).update(None, jnp.ones(2), ())[0])(jnp.ones(2))

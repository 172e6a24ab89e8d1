"""float32 on adversarial Jacobians: every zoo method against its own float64 solution.

Families (seeded generators; float32 Jacobians of K = 2, 5, 10 tasks x 16 coordinates):

* ``opposite<δ>`` / ``parallel<δ>``: every task along one direction (alternating signs /
  one sign), each perturbed by a random ``δ`` = 1e-3 … 1e-6 (relative), norms over a factor 10;
* ``spread<S>``: random directions with norms log-uniform over ``S`` = 1e2 … 1e8;
* ``rank<r>``: integer combinations of ``r < K`` dyadic rows (exactly rank ``r`` in float32);
* ``scale<s>``: random rows times ``10^s``, ``s`` = ±15, ±30 (the tiers' power-of-two rescaling).

Oracle: the same method in float64 on the float64 Gram of the same float32 Jacobian, through
the tiers' rescaling (:func:`mtl_optax.gram.apply_weighting`). A case is **well-posed at
float32 precision** when that float64 update moves by at most 1e-6 (1000x tighter than the
1e-3 asked of float32) under what a float32 Gram cannot tell apart: two random perturbations
``G_ij ± 16 · 2⁻²⁴ √(G_ii G_jj)``, the a-priori rounding bound of a 16-term float32 dot
product, whatever summation order XLA picks on a given CPU (for the rank family its dyadic
factors are perturbed instead, keeping the rank exact) and the Gram with its eigenvalues
below float32's resolution removed (:func:`float32_resolution`). Where well-posed, the
float32 update ``u = Σ w_i g_i`` (the update: weights are not unique for rank-deficient
Jacobians) agrees with float64 to
``1e-3 ‖u₆₄‖`` plus the rounding of forming ``u`` from float32 weights,
``K ε Σ_j |w_j| ‖g_j‖``.

Properties, in float32, as declared in ``tests/test_aggregator_properties.py``:

* non-conflicting (every case unless excluded below): ``⟨g_i, u⟩ ≥ −‖g_i‖ (1e-4 ‖u‖ + K ε Σ_j
  |w_j| ‖g_j‖)``: 1e-4 relative (the audit's threshold, tighter than torchjd's 4e-4) plus the
  rounding of forming ``u`` from float32 weights, which no float32 update avoids;
* linear under scaling and permutation equivariant: to 1e-4 (torchjd's tolerance, plus the same
  rounding) on the well-posed cases (``u(cJ)`` with ``c = 3·10⁻⁶, 7·10⁴`` sees a float32
  rounding of ``cJ``);
* finite weights everywhere.

The random weighting is compared on its properties only (its normal draws depend on the dtype).
ConFIG runs twice: through the gradients' QR factor (``config``, as the tiers that hold the
gradients run it) and from the Gram alone (``config_from_the_gram``, the bounded-memory tiers).

``EXCLUDED`` lists the (method, family) pairs where a claim cannot hold from a float32 Gram,
with the reason; each method's docstring says the same.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_optax.gram import apply_weighting, weights_from_gradients
from mtl_optax.solvers.spectral import default_rank_rtol, gram_eigh, numerically_positive
from tests import zoo
from tests.test_aggregator_properties import EQUIVARIANT, LINEAR, NON_CONFLICTING, PROPERTIES

DIM = 16
KS = (2, 5, 10)
SEEDS = 2
U32 = 2.0**-24
GRAM_ROUNDING = DIM * U32  # |fl(⟨g_i, g_j⟩) − ⟨g_i, g_j⟩| ≤ DIM u ‖g_i‖ ‖g_j‖
EPS32 = float(np.finfo(np.float32).eps)
SCALES = (3.0e-6, 7.0e4)
WELL_POSED = 1e-6
AGREE = 1e-3


def _unit(rng, n):
    x = rng.normal(size=(n, DIM))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _along(rng, k, delta, signs):
    a = _unit(rng, 1)[0]
    rows = signs[:, None] * (a + delta * _unit(rng, k))
    return rows * np.exp(rng.uniform(0.0, np.log(10.0), size=(k, 1))), None


def _opposite(rng, k, delta):
    return _along(rng, k, delta, np.where(np.arange(k) % 2 == 0, 1.0, -1.0))


def _parallel(rng, k, delta):
    return _along(rng, k, delta, np.ones(k))


def _spread(rng, k, span):
    exps = rng.uniform(0.0, np.log10(span), size=k)
    exps[0], exps[-1] = 0.0, np.log10(span)
    return _unit(rng, k) * 10.0 ** exps[:, None], None


def _rank(rng, k, r):
    a = rng.integers(-3, 4, size=(k, min(r, k - 1))).astype(float)
    a[np.all(a == 0, axis=1), 0] = 1.0
    b = np.round(rng.normal(size=(a.shape[1], DIM)) * 64.0) / 64.0
    return a @ b, (a, b)


def _scaled(rng, k, log10_scale):
    return rng.normal(size=(k, DIM)) * 10.0**log10_scale, None


FAMILIES = {
    **{f"opposite{d:.0e}": (_opposite, d) for d in (1e-3, 1e-4, 1e-5, 1e-6)},
    **{f"parallel{d:.0e}": (_parallel, d) for d in (1e-3, 1e-4, 1e-5, 1e-6)},
    **{f"spread{s:.0e}": (_spread, s) for s in (1e2, 1e4, 1e6, 1e8)},
    "rank1": (_rank, 1),
    "rank2": (_rank, 2),
    **{f"scale{s:+d}": (_scaled, s) for s in (-30, -15, 15, 30)},
}

# (method, family prefix) -> (checks skipped there, why float32 cannot do better)
OUT_OF_RANGE = "the true Gram (‖g‖² = 1e±60) is outside float32's range"
EXCLUDED = {
    **{
        ("config", f"opposite{d:.0e}"): (
            {"conflict"},
            "K > 2 unit gradients within 1e-5 of ± one direction are dependent to within the "
            "rounding of their QR factor (16 K eps); ConFIG is then the least-squares (pinv) "
            "direction, which conflicts as for exactly dependent gradients",
        )
        for d in (1e-5, 1e-6)
    },
    ("config", "rank"): ({"conflict"}, "dependent unit gradients: pinv conflicts in float64 too"),
    ("config_from_the_gram", "opposite"): (
        {"conflict"},
        "K > 2 nearly opposite unit gradients are dependent to within a float32 Gram's "
        "rounding; ConFIG is then the least-squares (pinv) direction, which conflicts as for "
        "exactly dependent gradients (K = 2 gives u = 0)",
    ),
    ("config_from_the_gram", "rank"): (
        {"conflict"},
        "dependent unit gradients: pinv conflicts in float64 too",
    ),
    ("mgda_frank_wolfe", ""): (
        {"agree", "linear", "equivariant"},
        "Frank-Wolfe is approximate (stops at a |Δα|₁ tolerance or an iteration cap, sublinear "
        "on a face): float32 and float64, J and cJ, or permuted tasks stop at different "
        "iterates (up to 1e-2 apart at a 1e6 norm spread); mgda() is the exact solver",
    ),
    **{
        ("krum", family): (
            {"agree", "linear", "equivariant"},
            "(nearly) collinear or repeated gradients: Krum scores tie (to O(δ²), or exactly), "
            "so rounding, a scaling or the task order picks the selected gradient",
        )
        for family in ("opposite", "parallel", "rank")
    },
    ("cagrad", "spread1e+04"): (
        {"agree", "linear", "equivariant"},
        "norms 1 and 1e4 put ‖g_w*‖ on G/tr(G) at ≈ 1e-4 = norm_eps, torchjd's Pareto-"
        "stationarity cut-off (weights 0 below it): rounding decides the side",
    ),
    # absolute thresholds (clipping at max_norm, a step size): the tiers hand over the true
    # Gram, homogeneity=None
    ("nash_mtl", "scale+30"): ({"agree", "finite", "conflict"}, OUT_OF_RANGE),
    ("nash_mtl", "scale-30"): ({"agree", "finite", "conflict"}, OUT_OF_RANGE),
    ("gradnorm", "scale+30"): ({"agree", "finite"}, OUT_OF_RANGE),
    ("gradnorm", "scale-30"): ({"agree", "finite"}, OUT_OF_RANGE),
    ("modo", "scale+30"): ({"agree", "finite"}, OUT_OF_RANGE),
    ("modo", "scale-30"): ({"agree", "finite"}, OUT_OF_RANGE),
    ("fairgrad_alpha2", "scale+30"): (
        {"agree", "finite", "conflict"},
        "weights ∝ ‖g‖^(-4/3) = 1e-40 are below float32's range",
    ),
    ("fairgrad_alpha2", "scale-30"): (
        {"agree", "finite", "conflict"},
        "weights ∝ ‖g‖^(-4/3) = 1e+40 are above float32's range",
    ),
}


# A method that reads the gradients' QR factor, as the bounded-memory tiers run it (the Gram
# alone): name -> the zoo method
FROM_THE_GRAM = {"config_from_the_gram": "config"}


def make_weighting(name, k):
    if name in FROM_THE_GRAM:
        return zoo.WEIGHTINGS[FROM_THE_GRAM[name]](k)._replace(reads_gram_factor=False)
    return zoo.WEIGHTINGS[name](k)


def checked(name, names, check):
    """Mask of the cases of ``names`` (family names) where ``check`` applies to ``name``."""
    skip = [f for (m, f), (checks, _) in EXCLUDED.items() if m == name and check in checks]
    return (
        np.array([not n.startswith(tuple(skip)) for n in names])
        if skip
        else np.ones(len(names), bool)
    )


def family_cases(k):
    """``(names, jacobians (n, k, DIM) float32, factors)`` for every family and seed."""
    names, jacs, factors = [], [], []
    for name, (make, param) in FAMILIES.items():
        for seed in range(SEEDS):
            jac, fac = make(np.random.default_rng([k, seed, len(names)]), k, param)
            names.append(name)
            jacs.append(jac.astype(np.float32))
            factors.append(fac)
    return np.array(names), np.stack(jacs), factors


def gram_rounding(jacs, factors, rng):
    """Float64 Grams of ``jacs`` perturbed at float32 rounding (see the module docstring)."""
    if rng is None:
        return float32_resolution(jacs)
    out = []
    for jac, fac in zip(jacs.astype(np.float64), factors):
        if fac is None:
            gram = jac @ jac.T
            norms = np.sqrt(np.diag(gram))
            noise = np.triu(rng.uniform(-GRAM_ROUNDING, GRAM_ROUNDING, size=gram.shape))
            out.append(gram + (noise + np.triu(noise, 1).T) * np.outer(norms, norms))
        else:
            a, b = fac
            ratio = np.max(np.abs(jac)) / np.max(np.abs(a @ b))  # exact: dyadic rows
            # both factors: an exact symmetry of the integer combinations (e.g. the mean of
            # the tasks' coefficients exactly 0) is one rounding can break either way
            a = a * (1.0 + rng.uniform(-U32, U32, size=a.shape))
            j = ratio * a @ (b * (1.0 + rng.uniform(-U32, U32, size=b.shape)))
            out.append(j @ j.T)
    return np.stack(out)


def float32_resolution(jacs):
    """Float64 Grams of ``jacs`` without the eigenvalues a float32 Gram cannot resolve.

    The eigen-directions whose eigenvalue is below the float32 rounding along them
    (``≤ 16 K ε₃₂ (Σ_j |v_j| ‖g_j‖)²``, see :mod:`mtl_optax.solvers.spectral`) are set to
    zero: a Gram within float32's rounding of the original that no float32 Gram tells apart.
    """
    j64 = jacs.astype(np.float64)
    grams = j64 @ np.swapaxes(j64, 1, 2)
    k = jacs.shape[1]
    with jax.enable_x64(True):
        lam, vec = jax.vmap(gram_eigh)(jnp.asarray(grams))
        rtol = default_rank_rtol(k, jnp.float32)
        keep = jax.vmap(lambda g, l, v: numerically_positive(g, l, v, rtol=rtol))(
            jnp.asarray(grams), lam, vec
        )
        lam, vec, keep = np.asarray(lam), np.asarray(vec), np.asarray(keep)
    return np.einsum("bij,bj,bkj->bik", vec, np.where(keep, lam, 0.0), vec)


@functools.cache
def prepared_cases(k):
    """``(names, jacobians, exact Gram, [the three Grams float32 cannot tell apart])``.

    Method-independent, so computed once per K (the eigen-decompositions of
    :func:`float32_resolution` dominate otherwise)."""
    names, jacs, factors = family_cases(k)
    j64 = jacs.astype(np.float64)
    perturbed = [gram_rounding(jacs, factors, np.random.default_rng([k, d])) for d in (0, 1)]
    perturbed.append(gram_rounding(jacs, factors, None))
    return names, jacs, j64 @ np.swapaxes(j64, 1, 2), perturbed


def _losses(k):
    return np.linspace(0.5, 2.0, k)


class Runner:
    """One compiled float32 and one compiled float64 ``vmap`` per (method, K)."""

    def __init__(self, name, k):
        self.weighting = make_weighting(name, k)
        self.k = k
        w = self.weighting

        def f32(jac, losses):
            return weights_from_gradients(w, [jac], losses, w.init(k))[0]

        def f64(gram, log2_scale, losses):
            truth = w.homogeneity is None
            scale = jnp.where(truth, 0, log2_scale)
            gram = gram * jnp.exp2(-scale.astype(gram.dtype))
            return apply_weighting(w, gram, losses, w.init(k), log2_scale=scale)[0]

        self._f32 = jax.jit(jax.vmap(f32))
        self._f64 = jax.jit(jax.vmap(f64))

    def weights32(self, jacs, perm=None):
        """Float32 weights through the tiers (losses permuted with the tasks by ``perm``)."""
        losses = _losses(self.k) if perm is None else _losses(self.k)[perm]
        losses = np.broadcast_to(losses, (len(jacs), self.k))
        out = self._f32(jnp.asarray(jacs, jnp.float32), jnp.asarray(losses, jnp.float32))
        return np.asarray(out, np.float64)

    def weights64(self, grams, jacs):
        """Float64 weights on ``grams``, rescaled as the tiers do for ``jacs``."""
        exponent = np.frexp(np.max(np.abs(jacs), axis=(1, 2)))[1]
        exponent = np.where(np.max(np.abs(jacs), axis=(1, 2)) > 0, exponent, 0)
        losses = np.broadcast_to(_losses(self.k), (len(jacs), self.k))
        with jax.enable_x64(True):
            out = self._f64(
                jnp.asarray(grams, jnp.float64),
                jnp.asarray(2 * exponent, jnp.int64),
                jnp.asarray(losses, jnp.float64),
            )
            return np.asarray(out, np.float64)


def updates(weights, jacs):
    return np.einsum("bk,bkd->bd", weights, jacs.astype(np.float64))


def update32(weights, jacs):
    """``u`` formed in float32 from float32 weights, as the tiers do."""
    return np.einsum("bk,bkd->bd", weights.astype(np.float32), jacs.astype(np.float32)).astype(
        np.float64
    )


def rel(a, b):
    return np.linalg.norm(a - b, axis=-1) / np.maximum(np.linalg.norm(b, axis=-1), 1e-300)


def rounding(weights, jacs):
    """``K ε₃₂ Σ_j |w_j| ‖g_j‖``: how far float32 weights and sums can move ``u`` at most."""
    norms = np.linalg.norm(jacs.astype(np.float64), axis=2)
    return jacs.shape[1] * EPS32 * np.sum(np.abs(weights) * norms, axis=1)


def error(a, b, weights, jacs):
    """``‖a − b‖ / (‖b‖ + rounding/tol)``-style ratio: ≤ ``rtol`` means
    ``‖a − b‖ ≤ rtol ‖b‖ + rounding``; returned as ``‖a − b‖ − rounding`` over ``‖b‖``."""
    gap = np.linalg.norm(a - b, axis=-1) - rounding(weights, jacs)
    return np.maximum(gap, 0.0) / np.maximum(np.linalg.norm(b, axis=-1), 1e-300)


def conflicts(jacs, u, weights):
    """``min_i (⟨g_i, u⟩ + tol_i)`` per case (negative: a conflict beyond the tolerance)."""
    g = jacs.astype(np.float64)
    norms = np.linalg.norm(g, axis=2)
    tol = norms * (1e-4 * np.linalg.norm(u, axis=1) + rounding(weights, jacs))[:, None]
    return np.min(np.einsum("bkd,bd->bk", g, u) + tol, axis=1)


@pytest.mark.parametrize("name", list(zoo.WEIGHTINGS) + list(FROM_THE_GRAM))
def test_float32_matches_float64_and_keeps_its_properties(name):
    claims = PROPERTIES[FROM_THE_GRAM.get(name, name)]
    for k in KS if name != "krum" else KS[1:]:  # krum needs K >= n_byzantine + 3
        runner = Runner(name, k)
        names, jacs, gram, perturbed = prepared_cases(k)
        w32 = runner.weights32(jacs)
        finite = checked(name, names, "finite")
        assert np.all(np.isfinite(w32[finite])), f"non-finite weights, K={k}"
        u32 = update32(w32, jacs)
        u64 = updates(runner.weights64(gram, jacs), jacs)
        moved = [rel(updates(runner.weights64(g, jacs), jacs), u64) for g in perturbed]
        well_posed = (np.max(moved, axis=0) <= WELL_POSED) & finite
        if name != "random":  # its normal draws depend on the dtype
            err = error(u32, u64, w32, jacs)
            bad = well_posed & checked(name, names, "agree") & ~(err <= AGREE)
            assert not bad.any(), f"K={k}: float32 vs float64 {dict(zip(names[bad], err[bad]))}"
        if claims[NON_CONFLICTING]:
            margin = conflicts(jacs, u32, w32)
            bad = checked(name, names, "conflict") & ~(margin >= 0)
            assert not bad.any(), f"K={k}: conflicts in {sorted(set(names[bad]))}"
        if claims[LINEAR]:
            for c in SCALES:
                scaled = update32(runner.weights32((c * jacs).astype(np.float32)), c * jacs)
                err = error(scaled / c, u32, w32, jacs)
                bad = well_posed & checked(name, names, "linear") & ~(err <= 1e-4)
                assert not bad.any(), f"K={k}, c={c}: {dict(zip(names[bad], err[bad]))}"
        if claims[EQUIVARIANT]:
            perm = np.roll(np.arange(k), 1)
            w_perm = runner.weights32(jacs[:, perm], perm)
            err = error(update32(w_perm, jacs[:, perm]), u32, w32, jacs)
            bad = well_posed & checked(name, names, "equivariant") & ~(err <= 1e-4)
            assert not bad.any(), f"K={k}, permuted: {dict(zip(names[bad], err[bad]))}"


@pytest.mark.parametrize("k", KS)
def test_gram_eigh_resolves_every_eigenvalue_its_gram_carries(k):
    """Eigenvalues of float32 Grams against float64 singular values of the same Jacobian.

    Graded (norms 1e2 … 1e8 apart) and scaled Grams: every eigenvalue to 1e-5 relative, where
    ``jnp.linalg.eigh`` keeps only ``eps λ_max``; exactly rank-deficient Grams: the rank.
    Eigenvectors orthonormal to ``4 K ε``; ``V diag(λ) Vᵀ = G`` to ``16 K ε √(G_ii G_jj)``
    (the rank tolerance).
    """
    names, jacs, _ = family_cases(k)
    keep = np.array([n.startswith(("spread", "rank", "scale+15")) for n in names])
    names, jacs = names[keep], jacs[keep]
    exponent = np.frexp(np.max(np.abs(jacs), axis=(1, 2)))[1]
    jacs = np.ldexp(jacs, -exponent[:, None, None]).astype(np.float32)  # as the tiers do
    grams = jnp.einsum("bkd,bld->bkl", jacs, jacs, precision=jax.lax.Precision.HIGHEST)
    lam, vec = jax.jit(jax.vmap(gram_eigh))(grams)
    kept = np.asarray(jax.vmap(numerically_positive)(grams, lam, vec))
    lam, vec = np.asarray(lam, np.float64), np.asarray(vec, np.float64)
    eye = np.eye(k)
    for name, jac, g, lam_i, v, mask in zip(names, jacs, np.asarray(grams), lam, vec, kept):
        exact = np.sort(np.linalg.svd(jac.astype(np.float64), compute_uv=False) ** 2)
        rank = int(name[4:]) if name.startswith("rank") else k
        assert mask.sum() == min(rank, k - 1 if name.startswith("rank") else k), name
        np.testing.assert_allclose(np.sort(lam_i[mask]), exact[-mask.sum() :], rtol=1e-5)
        np.testing.assert_allclose(v.T @ v, eye, atol=4 * k * EPS32)  # Jacobi: O(K ε) rotations
        scale = np.sqrt(np.outer(np.diag(g), np.diag(g)))
        rounding = default_rank_rtol(k, jnp.float32)  # 16 K eps, the rank tolerance
        assert np.all(np.abs(v @ np.diag(lam_i) @ v.T - g) <= rounding * scale + 1e-30)


def test_mgda_loss_plus_is_not_scale_invariant():
    """README claim corrected: ``normalization="loss+"`` divides ``g_i`` by ``L_i ‖g_i‖``; scaling
    task 0's loss by c (``L_0 → c L_0``, ``g_0 → c g_0``) scales its normalised gradient by
    ``1/c``, so the min-norm weights and the update change ("l2" and "loss" do not).

    Oracle: the closed-form K = 2 min-norm point ``α = clip(⟨b, b − a⟩/‖a − b‖², 0, 1)`` of
    the normalised gradients (the implementation is checked against it by
    ``test_mgda_normalizations_solve_the_rescaled_problem``).
    """
    jac = np.array([[1.0, 0.2, 0.0], [-0.3, 1.0, 0.5]])
    losses = np.array([0.7, 1.3])

    def update(jac, losses, kind):
        norms = np.linalg.norm(jac, axis=1)
        n = {"l2": norms, "loss": losses, "loss+": losses * norms}[kind]
        a, b = jac / n[:, None]
        alpha = np.clip((b @ (b - a)) / ((a - b) @ (a - b)), 0.0, 1.0)
        return (np.array([alpha, 1.0 - alpha]) / n) @ jac

    scaled_jac, scaled_losses = jac * [[1e3], [1.0]], losses * [1e3, 1.0]
    for kind in ("l2", "loss"):
        np.testing.assert_allclose(
            update(scaled_jac, scaled_losses, kind), update(jac, losses, kind), rtol=1e-12
        )
    moved = update(scaled_jac, scaled_losses, "loss+") - update(jac, losses, "loss+")
    assert np.linalg.norm(moved) > 0.5 * np.linalg.norm(update(jac, losses, "loss+"))

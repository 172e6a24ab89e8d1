"""The min-norm solver against independent float64 oracles (scipy) and its KKT conditions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import minimize, nnls

import mtl_optax as mtl


def random_jacobian(k, dim, *, seed, scale_spread=1.0, common=0.5, rank=None):
    """K task gradients with a shared component; norms spread over ``scale_spread``."""
    rng = np.random.default_rng(seed)
    if rank is None:
        jac = rng.normal(size=(k, dim))
    else:  # rank-deficient: K gradients in a rank-r subspace
        jac = rng.normal(size=(k, rank)) @ rng.normal(size=(rank, dim))
    jac = jac + common * rng.normal(size=dim)
    return jac * np.exp(rng.uniform(0, np.log(scale_spread), size=(k, 1)))


def slsqp_simplex(gram):
    """float64 SLSQP solution of min αᵀGα on the simplex."""
    k = len(gram)
    result = minimize(
        lambda a: a @ gram @ a,
        np.full(k, 1 / k),
        jac=lambda a: 2 * gram @ a,
        bounds=[(0, 1)] * k,
        constraints=[{"type": "eq", "fun": lambda a: a.sum() - 1, "jac": lambda a: np.ones(k)}],
        method="SLSQP",
        options={"ftol": 1e-15, "maxiter": 2000},
    )
    return result.x


def nnls_min_norm(jac, primary):
    """float64 exact oracle: scipy NNLS (Lawson–Hanson) on the lifted problem.

    Lifting ``g_i → (g_i, s·[i primary])`` and projecting ``(0, s)`` on the cone of the
    lifted gradients solves ``min ‖Σ x_i g_i‖²``, ``x ≥ 0``, ``Σ_P x = 1`` after rescaling.
    """
    k = jac.shape[0]
    s = np.sqrt(np.mean(np.sum(jac**2, axis=1))) or 1.0
    a = np.vstack([jac.T, s * primary[None, :].astype(float)])
    target = np.zeros(a.shape[0])
    target[-1] = s
    beta, _ = nnls(a, target, maxiter=100 * k)
    return beta / beta[primary].sum()


solve = jax.jit(mtl.min_norm_weights, static_argnames="max_iters")


def solve_mgda(gram):
    return solve(gram, jnp.ones(gram.shape[0], bool))


@pytest.mark.parametrize("k", [1, 2, 3, 10])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mgda_matches_slsqp(k, seed):
    jac = random_jacobian(k, 40, seed=seed)
    gram = jac @ jac.T
    alpha = np.asarray(solve_mgda(jnp.asarray(gram, jnp.float32)), np.float64)
    oracle = slsqp_simplex(gram)
    assert alpha.min() >= 0 and abs(alpha.sum() - 1) < 1e-6
    assert alpha @ gram @ alpha <= oracle @ gram @ oracle * (1 + 1e-5) + 1e-9
    np.testing.assert_allclose(alpha @ jac, oracle @ jac, rtol=1e-4, atol=1e-5 * np.abs(jac).max())


@pytest.mark.parametrize("k,dim,rank", [(3, 40, 2), (10, 40, 4), (10, 5, None), (12, 30, 1)])
def test_mgda_rank_deficient(k, dim, rank):
    """Rank-deficient G (K > dim or low-rank gradients): the min-norm point u is unique."""
    jac = random_jacobian(k, dim, seed=k + dim, rank=rank)
    gram = jac @ jac.T
    alpha = np.asarray(solve_mgda(jnp.asarray(gram, jnp.float32)), np.float64)
    oracle = nnls_min_norm(jac, np.ones(k, bool))
    u, u_star = alpha @ jac, oracle @ jac
    assert np.all(np.isfinite(alpha)) and alpha.min() >= 0
    assert abs(alpha.sum() - 1) < 1e-5
    # u may be (near) zero when 0 is in the hull: compare on the gradient scale.
    assert np.linalg.norm(u - u_star) <= 1e-4 * np.linalg.norm(jac, axis=1).max()


@pytest.mark.parametrize("k", [2, 3, 10, 64])
@pytest.mark.parametrize("spread", [1.0, 1e3])
def test_mgda_exact_on_badly_scaled_gradients(k, spread):
    """Exact to float32 precision even when gradient norms differ by 10³."""
    jac = random_jacobian(k, 300, seed=7 * k, scale_spread=spread)
    gram = jac @ jac.T
    alpha = np.asarray(solve_mgda(jnp.asarray(gram, jnp.float32)), np.float64)
    oracle = nnls_min_norm(jac, np.ones(k, bool))
    u, u_star = alpha @ jac, oracle @ jac
    assert np.linalg.norm(u - u_star) <= 1e-5 * np.linalg.norm(u_star)


def test_mgda_two_tasks_closed_form():
    """K = 2: γ = clip((G₂₂ − G₁₂)/(G₁₁ − 2G₁₂ + G₂₂), 0, 1) on task 1."""
    for seed in range(20):
        jac = random_jacobian(2, 10, seed=seed, scale_spread=30.0)
        g = jac @ jac.T
        gamma = np.clip((g[1, 1] - g[0, 1]) / (g[0, 0] - 2 * g[0, 1] + g[1, 1]), 0, 1)
        alpha = np.asarray(solve_mgda(jnp.asarray(g, jnp.float32)))
        np.testing.assert_allclose(alpha, [gamma, 1 - gamma], atol=2e-6)


def test_frank_wolfe_is_exact_for_two_tasks_and_converges_for_more():
    jac = random_jacobian(2, 10, seed=3)
    g = jnp.asarray(jac @ jac.T, jnp.float32)
    np.testing.assert_allclose(mtl.frank_wolfe_simplex(g), solve_mgda(g), atol=1e-6)
    jac = random_jacobian(5, 50, seed=4)
    g = jac @ jac.T
    fw = np.asarray(mtl.frank_wolfe_simplex(jnp.asarray(g, jnp.float32), max_iters=2000, tol=0.0))
    oracle = slsqp_simplex(g)
    assert fw @ g @ fw <= oracle @ g @ oracle * (1 + 1e-3)
    fixed = mtl.frank_wolfe_simplex(jnp.asarray(g, jnp.float32), line_search=False, max_iters=5)
    np.testing.assert_allclose(jnp.sum(fixed), 1.0, rtol=1e-6)


def kkt_residuals(jac, x, primary):
    """KKT of min ‖Σ x_i g_i‖², x ≥ 0, Σ_P x = 1: returns (u, ⟨u, g_j⟩)."""
    u = x @ jac
    return u, jac @ u


@pytest.mark.parametrize("num_aux", [1, 2, 5, 20])
@pytest.mark.parametrize("seed", [0, 1])
def test_primary_auxiliary_matches_nnls_and_kkt(num_aux, seed):
    jac = random_jacobian(1 + num_aux, 30, seed=seed, common=-0.3, scale_spread=10.0)
    primary = np.zeros(1 + num_aux, bool)
    primary[0] = True
    x = np.asarray(solve(jnp.asarray(jac @ jac.T, jnp.float32), jnp.asarray(primary)))
    lam_oracle, _ = nnls(jac[1:].T, -jac[0])  # min_{λ≥0} ‖g₀ + Σ λ_j g_j‖
    assert x[0] == pytest.approx(1.0, abs=1e-6)
    u, u_oracle = x @ jac, jac[0] + lam_oracle @ jac[1:]
    scale = np.linalg.norm(jac, axis=1).max()
    assert np.linalg.norm(u - u_oracle) <= 1e-5 * scale
    inner = jac @ u
    tol = 1e-4 * scale * np.linalg.norm(u) + 1e-6
    assert np.all(x[1:] >= 0)  # λ ≥ 0
    assert np.all(inner[1:] >= -tol)  # ⟨u, g_j⟩ ≥ 0: no auxiliary increases
    assert np.all(np.abs(x[1:] * inner[1:]) <= tol * (1 + x[1:]))  # complementary slackness
    assert inner[0] == pytest.approx(u @ u, abs=tol)  # ⟨u, g₀⟩ = ‖u‖²


def test_one_auxiliary_closed_form():
    """λ = relu(−⟨g₀, g₁⟩)/‖g₁‖²."""
    for seed in range(10):
        jac = random_jacobian(2, 8, seed=seed, common=0.0)
        g = jac @ jac.T
        lam = max(-g[0, 1], 0.0) / g[1, 1]
        x = solve(jnp.asarray(g, jnp.float32), jnp.array([True, False]))
        np.testing.assert_allclose(x, [1.0, lam], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_several_primaries_and_auxiliaries_match_slsqp(seed):
    """min_{α ∈ simplex, λ ≥ 0} ‖Σ α_i g_i + Σ λ_j h_j‖² against float64 SLSQP."""
    jac = random_jacobian(6, 20, seed=seed, common=-0.5)
    primary = np.array([True, True, True, False, False, False])
    gram = jac @ jac.T
    x = np.asarray(solve(jnp.asarray(gram, jnp.float32), jnp.asarray(primary)))
    result = minimize(
        lambda v: v @ gram @ v,
        np.where(primary, 1 / 3, 0.0),
        jac=lambda v: 2 * gram @ v,
        bounds=[(0, None)] * 6,
        constraints=[{"type": "eq", "fun": lambda v: v[primary].sum() - 1}],
        method="SLSQP",
        options={"ftol": 1e-15, "maxiter": 2000},
    )
    assert x.min() >= 0 and x[primary].sum() == pytest.approx(1.0, abs=1e-6)
    assert x @ gram @ x <= result.fun * (1 + 1e-5) + 1e-8
    np.testing.assert_allclose(x @ jac, result.x @ jac, atol=1e-4 * np.abs(jac).max())


def test_solver_vmaps_and_warm_start_is_only_a_hint():
    jacs = [random_jacobian(5, 20, seed=s) for s in range(4)]
    grams = jnp.asarray(np.stack([j @ j.T for j in jacs]), jnp.float32)
    batched = jax.vmap(lambda g: solve(g, jnp.ones(5, bool)))(grams)
    for gram, row in zip(grams, batched):
        np.testing.assert_allclose(row, solve_mgda(gram), atol=1e-6)
        for guess in (jnp.ones(5, bool), jnp.array([False, True, False, True, False])):
            warm = solve(gram, jnp.ones(5, bool), init_support=guess)
            np.testing.assert_allclose(warm, row, atol=1e-6)


def test_degenerate_grams_are_finite():
    zero = jnp.zeros((3, 3))
    x = solve(zero, jnp.ones(3, bool))
    assert np.all(np.isfinite(x)) and float(jnp.sum(x)) == pytest.approx(1.0)
    jac = random_jacobian(3, 6, seed=0)
    jac[1] = 0.0  # one zero gradient: Pareto-stationary, u = 0
    x = solve(jnp.asarray(jac @ jac.T, jnp.float32), jnp.ones(3, bool))
    np.testing.assert_allclose(np.asarray(x) @ jac, 0.0, atol=1e-6)
    dup = np.vstack([jac[0], jac[0], jac[2]])  # duplicated gradients: singular G
    x = solve(jnp.asarray(dup @ dup.T, jnp.float32), jnp.ones(3, bool))
    oracle = nnls_min_norm(dup, np.ones(3, bool))
    np.testing.assert_allclose(np.asarray(x) @ dup, oracle @ dup, atol=1e-5 * np.abs(dup).max())


@pytest.mark.parametrize("bad", [jnp.zeros((3,)), jnp.zeros((2, 3)), jnp.zeros((0, 0))])
def test_non_square_gram_is_rejected(bad):
    with pytest.raises(ValueError, match="gram"):
        solve(bad, jnp.ones(bad.shape[0] if bad.ndim else 0, bool))


def test_float64_grams_are_solved_to_float64_precision():
    jac = random_jacobian(8, 30, seed=11, scale_spread=1e3)
    oracle = nnls_min_norm(jac, np.ones(8, bool))
    with jax.enable_x64(True):
        x = np.asarray(mtl.min_norm_weights(jnp.asarray(jac @ jac.T), jnp.ones(8, bool)))
    assert x.dtype == np.float64
    u, u_star = x @ jac, oracle @ jac
    assert np.linalg.norm(u - u_star) <= 1e-11 * np.linalg.norm(u_star)


def test_non_finite_gram_gives_nan_weights():
    """A NaN/inf gradient must not produce finite-looking weights (apply_if_finite skips it)."""
    jac = random_jacobian(3, 6, seed=1)
    gram = jac @ jac.T
    for bad in (np.nan, np.inf):
        g = gram.copy()
        g[0, 1] = g[1, 0] = bad
        g = jnp.asarray(g, jnp.float32)
        assert bool(jnp.all(jnp.isnan(solve(g, jnp.array([True, False, True])))))
        assert bool(jnp.all(jnp.isnan(mtl.frank_wolfe_simplex(g))))


def test_argument_checks():
    gram = jnp.eye(3)
    with pytest.raises(ValueError, match="at least one primary"):
        mtl.min_norm_weights(gram, jnp.zeros(3, bool))
    # a concrete mask closed over inside jit is still checked (it once raised a
    # TracerBoolConversionError there instead), and a valid one solves
    none, every = jnp.zeros(3, bool), jnp.ones(3, bool)
    with pytest.raises(ValueError, match="at least one primary"):
        jax.jit(lambda g: mtl.min_norm_weights(g, none))(gram)
    np.testing.assert_allclose(jax.jit(lambda g: mtl.min_norm_weights(g, every))(gram), 1 / 3)
    with pytest.raises(ValueError, match=r"`init_support` must have shape \(3,\)"):
        mtl.min_norm_weights(gram, jnp.ones(3, bool), init_support=jnp.ones(4, bool))
    with pytest.raises(ValueError, match=r"`primary` must have shape \(3,\)"):
        mtl.min_norm_weights(gram, jnp.ones(2, bool))
    with pytest.raises(ValueError, match="max_iters"):
        mtl.min_norm_weights(gram, jnp.ones(3, bool), max_iters=0)


def test_bad_inputs_from_the_audit():
    """Integer/bool-index primaries, asymmetric Grams, bad loop settings: clear errors."""
    gram = jnp.eye(3)
    with pytest.raises(ValueError, match="`primary` must be a bool mask"):
        mtl.min_norm_weights(gram, jnp.array([1, 0, 0]))
    with pytest.raises(ValueError, match="`init_support` must be a bool mask"):
        mtl.min_norm_weights(gram, jnp.ones(3, bool), init_support=jnp.ones(3))
    with pytest.raises(ValueError, match="symmetric.*gram\\[0, 1\\]"):
        mtl.min_norm_weights(jnp.array([[1.0, 0.5], [0.0, 1.0]]), jnp.ones(2, bool))
    with pytest.raises(ValueError, match="floating point"):
        mtl.min_norm_weights(jnp.eye(2, dtype=jnp.int32), jnp.ones(2, bool))
    for bad in (0, True, 2.0):
        with pytest.raises(ValueError, match="max_iters"):
            mtl.frank_wolfe_simplex(gram, max_iters=bad)
        with pytest.raises(ValueError, match="max_iters"):
            mtl.min_norm_weights(gram, jnp.ones(3, bool), max_iters=bad)
    with pytest.raises(ValueError, match="tol"):
        mtl.frank_wolfe_simplex(gram, tol=-1.0)


def test_traced_asymmetric_gram_uses_its_symmetric_part():
    """Under jit the symmetry cannot be checked: (G + Gᵀ)/2 is solved (documented)."""
    jac = random_jacobian(3, 6, seed=5)
    gram = jac @ jac.T
    skew = np.array([[0.0, 0.3, -0.2], [-0.3, 0.0, 0.1], [0.2, -0.1, 0.0]])
    x = solve(jnp.asarray(gram + skew, jnp.float32), jnp.ones(3, bool))
    np.testing.assert_allclose(x, solve_mgda(jnp.asarray(gram, jnp.float32)), atol=1e-6)


def test_lower_bounded_qp_matches_slsqp_and_float16_grams_are_promoted():
    jac = random_jacobian(4, 10, seed=8, common=-0.3)
    gram = jac @ jac.T
    lower = np.array([0.5, 0.0, 1.0, 0.2])
    result = minimize(
        lambda v: v @ gram @ v,
        lower + 1,
        jac=lambda v: 2 * gram @ v,
        bounds=[(lo, None) for lo in lower],
        method="SLSQP",
        options={"ftol": 1e-15, "maxiter": 1000},
    )
    v = np.asarray(mtl.lower_bounded_qp(jnp.asarray(gram, jnp.float32), jnp.asarray(lower)))
    assert np.all(v >= lower)
    np.testing.assert_allclose(v @ jac, result.x @ jac, atol=1e-5 * np.abs(jac).max())
    half = solve(jnp.asarray(gram, jnp.float16), jnp.ones(4, bool))
    assert half.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(half)))


def test_lower_bounded_qps_certified_or_by_the_active_set_match_nnls():
    """UPGrad's K problems on one Gram. Near-orthogonal gradients: every problem is solved
    and certified by the matrix-free phase. A nearly singular Gram (12 gradients in 13
    dimensions): the certificate's bound is too weak for all; 12 in 16 dimensions: for some.
    The active-set method solves those not certified. All against scipy NNLS in float64:
    ``min_{λ ≥ 0} ‖g_i + Σ_j λ_j g_j‖``."""
    from mtl_optax.solvers import active_set

    k = 12
    kkt_tol, ridge = active_set._tolerances(jnp.float32)
    lowers = jnp.eye(k)
    qps = jax.jit(jax.vmap(mtl.lower_bounded_qp, in_axes=(None, 0)))

    @jax.jit
    def certified(gram):
        d = jax.lax.rsqrt(jnp.diagonal(gram))
        g_hat = gram * d[:, None] * d[None, :]

        def one(lower):
            b_hat = lower / d
            q_hat = g_hat @ b_hat
            return active_set._certified_orthant_solve(
                g_hat, q_hat, q_hat < 0, ridge, kkt_tol, jnp.sum(b_hat), max_exchanges=46
            )[1]

        return jax.vmap(one)(lowers)

    for dim, expected in [(400, "all"), (13, "none"), (16, "some")]:
        jac = random_jacobian(k, dim, seed=dim, common=0.0)
        gram = jnp.asarray(jac @ jac.T, jnp.float32)
        flags = np.asarray(certified(gram))
        assert {"all": flags.all(), "none": not flags.any(), "some": 0 < flags.sum() < k}[expected]
        v = np.asarray(qps(gram, lowers), np.float64)
        for i in range(k):
            lam, _ = nnls(jac.T, -jac[i], maxiter=100 * k)
            oracle = np.eye(k)[i] + lam
            scale = np.linalg.norm(jac[i])
            np.testing.assert_allclose(v[i] @ jac, oracle @ jac, atol=1e-5 * scale)
            assert np.all(v[i] >= np.eye(k)[i])

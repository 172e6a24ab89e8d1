"""Exact, jittable and vmappable solvers for the small quadratic programs of multi-task learning.

Every problem here lives on the K x K Gram matrix ``G = J Jᵀ`` of the task gradients and is
solved on the device with a fixed iteration cap (``lax.while_loop``), so it runs under
``jit``/``vmap`` with no host round-trip.

One solver, :func:`min_norm_weights`, serves the whole family

    ``min_x ‖Σ_i (x_i + b_i) g_i‖²  s.t.  x ≥ 0,  Σ_{i ∈ P} x_i = 1``

(``b`` a fixed offset, ``P`` a possibly empty set of primary tasks), i.e.
``min xᵀGx + 2(Gb)ᵀx`` on the orthant, optionally with the simplex equality on ``P``:

* MGDA, min-norm point of the convex hull: ``b = 0``, every task primary;
* primary/auxiliary projection: ``b = 0``, ``P = {0}``: ``min_{λ ≥ 0} ‖g_0 + Σ λ_j g_j‖²``;
* several primaries and auxiliaries: ``min_{α ∈ simplex, λ ≥ 0} ‖Σ α_i g_i + Σ λ_j g_j‖²``;
* the lower-bounded QP ``min_{v ≥ b} vᵀGv`` (UPGrad, DualProj): ``v = b + x``, ``P`` empty
  (:func:`lower_bounded_qp`);
* the simplex QP with a linear term ``c ⊙ G`` direction, ``min_{w ∈ Δ} wᵀGw + 2βᵀGw``
  (CAGrad's inner problem): ``b = β``, every task primary.

Method: a primal active-set method (the Lawson–Hanson scheme with the one equality
constraint). On a support ``S`` the equality-constrained subproblem is one KKT linear system;
tasks enter and leave ``S`` one at a time until the KKT conditions hold, which gives the
exact minimiser after finitely many steps. Without the equality constraint (UPGrad,
DualProj) a matrix-free phase runs first: block principal pivoting with conjugate-gradient
solves, which needs only products with the Gram, so the K problems UPGrad vmaps over one
Gram cost matrix-matrix products; its answer is kept when a certificate proves it exact
(below), and the active-set method solves the problems it cannot certify.

Precision. Everything is solved in the variables ``x̂_i = ‖g_i‖ x_i`` on the Jacobi-scaled
Gram ``Ĝ_ij = G_ij/(‖g_i‖‖g_j‖)`` (the cosines), with the equality row scaled to unit
maximum. The float rounding of a computed Gram entry is ``≈ ε‖g_i‖‖g_j‖``, so every entry of
``Ĝ`` is known to the same absolute accuracy ``≈ ε`` whatever the norms: gradients whose norms
differ by 10⁸ (any spread whose squares stay normal numbers) lose nothing, and neither does a
global scale (the tiers hand over a Gram rescaled by a power of two). The optimality test is
relative to the rounding of the reduced gradient, ``ε · Σ_i |x̂_i + b̂_i|``; the final
support's solve is iteratively refined until its residual and the next correction (the
estimate of its remaining error) are at rounding level (with the rank-2-updated inverse, or
by a fresh LU factorisation when that does not suffice). The matrix-free phase's answer
passes the same optimality test, and its solve's error is bounded by ``ν ‖residual‖₂`` with
``ν`` a verified bound on the inverse of every principal submatrix of the scaled Gram
(interlacing), required to be below the same rounding level.
"Exact" therefore means: the KKT conditions hold on the Gram as given to float
precision, and the update ``u = Σ (x_i + b_i) g_i`` has a relative error of a few ``ε``
times the conditioning of the active gradients (measured ≤ 1e-5 in float32 and ≤ 1e-12 in
float64 on random problems with norm spreads up to 10⁸, see
``tests/test_solver_scale.py``). What no solver can recover is a Gram entry that
overflowed or underflowed (norms beyond ~1e±19 in float32), which is why the tiers compute
the Gram from power-of-two rescaled gradients.

Inputs: float32 at least (bf16/fp16 Grams are promoted), float64 Grams are solved in float64.
A Gram that is not symmetric is rejected when its values are known (outside ``jit``); under
``jit`` it cannot be checked and its symmetric part ``(G + Gᵀ)/2`` is used. Non-finite Grams
or offsets (a NaN or inf gradient) give NaN weights, so the update is non-finite too and
``optax.apply_if_finite`` can skip it. Frank–Wolfe (the original MGDA solver) is provided too,
for reference and comparison.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mtl_optax.solvers.loop import while_loop_like

# In float32: relative tolerance of the optimality test (≈ 8 ulps) and the ridge that keeps
# the Jacobi-scaled solves of rank-deficient (e.g. duplicated) gradients finite. Wider dtypes
# scale both with their machine epsilon (the ridge quadratically).
_KKT_TOL = 1e-6
_RIDGE = 1e-10
# Relative asymmetry |G_ij − G_ji| / √(G_ii G_jj) above which a concrete Gram is rejected.
_SYMMETRY_TOL = 1e-4
# Refinement steps of the final support's solve with the rank-2-updated inverse.
_REFINEMENTS = 2
_HIGHEST = jax.lax.Precision.HIGHEST


def _tolerances(dtype) -> tuple[float, float]:
    """(optimality tolerance, ridge) for the working dtype."""
    rel = float(jnp.finfo(dtype).eps / jnp.finfo(jnp.float32).eps)
    return _KKT_TOL * rel, _RIDGE * rel**2


def _compute_dtype(gram: jax.Array) -> jnp.dtype:
    """float32 at least (bf16/fp16 Grams are promoted), float64 if given float64."""
    return jnp.promote_types(gram.dtype, jnp.float32)


def _is_concrete(value) -> bool:
    return not isinstance(value, jax.core.Tracer)


def check_gram(gram: jax.Array, name: str = "gram") -> int:
    """Trace-time check that ``gram`` is a square (K, K) floating matrix; returns K.

    A concrete (non-traced) Gram must also be symmetric up to rounding
    (``|G_ij − G_ji| ≤ 1e-4 √(G_ii G_jj)``); under ``jit`` this cannot be checked and the
    solvers use ``(G + Gᵀ)/2``.
    """
    shape = jnp.shape(gram)
    if len(shape) != 2 or shape[0] != shape[1]:
        raise ValueError(f"`{name}` must be a square (K, K) Gram matrix, got shape {shape}.")
    if not jnp.issubdtype(jnp.result_type(gram), jnp.floating):
        raise ValueError(
            f"`{name}` must be floating point, got dtype {jnp.result_type(gram)}; "
            "cast it with .astype(jnp.float32)."
        )
    if shape[0] == 0:
        raise ValueError(f"`{name}` must have at least one task, got shape {shape}.")
    if _is_concrete(gram):
        g = np.asarray(gram, np.float64)
        scale = np.sqrt(np.abs(np.outer(np.diag(g), np.diag(g))))
        with np.errstate(invalid="ignore"):  # NaN/inf entries: NaN weights, not an error
            gap = np.abs(g - g.T)
        bad = gap > _SYMMETRY_TOL * scale + np.finfo(np.float64).tiny
        if np.any(bad & np.isfinite(gap)):
            i, j = np.argwhere(bad & np.isfinite(gap))[0]
            raise ValueError(
                f"`{name}` must be symmetric (a Gram matrix J Jᵀ), but {name}[{i}, {j}] = "
                f"{g[i, j]:.6g} and {name}[{j}, {i}] = {g[j, i]:.6g}; pass (G + G.T) / 2 if "
                "the asymmetry is rounding."
            )
    return shape[0]


def check_iters(max_iters, name: str = "max_iters") -> int:
    """``max_iters`` must be a positive Python int (it fixes a loop bound)."""
    if not isinstance(max_iters, int) or isinstance(max_iters, bool) or max_iters < 1:
        raise ValueError(f"`{name}` must be a positive int, got {max_iters!r}.")
    return max_iters


def check_nonnegative(name: str, value) -> float:
    """A hyper-parameter that must be a non-negative, finite Python number (not a bool)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(
        value, (int, float, np.floating, np.integer)
    ):
        raise TypeError(f"`{name}` must be a non-negative float, got {value!r}.")
    if not np.isfinite(value) or value < 0:
        raise ValueError(f"`{name}` must be a non-negative finite float, got {value!r}.")
    return float(value)


def _check_vector(name: str, value, k: int, *, kind: str) -> None:
    """Trace-time check that a per-task vector has shape (K,) and the right kind of dtype."""
    if jnp.shape(value) != (k,):
        raise ValueError(
            f"`{name}` must have shape ({k},) (one entry per task), got {jnp.shape(value)}."
        )
    dtype = jnp.result_type(value)
    if kind == "bool" and dtype != jnp.bool_:
        raise ValueError(
            f"`{name}` must be a bool mask, got dtype {dtype}; for task indices `idx` pass "
            f"jnp.zeros({k}, bool).at[idx].set(True)."
        )
    if kind == "float" and not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"`{name}` must be floating point, got dtype {dtype}.")


def _kkt_matrix(g_hat, c_hat, corner, support, ridge):
    """The KKT matrix ``[[Ĝ_SS, ĉ_S], [ĉ_Sᵀ, corner]]`` of the subproblem on the support S.

    ``min x̂ᵀĜx̂ + 2q̂ᵀx̂  s.t.  ĉᵀx̂ = r, x̂_i = 0 off S``. Rows and columns outside S are
    those of the identity, so the shape stays (K+1, K+1) under jit/vmap. Without an equality
    constraint ``ĉ = 0`` and ``corner = 1``; with one, ``corner = 0``.
    """
    both = support[:, None] & support[None, :]
    g = jnp.where(both, g_hat, 0.0) + jnp.diag(jnp.where(support, ridge, 1.0))
    c = jnp.where(support, c_hat, 0.0)
    return jnp.block([[g, c[:, None]], [c[None, :], corner[None, None]]])


def _kkt_row(g_hat, c_hat, support, j, ridge):
    """Row ``j < K`` of :func:`_kkt_matrix` without building the matrix."""
    k = g_hat.shape[0]
    active = jnp.concatenate([jnp.where(support, g_hat[j], 0.0), c_hat[j][None]])
    active = active.at[j].add(ridge)
    return jnp.where(support[j], active, jax.nn.one_hot(j, k + 1, dtype=g_hat.dtype))


def _toggle_inverse(inverse, g_hat, c_hat, support, j, ridge, apply=True):
    """Inverse KKT matrix after task ``j`` enters or leaves the support: O(K²).

    Returns ``(inverse, finite)``; with ``apply`` False the change is zero and the inverse
    is returned unchanged (no select over the whole matrix needed).

    Toggling j changes row and column j by ``r``, a symmetric rank-2 change
    ``U C Uᵀ`` with ``U = [e_j, r]``, ``C = [[−r_j, 1], [1, 0]]``; Woodbury's identity
    updates the inverse with one 2 x 2 solve.
    """
    new_support = support.at[j].set(~support[j])
    r = _kkt_row(g_hat, c_hat, new_support, j, ridge) - _kkt_row(g_hat, c_hat, support, j, ridge)
    r = jnp.where(apply, r, 0.0)
    h_e, h_r = inverse[:, j], inverse @ r  # H U, column by column (H is symmetric)
    # S = C⁻¹ + Uᵀ H U with C⁻¹ = [[0, 1], [1, r_j]]; inverted in closed form.
    s00, s01, s11 = h_e[j], 1.0 + r @ h_e, r[j] + r @ h_r
    det = s00 * s11 - s01 * s01
    a, b, e = s11 / det, -s01 / det, s00 / det
    left, right = a * h_e + b * h_r, b * h_e + e * h_r
    finite = jnp.isfinite(det) & jnp.all(jnp.isfinite(left)) & jnp.all(jnp.isfinite(right))
    return inverse - left[:, None] * h_e[None, :] - right[:, None] * h_r[None, :], finite


def _refined_solve(matrix, rhs):
    """``matrix⁻¹ rhs`` by LU with one step of iterative refinement (working precision)."""
    lu = jax.scipy.linalg.lu_factor(matrix)
    sol = jax.scipy.linalg.lu_solve(lu, rhs)
    residual = rhs - jnp.matmul(matrix, sol, precision=_HIGHEST)
    return sol + jax.scipy.linalg.lu_solve(lu, residual)


def _inverse_norm_bound(g_hat, ridge):
    """Verified upper bound on ``‖(Ĝ_SS + ridge·I)⁻¹‖₂`` for every support S at once.

    By Cauchy's interlacing theorem the smallest eigenvalue of a principal submatrix is at
    least that of the whole matrix ``A = Ĝ + ridge·I``, so ``‖A_SS⁻¹‖₂ ≤ ‖A⁻¹‖₂ ≤ ‖A⁻¹‖_∞``
    (A symmetric). With ``X`` a computed inverse (Cholesky) and ``‖I − XA‖_∞ < 1``,
    ``‖A⁻¹‖_∞ ≤ ‖X‖_∞ / (1 − ‖I − XA‖_∞)`` (Neumann series); the defect is inflated by a
    bound on its own rounding. ``inf`` when A is not numerically positive definite.
    """
    k = g_hat.shape[0]
    eye = jnp.eye(k, dtype=g_hat.dtype)
    a = g_hat + ridge * eye
    approx = jax.scipy.linalg.cho_solve((jnp.linalg.cholesky(a), True), eye)
    norm_x = jnp.max(jnp.sum(jnp.abs(approx), axis=1))
    norm_a = jnp.max(jnp.sum(jnp.abs(a), axis=1))
    defect = eye - jnp.matmul(approx, a, precision=_HIGHEST)
    defect = jnp.max(jnp.sum(jnp.abs(defect), axis=1))
    defect = defect + (k + 2) * jnp.finfo(g_hat.dtype).eps * norm_x * norm_a
    bound = norm_x / (1.0 - defect)
    return jnp.where(jnp.isfinite(bound) & (defect < 1.0), bound, jnp.inf)


def _certified_orthant_solve(g_hat, q_hat, guess, ridge, kkt_tol, size, max_exchanges):
    """Matrix-free solve of ``min x̂ᵀĜx̂ + 2q̂ᵀx̂, x̂ ≥ 0`` (no equality), certified or not.

    Returns ``(x̂, certified)``. Block principal pivoting (Júdice & Pires 1994; Kim & Park
    2011) from the support ``guess``: solve the subproblem on the support ``S`` by
    conjugate gradients, then exchange at once every task of ``S`` with a non-positive
    weight and every task outside with a negative reduced gradient, until none is left (at
    most ``max_exchanges`` times). Only products ``Ĝ x̂`` are needed, so K problems vmapped
    over one Gram (UPGrad) are solved with matrix-matrix products and no factorisation per
    problem.

    Certified means the KKT conditions hold at the rounding level ``τ`` of the optimality
    test and the solve's error is proven to be below it too: ``‖x̂_S − x̂*_S‖_∞ ≤
    ν ‖r_S‖₂ ≤ τ`` with ``r`` the residual and ``ν`` the verified bound of
    :func:`_inverse_norm_bound` (one for all supports and all vmapped problems). Anything
    else (an ill-conditioned Gram, no convergence) is left to the active-set method.
    """
    k = g_hat.shape[0]
    bound = _inverse_norm_bound(g_hat, ridge)
    cg_iters = min(k, 30) + 1

    def apply(support, v):  # A v on the support, zero outside
        return jnp.where(support, jnp.matmul(g_hat, v, precision=_HIGHEST) + ridge * v, 0.0)

    def level(x):
        return kkt_tol * (jnp.sum(jnp.abs(x)) + size)

    def conjugate_gradients(support, x):
        x = jnp.where(support, x, 0.0)
        res = jnp.where(support, -q_hat, 0.0) - apply(support, x)

        def cond(carry):
            x, _, _, rs, it = carry
            # a quarter of the certificate's need: room for the recurrence's drift
            return (bound * jnp.sqrt(rs) > 0.25 * level(x)) & (it < cg_iters)

        def body(carry):
            x, res, p, rs, it = carry
            ap = apply(support, p)
            curvature = p @ ap
            alpha = jnp.where(curvature > 0, rs / jnp.where(curvature > 0, curvature, 1.0), 0.0)
            x, res = x + alpha * p, res - alpha * ap
            rs_new = res @ res
            beta = jnp.where(rs > 0, rs_new / jnp.where(rs > 0, rs, 1.0), 0.0)
            return x, res, res + beta * p, rs_new, it + 1

        return while_loop_like(cond, body, (x, res, res, res @ res, 0), g_hat)[0]

    def exchange(carry):
        support, x, _, it = carry
        x = conjugate_gradients(support, x)
        grad = jnp.matmul(g_hat, x, precision=_HIGHEST) + q_hat
        swap = jnp.where(support, x <= 0, grad < -level(x))
        return support ^ swap, x, ~jnp.any(swap), it + 1

    # Nothing can be certified without the bound: then no exchange runs at all.
    support, x, converged, _ = while_loop_like(
        lambda carry: ~carry[2] & (carry[3] < max_exchanges) & jnp.isfinite(bound),
        exchange,
        (guess, jnp.zeros_like(q_hat), False, 0),
        g_hat,
    )
    # The certificate, from scratch: residual, its error bound, sign conditions.
    x = jnp.where(support, x, 0.0)
    grad = jnp.matmul(g_hat, x, precision=_HIGHEST) + q_hat
    residual = jnp.where(support, grad + ridge * x, 0.0)
    tol = level(x)
    certified = (
        converged
        & (bound * jnp.sqrt(residual @ residual) <= tol)
        & jnp.all(jnp.where(support, x > 0, grad >= -tol))
        & jnp.all(jnp.isfinite(x))
    )
    return x, certified


def min_norm_weights(
    gram: jax.Array,
    primary: jax.Array,
    *,
    offset: jax.Array | None = None,
    init_support: jax.Array | None = None,
    max_iters: int | None = None,
) -> jax.Array:
    """Exact ``argmin_x ‖Σ (x_i + b_i) g_i‖²`` s.t. ``x ≥ 0``, ``Σ_{i ∈ P} x_i = 1``, on G.

    Args:
      gram: (K, K) Gram matrix ``G = J Jᵀ`` (symmetric; float32 or wider after promotion).
      primary: (K,) bool mask of the primary tasks ``P`` (all True: MGDA's min-norm point
        of the convex hull; one True: primary/auxiliary projection); the others get
        unbounded non-negative weights. All False (no equality constraint) is allowed only
        with an ``offset`` (without one the answer would be ``x = 0``): an error when the
        mask is concrete, NaN weights when it is traced.
      offset: (K,) fixed offset ``b`` (default 0): the objective is ``xᵀGx + 2(Gb)ᵀx``.
      init_support: (K,) bool guess of the non-zero weights (e.g. the last step's, kept in a
        weighting's state); a wrong guess costs iterations, never correctness.
      max_iters: iteration cap per phase, default ``3K + 10``.

    Returns ``x`` (without the offset), float32 or float64 like the promoted Gram; NaN if
    ``gram`` or ``offset`` has a non-finite entry.

    Primal active-set method: keep a support S and the exact minimiser on it (a KKT solve);
    free the task with the most negative reduced gradient ``(G(x + b))_j − μ c_j`` while one
    is below the rounding tolerance; when a solve leaves the orthant, step back to its
    boundary and drop the blocking task. The inverse KKT matrix is kept up to date with
    O(K²) rank-2 updates as tasks enter and leave; the final support's solve is refined with
    it (matrix-vector products) and accepted when its residual, the next correction and the
    KKT test are at rounding level; otherwise a second phase re-solves from scratch (LU
    plus one refinement step) until the KKT conditions hold with exact solves. A warm start
    builds the inverse of the guessed support by the same rank-2 updates and continues from
    its solution when that is feasible. Without an equality constraint (``primary`` a
    concrete all-False mask) a certified matrix-free phase (``_certified_orthant_solve``)
    runs first and the active-set method only for the problems it leaves uncertified. See
    the module docstring for what "exact" means at extreme scales.

    Checked against scipy SLSQP and ``scipy.optimize.nnls`` (float64) and the KKT
    conditions in ``tests/test_solvers.py`` (both phases: certified, uncertified and mixed
    batches) and ``tests/test_solver_scale.py`` (hypothesis, norm spreads up to 10⁸, global
    scales 1e-30…1e30 through the tiers).

    Example::

        gram, primary = jnp.array([[4.0, -1.0], [-1.0, 1.0]]), jnp.array([True, True])
        x = jax.jit(mtl.min_norm_weights)(gram, primary)
        # x == [0.2857, 0.7143]: the min-norm point of the hull of two gradients
        np.testing.assert_allclose(x, [2 / 7, 5 / 7], rtol=1e-5)
    """
    k = check_gram(gram)
    _check_vector("primary", primary, k, kind="bool")
    if offset is None:
        if _is_concrete(primary) and not np.any(np.asarray(primary)):
            raise ValueError(
                "`primary` must mark at least one primary task (all False given); without "
                "an `offset` the problem has the trivial solution x = 0."
            )
    else:
        _check_vector("offset", offset, k, kind="float")
    if init_support is not None:
        _check_vector("init_support", init_support, k, kind="bool")
    max_iters = check_iters(3 * k + 10 if max_iters is None else max_iters)
    # Known at trace time to have no equality constraint (a concrete all-False mask).
    orthant_only = offset is not None and _is_concrete(primary) and not np.any(np.asarray(primary))
    dtype = _compute_dtype(gram)
    kkt_tol, ridge_rel = _tolerances(dtype)
    tiny = jnp.finfo(dtype).tiny
    gram = gram.astype(dtype)
    gram = 0.5 * (gram + gram.T)
    b = jnp.zeros(k, dtype) if offset is None else offset.astype(dtype)
    # Masked separately so that the scaled Gram depends on the Gram alone: under vmap over
    # offsets (UPGrad's K problems) it stays one shared matrix, and products with it are
    # matrix-matrix products rather than one matrix-vector product per problem.
    finite_gram, finite_b = jnp.all(jnp.isfinite(gram)), jnp.all(jnp.isfinite(b))
    finite = finite_gram & finite_b
    gram = jnp.where(finite_gram, gram, 0.0)
    b = jnp.where(finite_b, b, 0.0)
    diag = jnp.diagonal(gram)
    peak = jnp.max(jnp.abs(diag))
    # Jacobi scaling by 1/‖g_i‖; a zero gradient (or a subnormal squared norm, which
    # carries no digits) gets the largest task's scale: its rows are zero apart from the ridge.
    d = jnp.where(
        diag > tiny,
        jax.lax.rsqrt(jnp.maximum(diag, tiny)),
        jax.lax.rsqrt(jnp.where(peak > tiny, peak, 1.0)),
    )
    g_hat = gram * d[:, None] * d[None, :]
    b_hat = b / d
    q_hat = jnp.matmul(g_hat, b_hat, precision=_HIGHEST)
    primary = primary.astype(bool)
    has_eq = jnp.any(primary)
    cd = jnp.where(primary, d, 0.0)
    c_norm = jnp.where(has_eq, jnp.max(cd), 1.0)
    c_hat = cd / c_norm  # equality row scaled to unit maximum: ĉᵀx̂ = r
    r = jnp.where(has_eq, 1.0 / c_norm, 0.0).astype(dtype)
    corner = jnp.where(has_eq, 0.0, 1.0).astype(dtype)
    ridge = jnp.asarray(ridge_rel, dtype)
    size = jnp.sum(jnp.abs(b_hat))

    def active_set(q_hat):
        """Phases 0–2: the primal active-set method (exact for every problem).

        ``q_hat`` is an argument: run inside the loop below, the work then depends on the
        loop's carry, and XLA cannot hoist it out of the loop (and run it regardless)."""

        def rhs(support):
            return jnp.concatenate([jnp.where(support, -q_hat, 0.0), r[None]])

        # Feasible start: the primary task with the smallest gradient norm alone (x̂ = r/ĉ);
        # without an equality constraint, x = 0.
        first = jnp.argmin(jnp.where(primary, diag, jnp.inf))
        start_support = jax.nn.one_hot(first, k, dtype=bool) & has_eq
        start = jnp.where(start_support, r / jnp.where(c_hat > 0, c_hat, 1.0), 0.0)

        def step(x, support, sol):
            """One active-set move from the subproblem solution ``sol = [x̂; −μ]``."""
            z = jnp.where(support, sol[:k], 0.0)
            mu = -sol[k]
            feasible = jnp.all(jnp.where(support, z > 0, True))
            # Feasible: accept z, free the task with the most negative reduced gradient (or stop).
            grad = jnp.matmul(g_hat, z, precision=_HIGHEST) + q_hat - mu * c_hat
            reduced = jnp.where(support, jnp.inf, grad)
            j = jnp.argmin(reduced)
            # Relative test: the rounding of the reduced gradient is ≈ ε Σ|x̂_i + b̂_i|.
            optimal = reduced[j] >= -kkt_tol * (jnp.sum(jnp.abs(z)) + size)
            # Infeasible: move from x toward z until the first weight hits zero, drop that task.
            blocked = support & (z <= 0)
            ratios = jnp.where(blocked, x / jnp.maximum(x - z, tiny), jnp.inf)
            i = jnp.argmin(ratios)
            x_i = jnp.maximum(x + jnp.clip(ratios[i], 0.0, 1.0) * (z - x), 0.0).at[i].set(0.0)
            toggle = jnp.where(feasible, j, i)
            moves = ~(feasible & optimal)
            new_support = support.at[toggle].set(support[toggle] ^ moves)
            x = jnp.where(feasible, z, jnp.where(new_support, x_i, 0.0))
            return x, new_support, ~moves, toggle

        def cond(carry):
            return (~carry[2]) & (carry[3] < max_iters)

        def fast_body(carry):
            x, support, _, it, inverse = carry
            x, new_support, done, toggle = step(x, support, inverse @ rhs(support))
            inverse, finite = _toggle_inverse(
                inverse, g_hat, c_hat, support, toggle, ridge, apply=~done
            )
            return x, new_support, done | ~finite, it + 1, inverse

        def exact_step(x, support):
            sol = _refined_solve(_kkt_matrix(g_hat, c_hat, corner, support, ridge), rhs(support))
            return step(x, support, sol)[:3]

        # The inverse KKT matrix of the start support: identity without an equality constraint;
        # with one, identity except the block [[a, c], [c, 0]]⁻¹ = [[0, 1/c], [1/c, −a/c²]]
        # on the rows (first, K).
        a, c_f = g_hat[first, first] + ridge, jnp.where(has_eq, c_hat[first], 1.0)
        idx = jnp.array([first, k])
        block = jnp.where(
            has_eq,
            jnp.array([[0.0, 1.0 / c_f], [1.0 / c_f, -a / c_f**2]]),
            jnp.eye(2, dtype=dtype),
        )
        inverse0 = jnp.eye(k + 1, dtype=dtype).at[idx[:, None], idx[None, :]].set(block)

        def refined(support, inverse):
            """Solution on ``support`` refined with ``inverse`` (matrix-vector products only),
            and whether it is accurate to rounding level.

            Accurate means both the residual and the next correction (``inverse @ residual``,
            the estimate of the remaining error) are at rounding level. The residual alone is
            not enough: an inverse worn by many rank-2 updates refines slowly, and on an
            ill-conditioned support (Ĝ_SS of condition ~4e3, a rank-deficient Gram plus the
            weighting's ridge) a residual of ~8 ε still hid weight errors of 8e-5."""
            matrix, b_vec = _kkt_matrix(g_hat, c_hat, corner, support, ridge), rhs(support)
            sol = inverse @ b_vec
            for _ in range(_REFINEMENTS):
                sol = sol + inverse @ (b_vec - jnp.matmul(matrix, sol, precision=_HIGHEST))
            residual = b_vec - jnp.matmul(matrix, sol, precision=_HIGHEST)
            level = kkt_tol * (jnp.sum(jnp.abs(sol[:k])) + size + r)
            accurate = (jnp.max(jnp.abs(residual)) <= level) & (
                jnp.max(jnp.abs(inverse @ residual)) <= level
            )
            return sol, accurate & jnp.all(jnp.isfinite(sol))

        x, support, inverse = start, start_support, inverse0
        if init_support is not None:
            # Phase 0 (warm start): build the inverse of the guessed support by rank-2 updates;
            # if its solution is feasible, the active-set method continues from it (usually
            # confirming it at once), otherwise from the cold start.
            guess = start_support | init_support.astype(bool)

            def enter(carry):
                inv, sup = carry
                j = jnp.argmax(guess & ~sup)
                # a non-finite update shows in the residual test below
                return _toggle_inverse(inv, g_hat, c_hat, sup, j, ridge)[0], sup.at[j].set(True)

            inverse_g, _ = while_loop_like(
                lambda carry: jnp.any(guess & ~carry[1]), enter, (inverse0, start_support), g_hat
            )
            sol, accurate = refined(guess, inverse_g)
            z = jnp.where(guess, sol[:k], 0.0)
            use = accurate & jnp.all(jnp.where(guess, z > 0, True))
            x, support = jnp.where(use, z, start), jnp.where(use, guess, start_support)
            inverse = jnp.where(use, inverse_g, inverse0)

        # Phase 1: the active-set iterations with the inverse kept up to date.
        done = jnp.array(False)
        carry = (x, support, done, jnp.array(0), inverse)
        x, support, phase1_done, _, inverse = while_loop_like(cond, fast_body, carry, g_hat)
        ok = jnp.all(jnp.isfinite(x))
        x, support = jnp.where(ok, x, start), jnp.where(ok, support, start_support)

        # Polish: refine the final support's solve with the updated inverse; accepted when the
        # residual and the optimality test pass, otherwise phase 2 re-solves by LU.
        sol, accurate = refined(support, inverse)
        x_p, _, optimal, _ = step(x, support, sol)
        polished = phase1_done & ok & accurate & optimal
        x = jnp.where(polished, x_p, x)

        # Phase 2: exact solves from the support found (usually a single solve confirms it).
        def exact_body(carry):
            x, support, _, it = carry
            return (*exact_step(x, support), it + 1)

        carry = (x, support, polished, jnp.array(0))
        x, *_ = while_loop_like(cond, exact_body, carry, g_hat)
        return x

    # Without an equality constraint (the lower-bounded QPs of UPGrad and DualProj) a
    # matrix-free phase solves and certifies most problems first; the active-set method runs
    # only for those it cannot certify (under vmap: zero iterations when it certifies all).
    if orthant_only:
        # Cold start (no guess, or an empty one): the tasks whose reduced gradient at x = 0
        # is negative, i.e. the first exchange from the empty support.
        violated = q_hat < 0
        guess = violated if init_support is None else init_support.astype(bool)
        guess = jnp.where(jnp.any(guess), guess, violated)
        x_fast, certified = _certified_orthant_solve(
            g_hat, q_hat, guess, ridge, kkt_tol, size, max_exchanges=max_iters
        )

        def fallback(carry):
            x = active_set(carry[2])
            # The third slot is overwritten (never read again: the loop stops) so that it is
            # not loop-invariant and XLA keeps the active-set method inside the loop.
            return x, jnp.ones_like(carry[1]), x

        x, *_ = while_loop_like(
            lambda carry: ~carry[1], fallback, (x_fast, certified, q_hat), g_hat
        )
    else:
        x = active_set(q_hat)
    if offset is None:  # a traced all-False mask: no primary task, no meaningful answer
        finite = finite & jnp.any(primary)
    return jnp.where(finite, x * d, jnp.nan)


def lower_bounded_qp(
    gram: jax.Array,
    lower: jax.Array,
    *,
    init_support: jax.Array | None = None,
    max_iters: int | None = None,
) -> jax.Array:
    """Exact ``argmin_{v ≥ lower} vᵀGv``: the weights of the projection onto the dual cone.

    ``v = lower + λ`` with ``λ = argmin_{λ ≥ 0} ‖Σ (lower_i + λ_i) g_i‖²`` (
    :func:`min_norm_weights` with ``offset=lower`` and no primary task). With
    ``lower = e_i`` the update ``Σ v_j g_j`` is the projection of ``g_i`` onto the dual cone
    of the gradients ``{u : ⟨u, g_j⟩ ≥ 0 ∀j}`` (UPGrad); the KKT conditions are
    ``λ ≥ 0``, ``(Gv)_j ≥ 0``, ``λ_j (Gv)_j = 0``. vmap it over ``lower`` to solve many.

    Checked against scipy SLSQP (float64) and the KKT conditions in ``tests/test_dual_cone.py``.

    Example::

        gram, lower = jnp.array([[1.0, -0.5], [-0.5, 1.0]]), jnp.array([1.0, 0.0])
        v = jax.jit(mtl.lower_bounded_qp)(gram, lower)
        # v == [1.0, 0.5]: g_1 plus just enough g_2 to stop conflicting with it
        np.testing.assert_allclose(v, [1.0, 0.5], rtol=1e-5)
    """
    k = check_gram(gram)
    _check_vector("lower", lower, k, kind="float")
    dtype = jnp.promote_types(_compute_dtype(gram), jnp.result_type(lower))
    lower = lower.astype(dtype)
    lam = min_norm_weights(
        gram.astype(dtype),
        np.zeros(k, bool),
        offset=lower,
        init_support=init_support,
        max_iters=max_iters,
    )
    return lower + lam


def frank_wolfe_simplex(
    gram: jax.Array,
    *,
    max_iters: int = 250,
    tol: float = 1e-6,
    line_search: bool = True,
) -> jax.Array:
    """Frank–Wolfe for ``min_{α ∈ simplex} αᵀGα`` (the solver of Sener & Koltun, 2018).

    Start at ``α = 1/K``; ``τ = argmin_i (Gα)_i``; with exact line search
    ``γ = clip((a − b)/(a − 2b + c), 0, 1)`` where ``a = αᵀGα``, ``b = (Gα)_τ``,
    ``c = G_ττ``; otherwise the fixed step ``γ = 1/(k + 2)``, i.e.
    ``α ← (k α + e_τ)/(k + 1)`` with ``α_0`` counted as the first vertex average. Stops when
    ``‖Δα‖₁ < tol`` or after ``max_iters`` (a positive int, like the active-set solver's).
    Exact for K = 2 (one line search suffices); otherwise only sublinear when the optimum
    lies on a face: use :func:`min_norm_weights` when exactness matters.
    """
    k = check_gram(gram)
    check_iters(max_iters)
    tol = check_nonnegative("tol", tol)
    if not isinstance(line_search, bool):
        raise TypeError(f"`line_search` must be a bool, got {line_search!r}.")
    dtype = _compute_dtype(gram)
    gram = gram.astype(dtype)
    gram = 0.5 * (gram + gram.T)

    def cond(carry):
        _, change, it = carry
        return (change >= tol) & (it < max_iters)

    def body(carry):
        alpha, _, it = carry
        g_alpha = gram @ alpha
        tau = jnp.argmin(g_alpha)
        if line_search:
            a, b, c = alpha @ g_alpha, g_alpha[tau], gram[tau, tau]
            denom = a - 2 * b + c
            gamma = jnp.where(
                denom > 0, jnp.clip((a - b) / jnp.where(denom > 0, denom, 1), 0, 1), 0
            )
        else:
            gamma = 1.0 / (it + 2.0)
        new = (1 - gamma) * alpha + gamma * jax.nn.one_hot(tau, k, dtype=dtype)
        return new, jnp.sum(jnp.abs(new - alpha)), it + 1

    alpha0 = jnp.full((k,), 1.0 / k, dtype)
    alpha, *_ = while_loop_like(cond, body, (alpha0, jnp.asarray(jnp.inf, dtype), 0), gram)
    return jnp.where(jnp.all(jnp.isfinite(gram)), alpha, jnp.nan)

"""Exact, jittable and vmappable solvers for the small quadratic programs of multi-task learning.

Every problem here lives on the K x K Gram matrix ``G = J Jᵀ`` of the task gradients and is
solved on the device with a fixed iteration cap (``lax.while_loop``), so it runs under
``jit``/``vmap`` with no host round-trip.

One solver serves all three problems of DESIGN.md 3.2-3.3:

* MGDA, min-norm point of the convex hull: ``min_{α ∈ simplex} αᵀGα``;
* primary/auxiliary projection: ``min_{λ ≥ 0} ‖g_0 + Σ λ_j g_j‖²``;
* several primaries and auxiliaries: ``min_{α ∈ simplex, λ ≥ 0} ‖Σ α_i g_i + Σ λ_j g_j‖²``.

They are one problem, ``min ‖Σ_i x_i g_i‖²`` with ``x ≥ 0`` and ``Σ_{i ∈ P} x_i = 1`` over the
primary set ``P`` (MGDA: every task is primary), solved exactly by a primal active-set
method (:func:`min_norm_weights`): on a support ``S`` the equality-constrained subproblem is
one KKT linear system, Jacobi-scaled by ``diag(G)^{-1/2}`` so that gradients whose norms
differ by 10³ lose no precision; tasks enter and leave ``S`` one at a time (Lawson–Hanson
scheme) until the KKT conditions hold. Tolerances follow the working precision (float32 at
least; float64 Grams are solved in float64).

Non-finite Grams (a NaN or inf gradient) give NaN weights, so the update is non-finite
too and ``optax.apply_if_finite`` can skip it. Frank–Wolfe (the original MGDA solver) is
provided too, for reference and comparison.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# In float32: relative tolerance of the optimality test (≈ 8 ulps) and the ridge that keeps
# the Jacobi-scaled solves of rank-deficient (e.g. duplicated) gradients finite. Wider dtypes
# scale both with their machine epsilon (the ridge quadratically).
_KKT_TOL = 1e-6
_RIDGE = 1e-10


def _tolerances(dtype) -> tuple[float, float]:
    """(optimality tolerance, ridge) for the working dtype."""
    rel = float(jnp.finfo(dtype).eps / jnp.finfo(jnp.float32).eps)
    return _KKT_TOL * rel, _RIDGE * rel**2


def _compute_dtype(gram: jax.Array) -> jnp.dtype:
    """float32 at least (bf16/fp16 Grams are promoted), float64 if given float64."""
    return jnp.promote_types(gram.dtype, jnp.float32)


def check_gram(gram: jax.Array, name: str = "gram") -> int:
    """Trace-time check that ``gram`` is a square (K, K) floating matrix; returns K."""
    shape = jnp.shape(gram)
    if len(shape) != 2 or shape[0] != shape[1]:
        raise ValueError(f"`{name}` must be a square (K, K) Gram matrix, got shape {shape}.")
    if not jnp.issubdtype(jnp.result_type(gram), jnp.floating):
        raise ValueError(f"`{name}` must be floating point, got dtype {jnp.result_type(gram)}.")
    if shape[0] == 0:
        raise ValueError(f"`{name}` must have at least one task, got shape {shape}.")
    return shape[0]


def _check_vector(name: str, value, k: int) -> None:
    """Trace-time check that a per-task vector has shape (K,)."""
    if jnp.shape(value) != (k,):
        raise ValueError(
            f"`{name}` must have shape ({k},) (one entry per task), got {jnp.shape(value)}."
        )


def _kkt_matrix(g_hat, c_hat, support, ridge):
    """The KKT matrix ``[[Ĝ_SS, ĉ_S], [ĉ_Sᵀ, 0]]`` of the subproblem on the support S.

    ``min xᵀĜx  s.t.  ĉᵀx = 1, x_i = 0 off S`` (Jacobi-scaled). Rows and columns outside
    S are those of the identity, so the shape stays (K+1, K+1) under jit/vmap; its solution
    for the right-hand side ``e_K`` is ``[x; −μ]`` with ``μ = xᵀĜx``.
    """
    both = support[:, None] & support[None, :]
    g = jnp.where(both, g_hat, 0.0) + jnp.diag(jnp.where(support, ridge, 1.0))
    c = jnp.where(support, c_hat, 0.0)
    return jnp.block([[g, c[:, None]], [c[None, :], jnp.zeros((1, 1), g.dtype)]])


def _kkt_row(g_hat, c_hat, support, j, ridge):
    """Row ``j`` of :func:`_kkt_matrix` without building the matrix."""
    k = g_hat.shape[0]
    active = jnp.concatenate([jnp.where(support, g_hat[j], 0.0), c_hat[j][None]])
    active = active.at[j].add(ridge)
    return jnp.where(support[j], active, jax.nn.one_hot(j, k + 1, dtype=g_hat.dtype))


def _toggle_inverse(inverse, g_hat, c_hat, support, j, ridge):
    """Inverse KKT matrix after task ``j`` enters or leaves the support: O(K²).

    Toggling j changes row and column j by ``r``, a symmetric rank-2 change
    ``U C Uᵀ`` with ``U = [e_j, r]``, ``C = [[−r_j, 1], [1, 0]]``; Woodbury's identity
    updates the inverse with one 2 x 2 solve.
    """
    new_support = support.at[j].set(~support[j])
    r = _kkt_row(g_hat, c_hat, new_support, j, ridge) - _kkt_row(g_hat, c_hat, support, j, ridge)
    h_e, h_r = inverse[:, j], inverse @ r  # H U, column by column (H is symmetric)
    # S = C⁻¹ + Uᵀ H U with C⁻¹ = [[0, 1], [1, r_j]]; inverted in closed form.
    s00, s01, s11 = h_e[j], 1.0 + r @ h_e, r[j] + r @ h_r
    det = s00 * s11 - s01 * s01
    a, b, e = s11 / det, -s01 / det, s00 / det
    left, right = a * h_e + b * h_r, b * h_e + e * h_r
    return inverse - left[:, None] * h_e[None, :] - right[:, None] * h_r[None, :]


def min_norm_weights(
    gram: jax.Array,
    primary: jax.Array,
    *,
    init_support: jax.Array | None = None,
    max_iters: int | None = None,
) -> jax.Array:
    """Exact ``argmin ‖Σ x_i g_i‖²`` s.t. ``x ≥ 0``, ``Σ_{i ∈ P} x_i = 1``, on the Gram matrix.

    ``primary`` is a (K,) bool mask of the primary tasks ``P`` (all True: MGDA's min-norm
    point of the convex hull; one True: primary/auxiliary projection); auxiliary tasks get
    unbounded non-negative weights.

    Primal active-set method (the Lawson–Hanson scheme with the one equality constraint):
    keep a support S and the exact minimiser on it (a KKT solve); free the task with the most
    negative reduced gradient ``(Gx)_j − μ c_j`` while one is below ``−tol``; when a solve
    leaves the non-negative orthant, step back to its boundary and drop the blocking task.
    Finite termination. The linear systems are Jacobi-scaled so that gradients whose norms
    differ by 10³ lose no precision. Two phases: the first updates the inverse KKT matrix
    with O(K²) rank-2 updates as tasks enter and leave; the second re-solves from scratch
    on the support found and continues until the KKT conditions hold with exact solves, so
    the result is exact up to one linear solve whatever rounding the updates accumulated.
    ``init_support`` (e.g. the last step's support, kept in a weighting's state)
    warm-starts it: a wrong guess costs iterations, never correctness. ``max_iters``
    (per phase) defaults to ``3K + 10``.

    Checked against scipy SLSQP and ``scipy.optimize.nnls`` (float64) and the KKT
    conditions in ``tests/test_solvers.py``.
    """
    k = check_gram(gram)
    _check_vector("primary", primary, k)
    if not isinstance(primary, jax.core.Tracer) and not bool(jnp.any(primary)):
        raise ValueError("`primary` must mark at least one primary task (all False given).")
    if init_support is not None:
        _check_vector("init_support", init_support, k)
    max_iters = 3 * k + 10 if max_iters is None else max_iters
    if not isinstance(max_iters, int) or max_iters < 1:
        raise ValueError(f"`max_iters` must be a positive int, got {max_iters!r}.")
    dtype = _compute_dtype(gram)
    kkt_tol, ridge_rel = _tolerances(dtype)
    gram = gram.astype(dtype)
    diag = jnp.diagonal(gram)
    scale = jnp.max(jnp.abs(diag))
    scale = jnp.where(scale > 0, scale, 1.0)  # all-zero gradients: any feasible x is optimal
    # Tasks with a zero gradient are scaled by 1 (their rows are zero apart from the ridge).
    d = jnp.where(
        diag > ridge_rel * scale,
        jax.lax.rsqrt(jnp.maximum(diag, jnp.finfo(dtype).tiny)),
        1.0 / jnp.sqrt(scale),
    )
    g_hat = gram * d[:, None] * d[None, :]
    c = primary.astype(dtype)
    c_hat = c * d
    ridge = jnp.asarray(ridge_rel, dtype)
    norms = jnp.sqrt(jnp.maximum(diag, 0.0))
    rhs = jax.nn.one_hot(k, k + 1, dtype=dtype)

    # Feasible start: the primary task with the smallest gradient norm, alone.
    first = jnp.argmin(jnp.where(primary, diag, jnp.inf))
    start = jax.nn.one_hot(first, k, dtype=dtype)
    support0 = start > 0
    if init_support is not None:
        support0 = support0 | init_support.astype(bool)

    def step(x, support, sol):
        """One active-set move from the subproblem solution ``sol = [x̂; −μ]``."""
        z = jnp.where(support, sol[:k] * d, 0.0)
        mu = -sol[k]
        feasible = jnp.all(jnp.where(support, z > 0, True))
        # Feasible: accept z, free the task with the most negative reduced gradient (or stop).
        reduced = jnp.where(support, jnp.inf, gram @ z - mu * c)
        j = jnp.argmin(reduced)
        # Relative test: |⟨g_j, u⟩| ≤ ‖g_j‖ Σ_i z_i ‖g_i‖, the scale of the rounding error.
        optimal = reduced[j] >= -kkt_tol * norms[j] * (norms @ z)
        # Infeasible: move from x toward z until the first weight hits zero, drop that task.
        blocked = support & (z <= 0)
        ratios = jnp.where(blocked, x / jnp.maximum(x - z, jnp.finfo(dtype).tiny), jnp.inf)
        i = jnp.argmin(ratios)
        x_i = jnp.maximum(x + jnp.clip(ratios[i], 0.0, 1.0) * (z - x), 0.0).at[i].set(0.0)
        toggle = jnp.where(feasible, j, i)
        moves = ~(feasible & optimal)
        new_support = support.at[toggle].set(support[toggle] ^ moves)
        x = jnp.where(feasible, z, jnp.where(new_support, x_i, 0.0))
        return x, new_support, ~moves, toggle

    def cond(carry):
        return (~carry[2]) & (carry[3] < max_iters)

    # Phase 1: inverse KKT matrix kept up to date by rank-2 updates.
    def fast_body(carry):
        x, support, _, it, inverse = carry
        x, new_support, done, toggle = step(x, support, inverse @ rhs)
        inverse = jnp.where(
            done, inverse, _toggle_inverse(inverse, g_hat, c_hat, support, toggle, ridge)
        )
        broken = ~jnp.all(jnp.isfinite(inverse))
        return x, new_support, done | broken, it + 1, inverse

    def exact_step(x, support):
        sol = jnp.linalg.solve(_kkt_matrix(g_hat, c_hat, support, ridge), rhs)
        return step(x, support, sol)[:3]

    # Phase 0: with a warm start, one exact solve on the guessed support may already be
    # optimal (the usual case from one training step to the next).
    done = jnp.array(False)
    if init_support is not None:
        x, support, done = exact_step(start, support0)
        x = jnp.where(done, x, start)
        support = jnp.where(done, support, start > 0)
    else:
        x, support = start, support0
    # The inverse KKT matrix of the start support {first}: identity, except the block
    # [[a, c], [c, 0]]⁻¹ = [[0, 1/c], [1/c, −a/c²]] on the rows (first, K).
    a, c_f = g_hat[first, first] + ridge, c_hat[first]
    idx = jnp.array([first, k])
    inverse0 = jnp.eye(k + 1, dtype=dtype).at[first, first].set(0.0)
    inverse0 = inverse0.at[idx[:, None], idx[None, :]].set(
        jnp.array([[0.0, 1.0 / c_f], [1.0 / c_f, -a / c_f**2]])
    )
    carry = (x, support, done, jnp.array(0), inverse0)
    x, support, *_ = jax.lax.while_loop(cond, fast_body, carry)
    finite = jnp.all(jnp.isfinite(x))
    x, support = jnp.where(finite, x, start), jnp.where(finite, support, start > 0)

    # Phase 2: exact solves from the support found (usually a single solve confirms it).
    def exact_body(carry):
        x, support, _, it = carry
        return (*exact_step(x, support), it + 1)

    carry = (x, support, done, jnp.array(0))
    x, *_ = jax.lax.while_loop(cond, exact_body, carry)
    return jnp.where(jnp.all(jnp.isfinite(gram)), x, jnp.nan)


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
    ``‖Δα‖₁ < tol`` or after ``max_iters``. Exact for K = 2 (one line search suffices);
    otherwise only sublinear when the optimum lies on a face: use
    :func:`min_norm_weights` when exactness matters.
    """
    k = check_gram(gram)
    dtype = _compute_dtype(gram)
    gram = gram.astype(dtype)

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
    alpha, *_ = jax.lax.while_loop(cond, body, (alpha0, jnp.asarray(jnp.inf, dtype), 0))
    return jnp.where(jnp.all(jnp.isfinite(gram)), alpha, jnp.nan)

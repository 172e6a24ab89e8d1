"""Central finite-difference gradient check, fully jitted (fast on CPU)."""

import jax
import jax.numpy as jnp
import numpy as np


def check_grad_fd(f, *args, argnum=0, n_dirs=6, eps=1e-6, rtol=1e-5, atol=1e-7, seed=0):
    """Compares jax.grad(f) with central differences along random directions in float64.

    ``f`` maps ``args`` to a scalar; ``args[argnum]`` is perturbed.
    """
    with jax.enable_x64(True):
        args = [
            jnp.asarray(a, jnp.float64)
            if np.issubdtype(np.asarray(a).dtype, np.floating)
            else jnp.asarray(a)
            for a in args
        ]
        x = args[argnum]

        def fx(z):
            a = list(args)
            a[argnum] = z
            return f(*a)

        g = jax.jit(jax.grad(fx))(x)
        dirs = jnp.asarray(np.random.default_rng(seed).normal(size=(n_dirs, *x.shape)))
        fd = jax.jit(jax.vmap(lambda d: (fx(x + eps * d) - fx(x - eps * d)) / (2 * eps)))(dirs)
        analytic = jnp.tensordot(dirs, g, axes=g.ndim)
        assert np.all(np.isfinite(np.asarray(g)))
        np.testing.assert_allclose(np.asarray(analytic), np.asarray(fd), rtol=rtol, atol=atol)
        return np.asarray(g)

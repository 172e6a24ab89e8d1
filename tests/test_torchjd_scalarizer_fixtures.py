"""Loss weightings against torchjd 0.18's scalarizers on the same loss sequences.

The fixtures are produced by ``tests/fixtures/make_torchjd_scalarizer_fixtures.py`` (torchjd
is never a test dependency): each scalarizer's weights are the gradient of its output with
respect to the losses, call after call, with its parameters trained as in a training loop.
"""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtl_optax as mtl

FIXTURES = np.load(pathlib.Path(__file__).parent / "fixtures" / "torchjd_scalarizers.npz")
SGD_LR, DWA_WINDOW = 0.1, 2  # as in the generating script

OURS = {
    "UW": lambda: mtl.uncertainty_weighting(optimizer=optax.sgd(SGD_LR)),
    "IMTLL": lambda: mtl.imtl_l(optimizer=optax.sgd(SGD_LR)),
    "FAMO": lambda: mtl.famo(weight_decay=1e-3),  # torchjd's weight decay
    "DWA": lambda: mtl.dwa(window=DWA_WINDOW),
    "GeometricMean": mtl.geometric_mean,
}


@pytest.mark.parametrize("name", list(OURS))
def test_weights_match_torchjd_call_by_call(name):
    weighting = OURS[name]()
    losses = FIXTURES["losses"]
    update = jax.jit(weighting.update)
    state = weighting.init(losses.shape[1])
    for t, values in enumerate(losses):
        weights, state = update(None, jnp.asarray(values, jnp.float32), state)
        np.testing.assert_allclose(weights, FIXTURES[name][t], rtol=2e-5, err_msg=f"call {t}")

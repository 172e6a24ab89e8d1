"""Multi-device tests: they need 4 devices, which on CPU must be requested before jax starts.

``XLA_FLAGS=--xla_force_host_platform_device_count=4`` only takes effect if it is set before
jax is imported, so these tests run in a process of their own, started by
``tests/test_multidevice.py``. Run them directly with::

    MTL_OPTAX_MULTIDEVICE=1 python -m pytest tests/multidevice -p no:xdist -q

(``MTL_OPTAX_MULTIDEVICE=1`` sets the XLA flag when jax has not been imported yet.) In any
other process, e.g. the ordinary one-device ``pytest`` run, the files here are not collected.
With the variable set but fewer than 4 devices, collection stops with an error instead of
testing nothing.
"""

import os
import sys

import pytest

NUM_DEVICES = 4
FLAG = f"--xla_force_host_platform_device_count={NUM_DEVICES}"

ENABLED = os.environ.get("MTL_OPTAX_MULTIDEVICE") == "1"

if not ENABLED:
    collect_ignore_glob = ["test_*.py"]
else:
    if "jax" not in sys.modules and "xla_force_host_platform_device_count" not in os.environ.get(
        "XLA_FLAGS", ""
    ):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + FLAG).strip()
    import jax

    if jax.device_count() < NUM_DEVICES:
        raise pytest.UsageError(
            f"tests/multidevice needs {NUM_DEVICES} devices, found {jax.device_count()}: set "
            f"XLA_FLAGS={FLAG} before jax is imported (run them in a fresh process, as "
            "tests/test_multidevice.py does)."
        )


def pytest_report_header(config):
    """Shown when this directory is named on the command line (``pytest tests/multidevice``)."""
    if not ENABLED:
        return "tests/multidevice: not collected; set MTL_OPTAX_MULTIDEVICE=1 (see its conftest.py)"
    return f"tests/multidevice: {jax.device_count()} devices"

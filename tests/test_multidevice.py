"""Runs ``tests/multidevice`` on 4 simulated CPU devices, in a process of its own.

The device count of the CPU backend is fixed when jax starts
(``XLA_FLAGS=--xla_force_host_platform_device_count=4``), so the multi-device tests cannot
share this process (which already has one device); ``tests/multidevice/conftest.py`` keeps
them out of this run and refuses to run them with fewer than 4 devices.
"""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_multidevice_suite_passes_on_four_devices():
    env = dict(os.environ)
    env["MTL_OPTAX_MULTIDEVICE"] = "1"
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "tests/multidevice",
            "-p",
            "no:xdist",
            "-q",
            "-p",
            "no:cacheprovider",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    report = proc.stdout[-6000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, report
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, report

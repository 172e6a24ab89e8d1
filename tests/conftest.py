"""Suite-wide fixture: release every compiled program after each test module.

JAX keeps every compiled executable for the life of the process, and each one holds a few
dozen memory mappings of generated code. A pytest-xdist worker compiles thousands of solver
programs in a full run, and a process may hold at most ``vm.max_map_count`` (65,530 by
default) mappings: past it, XLA's next code allocation fails and the worker dies mid-compile.
Clearing the caches between modules keeps a worker well below that (programs are rarely
shared across test modules, so little is recompiled).
"""

import gc

import jax
import pytest


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    yield
    jax.clear_caches()
    gc.collect()

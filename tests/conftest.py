"""Test-suite settings: float32 everywhere, CPU, quick compiles, compile caching between tests.

Compilation is most of the suite's time. XLA's CPU backend compiles here without its expensive
optimisation passes: the suite's programs are tiny, so running them unoptimised costs less than
optimising them (about 40% less CPU time for the model and routing tests). Many tests, and the
binaries they start in subprocesses, compile the same smoke-sized programs: JAX's persistent
compilation cache, in one temporary directory per pytest run, lets every xdist worker and every
subprocess reuse them. The directory is made by the first process that loads this file (pytest's
controller), reaches the workers and subprocesses through the environment, which they inherit,
and is removed at exit.

Every compiled program keeps its machine code mapped in the process, and XLA's CPU backend maps
each program in many pieces: one test module can add 8,000 memory maps. An xdist worker that runs
half the suite would pass the kernel's limit on maps per process (vm.max_map_count, 65,530 by
default) and crash inside the compiler. So after every test module the in-memory compilation
caches are cleared and the programs freed; the next module that needs one reads it back from the
persistent cache.
"""

import atexit
import gc
import os
import shutil
import tempfile

_CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"
_FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FAST_COMPILE}".strip()
if _CACHE_ENV not in os.environ:
  _cache_dir = tempfile.mkdtemp(prefix="memkernel-test-jax-cache-")
  atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
  os.environ[_CACHE_ENV] = _cache_dir
  # Cache every compiled program, however small or quick to compile.
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
  """Frees the module's compiled programs once it ends (see the module docstring)."""
  yield
  jax.clear_caches()
  gc.collect()

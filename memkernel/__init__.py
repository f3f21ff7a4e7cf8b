"""memkernel: hierarchical and persistent memory for sequence models, in JAX/Flax.

The core is the Recursive Memory Kernel (`memkernel.kernel`): a causal model whose long-range
memory is a sealed dyadic summary tree over 16-token leaves, read by sparse beam routing and an
exact token-level read. Every model family (`memkernel.family`) runs in one harness: training,
evaluation, the auditor, the sweeps, the benchmark and the sampler. See README.md.
"""

import importlib
from typing import Any

# Loaded on first use, so host-side parts (`memkernel.store`) start without importing JAX.
_LAZY = {
    "family": "memkernel.family",
    "Interventions": "memkernel.kernel",
    "KernelConfig": "memkernel.kernel",
    "KernelModel": "memkernel.kernel",
    "Memory": "memkernel.kernel",
    "init_memory": "memkernel.kernel",
    "Outputs": "memkernel.outputs",
    "RouteTrace": "memkernel.outputs",
    "load_run": "memkernel.runs",
    "SampleResult": "memkernel.sampler",
    "generate": "memkernel.sampler",
}


def __getattr__(name: str) -> Any:
  if name not in _LAZY:
    raise AttributeError(f"module 'memkernel' has no attribute {name!r}")
  module = importlib.import_module(_LAZY[name])
  value = module if name == "family" else getattr(module, name)
  globals()[name] = value
  return value


__all__ = [
    "Interventions",
    "KernelConfig",
    "KernelModel",
    "Memory",
    "Outputs",
    "RouteTrace",
    "SampleResult",
    "family",
    "generate",
    "init_memory",
    "load_run",
]

"""memkernel: hierarchical and persistent memory for sequence models, in JAX/Flax.

The core is the Recursive Memory Kernel (`memkernel.kernel`): a causal model whose long-range
memory is a sealed dyadic summary tree over 16-token leaves, read by sparse beam routing and an
exact token-level read. Every model family (`memkernel.family`) runs in one harness: training,
evaluation, the auditor, the sweeps, the benchmark and the sampler. See README.md.
"""

from memkernel import family
from memkernel.kernel import Interventions, KernelConfig, KernelModel, Memory, init_memory
from memkernel.outputs import Outputs, RouteTrace
from memkernel.runs import load_run
from memkernel.sampler import SampleResult, generate

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

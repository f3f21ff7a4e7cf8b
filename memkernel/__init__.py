"""memkernel: the Recursive Memory Kernel in JAX/Flax.

A causal sequence model whose long-range memory is a sealed dyadic summary tree over 16-token
leaves, read by sparse beam routing and an exact token-level read. See README.md.
"""

from memkernel.config import ModelConfig
from memkernel.model import FractalV2Model, Interventions
from memkernel.runs import load_run
from memkernel.state import LayerMemory, Memory, init_memory, memory_bytes

__all__ = [
    "FractalV2Model",
    "Interventions",
    "LayerMemory",
    "Memory",
    "ModelConfig",
    "init_memory",
    "load_run",
    "memory_bytes",
]

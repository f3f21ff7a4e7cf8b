"""memkernel: the Recursive Memory Kernel in JAX/Flax."""

from memkernel.config import ModelConfig

__all__ = ["ModelConfig"]

"""The Recursive Memory Kernel: a sealed dyadic summary tree over 16-token leaves, read by sparse
beam routing and an exact token-level read.

  config.py         KernelConfig, frozen and validated
  state.py          the memory pytree and `init_memory`
  trunk.py          LocalTrunk: causal conv + gated diagonal recurrences (roots)
  tree.py           leaf summaries, the dyadic merge, batched build and incremental insert
  routing.py        Fenwick candidates, the beam descent, the dense teacher
  read.py           the exact token read of the routed leaves
  fusion.py         ReadFusion: the gated sum of the memory sources into the residual stream
  layer.py          KernelLayer: features, fusion and MLP of one layer
  model.py          KernelModel: the parallel, recurrent and step forms
  interventions.py  run-time ablations of the sources
  family.py         the kernel's entry in the family registry
"""

from memkernel.kernel.config import KernelConfig
from memkernel.kernel.interventions import Interventions
from memkernel.kernel.model import KernelModel
from memkernel.kernel.state import LayerMemory, Memory, init_memory

__all__ = ["Interventions", "KernelConfig", "KernelModel", "LayerMemory", "Memory", "init_memory"]

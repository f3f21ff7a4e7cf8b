"""ReadFusion: the explicit, gated fusion of the kernel's memory sources into the residual stream.

The sources are named: "roots" (the trunk's fused root outputs), "tree" (the routed tree value)
and "exact" (the exact token read). `source_names(config)` lists those a config enables, in gate
order; it is the kernel family's `sources`, so interventions, diagnostics and the auditor name
sources and gates from this one list.
"""

from __future__ import annotations

from typing import Collection, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from memkernel.kernel.config import KernelConfig

# Every source the kernel can fuse, in gate order. The gate layer has one column per entry
# whatever the config switches off, so a checkpoint loads under any choice of reads.
SOURCES = ("roots", "tree", "exact")
# The trunk's source: recurrent state rather than a read of the memory; already [B, T, D].
TRUNK = "roots"


def source_names(config: KernelConfig) -> tuple[str, ...]:
  """The sources `config` enables, in gate order (the trunk's roots always)."""
  enabled = {TRUNK: True, "tree": config.use_tree_read, "exact": config.use_exact_read}
  return tuple(s for s in SOURCES if enabled[s])


class ReadFusion(nn.Module):
  """Explicit fusion of the named sources, one gate each.

  out = sum over kept sources s of g_s * W_s(value_s), with per-token gates g = sigmoid(W_g xn + b)
  and W_s the identity for the trunk (already projected). A source the config switches off has no
  projection; one left out of `keep` keeps its parameters and adds exactly zero.
  """

  config: KernelConfig

  @nn.compact
  def __call__(self, xn_BTD: jax.Array, values: Mapping[str, jax.Array],
               keep: Collection[str]) -> tuple[jax.Array, jax.Array]:
    """Fuses `values`.

    Args:
      xn_BTD: the normed input the gates read.
      values: source name -> value, exactly the `source_names(config)`: the trunk [B, T, D],
        the others [B, T, H, E].
      keep: names of the sources added (the others add zero).
    Returns:
      (fused [B, T, D], gates [B, T, S]) with the gates in `source_names(config)` order.
    """
    c = self.config
    names = source_names(c)
    if set(values) != set(names):
      raise ValueError(f"ReadFusion needs a value for each of the config's sources {names}, "
                       f"got {tuple(values)}")
    every_gate = jax.nn.sigmoid(nn.Dense(len(SOURCES), name="gates")(xn_BTD))
    gates = jnp.stack([every_gate[..., SOURCES.index(s)] for s in names], axis=-1)
    out = jnp.zeros_like(values[TRUNK])
    for i, name in enumerate(names):
      value = values[name]
      if name != TRUNK:
        value = nn.Dense(c.d_model, use_bias=False, name=f"{name}_proj")(
            value.reshape(value.shape[:2] + (-1,)))
      if name in keep:
        out = out + gates[..., i:i + 1] * value
    return out, gates

"""ReadFusion: the explicit, gated fusion of the kernel's memory sources into the residual stream."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from memkernel.kernel.config import KernelConfig


class ReadFusion(nn.Module):
  """Explicit fusion of (root outputs, routed tree value, exact read), one gate per source.

  out = g_roots * roots + g_tree * W_tree(tree) + g_exact * W_exact(read), with per-token gates
  g = sigmoid(W_g xn + b). A source switched off (config or intervention) contributes exactly zero.
  """

  config: KernelConfig

  @nn.compact
  def __call__(self, xn_BTD, trunk_BTD, tree_BTHE, exact_BTHE, keep: tuple[bool, bool, bool]):
    c = self.config
    gates = jax.nn.sigmoid(nn.Dense(3, name="gates")(xn_BTD))
    flat = lambda y: y.reshape(y.shape[:2] + (-1,))
    # A source the config switches off has no projection; one an intervention switches off keeps
    # its parameters and adds exactly zero.
    sources = (
        trunk_BTD,
        nn.Dense(c.d_model, use_bias=False, name="tree_proj")(flat(tree_BTHE))
        if c.use_tree_read else None,
        nn.Dense(c.d_model, use_bias=False, name="exact_proj")(flat(exact_BTHE))
        if c.use_exact_read else None)
    out = jnp.zeros_like(trunk_BTD)
    for i, (source, on) in enumerate(zip(sources, keep)):
      if on:
        out = out + gates[..., i:i + 1] * source
    return out, gates

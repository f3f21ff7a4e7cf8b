"""KernelLayer: one memory-kernel layer (trunk, memory projections, fusion) and its MLP.

The execution forms in `memkernel.kernel.model` call `features` (per-token quantities) and
`finish` (fusion and MLP) around the tree, routing and read.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from memkernel.kernel.config import KernelConfig
from memkernel.kernel.fusion import ReadFusion, source_names
from memkernel.kernel.trunk import LocalTrunk


class Features(NamedTuple):
  """Per-token quantities of one layer: normed input, trunk outputs and memory projections."""

  xn: jax.Array          # [B, T, D]
  roots: jax.Array       # [B, T, R, D] per-root outputs
  trunk: jax.Array       # [B, T, D] fused root contribution
  q: jax.Array           # [B, T, H, E]
  k: jax.Array           # [B, T, H, E]
  v: jax.Array           # [B, T, H, E]
  rq: jax.Array          # [B, T, H, P]
  rk: jax.Array          # [B, T, H, P]
  pool: jax.Array        # [B, T, H]

def memory_proj_init(config: KernelConfig):
  """Initialiser of the memory projections [(M + 1) D, H (3E + 2P + 1)].

  Input rows: lags 0..M-1 of the normed stream (M = `proj_lags`), then the trunk output. Output
  columns: read q, k, v, routing rq, rk, pooling logits. With `shift_init` the read and the router
  start as an associative-recall prior (as a token shift does in other recurrent models): a key is
  the *previous* token projected exactly like a query's *current* token (k = R lag1, q = R lag0,
  and rk / rq likewise with their own R), values are the current token, pooling is uniform, and the
  trunk enters small. Everything stays trainable; without `shift_init` all blocks are random.
  """
  c = config
  d, m, h, e, p = c.d_model, c.proj_lags, c.num_route_heads, c.read_dim, c.key_dim
  lecun = nn.initializers.lecun_normal()

  def init(key, shape, dtype=jnp.float32):
    if not c.shift_init:
      return lecun(key, shape, dtype)
    kq, kv, kr, kt = jax.random.split(key, 4)
    std = d ** -0.5
    r_q = jax.random.normal(kq, (d, h * e), dtype) * std
    r_v = jax.random.normal(kv, (d, h * e), dtype) * std
    r_r = jax.random.normal(kr, (d, h * p), dtype) * std
    kernel = jnp.zeros(shape, dtype)
    col = np.cumsum([0, h * e, h * e, h * e, h * p, h * p])
    kernel = kernel.at[0:d, col[0]:col[1]].set(r_q)          # q  <- lag 0
    kernel = kernel.at[d:2 * d, col[1]:col[2]].set(r_q)      # k  <- lag 1
    kernel = kernel.at[0:d, col[2]:col[3]].set(r_v)          # v  <- lag 0
    kernel = kernel.at[0:d, col[3]:col[4]].set(r_r)          # rq <- lag 0
    kernel = kernel.at[d:2 * d, col[4]:col[5]].set(r_r)      # rk <- lag 1
    trunk = jax.random.normal(kt, (d, shape[1]), dtype) * 0.1 * std
    return kernel.at[m * d:].set(trunk)

  return init


class KernelLayer(nn.Module):
  """One memory-kernel layer plus its MLP. The forms call `features` and `finish`."""

  config: KernelConfig

  def setup(self):
    c = self.config
    h, e, p = c.num_route_heads, c.read_dim, c.key_dim
    self.norm = nn.RMSNorm(name="norm")
    self.trunk = LocalTrunk(c, name="trunk")
    self.proj = nn.Dense(h * (3 * e + 2 * p + 1), use_bias=False, name="memory_proj",
                         kernel_init=memory_proj_init(c))
    self.fusion = ReadFusion(c, name="fusion")
    self.read_sink = (self.param("read_sink", nn.initializers.zeros, (h,)) if c.read_sink
                      else None)
    self.mlp_norm = nn.RMSNorm(name="mlp_norm")
    self.mlp_in = nn.Dense(c.mlp_hidden, name="mlp_in")
    self.mlp_out = nn.Dense(c.d_model, name="mlp_out")

  def features(self, x_BTD, conv_BWD, roots_BRD, keep_R, impl, lag_valid_BTW=None,
               carry_scale_BT=None):
    """Per-token quantities; `lag_valid_BTW` and `carry_scale_BT` are the trunk's document
    boundaries (`LocalTrunk.conv`, `LocalTrunk.recur`). Returns (Features, conv state, roots)."""
    c = self.config
    h, e, p = c.num_route_heads, c.read_dim, c.key_dim
    xn = self.norm(x_BTD)
    u, lags, conv = self.trunk.conv(xn, conv_BWD, lag_valid_BTW)
    roots, root_state = self.trunk.recur(u, roots_BRD, impl, carry_scale_BT)
    trunk = self.trunk.project(roots, keep_R)
    b, t = xn.shape[:2]
    if c.use_tree_read or c.use_exact_read:
      # Memory projections see the last M tokens separately (M = proj_lags), so a key can be
      # "the previous token" without untangling the depthwise conv's mixed lags, plus the trunk.
      z = self.proj(jnp.concatenate([*lags[:c.proj_lags], trunk], axis=-1))
    else:  # No memory: no projection parameters either (ablations compare equal budgets).
      z = jnp.zeros((b, t, h * (3 * e + 2 * p + 1)), xn.dtype)
    sizes = np.cumsum([h * e, h * e, h * e, h * p, h * p])
    q, k, v, rq, rk, pool = jnp.split(z, sizes, axis=-1)
    q, k, v = (y.reshape(b, t, h, e) for y in (q, k, v))
    rq, rk = (y.reshape(b, t, h, p) for y in (rq, rk))
    feats = Features(xn, roots, trunk, q, k, v, rq, rk, pool)
    return feats, conv, root_state

  def finish(self, x_BTD, feats: Features, tree_BTHE, exact_BTHE, keep):
    """Fuses the sources the config enables (those in `keep` add) and applies the MLP."""
    values = {"roots": feats.trunk, "tree": tree_BTHE, "exact": exact_BTHE}
    values = {s: values[s] for s in source_names(self.config)}
    fused, gates = self.fusion(feats.xn, values, keep)
    x = x_BTD + fused
    x = x + self.mlp_out(jax.nn.gelu(self.mlp_in(self.mlp_norm(x))))
    return x, gates

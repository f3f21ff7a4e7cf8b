"""The memory state: immutable pytrees passed into and returned from every stateful call.

Shape key in `memkernel.shapes`.

The tree is stored level-major: level l (leaves at l = 0) occupies flat node indices
`[level_offset(l), level_offset(l) + N / 2**l)`, and node i of level l spans leaves
`[i * 2**l, (i + 1) * 2**l)`. A node exists once every leaf under it is sealed; until then its
slot holds zeros and its span is (-1, -1).

The batch shares one position: `num_tokens` is a scalar, and the live-leaf fill and the number of
sealed leaves are derived from it.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from memkernel.kernel.config import KernelConfig


def level_offset(num_leaves: int, level: int) -> int:
  """Flat index of the first node of `level` in the level-major store."""
  return 2 * num_leaves - 2 * num_leaves // (1 << level)


@flax.struct.dataclass
class LayerMemory:
  """Memory of one kernel layer.

  Attributes:
    roots_BRD: trunk root states after the last token.
    conv_BWD: the last W - 1 inputs of the causal convolution (W - 1 = conv_width - 1).
    live_k_BLHE, live_v_BLHE: exact-read keys / values of the live leaf's tokens (zeros past fill).
    live_rk_BLHP: routing keys of the live leaf's tokens.
    live_pool_BLH: summary pooling logits of the live leaf's tokens.
    node_keys_BSHP: routing key of every tree node (level-major).
    node_vals_BSHE: summary value of every tree node (level-major).
    node_sal_BSH: salience of every tree node: log of the pooling mass of the tokens under it.
    cache_k_BNLHE, cache_v_BNLHE: the exact token cache of sealed leaves.
  """

  roots_BRD: jax.Array
  conv_BWD: jax.Array
  live_k_BLHE: jax.Array
  live_v_BLHE: jax.Array
  live_rk_BLHP: jax.Array
  live_pool_BLH: jax.Array
  node_keys_BSHP: jax.Array
  node_vals_BSHE: jax.Array
  node_sal_BSH: jax.Array
  cache_k_BNLHE: jax.Array
  cache_v_BNLHE: jax.Array


@flax.struct.dataclass
class Memory:
  """The whole model's memory: one `LayerMemory` per layer plus the shared position.

  Attributes:
    layers: per-layer memories.
    num_tokens: int32 scalar, tokens consumed so far (the same for the whole batch).
    node_span_S2: int32 [S, 2], the leaf span [start, end) of every existing tree node, (-1, -1)
      for nodes not complete yet.
    leaf_size: static L.
  """

  layers: tuple[LayerMemory, ...]
  num_tokens: jax.Array
  node_span_S2: jax.Array
  leaf_size: int = flax.struct.field(pytree_node=False, default=16)

  @property
  def fill(self) -> jax.Array:
    """Tokens in the live leaf."""
    return self.num_tokens % self.leaf_size

  @property
  def num_sealed(self) -> jax.Array:
    """Sealed leaves, which are exactly the leaves in global memory."""
    return self.num_tokens // self.leaf_size


def init_layer_memory(config: KernelConfig, batch_size: int) -> LayerMemory:
  c = config
  f32 = jnp.float32
  b, l, h, e, p = batch_size, c.leaf_size, c.num_route_heads, c.read_dim, c.key_dim
  return LayerMemory(
      roots_BRD=jnp.zeros((b, c.num_roots, c.d_model), f32),
      conv_BWD=jnp.zeros((b, c.conv_width - 1, c.d_model), f32),
      live_k_BLHE=jnp.zeros((b, l, h, e), f32),
      live_v_BLHE=jnp.zeros((b, l, h, e), f32),
      live_rk_BLHP=jnp.zeros((b, l, h, p), f32),
      live_pool_BLH=jnp.zeros((b, l, h), f32),
      node_keys_BSHP=jnp.zeros((b, c.num_nodes, h, p), f32),
      node_vals_BSHE=jnp.zeros((b, c.num_nodes, h, e), f32),
      node_sal_BSH=jnp.zeros((b, c.num_nodes, h), f32),
      cache_k_BNLHE=jnp.zeros((b, c.num_leaves, l, h, e), f32),
      cache_v_BNLHE=jnp.zeros((b, c.num_leaves, l, h, e), f32),
  )


def init_memory(config: KernelConfig, batch_size: int) -> Memory:
  """The empty memory of a model with `config`, for `batch_size` sequences."""
  if not isinstance(batch_size, int) or batch_size <= 0:
    raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
  return Memory(
      layers=tuple(init_layer_memory(config, batch_size) for _ in range(config.num_layers)),
      num_tokens=jnp.zeros((), jnp.int32),
      node_span_S2=jnp.full((config.num_nodes, 2), -1, jnp.int32),
      leaf_size=config.leaf_size,
  )


def memory_bytes(memory: Memory) -> int:
  """Bytes held by a memory pytree."""
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(memory))

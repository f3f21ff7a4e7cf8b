"""The memory state: immutable pytrees passed into and returned from every stateful call.

Shape key in `memkernel.shapes`.

A layer's memory is composed of the parts its sublayers own (as a recurrent block's cache is built
from its sublayers' caches), each with an `init_*` function returning zeros and the one update it
owns: `TrunkState` (the trunk's recurrences and convolution), `LiveLeaf` (the tokens of the leaf
being filled; `append`), `TreeStore` (the sealed summary tree; `insert`) and `TokenCache` (the
exact tokens of sealed leaves; `write`); `prefill` seals K leaves at once (`insert_leaves`,
`write_leaves`). Beside the layers, a memory may keep `TokenPresence` (which tokens every node's
tokens follow; `advance`, `seal_leaves`), the store routing hints read.

The tree is stored level-major: level l (leaves at l = 0) occupies flat node indices
`[level_offset(l), level_offset(l) + N / 2**l)`, and node i of level l spans leaves
`[i * 2**l, (i + 1) * 2**l)`. A node exists once every leaf under it is sealed; until then its
slot holds zeros and its span is (-1, -1).

The batch shares one position: `num_tokens` is a scalar, and the live-leaf fill and the number of
sealed leaves are derived from it. Document streams are per row: the document of the last token,
where the current document started, and the document of every sealed leaf.
"""

from __future__ import annotations

import functools
from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp

from memkernel.kernel import tree as tree_lib
from memkernel.kernel.config import KernelConfig
from memkernel.kernel.tree import level_offset  # pylint: disable=unused-import


@flax.struct.dataclass
class TrunkState:
  """The trunk's state after the last token.

  Attributes:
    roots_BRD: root recurrence states.
    conv_BWD: the last W - 1 normed inputs of the causal convolution (W = conv_width).
  """

  roots_BRD: jax.Array
  conv_BWD: jax.Array


@flax.struct.dataclass
class LiveLeaf:
  """The tokens of the leaf being filled (zeros past the fill).

  Attributes:
    k_BLHE, v_BLHE: exact-read keys / values.
    rk_BLHP: routing keys.
    pool_BLH: summary pooling logits.
  """

  k_BLHE: jax.Array
  v_BLHE: jax.Array
  rk_BLHP: jax.Array
  pool_BLH: jax.Array

  def append(self, new: "LiveLeaf", fill: jax.Array, seals: jax.Array):
    """Writes C <= L new tokens at `fill`; at most one leaf completes.

    Args:
      new: the chunk's tokens, each field [B, C, ...].
      fill: tokens already in the live leaf (traced scalar).
      seals: whether the leaf completes inside the chunk (fill + C >= L).
    Returns:
      (the leaf holding the first L buffered tokens, which is the completed leaf when `seals`;
      the live leaf after the chunk).
    """
    def buffer(live, x):
      b, l = live.shape[:2]
      pad = jnp.zeros((b, 2 * l - x.shape[1]) + live.shape[2:], live.dtype)
      buf = jnp.concatenate([live, pad], axis=1)       # [B, 2L, ...]
      return jax.lax.dynamic_update_slice_in_dim(buf, x.astype(live.dtype), fill, axis=1)

    bufs = jax.tree.map(buffer, self, new)
    l = self.k_BLHE.shape[1]
    leaf = jax.tree.map(lambda y: y[:, :l], bufs)
    live = jax.tree.map(
        lambda y: jax.lax.dynamic_slice_in_dim(y, seals.astype(jnp.int32) * l, l, axis=1), bufs)
    return leaf, live


@flax.struct.dataclass
class TreeStore:
  """The sealed summary tree (level-major, see the module docstring).

  Attributes:
    node_keys_BSHP: routing key of every node.
    node_vals_BSHE: summary value of every node.
    node_sal_BSH: salience of every node: log of the pooling mass of the tokens under it.
    rep_keys_BSHMP, rep_sal_BSHM: the routing keys and pooling logits of every node's M most
      salient tokens (`tree.leaf_reps`), or None when the config keeps none (`node_reps` 0).
  """

  node_keys_BSHP: jax.Array
  node_vals_BSHE: jax.Array
  node_sal_BSH: jax.Array
  rep_keys_BSHMP: Optional[jax.Array] = None
  rep_sal_BSHM: Optional[jax.Array] = None

  @property
  def reps(self) -> Optional[tuple[jax.Array, jax.Array]]:
    """(rep_keys, rep_sal), or None: what `routing.route_beam(node_reps=...)` takes."""
    return None if self.rep_keys_BSHMP is None else (self.rep_keys_BSHMP, self.rep_sal_BSHM)

  def insert(self, node_span_S2, leaf_key_BHP, leaf_val_BHE, leaf_sal_BH, leaf_index, do_insert,
             pooled: bool, leaf_doc_BN: Optional[jax.Array] = None, leaf_reps=None):
    """Seals one leaf summary and, when the store keeps representatives, the leaf's `leaf_reps`
    (rep_key [B, H, M, P], rep_sal [B, H, M]) in one carry chain (`tree.insert_levels`);
    returns (TreeStore, node_span_S2)."""
    stores = (self.node_keys_BSHP, self.node_vals_BSHE, self.node_sal_BSH)
    leaf = (leaf_key_BHP, leaf_val_BHE, leaf_sal_BH)
    merge = functools.partial(tree_lib.merge_nodes, pooled=pooled)
    if self.reps is not None:
      if leaf_reps is None:
        raise ValueError("this tree store keeps representative keys; pass the leaf's leaf_reps")
      stores, leaf = stores + self.reps, leaf + tuple(leaf_reps)
      merge = functools.partial(tree_lib.merge_nodes_and_reps, pooled=pooled)
    stores, span = tree_lib.insert_levels(stores, node_span_S2, leaf, leaf_index, do_insert,
                                          merge, leaf_doc_BN)
    return TreeStore(*stores), span

  def insert_leaves(self, node_span_S2, leaf_key_BKHP, leaf_val_BKHE, leaf_sal_BKH, first_index,
                    pooled: bool, leaf_doc_BN: Optional[jax.Array] = None, leaf_reps=None):
    """Seals K consecutive leaves, `first_index` onwards, one `insert` after another (fields
    [B, K, ...], `leaf_reps` likewise); returns (TreeStore, node_span_S2)."""
    def body(j, carry):
      tree, span = carry
      take = lambda x: jax.lax.dynamic_index_in_dim(x, j, axis=1, keepdims=False)
      reps = None if leaf_reps is None else tuple(take(x) for x in leaf_reps)
      return tree.insert(span, take(leaf_key_BKHP), take(leaf_val_BKHE), take(leaf_sal_BKH),
                         first_index + j, jnp.bool_(True), pooled, leaf_doc_BN, reps)
    return jax.lax.fori_loop(0, leaf_key_BKHP.shape[1], body, (self, node_span_S2))


@flax.struct.dataclass
class TokenCache:
  """The exact keys and values of every sealed leaf's tokens.

  Attributes:
    k_BNLHE, v_BNLHE: per leaf slot, its L tokens' keys / values (zeros until sealed).
  """

  k_BNLHE: jax.Array
  v_BNLHE: jax.Array

  def write(self, leaf: LiveLeaf, index: jax.Array, cond: jax.Array) -> "TokenCache":
    """Writes a completed leaf's keys and values into slot `index` when `cond`."""
    return TokenCache(_write_slot(self.k_BNLHE, leaf.k_BLHE, index, cond),
                      _write_slot(self.v_BNLHE, leaf.v_BLHE, index, cond))

  def write_leaves(self, k_BKLHE, v_BKLHE, first_index) -> "TokenCache":
    """Writes K consecutive completed leaves into slots `first_index` onwards (the caller keeps
    them inside the cache's N slots)."""
    put = lambda store, x: jax.lax.dynamic_update_slice_in_dim(store, x.astype(store.dtype),
                                                               first_index, axis=1)
    return TokenCache(put(self.k_BNLHE, k_BKLHE), put(self.v_BNLHE, v_BKLHE))


def _write_slot(store_BN, value_B, index, cond):
  n = store_BN.shape[1]
  safe = jnp.minimum(index, n - 1)
  old = jax.lax.dynamic_index_in_dim(store_BN, safe, axis=1, keepdims=False)
  new = jnp.where(cond & (index < n), value_B, old)
  return jax.lax.dynamic_update_index_in_dim(store_BN, new, safe, axis=1)


@flax.struct.dataclass
class TokenPresence:
  """Which tokens every sealed node's tokens follow: `tree.build_presence`'s store, kept
  incrementally for the routing hints of the recurrent forms. Shared by the layers (it depends
  on the tokens only); a sealed leaf writes O(log N) nodes of W words.

  Attributes:
    nodes_BSW: uint32, every node's set of tokens, packed (`tree.presence_words`).
    live_BW: uint32, the set of the live leaf's tokens so far.
    last_B: int32, the last token consumed (-1 before any): the token the next one follows.
  """

  nodes_BSW: jax.Array
  live_BW: jax.Array
  last_B: jax.Array

  def advance(self, tokens_BC, leaf_size: int, fill, seals, node_span_S2, leaf_index,
              leaf_doc_BN: Optional[jax.Array] = None) -> "TokenPresence":
    """Adds C <= L new tokens starting at `fill` of the live leaf (at most one leaf seals, as in
    `LiveLeaf.append`); when `seals`, the completed leaf's set goes into the nodes at
    `leaf_index` (`tree.insert_levels`; `leaf_doc_BN` as there)."""
    c = tokens_BC.shape[1]
    before = jnp.concatenate([self.last_B[:, None], tokens_BC[:, :-1].astype(jnp.int32)], axis=1)
    bits = tree_lib.token_bits(before, self.live_BW.shape[-1])             # [B, C, W]
    in_leaf = (fill + jnp.arange(c) < leaf_size)[None, :, None]
    leaf = self.live_BW | tree_lib.union(jnp.where(in_leaf, bits, jnp.uint32(0)), axis=1)
    after = tree_lib.union(jnp.where(in_leaf, jnp.uint32(0), bits), axis=1)
    (nodes,), _ = tree_lib.insert_levels((self.nodes_BSW,), node_span_S2, (leaf,), leaf_index,
                                         seals, tree_lib.merge_presence, leaf_doc_BN)
    return TokenPresence(nodes_BSW=nodes, live_BW=jnp.where(seals, after, leaf),
                         last_B=tokens_BC[:, -1].astype(jnp.int32))

  def seal_leaves(self, tokens_BC, leaf_size: int, node_span_S2, first_index,
                  leaf_doc_BN: Optional[jax.Array] = None) -> "TokenPresence":
    """Adds C = K * L new tokens that start a leaf (the live leaf is empty) and seals their K
    leaves at `first_index` onwards."""
    b, c = tokens_BC.shape
    before = jnp.concatenate([self.last_B[:, None], tokens_BC[:, :-1].astype(jnp.int32)], axis=1)
    bits = tree_lib.union(tree_lib.token_bits(before.reshape(b, c // leaf_size, leaf_size),
                                              self.live_BW.shape[-1]), axis=2)   # [B, K, W]

    def body(j, carry):
      nodes, span = carry
      leaf = jax.lax.dynamic_index_in_dim(bits, j, axis=1, keepdims=False)
      (nodes,), span = tree_lib.insert_levels((nodes,), span, (leaf,), first_index + j,
                                              jnp.bool_(True), tree_lib.merge_presence,
                                              leaf_doc_BN)
      return nodes, span

    nodes, _ = jax.lax.fori_loop(0, bits.shape[1], body, (self.nodes_BSW, node_span_S2))
    return TokenPresence(nodes_BSW=nodes, live_BW=jnp.zeros_like(self.live_BW),
                         last_B=tokens_BC[:, -1].astype(jnp.int32))


@flax.struct.dataclass
class LayerMemory:
  """Memory of one kernel layer, composed of its parts."""

  trunk: TrunkState
  live: LiveLeaf
  tree: TreeStore
  cache: TokenCache


@flax.struct.dataclass
class Memory:
  """The whole model's memory: one `LayerMemory` per layer plus the shared position.

  Attributes:
    layers: per-layer memories.
    num_tokens: int32 scalar, tokens consumed so far (the same for the whole batch).
    node_span_S2: int32 [S, 2], the leaf span [start, end) of every existing tree node, (-1, -1)
      for nodes not complete yet.
    segment_B: int32 [B], the document of the last token consumed (-1 before any); a call
      without `segments` continues it.
    doc_start_B: int32 [B], the position where each row's current document started.
    leaf_doc_BN: int32 [B, N], the document of every sealed leaf (-1 for unsealed slots).
    leaf_size: static L.
    presence: the tokens every node follows (`TokenPresence`), kept only by a memory made with
      `init_memory(..., presence=True)`: routing hints in the recurrent forms need it.
  """

  layers: tuple[LayerMemory, ...]
  num_tokens: jax.Array
  node_span_S2: jax.Array
  segment_B: jax.Array
  doc_start_B: jax.Array
  leaf_doc_BN: jax.Array
  leaf_size: int = flax.struct.field(pytree_node=False, default=16)
  presence: Optional[TokenPresence] = None

  @property
  def fill(self) -> jax.Array:
    """Tokens in the live leaf."""
    return self.num_tokens % self.leaf_size

  @property
  def num_sealed(self) -> jax.Array:
    """Sealed leaves, which are exactly the leaves in global memory."""
    return self.num_tokens // self.leaf_size


def init_trunk_state(config: KernelConfig, batch_size: int) -> TrunkState:
  c = config
  return TrunkState(roots_BRD=jnp.zeros((batch_size, c.num_roots, c.d_model), jnp.float32),
                    conv_BWD=jnp.zeros((batch_size, c.conv_width - 1, c.d_model), jnp.float32))


def init_live_leaf(config: KernelConfig, batch_size: int) -> LiveLeaf:
  c = config
  b, l, h, e, p = batch_size, c.leaf_size, c.num_route_heads, c.read_dim, c.key_dim
  return LiveLeaf(k_BLHE=jnp.zeros((b, l, h, e), jnp.float32),
                  v_BLHE=jnp.zeros((b, l, h, e), jnp.float32),
                  rk_BLHP=jnp.zeros((b, l, h, p), jnp.float32),
                  pool_BLH=jnp.zeros((b, l, h), jnp.float32))


def init_tree_store(config: KernelConfig, batch_size: int) -> TreeStore:
  c = config
  b, s, h = batch_size, c.num_nodes, c.num_route_heads
  m = c.node_reps
  return TreeStore(node_keys_BSHP=jnp.zeros((b, s, h, c.key_dim), jnp.float32),
                   node_vals_BSHE=jnp.zeros((b, s, h, c.read_dim), jnp.float32),
                   node_sal_BSH=jnp.zeros((b, s, h), jnp.float32),
                   rep_keys_BSHMP=jnp.zeros((b, s, h, m, c.key_dim), jnp.float32) if m else None,
                   rep_sal_BSHM=jnp.zeros((b, s, h, m), jnp.float32) if m else None)


def init_token_cache(config: KernelConfig, batch_size: int) -> TokenCache:
  c = config
  shape = (batch_size, c.num_leaves, c.leaf_size, c.num_route_heads, c.read_dim)
  return TokenCache(k_BNLHE=jnp.zeros(shape, jnp.float32), v_BNLHE=jnp.zeros(shape, jnp.float32))


def init_layer_memory(config: KernelConfig, batch_size: int) -> LayerMemory:
  return LayerMemory(trunk=init_trunk_state(config, batch_size),
                     live=init_live_leaf(config, batch_size),
                     tree=init_tree_store(config, batch_size),
                     cache=init_token_cache(config, batch_size))


def init_token_presence(config: KernelConfig, batch_size: int) -> TokenPresence:
  w = tree_lib.presence_words(config.vocab_size)
  return TokenPresence(nodes_BSW=jnp.zeros((batch_size, config.num_nodes, w), jnp.uint32),
                       live_BW=jnp.zeros((batch_size, w), jnp.uint32),
                       last_B=jnp.full((batch_size,), -1, jnp.int32))


def init_memory(config: KernelConfig, batch_size: int, *, presence: bool = False) -> Memory:
  """The empty memory of a model with `config`, for `batch_size` sequences; with `presence`,
  it also keeps the tokens every tree node follows (`TokenPresence`, 4 * ceil(V / 32) bytes
  per node and sequence), which routing hints in `scan`, `step` and `prefill` read."""
  if not isinstance(batch_size, int) or batch_size <= 0:
    raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
  return Memory(
      layers=tuple(init_layer_memory(config, batch_size) for _ in range(config.num_layers)),
      num_tokens=jnp.zeros((), jnp.int32),
      node_span_S2=jnp.full((config.num_nodes, 2), -1, jnp.int32),
      segment_B=jnp.full((batch_size,), -1, jnp.int32),
      doc_start_B=jnp.zeros((batch_size,), jnp.int32),
      leaf_doc_BN=jnp.full((batch_size, config.num_leaves), -1, jnp.int32),
      leaf_size=config.leaf_size,
      presence=init_token_presence(config, batch_size) if presence else None,
  )


def memory_bytes(memory: Memory) -> int:
  """Bytes held by a memory pytree."""
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(memory))

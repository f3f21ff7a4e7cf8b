"""The peers' memory: a KV cache per layer, as immutable pytrees passed in and returned.

The dense peer keeps every position (`max_seq_len` slots; slot p holds position p). The
sliding-window peer keeps a ring buffer of the last `window` positions (slot p % window holds
position p), so its state does not grow with the stream. The batch shares one position.

Shape key in `memkernel.peers.attention` (S: cache slots).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from memkernel.peers.config import PeerConfig


@flax.struct.dataclass
class LayerCache:
  """Rotated keys and values of one attention layer.

  Attributes:
    k_BSNH, v_BSNH: float32 [B, S, N, H], zeros where no position was written.
  """

  k_BSNH: jax.Array
  v_BSNH: jax.Array


@flax.struct.dataclass
class PeerMemory:
  """A peer's whole memory.

  Attributes:
    layers: per-layer caches.
    key_segments_BS: int32 [B, S], the document of the position each slot holds.
    segment_B: int32 [B], the document of the last token consumed (0 before any): a call without
      `segments` continues it.
    position: int32 scalar, tokens consumed so far (the same for the whole batch).
    ring: static; True for the sliding window's ring buffer, False for the dense cache.
  """

  layers: tuple[LayerCache, ...]
  key_segments_BS: jax.Array
  segment_B: jax.Array
  position: jax.Array
  ring: bool = flax.struct.field(pytree_node=False, default=False)

  @property
  def num_slots(self) -> int:
    """S: positions the cache holds."""
    return self.key_segments_BS.shape[1]

  def slot_positions(self) -> jax.Array:
    """int32 [S]: the absolute position each slot holds before the next write (< 0: none yet;
    a dense slot >= position holds nothing yet either)."""
    slots = jnp.arange(self.num_slots, dtype=jnp.int32)
    if not self.ring:
      return slots
    last = self.position - 1
    return last - jnp.mod(last - slots, self.num_slots)


def init_memory(config: PeerConfig, batch_size: int) -> PeerMemory:
  """The empty memory of a peer with `config`, for `batch_size` sequences."""
  if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size <= 0:
    raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
  shape = (batch_size, config.cache_len, config.num_heads, config.head_dim)
  layer = lambda: LayerCache(k_BSNH=jnp.zeros(shape, jnp.float32),
                             v_BSNH=jnp.zeros(shape, jnp.float32))
  return PeerMemory(
      layers=tuple(layer() for _ in range(config.num_layers)),
      key_segments_BS=jnp.zeros((batch_size, config.cache_len), jnp.int32),
      segment_B=jnp.zeros((batch_size,), jnp.int32),
      position=jnp.zeros((), jnp.int32),
      ring=config.kind == "sliding_window",
  )


def write(cache_BS: jax.Array, new_BQ: jax.Array, position: jax.Array, ring: bool) -> jax.Array:
  """Writes Q new entries (positions position .. position + Q - 1) into the slots [B, S, ...].

  Dense: slots position .. position + Q - 1 (the caller keeps position + Q <= S). Ring: slot
  p % S for the last min(Q, S) of them.
  """
  new_BQ = new_BQ.astype(cache_BS.dtype)
  if not ring:
    return jax.lax.dynamic_update_slice_in_dim(cache_BS, new_BQ, position, axis=1)
  num_slots, q = cache_BS.shape[1], new_BQ.shape[1]
  kept = min(q, num_slots)
  slots = jnp.mod(position + q - kept + jnp.arange(kept), num_slots)
  return cache_BS.at[:, slots].set(new_BQ[:, q - kept:])


def memory_bytes(memory: PeerMemory) -> int:
  """Bytes held by a memory pytree."""
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(memory))

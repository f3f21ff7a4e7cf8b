"""The brain-core's working memory (seed 002, WM): causal attention over the last W tokens, kept
in a ring buffer of W slots, so its state does not grow with the stream.

    wm = WorkingMemory(d_model=64, num_heads=4, window=256)
    cache = init_window(batch_size, window=256, num_heads=4, head_dim=16)
    y_BQD, cache = wm.apply(params, x_BQD, cache, segments_BQ)   # any chunking, same outputs

The attention arithmetic, rotary positions and ring writes are the sliding-window peer's
(`memkernel.peers.attention`, `memkernel.peers.memory.write`); this module holds the projections
and the per-layer cache. A query sees keys at distance 0 .. W-1 in its own document (keys of an
earlier document are masked: working memory resets at a boundary) or, with `carry`, in any.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from memkernel.peers import attention
from memkernel.peers import memory as peer_memory


@flax.struct.dataclass
class WindowCache:
  """The last W tokens' rotated keys and values [B, W, N, H], their documents [B, W] and the
  number of tokens seen (shared by the batch)."""
  k_BSNH: jax.Array
  v_BSNH: jax.Array
  segments_BS: jax.Array
  position: jax.Array

  def slot_positions(self) -> jax.Array:
    """int32 [W]: the position each slot holds (< 0: none yet)."""
    w = self.segments_BS.shape[1]
    last = self.position - 1
    return last - jnp.mod(last - jnp.arange(w, dtype=jnp.int32), w)


def init_window(batch_size: int, window: int, num_heads: int, head_dim: int) -> WindowCache:
  """An empty window."""
  shape = (batch_size, window, num_heads, head_dim)
  return WindowCache(jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32),
                     jnp.zeros((batch_size, window), jnp.int32), jnp.zeros((), jnp.int32))


class WorkingMemory(nn.Module):
  """Sliding-window attention with a ring-buffer cache; returns the attention's output only (the
  caller adds it to the residual stream)."""

  d_model: int
  num_heads: int
  window: int
  carry: bool = False
  # Token shift: keys also read the previous token's input (`x_previous`). Initialised as an
  # associative-recall prior: a key is the previous token projected exactly as a query projects
  # the current one (k_j = R x_{j-1}, q_t = R x_t), so a query finds the token after its match.
  shift: bool = False
  # Rotary positions on queries and keys (the sliding-window peer's). Without them attention
  # matches content alone and order comes from the recurrent core, as in hybrid models.
  rope: bool = True

  @nn.compact
  def __call__(self, x_BQD: jax.Array, cache: WindowCache,
               segments_BQ: Optional[jax.Array] = None,
               x_previous_BQD: Optional[jax.Array] = None,
               blockwise: bool = False) -> tuple[jax.Array, WindowCache]:
    """(the attention's output [B, Q, D], the cache after the chunk).

    `blockwise`: the chunk is a whole sequence and `cache` is empty (the parallel form): the
    attention runs in blocks of W over the sequence at once (the sliding-window peer's
    `blockwise_sliding_window_attention`) instead of against the ring and the chunk.
    """
    b, q = x_BQD.shape[:2]
    if self.shift and x_previous_BQD is None:
      raise ValueError("WorkingMemory(shift=True) needs x_previous_BQD, each token's predecessor")
    if self.d_model % self.num_heads:
      raise ValueError(f"WorkingMemory: d_model {self.d_model} is not a multiple of num_heads "
                       f"{self.num_heads}")
    heads = (self.num_heads, self.d_model // self.num_heads)
    if cache.k_BSNH.shape[1:] != (self.window,) + heads:
      raise ValueError(f"WorkingMemory: the cache holds {cache.k_BSNH.shape[1:]} slots and "
                       f"heads; this layer needs {(self.window,) + heads}")
    segments_BQ = jnp.zeros((b, q), jnp.int32) if segments_BQ is None else segments_BQ
    positions_Q = cache.position + jnp.arange(q, dtype=jnp.int32)
    query = nn.DenseGeneral(heads, use_bias=False, name="query")
    rope = attention.apply_rope if self.rope else lambda x, _: x
    q_BQNH = rope(query(x_BQD), positions_Q)
    key_init = nn.initializers.zeros if self.shift else nn.initializers.lecun_normal()
    k_BQNH = nn.DenseGeneral(heads, use_bias=False, kernel_init=key_init, name="key")(x_BQD)
    if self.shift:
      r = query.variables["params"]["kernel"]
      previous = self.param("key_previous", lambda *_: jnp.asarray(r), r.shape)
      k_BQNH = k_BQNH + jnp.einsum("bqd,dnh->bqnh", x_previous_BQD, previous)
    k_BQNH = rope(k_BQNH, positions_Q)
    v_BQNH = nn.DenseGeneral(heads, use_bias=False, name="value")(x_BQD)
    out = nn.DenseGeneral(self.d_model, axis=(-2, -1), use_bias=False, name="out")
    if blockwise:
      o_BQNH = attention.blockwise_sliding_window_attention(
          q_BQNH, k_BQNH.astype(jnp.float32), v_BQNH.astype(jnp.float32), self.window,
          None if self.carry else segments_BQ)
      return out(o_BQNH), self._written(cache, k_BQNH, v_BQNH, segments_BQ)
    # Keys: the ring's (positions before the chunk), then the chunk's own.
    key_positions = jnp.concatenate([cache.slot_positions(), positions_Q])
    distance = positions_Q[:, None] - key_positions[None, :]
    mask = (distance >= 0) & (distance < self.window) & (key_positions >= 0)[None, :]
    mask = mask[None, None]
    if not self.carry:
      key_segments = jnp.concatenate([cache.segments_BS, segments_BQ], axis=1)
      mask = mask & attention.document_mask(segments_BQ, key_segments)
    keys = jnp.concatenate([cache.k_BSNH, k_BQNH.astype(jnp.float32)], axis=1)
    values = jnp.concatenate([cache.v_BSNH, v_BQNH.astype(jnp.float32)], axis=1)
    o_BQNH = attention.masked_attention(q_BQNH, keys, values, mask)
    return out(o_BQNH), self._written(cache, k_BQNH, v_BQNH, segments_BQ)

  @staticmethod
  def _written(cache: WindowCache, k_BQNH, v_BQNH, segments_BQ) -> WindowCache:
    q = k_BQNH.shape[1]
    return WindowCache(peer_memory.write(cache.k_BSNH, k_BQNH, cache.position, True),
                       peer_memory.write(cache.v_BSNH, v_BQNH, cache.position, True),
                       peer_memory.write(cache.segments_BS, segments_BQ, cache.position, True),
                       cache.position + q)

"""Pure attention functions of the peers (no Flax): RoPE, masks and the attention forms.

Every form takes rotated queries, keys and values [B, T, N, H] and an optional document index
`segments_BT` (int32 [B, T]): given, a query attends only to keys of its own document (the
'reset' boundary); None, the sequence is one document.

Shape key (the peers' own; `memkernel.shapes` has the library's): B batch, T tokens, N heads,
H head width, Q queries, S keys, C blocks, W block size (the window).
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

ROPE_MAX_WAVELENGTH = 10_000.0


def apply_rope(x_BTNH: jax.Array, positions_T: jax.Array,
               max_wavelength: float = ROPE_MAX_WAVELENGTH) -> jax.Array:
  """Rotary position embedding: rotates the two halves of each head by position-dependent angles.

  Args:
    x_BTNH: queries or keys, [B, T, N, H] with H even.
    positions_T: absolute positions, [T].
    max_wavelength: the slowest rotation's wavelength, in tokens.

  Returns:
    The rotated array, [B, T, N, H], in x's dtype (computed in float32).
  """
  half = x_BTNH.shape[-1] // 2
  inv_freq = max_wavelength ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles_TK = positions_T.astype(jnp.float32)[:, None] * inv_freq[None, :]
  sin = jnp.sin(angles_TK)[None, :, None, :]
  cos = jnp.cos(angles_TK)[None, :, None, :]
  x1, x2 = jnp.split(x_BTNH.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x_BTNH.dtype)


def band_mask(num_queries: int, num_keys: int, window: int | None, offset: int = 0) -> np.ndarray:
  """Boolean [num_queries, num_keys] mask: query i (at position i + offset) sees key j iff
  0 <= i + offset - j < window (window None: unbounded, i.e. plain causal)."""
  distance = np.arange(num_queries)[:, None] + offset - np.arange(num_keys)[None, :]
  mask = distance >= 0
  if window is not None:
    mask &= distance < window
  return mask


def document_mask(query_segments_BQ: jax.Array, key_segments_BS: jax.Array) -> jax.Array:
  """Boolean [B, 1, Q, S]: True where query and key belong to the same document."""
  return (query_segments_BQ[:, :, None] == key_segments_BS[:, None, :])[:, None]


def masked_attention(q_BQNH: jax.Array, k_BSNH: jax.Array, v_BSNH: jax.Array,
                     mask: jax.Array) -> jax.Array:
  """Softmax attention in float32 with an explicit boolean mask.

  Args:
    q_BQNH, k_BSNH, v_BSNH: queries, keys, values (leading batch-like dims may be more than one).
    mask: True where a query may attend to a key; broadcastable to [..., N, Q, S]. Every query
      must see at least one key.

  Returns:
    [..., Q, N, H] in q's dtype.
  """
  scale = 1.0 / math.sqrt(q_BQNH.shape[-1])
  logits = jnp.einsum("...qnh,...snh->...nqs", q_BQNH.astype(jnp.float32),
                      k_BSNH.astype(jnp.float32)) * scale
  logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("...nqs,...snh->...qnh", probs, v_BSNH.astype(jnp.float32))
  return out.astype(q_BQNH.dtype)


def causal_attention(q_BTNH: jax.Array, k_BTNH: jax.Array, v_BTNH: jax.Array,
                     segments_BT: Optional[jax.Array] = None) -> jax.Array:
  """Full causal attention via `jax.nn.dot_product_attention` (computes all T^2 scores on CPU)."""
  mask = None if segments_BT is None else document_mask(segments_BT, segments_BT)
  return jax.nn.dot_product_attention(q_BTNH, k_BTNH, v_BTNH, mask=mask, is_causal=True)


def blocked_causal_attention(q_BTNH: jax.Array, k_BTNH: jax.Array, v_BTNH: jax.Array,
                             block: int, segments_BT: Optional[jax.Array] = None) -> jax.Array:
  """Causal attention over blocks of `block` queries (`lax.map`), each block checkpointed.

  Equal to `causal_attention`; only one block's [B, N, block, T] scores are live at a time, in
  the forward pass and, recomputed, in the backward pass.
  """
  b, t = q_BTNH.shape[:2]
  if t <= block:
    return causal_attention(q_BTNH, k_BTNH, v_BTNH, segments_BT)
  nb = -(-t // block)
  pad = nb * block - t

  def to_blocks(x):  # [B, T, ...] -> [C, B, W, ...]
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape((b, nb, block) + x.shape[2:]), 1, 0)

  def one_block(args):
    q_BWNH, query_segments_BW, start = args
    mask = (start + jnp.arange(block))[:, None] >= jnp.arange(t)[None, :]
    if segments_BT is not None:
      mask = mask & document_mask(query_segments_BW, segments_BT)
    return masked_attention(q_BWNH, k_BTNH, v_BTNH, mask)

  query_segments = None if segments_BT is None else to_blocks(segments_BT)
  out_CBWNH = jax.lax.map(jax.checkpoint(one_block),
                          (to_blocks(q_BTNH), query_segments, jnp.arange(nb) * block))
  return jnp.moveaxis(out_CBWNH, 0, 1).reshape((b, nb * block) + q_BTNH.shape[2:])[:, :t]


def banded_attention(q_BTNH: jax.Array, k_BTNH: jax.Array, v_BTNH: jax.Array, window: int,
                     segments_BT: Optional[jax.Array] = None) -> jax.Array:
  """Sliding-window attention the O(T^2) way: a full [T, T] score matrix with a band mask.

  The reference `blockwise_sliding_window_attention` must match.
  """
  seq_len = q_BTNH.shape[1]
  mask = band_mask(seq_len, seq_len, window)
  if segments_BT is not None:
    mask = mask & document_mask(segments_BT, segments_BT)
  return masked_attention(q_BTNH, k_BTNH, v_BTNH, mask)


def sliding_window_blocking(seq_len: int, window: int) -> tuple[int, int, int]:
  """How the blockwise scheme tiles a sequence.

  Returns:
    (block_size W, num_blocks C, keys_per_query S). If the whole sequence fits in one window, one
    block of `seq_len` with plain causal masking; otherwise blocks of `window` (T padded up to
    C * W), each attending to its own block and the previous one (S = 2 * window).
  """
  if seq_len <= window:
    return seq_len, 1, seq_len
  return window, -(-seq_len // window), 2 * window


def blockwise_sliding_window_attention(q_BTNH: jax.Array, k_BTNH: jax.Array, v_BTNH: jax.Array,
                                       window: int,
                                       segments_BT: Optional[jax.Array] = None) -> jax.Array:
  """Causal sliding-window attention in O(T * window) compute and memory.

  Query at position t sees keys at positions (t - window, t]. The sequence is padded to C blocks of
  W = window; block c's queries attend to the 2W keys of blocks c-1 and c under the band mask. Padded
  keys lie after every real query, so the causal band already hides them.

  Args:
    q_BTNH, k_BTNH, v_BTNH: rotated queries, keys and values, [B, T, N, H].
    window: tokens each query sees, itself included.
    segments_BT: optional document index; a query sees only its own document's keys.

  Returns:
    [B, T, N, H].
  """
  batch, seq_len, num_heads, head_dim = q_BTNH.shape
  block, num_blocks, _ = sliding_window_blocking(seq_len, window)
  if num_blocks == 1:
    return banded_attention(q_BTNH, k_BTNH, v_BTNH, window, segments_BT)

  pad = num_blocks * block - seq_len

  def to_blocks(x):  # [B, T, ...] -> [B, C, W, ...]
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return x.reshape((batch, num_blocks, block) + x.shape[2:])

  def with_previous_block(x_BCW):  # -> [B, C, 2W, ...]
    previous = jnp.concatenate([jnp.zeros_like(x_BCW[:, :1]), x_BCW[:, :-1]], axis=1)
    return jnp.concatenate([previous, x_BCW], axis=2)

  q_BCWNH = to_blocks(q_BTNH)
  k_BCSNH = with_previous_block(to_blocks(k_BTNH))
  v_BCSNH = with_previous_block(to_blocks(v_BTNH))
  # Query a of a block sits at offset W from key 0 of the previous block.
  mask_WS = band_mask(block, 2 * block, window, offset=block)
  first_block_mask_WS = mask_WS & (np.arange(2 * block) >= block)[None, :]  # no block -1
  mask_CWS = np.concatenate([first_block_mask_WS[None],
                             np.broadcast_to(mask_WS, (num_blocks - 1, block, 2 * block))])
  mask = mask_CWS[None, :, None]  # [1, C, 1, W, S]
  if segments_BT is not None:
    segments_BCW = to_blocks(segments_BT)
    same_BCWS = segments_BCW[..., :, None] == with_previous_block(segments_BCW)[..., None, :]
    mask = mask & same_BCWS[:, :, None]
  out_BCWNH = masked_attention(q_BCWNH, k_BCSNH, v_BCSNH, mask)
  return out_BCWNH.reshape(batch, num_blocks * block, num_heads, head_dim)[:, :seq_len]

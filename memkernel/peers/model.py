"""Reference "peer" language models the memory kernel is compared with.

Two causal transformers of the same size as the kernel, run in the same harness:

* `DenseTransformer`: full causal multi-head attention (O(T^2) compute and memory).
* `SlidingWindowTransformer`: each token attends to the previous `window` tokens, itself included,
  computed blockwise so compute and memory are linear in T.

Both are pre-norm stacks of (RMSNorm -> causal multi-head attention) and (RMSNorm -> GELU MLP)
residual blocks, followed by a final RMSNorm and an *untied* LM head (the embedding and the head are
separate matrices, so the peers' parameter count is explicit and needs no weight-sharing special case).
Positions enter only through RoPE rotary embeddings on queries and keys, so no parameter shape depends
on `max_seq_len`: a trained peer is evaluated on longer inputs with
`dataclasses.replace(config, max_seq_len=...)`. No layer has a bias.

Both models share one parameter layout, so parameters initialised for one apply to the other; with
`kind='sliding_window'`, `DenseTransformer` computes the same band-masked attention the O(T^2) way and
is the reference the blockwise form is tested against.

Shape key: B batch, T tokens, D model width, N heads, H head width, V vocabulary,
C blocks, W block size (the window), S keys per query block.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from memkernel.outputs import Outputs

_KINDS = ("dense", "sliding_window")
_ROPE_MAX_WAVELENGTH = 10_000.0

AttentionFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class PeerConfig:
  """Hyper-parameters of a peer model.

  Attributes:
    kind: 'dense' (full causal attention) or 'sliding_window' (causal band of `window` tokens).
    vocab_size: number of token ids (V).
    d_model: width of the residual stream (D).
    num_layers: attention + MLP blocks.
    num_heads: attention heads (N); d_model // num_heads must be even (RoPE rotates pairs).
    mlp_ratio: hidden width of each MLP relative to d_model.
    window: tokens each query sees in the sliding-window peer, itself included; unused by 'dense'.
    max_seq_len: longest accepted input; validation only, no parameter depends on it.
    query_block: 'dense' only: attend in blocks of this many queries, each recomputed in the
      backward pass, so one block's [B, N, block, T] scores exist at a time instead of every
      layer's [B, N, T, T] (0: all queries at once, `jax.nn.dot_product_attention`). The same
      attention, as a memory-efficient dense attention computes it; the benchmark uses it so
      dense attention's train step fits at 8k on a 24 GiB machine.
  """

  kind: str
  vocab_size: int = 256
  d_model: int = 64
  num_layers: int = 2
  num_heads: int = 4
  mlp_ratio: int = 4
  window: int = 256
  max_seq_len: int = 512
  query_block: int = 0

  def __post_init__(self):
    if self.kind not in _KINDS:
      raise ValueError(f"PeerConfig.kind must be one of {_KINDS}, got {self.kind!r}")
    for name in ("vocab_size", "d_model", "num_layers", "num_heads", "mlp_ratio", "window",
                 "max_seq_len"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"PeerConfig.{name} must be a positive integer, got {value!r}")
    if (not isinstance(self.query_block, int) or isinstance(self.query_block, bool)
        or self.query_block < 0):
      raise ValueError(f"PeerConfig.query_block must be a non-negative integer, got "
                       f"{self.query_block!r}")
    if self.d_model % self.num_heads:
      raise ValueError(f"PeerConfig.num_heads must divide d_model={self.d_model}, "
                       f"got {self.num_heads!r}")
    if self.head_dim % 2:
      raise ValueError(f"PeerConfig.num_heads must leave an even head width for RoPE "
                       f"(d_model={self.d_model}), got {self.num_heads!r}")

  @property
  def family(self) -> str:
    """The registry name of the family this config belongs to (`memkernel.family`)."""
    return self.kind

  @property
  def head_dim(self) -> int:
    """H: per-head width."""
    return self.d_model // self.num_heads

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> "PeerConfig":
    """Builds a config from a mapping (e.g. a `ConfigDict`), rejecting unknown fields."""
    if hasattr(values, "to_dict"):
      values = values.to_dict()
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ValueError(f"PeerConfig got unknown field(s) {unknown}; known fields: {sorted(known)}")
    return cls(**dict(values))

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------
# Pure attention functions (no Flax). q, k, v: [B, T, N, H]; output [B, T, N, H].
# ----------------------------------------------------------------------------------------------


def apply_rope(x_BTNH: jax.Array, positions_T: jax.Array,
               max_wavelength: float = _ROPE_MAX_WAVELENGTH) -> jax.Array:
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


def _masked_attention(q_BQNH: jax.Array, k_BSNH: jax.Array, v_BSNH: jax.Array,
                      mask_QS: jax.Array) -> jax.Array:
  """Softmax attention in float32 with an explicit boolean mask broadcast over batch and heads.

  Args:
    q_BQNH, k_BSNH, v_BSNH: queries, keys, values (leading batch-like dims may be more than one).
    mask_QS: True where a query may attend to a key; broadcastable to [..., N, Q, S].
  """
  scale = 1.0 / math.sqrt(q_BQNH.shape[-1])
  logits = jnp.einsum("...qnh,...snh->...nqs", q_BQNH.astype(jnp.float32),
                      k_BSNH.astype(jnp.float32)) * scale
  logits = jnp.where(mask_QS, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("...nqs,...snh->...qnh", probs, v_BSNH.astype(jnp.float32))
  return out.astype(q_BQNH.dtype)


def causal_attention(q_BTNH: jax.Array, k_BTNH: jax.Array, v_BTNH: jax.Array) -> jax.Array:
  """Full causal attention via `jax.nn.dot_product_attention` (computes all T^2 scores on CPU)."""
  return jax.nn.dot_product_attention(q_BTNH, k_BTNH, v_BTNH, is_causal=True)


def blocked_causal_attention(q_BTNH: jax.Array, k_BTNH: jax.Array, v_BTNH: jax.Array,
                             block: int) -> jax.Array:
  """Causal attention over blocks of `block` queries (`lax.map`), each block checkpointed.

  Equal to `causal_attention`; only one block's [B, N, block, T] scores are live at a time, in
  the forward pass and, recomputed, in the backward pass.
  """
  b, t = q_BTNH.shape[:2]
  if t <= block:
    return causal_attention(q_BTNH, k_BTNH, v_BTNH)
  nb = -(-t // block)
  q_CBWNH = jnp.moveaxis(
      jnp.pad(q_BTNH, [(0, 0), (0, nb * block - t), (0, 0), (0, 0)]).reshape(
          (b, nb, block) + q_BTNH.shape[2:]), 1, 0)

  def one_block(args):
    q_BWNH, start = args
    mask_WS = (start + jnp.arange(block))[:, None] >= jnp.arange(t)[None, :]
    return _masked_attention(q_BWNH, k_BTNH, v_BTNH, mask_WS)

  out_CBWNH = jax.lax.map(jax.checkpoint(one_block), (q_CBWNH, jnp.arange(nb) * block))
  return jnp.moveaxis(out_CBWNH, 0, 1).reshape((b, nb * block) + q_BTNH.shape[2:])[:, :t]


def banded_attention(q_BTNH: jax.Array, k_BTNH: jax.Array, v_BTNH: jax.Array,
                     window: int) -> jax.Array:
  """Sliding-window attention the O(T^2) way: a full [T, T] score matrix with a band mask.

  The reference `blockwise_sliding_window_attention` must match.
  """
  seq_len = q_BTNH.shape[1]
  return _masked_attention(q_BTNH, k_BTNH, v_BTNH, band_mask(seq_len, seq_len, window))


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
                                       window: int) -> jax.Array:
  """Causal sliding-window attention in O(T * window) compute and memory.

  Query at position t sees keys at positions (t - window, t]. The sequence is padded to C blocks of
  W = window; block c's queries attend to the 2W keys of blocks c-1 and c under the band mask. Padded
  keys lie after every real query, so the causal band already hides them.

  Args:
    q_BTNH, k_BTNH, v_BTNH: rotated queries, keys and values, [B, T, N, H].
    window: tokens each query sees, itself included.

  Returns:
    [B, T, N, H].
  """
  batch, seq_len, num_heads, head_dim = q_BTNH.shape
  block, num_blocks, _ = sliding_window_blocking(seq_len, window)
  if num_blocks == 1:
    return _masked_attention(q_BTNH, k_BTNH, v_BTNH, band_mask(seq_len, seq_len, window))

  pad = num_blocks * block - seq_len
  pad_width = ((0, 0), (0, pad), (0, 0), (0, 0))
  to_blocks = lambda x: jnp.pad(x, pad_width).reshape(batch, num_blocks, block, num_heads, head_dim)
  q_BCWNH, k_BCWNH, v_BCWNH = to_blocks(q_BTNH), to_blocks(k_BTNH), to_blocks(v_BTNH)

  def with_previous_block(x_BCWNH):
    previous = jnp.concatenate([jnp.zeros_like(x_BCWNH[:, :1]), x_BCWNH[:, :-1]], axis=1)
    return jnp.concatenate([previous, x_BCWNH], axis=2)  # [B, C, 2W, N, H]

  k_BCSNH, v_BCSNH = with_previous_block(k_BCWNH), with_previous_block(v_BCWNH)
  # Query a of a block sits at offset W from key 0 of the previous block.
  mask_WS = band_mask(block, 2 * block, window, offset=block)
  first_block_mask_WS = mask_WS & (np.arange(2 * block) >= block)[None, :]  # no block -1
  mask_CWS = np.concatenate([first_block_mask_WS[None],
                             np.broadcast_to(mask_WS, (num_blocks - 1, block, 2 * block))])
  out_BCWNH = _masked_attention(q_BCWNH, k_BCSNH, v_BCSNH, mask_CWS[None, :, None])
  return out_BCWNH.reshape(batch, num_blocks * block, num_heads, head_dim)[:, :seq_len]


# ----------------------------------------------------------------------------------------------
# Flax modules.
# ----------------------------------------------------------------------------------------------


class PeerBlock(nn.Module):
  """Pre-norm residual block: x + Attn(RMSNorm(x)), then x + MLP(RMSNorm(x))."""

  config: PeerConfig
  attention_fn: AttentionFn

  @nn.compact
  def __call__(self, x_BTD: jax.Array, positions_T: jax.Array) -> jax.Array:
    cfg = self.config
    heads = (cfg.num_heads, cfg.head_dim)
    h_BTD = nn.RMSNorm(name="attention_norm")(x_BTD)
    q_BTNH = nn.DenseGeneral(heads, use_bias=False, name="query")(h_BTD)
    k_BTNH = nn.DenseGeneral(heads, use_bias=False, name="key")(h_BTD)
    v_BTNH = nn.DenseGeneral(heads, use_bias=False, name="value")(h_BTD)
    q_BTNH = apply_rope(q_BTNH, positions_T)
    k_BTNH = apply_rope(k_BTNH, positions_T)
    o_BTNH = self.attention_fn(q_BTNH, k_BTNH, v_BTNH)
    x_BTD = x_BTD + nn.DenseGeneral(cfg.d_model, axis=(-2, -1), use_bias=False,
                                    name="attention_out")(o_BTNH)

    h_BTD = nn.RMSNorm(name="mlp_norm")(x_BTD)
    h_BTF = nn.gelu(nn.Dense(cfg.mlp_ratio * cfg.d_model, use_bias=False, name="mlp_in")(h_BTD))
    return x_BTD + nn.Dense(cfg.d_model, use_bias=False, name="mlp_out")(h_BTF)


class _PeerLM(nn.Module):
  """Embedding -> `num_layers` PeerBlocks -> RMSNorm -> untied LM head. Subclasses pick attention."""

  config: PeerConfig

  def attention_fn(self) -> AttentionFn:
    raise NotImplementedError

  @nn.compact
  def __call__(self, tokens: jax.Array, segments: Any = None, *, oracle_leaves: Any = None,
               train: bool = False, loss_mask: Any = None,
               interventions: Any = None) -> tuple[jax.Array, Outputs]:
    """Next-token logits (the family protocol's parallel form, `memkernel.family`).

    Args:
      tokens: int32 [B, T] with T <= max_seq_len.
      segments: document index per token [B, T] (not supported yet: must be None).
      oracle_leaves, train, loss_mask, interventions: the harness interface; a peer has no
        routes, no train-only behaviour and no sources to drop.

    Returns:
      logits float32 [B, T, V] and empty `Outputs`.
    """
    del oracle_leaves, train, loss_mask, interventions
    if segments is not None:
      raise ValueError("the attention peers do not take document streams yet (segments=None)")
    cfg = self.config
    if tokens.ndim != 2:
      raise ValueError(f"tokens must be [B, T], got shape {tokens.shape}")
    seq_len = tokens.shape[1]
    if seq_len > cfg.max_seq_len:
      raise ValueError(f"sequence length {seq_len} exceeds PeerConfig.max_seq_len="
                       f"{cfg.max_seq_len}")
    positions_T = jnp.arange(seq_len)
    x_BTD = nn.Embed(cfg.vocab_size, cfg.d_model, name="embed")(tokens)
    attention_fn = self.attention_fn()
    for layer in range(cfg.num_layers):
      x_BTD = PeerBlock(cfg, attention_fn, name=f"block_{layer}")(x_BTD, positions_T)
    x_BTD = nn.RMSNorm(name="final_norm")(x_BTD)
    logits_BTV = nn.Dense(cfg.vocab_size, use_bias=False, name="lm_head")(x_BTD)
    return logits_BTV.astype(jnp.float32), Outputs()


class DenseTransformer(_PeerLM):
  """Full-attention peer.

  With `config.kind == 'dense'` attention is plain causal (`jax.nn.dot_product_attention`). With
  `kind == 'sliding_window'` it applies the band mask to the full [T, T] score matrix: the O(T^2)
  reference form of `SlidingWindowTransformer`, with identical parameters.
  """

  def attention_fn(self) -> AttentionFn:
    if self.config.kind == "dense":
      if self.config.query_block:
        return functools.partial(blocked_causal_attention, block=self.config.query_block)
      return causal_attention
    return functools.partial(banded_attention, window=self.config.window)


class SlidingWindowTransformer(_PeerLM):
  """Sliding-window peer: blockwise band attention, linear in T. Requires kind='sliding_window'."""

  def attention_fn(self) -> AttentionFn:
    if self.config.kind != "sliding_window":
      raise ValueError("SlidingWindowTransformer needs PeerConfig.kind='sliding_window', "
                       f"got {self.config.kind!r}")
    return functools.partial(blockwise_sliding_window_attention, window=self.config.window)


def build_peer(config: PeerConfig) -> _PeerLM:
  """The peer model a config describes: DenseTransformer or SlidingWindowTransformer."""
  if config.kind == "dense":
    return DenseTransformer(config)
  return SlidingWindowTransformer(config)


def peer_flops(config: PeerConfig, seq_len: int) -> int:
  """Matmul FLOPs (2*m*n*k each) of one forward pass of `build_peer(config)` on one sequence.

  Counts the Q/K/V/output projections, the MLP, the attention scores (QK) and the weighted values
  (PV) as actually computed, and the LM head; norms, softmax, RoPE and the embedding gather are
  excluded. Dense attention computes every one of the T^2 scores (no causal savings on CPU); the
  blockwise sliding window computes S keys for each of C*W padded queries (see
  `sliding_window_blocking`). Multiply by the batch size for a batch.
  """
  if not isinstance(seq_len, int) or seq_len <= 0:
    raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
  d, t = config.d_model, seq_len
  projections = 2 * t * d * (3 * d) + 2 * t * d * d
  mlp = 2 * (2 * t * d * config.mlp_ratio * d)
  if config.kind == "dense":
    queries, keys_per_query = t, t
  else:
    block, num_blocks, keys_per_query = sliding_window_blocking(t, config.window)
    queries = block * num_blocks
  attention = 2 * (2 * queries * keys_per_query * d)  # QK and PV over all heads (N * H = D)
  head = 2 * t * d * config.vocab_size
  return config.num_layers * (projections + mlp + attention) + head

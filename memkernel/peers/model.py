"""The reference "peer" language models the memory kernel is compared with, as Flax modules.

* `DenseTransformer`: full causal multi-head attention (O(T^2) compute and memory).
* `SlidingWindowTransformer`: each token attends to the previous `window` tokens, itself included,
  computed blockwise so compute and memory are linear in T.

Both are pre-norm stacks of (RMSNorm -> causal multi-head attention) and (RMSNorm -> GELU MLP)
residual blocks, a final RMSNorm and an untied LM head; no layer has a bias. Positions enter only
through RoPE, so no parameter depends on `max_seq_len`. Both share one parameter layout: with
`kind='sliding_window'`, `DenseTransformer` computes the band-masked attention the O(T^2) way, the
reference of the blockwise form.

Each has the three forms of the family protocol (`memkernel.family`): the parallel `__call__`, the
recurrent `scan` over chunks and the one-token `step`, both over a `PeerMemory` (a KV cache, or
for the sliding window a ring buffer of the last `window` tokens).

Shape key in `memkernel.peers.attention`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from memkernel import family as family_lib
from memkernel.outputs import Outputs
from memkernel.peers import attention
from memkernel.peers import memory as memory_lib
from memkernel.peers.config import PeerConfig
from memkernel.peers.memory import LayerCache, PeerMemory

# (q, k, v [B, T, N, H], *, segments_BT [B, T] or None) -> [B, T, N, H].
AttentionFn = Callable[..., jax.Array]


class PeerBlock(nn.Module):
  """Pre-norm residual block: x + Attn(RMSNorm(x)), then x + MLP(RMSNorm(x))."""

  config: PeerConfig

  def setup(self):
    cfg = self.config
    heads = (cfg.num_heads, cfg.head_dim)
    self.attention_norm = nn.RMSNorm()
    self.query = nn.DenseGeneral(heads, use_bias=False)
    self.key = nn.DenseGeneral(heads, use_bias=False)
    self.value = nn.DenseGeneral(heads, use_bias=False)
    self.attention_out = nn.DenseGeneral(cfg.d_model, axis=(-2, -1), use_bias=False)
    self.mlp_norm = nn.RMSNorm()
    self.mlp_in = nn.Dense(cfg.mlp_ratio * cfg.d_model, use_bias=False)
    self.mlp_out = nn.Dense(cfg.d_model, use_bias=False)

  def project(self, x_BTD: jax.Array, positions_T: jax.Array):
    """Rotated queries, keys and values [B, T, N, H] of the tokens at absolute `positions_T`."""
    h_BTD = self.attention_norm(x_BTD)
    q_BTNH = attention.apply_rope(self.query(h_BTD), positions_T)
    k_BTNH = attention.apply_rope(self.key(h_BTD), positions_T)
    return q_BTNH, k_BTNH, self.value(h_BTD)

  def finish(self, x_BTD: jax.Array, o_BTNH: jax.Array) -> jax.Array:
    """The attention residual from the attended values, then the MLP residual."""
    x_BTD = x_BTD + self.attention_out(o_BTNH)
    h_BTF = nn.gelu(self.mlp_in(self.mlp_norm(x_BTD)))
    return x_BTD + self.mlp_out(h_BTF)

  def __call__(self, x_BTD: jax.Array, positions_T: jax.Array, attention_fn: AttentionFn,
               segments_BT: Optional[jax.Array]) -> jax.Array:
    q_BTNH, k_BTNH, v_BTNH = self.project(x_BTD, positions_T)
    return self.finish(x_BTD, attention_fn(q_BTNH, k_BTNH, v_BTNH, segments_BT=segments_BT))


def _check_tokens(tokens: Any, ndim: int, what: str):
  if not hasattr(tokens, "ndim") or tokens.ndim != ndim:
    raise ValueError(f"{what} must be an int array of rank {ndim}, got "
                     f"{getattr(tokens, 'shape', type(tokens))}")
  if not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(f"{what} must have an integer dtype, got {tokens.dtype}")


class _PeerLM(nn.Module):
  """Embedding -> `num_layers` PeerBlocks -> RMSNorm -> untied LM head. Subclasses pick attention."""

  config: PeerConfig

  def setup(self):
    cfg = self.config
    self.embed = nn.Embed(cfg.vocab_size, cfg.d_model)
    self.blocks = [PeerBlock(cfg, name=f"block_{i}") for i in range(cfg.num_layers)]
    self.final_norm = nn.RMSNorm()
    self.lm_head = nn.Dense(cfg.vocab_size, use_bias=False)

  def attention_fn(self) -> AttentionFn:
    raise NotImplementedError

  def _logits(self, x_BTD: jax.Array) -> jax.Array:
    return self.lm_head(self.final_norm(x_BTD)).astype(jnp.float32)

  def _documents(self, segments: Optional[jax.Array]) -> Optional[jax.Array]:
    """The document index attention masks with: the segments under 'reset', none under 'carry'."""
    return segments if self.config.boundary == "reset" else None

  # ----------------------------------------------------------------------------------------------
  # Parallel form.

  def __call__(self, tokens: jax.Array, segments: Any = None, *, oracle_leaves: Any = None,
               train: bool = False, loss_mask: Any = None,
               interventions: Any = None) -> tuple[jax.Array, Outputs]:
    """Parallel form, from an empty memory.

    Args:
      tokens: int32 [B, T], T <= max_seq_len.
      segments: optional int32 [B, T] document index per token (non-decreasing along a row);
        `config.boundary` says what a boundary does. None: one document.
      oracle_leaves, train, loss_mask, interventions: the harness interface; a peer has no
        routes, no train-only behaviour and no sources to drop.

    Returns:
      logits float32 [B, T, V] and empty `Outputs`.
    """
    del oracle_leaves, train, loss_mask, interventions
    cfg = self.config
    _check_tokens(tokens, 2, "tokens")
    family_lib.check_segments(segments, tokens.shape, align=1)
    seq_len = tokens.shape[1]
    if seq_len > cfg.max_seq_len:
      raise ValueError(f"sequence length {seq_len} exceeds PeerConfig.max_seq_len="
                       f"{cfg.max_seq_len}")
    positions_T = jnp.arange(seq_len)
    documents = self._documents(segments)
    attention_fn = self.attention_fn()
    x_BTD = self.embed(tokens)
    for block in self.blocks:
      x_BTD = block(x_BTD, positions_T, attention_fn, documents)
    return self._logits(x_BTD), Outputs()

  # ----------------------------------------------------------------------------------------------
  # Recurrent forms.

  def _check_memory(self, memory: Any, batch_size: int, new_tokens: int):
    cfg = self.config
    if not isinstance(memory, PeerMemory):
      raise ValueError(f"memory must be a PeerMemory (from init_memory), got {type(memory)}")
    if (len(memory.layers) != cfg.num_layers or memory.ring != (cfg.kind == "sliding_window")
        or memory.num_slots != cfg.cache_len or memory.segment_B.shape != (batch_size,)):
      raise ValueError("memory does not match the model config or the batch (layers, kind, "
                       "cache length or batch size differ); build it with "
                       "init_memory(config, batch_size)")
    if not memory.ring and not isinstance(memory.position, jax.core.Tracer):
      total = int(memory.position) + new_tokens
      if total > cfg.max_seq_len:
        raise ValueError(f"memory would hold {total} tokens, more than PeerConfig.max_seq_len="
                         f"{cfg.max_seq_len}")

  def _chunk(self, tokens_BQ: jax.Array, segments_BQ: jax.Array,
             memory: PeerMemory) -> tuple[jax.Array, PeerMemory]:
    """Advances the memory by Q tokens: logits [B, Q, V] and the memory after them."""
    cfg = self.config
    q = tokens_BQ.shape[1]
    position = memory.position
    positions_Q = position + jnp.arange(q, dtype=jnp.int32)
    key_segments = memory_lib.write(memory.key_segments_BS, segments_BQ, position, memory.ring)
    if memory.ring:
      # Keys: the ring's (positions before the chunk), then the chunk's own.
      key_positions_S = jnp.concatenate([memory.slot_positions(), positions_Q])
      key_segments_BS = jnp.concatenate([memory.key_segments_BS, segments_BQ], axis=1)
    else:
      key_positions_S, key_segments_BS = memory.slot_positions(), key_segments
    distance_QS = positions_Q[:, None] - key_positions_S[None, :]
    mask = (distance_QS >= 0) & (key_positions_S >= 0)[None, :]
    if memory.ring:
      mask &= distance_QS < cfg.window
    documents = self._documents(segments_BQ)
    if documents is not None:
      mask = mask & attention.document_mask(documents, key_segments_BS)
    x_BQD = self.embed(tokens_BQ)
    layers = []
    for block, cache in zip(self.blocks, memory.layers):
      q_BQNH, k_BQNH, v_BQNH = block.project(x_BQD, positions_Q)
      k_BSNH = memory_lib.write(cache.k_BSNH, k_BQNH, position, memory.ring)
      v_BSNH = memory_lib.write(cache.v_BSNH, v_BQNH, position, memory.ring)
      if memory.ring:
        keys = jnp.concatenate([cache.k_BSNH, k_BQNH.astype(jnp.float32)], axis=1)
        values = jnp.concatenate([cache.v_BSNH, v_BQNH.astype(jnp.float32)], axis=1)
      else:
        keys, values = k_BSNH, v_BSNH
      o_BQNH = attention.masked_attention(q_BQNH, keys, values, mask)
      x_BQD = block.finish(x_BQD, o_BQNH)
      layers.append(LayerCache(k_BSNH=k_BSNH, v_BSNH=v_BSNH))
    memory = PeerMemory(layers=tuple(layers), key_segments_BS=key_segments,
                        segment_B=segments_BQ[:, -1], position=position + q, ring=memory.ring)
    return self._logits(x_BQD), memory

  def _chunk_len(self, seq_len: int) -> int:
    if self.config.kind == "sliding_window":
      return self.config.window
    return self.config.query_block or seq_len

  def scan(self, tokens: jax.Array, memory: PeerMemory, segments: Any = None, *,
           interventions: Any = None, return_aux: bool = False):
    """Recurrent form: consumes `tokens` [B, T] (any T >= 1) in chunks, after `memory`.

    Chunks are `window` tokens (sliding window) or `query_block` tokens (dense; 0: all at once);
    RoPE positions are absolute (the memory's position onwards).

    Args:
      tokens: int32 [B, T]; the dense peer's memory must have room for them (max_seq_len).
      memory: the `PeerMemory` before them.
      segments: optional int32 [B, T] document index (non-decreasing); None continues the
        memory's current document.
      interventions: the harness interface (a peer has no sources to drop).
      return_aux: also return an (empty) `Outputs`.

    Returns:
      (logits float32 [B, T, V], memory') or, with return_aux, (logits, memory', Outputs).
    """
    del interventions
    _check_tokens(tokens, 2, "tokens")
    b, t = tokens.shape
    self._check_memory(memory, b, t)
    family_lib.check_segments(segments, tokens.shape, align=1)
    if segments is None:
      segments = jnp.broadcast_to(memory.segment_B[:, None], (b, t))
    segments = jnp.asarray(segments, jnp.int32)
    chunk = self._chunk_len(t)
    n_chunks, tail = divmod(t, chunk)
    logits = []
    if n_chunks > 1:
      to_chunks = lambda y: jnp.swapaxes(y[:, :n_chunks * chunk].reshape(b, n_chunks, chunk), 0, 1)

      def body(module, mem, xs):
        chunk_logits, mem = module._chunk(xs[0], xs[1], mem)  # pylint: disable=protected-access
        return mem, chunk_logits

      memory, logits_CBQV = nn.scan(body, variable_broadcast="params",
                                    split_rngs={"params": False})(
                                        self, memory, (to_chunks(tokens), to_chunks(segments)))
      logits.append(jnp.swapaxes(logits_CBQV, 0, 1).reshape(b, n_chunks * chunk, -1))
    elif n_chunks:
      chunk_logits, memory = self._chunk(tokens[:, :chunk], segments[:, :chunk], memory)
      logits.append(chunk_logits)
    if tail:
      chunk_logits, memory = self._chunk(tokens[:, n_chunks * chunk:],
                                         segments[:, n_chunks * chunk:], memory)
      logits.append(chunk_logits)
    logits_BTV = jnp.concatenate(logits, axis=1) if len(logits) > 1 else logits[0]
    if return_aux:
      return logits_BTV, memory, Outputs()
    return logits_BTV, memory

  def step(self, token: jax.Array, memory: PeerMemory, segment: Any = None, *,
           interventions: Any = None, return_aux: bool = False):
    """Decoding form: one token per sequence.

    Args:
      token: int32 [B].
      memory: the `PeerMemory` before it.
      segment: optional int32 [B], its document (None: the memory's current document).
      interventions, return_aux: as in `scan`.

    Returns:
      (logits float32 [B, V], memory') or, with return_aux, (logits, memory', Outputs).
    """
    del interventions
    _check_tokens(token, 1, "token")
    self._check_memory(memory, token.shape[0], 1)
    family_lib.check_segments(segment, token.shape, align=1, what="segment")
    segment = memory.segment_B if segment is None else jnp.asarray(segment, jnp.int32)
    logits, memory = self._chunk(token[:, None], segment[:, None], memory)
    if return_aux:
      return logits[:, 0], memory, Outputs()
    return logits[:, 0], memory


class DenseTransformer(_PeerLM):
  """Full-attention peer.

  With `config.kind == 'dense'` attention is plain causal (`jax.nn.dot_product_attention`). With
  `kind == 'sliding_window'` it applies the band mask to the full [T, T] score matrix: the O(T^2)
  reference form of `SlidingWindowTransformer`, with identical parameters.
  """

  def attention_fn(self) -> AttentionFn:
    if self.config.kind == "dense":
      if self.config.query_block:
        return functools.partial(attention.blocked_causal_attention,
                                 block=self.config.query_block)
      return attention.causal_attention
    return functools.partial(attention.banded_attention, window=self.config.window)


class SlidingWindowTransformer(_PeerLM):
  """Sliding-window peer: blockwise band attention, linear in T. Requires kind='sliding_window'."""

  def attention_fn(self) -> AttentionFn:
    if self.config.kind != "sliding_window":
      raise ValueError("SlidingWindowTransformer needs PeerConfig.kind='sliding_window', "
                       f"got {self.config.kind!r}")
    return functools.partial(attention.blockwise_sliding_window_attention,
                             window=self.config.window)


def build_peer(config: PeerConfig) -> _PeerLM:
  """The peer model a config describes: DenseTransformer or SlidingWindowTransformer."""
  if config.kind == "dense":
    return DenseTransformer(config)
  return SlidingWindowTransformer(config)


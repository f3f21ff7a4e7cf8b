"""What the attention peers cost: matmul FLOPs by part and the size of their attention scores.

Counted as the modules compute them (`memkernel.peers.model`): Q/K/V/output projections, the MLP,
the attention scores (QK) and weighted values (PV), and the LM head; norms, softmax, RoPE and the
embedding gather are left out, as the kernel's count leaves its element-wise work out.
"""

from __future__ import annotations

from memkernel.peers.attention import sliding_window_blocking
from memkernel.peers.config import PeerConfig

_FLOAT_BYTES = 4


def _chunks(config: PeerConfig, num_tokens: int) -> list[int]:
  """The chunk lengths the recurrent form (`scan`) splits `num_tokens` tokens into."""
  if config.kind == "sliding_window":
    chunk = config.window
  else:
    chunk = config.query_block or num_tokens
  full, tail = divmod(num_tokens, chunk)
  return [chunk] * full + ([tail] if tail else [])


def _attended_keys(config: PeerConfig, num_tokens: int, form: str) -> int:
  """Query-key pairs the attention computes (masked ones included) over `num_tokens` tokens."""
  if form == "parallel":
    if config.kind == "dense":
      return num_tokens * num_tokens
    block, num_blocks, keys_per_query = sliding_window_blocking(num_tokens, config.window)
    return block * num_blocks * keys_per_query
  if config.kind == "dense":  # Every query scores the whole cache.
    return num_tokens * config.cache_len
  return sum(q * (config.window + q) for q in _chunks(config, num_tokens))  # ring + the chunk


def flops_by_part(config: PeerConfig, num_tokens: int, *, form: str = "parallel",
                  train: bool = False) -> dict[str, int]:
  """Matmul FLOPs (2 per multiply-add) of one pass over one sequence of `num_tokens` tokens.

  Args:
    config: the peer (its `max_seq_len` sets the dense cache a recurrent call scores).
    num_tokens: T.
    form: 'parallel' (dense: all T^2 scores, no causal savings; sliding window: C * W padded
      queries against 2W keys, see `sliding_window_blocking`) or 'recurrent' (`scan` / `step`
      from an empty memory: dense scores every query against its `max_seq_len`-slot cache; the
      window scores each chunk against the ring buffer and the chunk).
    train: forward + backward (3x the forward).
  Returns:
    {"projections", "attention", "mlp", "head": FLOPs}; multiply by the batch size for a batch.
  """
  if not isinstance(num_tokens, int) or isinstance(num_tokens, bool) or num_tokens <= 0:
    raise ValueError(f"num_tokens must be a positive integer, got {num_tokens!r}")
  if form not in ("parallel", "recurrent"):
    raise ValueError(f"form must be 'parallel' or 'recurrent', got {form!r}")
  d, t, layers = config.d_model, num_tokens, config.num_layers
  parts = {
      "projections": layers * (2 * t * d * (3 * d) + 2 * t * d * d),
      # QK and PV over all heads (N * H = D).
      "attention": layers * 2 * 2 * _attended_keys(config, t, form) * d,
      "mlp": layers * 2 * (2 * t * d * config.mlp_ratio * d),
      "head": 2 * t * d * config.vocab_size,
  }
  if train:
    parts = {name: 3 * f for name, f in parts.items()}
  return parts


def flops(config: PeerConfig, num_tokens: int, *, form: str = "parallel",
          train: bool = False) -> int:
  """Total of `flops_by_part`."""
  return sum(flops_by_part(config, num_tokens, form=form, train=train).values())


def attention_bytes(config: PeerConfig, num_tokens: int, batch_size: int, *,
                    train: bool = False) -> int:
  """An estimate of the float32 attention-score buffers a parallel call holds at once.

  `jax.nn.dot_product_attention` materialises the scores on the CPU (logits, mask, probabilities:
  ~3 live in a forward); a training step keeps every layer's for the backward pass (~4 each). With
  the dense peer's `query_block` only one block's [B, heads, block, T] scores are live, forward or
  backward (~4 such buffers). Dense attention makes this O(T^2): it is what decides whether a
  point fits in memory before anything compiles.
  """
  per_buffer = batch_size * config.num_heads * _FLOAT_BYTES
  if config.kind == "dense" and config.query_block and config.query_block < num_tokens:
    return per_buffer * config.query_block * num_tokens * 4
  pairs = _attended_keys(config, num_tokens, "parallel")
  return per_buffer * pairs * (4 * config.num_layers if train else 3)

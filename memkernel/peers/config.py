"""The peers' one typed config: `PeerConfig`, frozen and validated when built."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from memkernel import fields

KINDS = ("dense", "sliding_window")
BOUNDARIES = ("reset", "carry")


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
    max_seq_len: longest accepted input (and the dense KV cache's length); no parameter depends
      on it.
    query_block: 'dense' only: attend in blocks of this many queries, each recomputed in the
      backward pass, so one block's [B, N, block, T] scores exist at a time instead of every
      layer's [B, N, T, T] (0: all queries at once, `jax.nn.dot_product_attention`). The same
      attention, as a memory-efficient dense attention computes it; the benchmark uses it so
      dense attention's train step fits at 8k on a 24 GiB machine. The recurrent form of the
      dense peer consumes its input in chunks of this many tokens (0: all at once).
    boundary: what a document boundary of a stream (`segments`) does to attention: 'reset' (a
      query sees only keys of its own document) or 'carry' (documents are ignored: one stream).
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
  boundary: str = "reset"

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"PeerConfig.kind must be one of {KINDS}, got {self.kind!r}")
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
    if self.boundary == "decay":
      raise ValueError("PeerConfig.boundary='decay' is not supported: an attention peer's KV "
                       "cache has nothing to decay; use 'reset' or 'carry'")
    if self.boundary not in BOUNDARIES:
      raise ValueError(f"PeerConfig.boundary must be one of {BOUNDARIES}, got "
                       f"{self.boundary!r}")

  @property
  def family(self) -> str:
    """The registry name of the family this config belongs to (`memkernel.family`)."""
    return self.kind

  @property
  def head_dim(self) -> int:
    """H: per-head width."""
    return self.d_model // self.num_heads

  @property
  def cache_len(self) -> int:
    """Keys the recurrent form keeps per layer: every position (dense) or the last `window`."""
    return self.max_seq_len if self.kind == "dense" else self.window

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> "PeerConfig":
    """Builds a config from a mapping (e.g. a `ConfigDict`), rejecting unknown fields."""
    return fields.from_mapping(cls, values)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

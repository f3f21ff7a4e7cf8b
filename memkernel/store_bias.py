"""Where the memory-line store meets a model: kNN-LM style lines in, a logits bias out.

    anchors = write_next_token_lines(store, hidden_BTD, tokens_BT, positions, vocab_size)
    bias = StoreBias(store)                        # a `sampler.generate(logits_bias=...)`
    logits_BV += bias(hidden_BD)                   # alpha * sum(w v) / sum(w)

A line's key is the model's final hidden state at a position (`memkernel.hidden`) and its value
the next token there, one-hot over the vocabulary, so a store's bias vector is a distribution over
next tokens gathered from earlier documents, in this process or any other. The store is host-side
numpy; this module only moves arrays between it and the model's outputs.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import numpy as np

from memkernel.store import store as store_lib


class StoreBias:
  """`alpha * store.bias_vector(hidden, k)`: the logits term a store adds (seed 003)."""

  def __init__(self, store: store_lib.MemoryLineStore, *, alpha: Optional[float] = None,
               k: Optional[int] = None, vocab_size: Optional[int] = None):
    """alpha and k default to the store's config (`bias_alpha`, `bias_k`).

    Raises ValueError for a negative or non-finite alpha, k < 1, or a store whose values are
    not vocabulary-sized (when `vocab_size` is given)."""
    alpha = store.config.bias_alpha if alpha is None else alpha
    k = store.config.bias_k if k is None else k
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not np.isfinite(alpha) \
        or alpha < 0:
      raise ValueError(f"store alpha must be a finite number >= 0, got {alpha!r}")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
      raise ValueError(f"store k must be a positive integer, got {k!r}")
    if vocab_size is not None and store.value_dim != vocab_size:
      raise ValueError(f"the store's values have {store.value_dim} entries; a logits bias needs "
                       f"the model's vocabulary size, {vocab_size}")
    self.store, self.alpha, self.k = store, float(alpha), k

  def __call__(self, hidden: np.ndarray) -> np.ndarray:
    """[..., D] hidden states -> [..., V] logits terms (zero for an all-zero state, which has
    no direction to match)."""
    hidden = np.asarray(hidden, np.float32)
    flat = hidden.reshape(-1, hidden.shape[-1])
    bias = np.zeros((len(flat), self.store.value_dim), np.float32)
    live = np.linalg.norm(flat, axis=-1) > 0
    if live.any():
      bias[live] = self.store.bias_vector(flat[live], self.k)
    return (self.alpha * bias).astype(np.float32).reshape(hidden.shape[:-1] + (-1,))


def write_next_token_lines(store: store_lib.MemoryLineStore, hidden_BTD: Any, tokens_BT: Any,
                           positions: Sequence[tuple[int, int]], vocab_size: int,
                           ctx: Optional[Callable[[int, int], dict]] = None) -> list[str]:
  """Appends one line per (row, position): key = hidden[row, position], value = one-hot of
  tokens[row, position + 1]; returns the anchors.

  Raises:
    ValueError: a position without a next token, or a store of the wrong widths.
  """
  hidden_BTD, tokens_BT = np.asarray(hidden_BTD, np.float32), np.asarray(tokens_BT)
  if hidden_BTD.ndim != 3 or tokens_BT.shape != hidden_BTD.shape[:2]:
    raise ValueError(f"hidden must be [B, T, D] and tokens [B, T] of the same B and T, got "
                     f"{hidden_BTD.shape} and {tokens_BT.shape}")
  if store.key_dim != hidden_BTD.shape[-1] or store.value_dim != vocab_size:
    raise ValueError(f"the store holds [{store.key_dim}] keys and [{store.value_dim}] values; "
                     f"this model needs [{hidden_BTD.shape[-1]}] and [{vocab_size}]")
  if not positions:
    raise ValueError("no positions to write")
  for b, t in positions:
    if not 0 <= b < tokens_BT.shape[0]:
      raise ValueError(f"position ({b}, {t}): row {b} is not in a batch of {tokens_BT.shape[0]}")
    if not 0 <= t < tokens_BT.shape[1] - 1:
      raise ValueError(f"position ({b}, {t}) has no next token in a row of {tokens_BT.shape[1]}")
  next_tokens = [int(tokens_BT[b, t + 1]) for b, t in positions]
  if min(next_tokens) < 0 or max(next_tokens) >= vocab_size:
    raise ValueError(f"next tokens must lie in [0, {vocab_size}), got "
                     f"[{min(next_tokens)}, {max(next_tokens)}]")
  keys = np.stack([hidden_BTD[b, t] for b, t in positions])
  values = np.zeros((len(positions), vocab_size), np.float32)
  values[np.arange(len(positions)), next_tokens] = 1.0
  ctxs = [ctx(b, t) if ctx else {"row": int(b), "position": int(t)} for b, t in positions]
  return store.put_many(keys, values, ctxs)

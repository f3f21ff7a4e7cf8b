"""The exact leaf read: token-level attention over the K/V of the routed sealed leaves.

Each head attends over the L tokens of each of its K selected leaves (K * L tokens), with `log w`
of the leaf's routing weight added to the logits, so the read's loss reaches the router through
the selection weights. No summary stands in for the tokens and nothing outside the selected leaves
is read. Shape key in `memkernel.shapes`.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from memkernel.kernel.routing import gather_leaves
from memkernel.ops import NEG_INF, matvec, vecmat


class ReadResult(NamedTuple):
  """Attributes:
    value: float32 [B, T, H, E], the read (zero where no leaf is selected).
    probs: float32 [B, T, H, K, L], attention over the selected leaves' tokens.
    active: bool [B, T, H], whether the head read anything.
  """

  value: jax.Array
  probs: jax.Array
  active: jax.Array


def exact_read(q_BTHE: jax.Array, cache_k_BNLHE: jax.Array, cache_v_BNLHE: jax.Array,
               leaves_BTHK: jax.Array, weights_BTHK: jax.Array,
               sink_H: Optional[jax.Array] = None) -> ReadResult:
  """Attends over the tokens of the selected leaves.

  Args:
    q_BTHE: read queries.
    cache_k_BNLHE, cache_v_BNLHE: the exact token cache (only sealed leaves are ever selected).
    leaves_BTHK: selected leaves, -1 for none.
    weights_BTHK: routing weights of the selected leaves (their log is added to the logits).
    sink_H: optional per-head logit of a "read nothing" slot with a zero value: a head whose
      leaves hold no matching key can put its mass there instead of averaging unrelated tokens.
  Returns:
    A `ReadResult`.
  """
  e = q_BTHE.shape[-1]
  keys = gather_leaves(cache_k_BNLHE, leaves_BTHK)   # [B, T, H, K, L, E]
  vals = gather_leaves(cache_v_BNLHE, leaves_BTHK)
  valid = (leaves_BTHK >= 0) & (weights_BTHK > 0)
  b, t, h, k, l, _ = keys.shape
  logits = matvec(keys.reshape(b, t, h, k * l, e), q_BTHE).reshape(b, t, h, k, l) * e ** -0.5
  logits = logits + jnp.log(jnp.where(valid, weights_BTHK, 1.0))[..., None]
  logits = jnp.where(valid[..., None], logits, NEG_INF)
  shape = logits.shape
  flat = logits.reshape(shape[:3] + (-1,))
  if sink_H is None:
    probs = jax.nn.softmax(flat, axis=-1).reshape(shape)
  else:
    sink = jnp.broadcast_to(sink_H.astype(flat.dtype), shape[:3])[..., None]
    norm = jax.nn.logsumexp(jnp.concatenate([flat, sink], axis=-1), axis=-1, keepdims=True)
    probs = jnp.exp(flat - norm).reshape(shape)
  active = jnp.any(valid, axis=-1)
  probs = jnp.where(active[..., None, None] & valid[..., None], probs, 0.0)
  value = vecmat(probs.reshape(b, t, h, k * l), vals.reshape(b, t, h, k * l, e))
  return ReadResult(value=value, probs=probs, active=active)

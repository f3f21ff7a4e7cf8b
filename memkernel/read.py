"""The exact leaf read: token-level attention over the K/V of the routed sealed leaves.

Each head attends over the L tokens of each of its K selected leaves (K * L tokens), with `log w`
of the leaf's routing weight added to the logits, so the read's loss reaches the router through
the selection weights. No summary stands in for the tokens and nothing outside the selected leaves
is read. Shape key in `memkernel.state`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from memkernel.routing import NEG_INF, matvec, vecmat


class ReadResult(NamedTuple):
  """Attributes:
    value: float32 [B, T, H, E], the read (zero where no leaf is selected).
    probs: float32 [B, T, H, K, L], attention over the selected leaves' tokens.
    active: bool [B, T, H], whether the head read anything.
  """

  value: jax.Array
  probs: jax.Array
  active: jax.Array


def gather_leaves(cache_BNLHX: jax.Array, leaves_BTHK: jax.Array) -> jax.Array:
  """cache[b, leaves[b, t, h, k], :, h] -> [B, T, H, K, L, X] (index -1 reads leaf 0, masked later)."""
  heads = jnp.arange(cache_BNLHX.shape[3])[None, :, None]
  safe = jnp.maximum(leaves_BTHK, 0)
  return jax.vmap(lambda c, i: c[i, heads])(jnp.swapaxes(cache_BNLHX, 2, 3), safe)


def exact_read(q_BTHE: jax.Array, cache_k_BNLHE: jax.Array, cache_v_BNLHE: jax.Array,
               leaves_BTHK: jax.Array, weights_BTHK: jax.Array) -> ReadResult:
  """Attends over the tokens of the selected leaves.

  Args:
    q_BTHE: read queries.
    cache_k_BNLHE, cache_v_BNLHE: the exact token cache (only sealed leaves are ever selected).
    leaves_BTHK: selected leaves, -1 for none.
    weights_BTHK: routing weights of the selected leaves (their log is added to the logits).
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
  probs = jax.nn.softmax(logits.reshape(shape[:3] + (-1,)), axis=-1).reshape(shape)
  active = jnp.any(valid, axis=-1)
  probs = jnp.where(active[..., None, None] & valid[..., None], probs, 0.0)
  value = vecmat(probs.reshape(b, t, h, k * l), vals.reshape(b, t, h, k * l, e))
  return ReadResult(value=value, probs=probs, active=active)

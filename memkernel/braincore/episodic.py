"""Episodic memory (seed 002, EM): a fixed number of items per example, read by top-k and written
through a gate that evicts the weakest item. Pure JAX: jittable, no Flax, no host code.

Shapes: B batch, M items, Q queries, K items read, D key width, E value width.

    memory = init_episodic(batch_size=2, items=256, key_dim=64, value_dim=64)
    out_BQE, weights_BQK, index_BQK = read(memory, queries_BQD, k=4)
    memory = write(memory, key_BD, value_BE, gate_B)       # at a span boundary
    memory = write_many(memory, keys_BCD, values_BCE, gates_BC)   # C candidates at once
    memory, stored_B = offer(memory, keys_BCD, values_BCE, gates_BC)   # and how many it stored
    memory, stored_B = offer(memory, keys_BCD, values_BCE, gates_BC, threshold=0.5)  # gate > 0.5
    memory, _ = offer(memory, keys_BCD, values_BCE, gates_BC, origins_BC=positions_BC)
    blind_BK = strongest(memory, k=4)                     # the query-blind read's items
    memory = decay(memory, 0.9)                           # strengths fade
    memory = reset_rows(memory, reset_B)                  # a document boundary under 'reset'

An item is (key, value, strength, origin); strength 0 means empty, and the origin is the stream
position of the token that wrote it (-1 if the writer gave none: provenance for audits, read by no
computation). A read scores the live items by q . k / sqrt(D) + log(strength), keeps the k best
and mixes their values with a softmax over those k scores (one-query cross-attention over the
retrieved items), so a weak item needs a closer key to win. A write offers one candidate per
example with a gate in [0, 1]: it replaces the weakest item if the gate exceeds that item's
strength and the write threshold (0 unless given), and is stored with the gate as its strength (a
gate of 0 writes nothing). Every example owns its items: no state crosses the batch.

What gradients flow: into the read's queries, the stored keys and values (from the candidates that
wrote them) and, through log(strength), into the gate of every write that landed. The choice of
slot (the weakest item) and of the k items read are selections, with no gradient.
"""

from __future__ import annotations

from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class EpisodicMemory:
  """Per-example items: keys [B, M, D], values [B, M, E], strengths [B, M] (0: empty) and
  origins [B, M] (the writing token's stream position; -1: none given)."""
  keys_BMD: jax.Array
  values_BME: jax.Array
  strength_BM: jax.Array
  origin_BM: jax.Array


def init_episodic(batch_size: int, items: int, key_dim: int, value_dim: int,
                  dtype=jnp.float32) -> EpisodicMemory:
  """An empty memory: every strength 0."""
  for name, value in (("batch_size", batch_size), ("items", items), ("key_dim", key_dim),
                      ("value_dim", value_dim)):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise ValueError(f"init_episodic: {name} must be a positive integer, got {value!r}")
  return EpisodicMemory(jnp.zeros((batch_size, items, key_dim), dtype),
                        jnp.zeros((batch_size, items, value_dim), dtype),
                        jnp.zeros((batch_size, items), jnp.float32),
                        jnp.full((batch_size, items), -1, jnp.int32))


def read(memory: EpisodicMemory, queries_BQD: jax.Array, k: int):
  """The k best live items per query and their softmax-weighted values.

  Returns:
    (out [B, Q, E], weights [B, Q, K], index [B, Q, K]): weights sum to 1 over the live items
    read and are 0 for the slots of a memory with fewer than k live items; out is 0 for a query
    of an empty memory.
  """
  items, key_dim = memory.keys_BMD.shape[1:]
  if not 1 <= k <= items:
    raise ValueError(f"read: k must lie in [1, {items}] (the items), got {k}")
  if queries_BQD.shape[-1] != key_dim or queries_BQD.ndim != 3:
    raise ValueError(f"read: queries must be [B, Q, {key_dim}], got {queries_BQD.shape}")
  live_BM = memory.strength_BM > 0
  scores_BQM = jnp.einsum("bqd,bmd->bqm", queries_BQD.astype(jnp.float32),
                          memory.keys_BMD.astype(jnp.float32)) / jnp.sqrt(key_dim)
  scores_BQM = scores_BQM + jnp.log(jnp.where(live_BM, memory.strength_BM, 1.0))[:, None, :]
  scores_BQM = jnp.where(live_BM[:, None, :], scores_BQM, -jnp.inf)
  top_BQK, index_BQK = jax.lax.top_k(scores_BQM, k)
  found_BQK = jnp.isfinite(top_BQK)
  shifted = jnp.where(found_BQK, top_BQK - jnp.max(jnp.where(found_BQK, top_BQK, -1e30), -1,
                                                   keepdims=True), -jnp.inf)
  exp_BQK = jnp.where(found_BQK, jnp.exp(shifted), 0.0)
  weights_BQK = exp_BQK / jnp.maximum(exp_BQK.sum(-1, keepdims=True), 1e-30)
  values_BQKE = jax.vmap(lambda v_ME, i_QK: v_ME[i_QK])(memory.values_BME, index_BQK)
  out_BQE = jnp.einsum("bqk,bqke->bqe", weights_BQK, values_BQKE.astype(jnp.float32))
  return out_BQE, weights_BQK, index_BQK


def write(memory: EpisodicMemory, key_BD: jax.Array, value_BE: jax.Array,
          gate_B: jax.Array) -> EpisodicMemory:
  """Offers one candidate item per example: it replaces the weakest item where its gate is
  above that item's strength, with the gate as its strength."""
  b, _, key_dim = memory.keys_BMD.shape
  value_dim = memory.values_BME.shape[-1]
  if key_BD.shape != (b, key_dim) or value_BE.shape != (b, value_dim) or gate_B.shape != (b,):
    raise ValueError(f"write: key [{b}, {key_dim}], value [{b}, {value_dim}] and gate [{b}] "
                     f"expected, got {key_BD.shape}, {value_BE.shape}, {gate_B.shape}")
  return write_many(memory, key_BD[:, None], value_BE[:, None], gate_B[:, None])


def write_many(memory: EpisodicMemory, keys_BCD: jax.Array, values_BCE: jax.Array,
               gates_BC: jax.Array, threshold: float = 0.0,
               origins_BC: Optional[jax.Array] = None) -> EpisodicMemory:
  """Offers C candidates per example at once: ranked by gate, the i-th strongest candidate
  replaces the i-th weakest item where its gate is above that item's strength and above
  `threshold` (C = 1 is `write`; of more candidates than items only the M strongest can
  land). One scatter, whatever C: a span's candidates cost one write, not C."""
  return offer(memory, keys_BCD, values_BCE, gates_BC, threshold, origins_BC)[0]


def offer(memory: EpisodicMemory, keys_BCD: jax.Array, values_BCE: jax.Array,
          gates_BC: jax.Array, threshold: float = 0.0,
          origins_BC: Optional[jax.Array] = None) -> tuple[EpisodicMemory, jax.Array]:
  """`write_many`, and how many of the C candidates it stored per example [B] (the write
  density is this over C). `origins_BC` (int [B, C]): the candidates' stream positions, kept
  as the items' origins (-1 without)."""
  if not 0.0 <= threshold < 1.0:
    raise ValueError(f"write_many: threshold must lie in [0, 1), got {threshold!r}")
  b, items, key_dim = memory.keys_BMD.shape
  value_dim = memory.values_BME.shape[-1]
  c = gates_BC.shape[-1] if gates_BC.ndim == 2 else -1
  if (gates_BC.shape != (b, c) or keys_BCD.shape != (b, c, key_dim)
      or values_BCE.shape != (b, c, value_dim) or c < 1):
    raise ValueError(f"write_many: keys [{b}, C, {key_dim}], values [{b}, C, {value_dim}] and "
                     f"gates [{b}, C] with C >= 1 expected, got {keys_BCD.shape}, "
                     f"{values_BCE.shape}, {gates_BC.shape}")
  if origins_BC is None:
    origins_BC = jnp.full((b, c), -1, jnp.int32)
  elif origins_BC.shape != (b, c):
    raise ValueError(f"offer: origins must be [{b}, {c}] like the gates, got {origins_BC.shape}")
  gates_BC = jnp.clip(gates_BC.astype(jnp.float32), 0.0, 1.0)
  # Candidates strongest first; slots weakest first (both selections, outside the gradient).
  order_BC = jnp.argsort(-jax.lax.stop_gradient(gates_BC), axis=-1)
  take = lambda a: jnp.take_along_axis(a, order_BC.reshape(order_BC.shape + (1,) * (a.ndim - 2)),
                                       axis=1)
  gates_BC, keys_BCD, values_BCE = take(gates_BC), take(keys_BCD), take(values_BCE)
  origins_BC = take(jnp.asarray(origins_BC, jnp.int32))
  if c > items:  # More candidates than items: only the M strongest can land.
    c = items
    gates_BC, keys_BCD, values_BCE, origins_BC = (
        gates_BC[:, :c], keys_BCD[:, :c], values_BCE[:, :c], origins_BC[:, :c])
  weakest_BC, slot_BC = jax.lax.top_k(-memory.strength_BM, c)
  lands_BC = (gates_BC > -weakest_BC) & (gates_BC > threshold)
  at_BCM = jax.nn.one_hot(slot_BC, items, dtype=jnp.float32) * lands_BC[..., None]
  at_BM = jnp.sum(at_BCM, axis=1) > 0   # Slots are distinct: at most one candidate each.
  place = lambda new_BCX, old_BMX: jnp.where(
      at_BM[..., None], jnp.einsum("bcm,bcx->bmx", at_BCM, new_BCX.astype(jnp.float32)).astype(
          old_BMX.dtype), old_BMX)
  written = EpisodicMemory(
      keys_BMD=place(keys_BCD, memory.keys_BMD),
      values_BME=place(values_BCE, memory.values_BME),
      strength_BM=jnp.where(at_BM, jnp.einsum("bcm,bc->bm", at_BCM, gates_BC),
                            memory.strength_BM),
      origin_BM=jnp.where(
          at_BM, jnp.sum(at_BCM.astype(jnp.int32) * origins_BC[..., None], axis=1),
          memory.origin_BM))
  return written, jnp.sum(lands_BC, axis=-1)


def strongest(memory: EpisodicMemory, k: int) -> jax.Array:
  """The k strongest live items' slots [B, K] (-1 past the live ones): what a query-blind read,
  one that picks the same items for every query, would read (the baseline a query's read must
  beat to be finding rather than recalling the strongest)."""
  items = memory.strength_BM.shape[1]
  if not 1 <= k <= items:
    raise ValueError(f"strongest: k must lie in [1, {items}] (the items), got {k}")
  top_BK, slot_BK = jax.lax.top_k(memory.strength_BM, k)
  return jnp.where(top_BK > 0, slot_BK, -1)


def origins(memory: EpisodicMemory, slots: jax.Array) -> jax.Array:
  """The origins of the items in `slots` [B, ...] (-1 where a slot is -1 or the item empty)."""
  b = slots.shape[0]
  flat = slots.reshape(b, -1)
  safe = jnp.maximum(flat, 0)
  origin = jnp.take_along_axis(memory.origin_BM, safe, axis=1)
  live = jnp.take_along_axis(memory.strength_BM, safe, axis=1) > 0
  return jnp.where((flat >= 0) & live, origin, -1).reshape(slots.shape)


def decay(memory: EpisodicMemory, factor) -> EpisodicMemory:
  """Every strength times `factor` (a scalar or one per example, in [0, 1])."""
  factor = jnp.clip(jnp.asarray(factor, jnp.float32), 0.0, 1.0)
  if factor.ndim == 1:
    factor = factor[:, None]
  return memory.replace(strength_BM=memory.strength_BM * factor)


def reset_rows(memory: EpisodicMemory, reset_B: jax.Array) -> EpisodicMemory:
  """Empties the memory of the examples where `reset_B` is true (a document boundary under
  'reset'); the others keep theirs."""
  return memory.replace(strength_BM=jnp.where(reset_B[:, None], 0.0, memory.strength_BM))


def occupancy(memory: EpisodicMemory) -> jax.Array:
  """Fraction of live items per example [B]."""
  return jnp.mean(memory.strength_BM > 0, axis=-1)

"""Procedural memory (seed 002, PM): plastic low-rank fast weights, written at span boundaries.
Pure JAX: jittable, no Flax, no host code.

Shapes: B batch, T tokens of a span, O output width, R rank.

A projection y = W x gains a per-example delta A (C x): C [R, in] is a slow (trained) weight
shared by every example, A [B, O, R] the plastic part. Inside a span A is read-only and each
token adds its Hebbian eligibility y_t (C x_t)^T to a trace; at the span's boundary the trace,
scaled by a learned neuromodulator m (one per example, any sign) and a learning rate, is added
to the decayed A, and A is clipped to a Frobenius-norm budget, so it stays bounded however long
the stream:

    pm = init_procedural(batch_size, out_dim=64, rank=8)
    delta_BTO = apply(pm, code_BTR)                      # read: A before this span's writes
    pm = accumulate(pm, post_BTO, code_BTR, mask_BT)     # eligibility over the span
    pm = consolidate(pm, modulator_B, lr=0.1, decay=0.95, budget=1.0)   # at the boundary

What gradients flow: through `apply` into the codes and A; through `consolidate` into the
modulator, the learning rate's product and the traces' inputs (post and code), so a loss after
the boundary trains the modulator.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class ProceduralMemory:
  """Per-example fast weights A [B, O, R] and the span's eligibility trace [B, O, R]."""
  fast_BOR: jax.Array
  trace_BOR: jax.Array


def init_procedural(batch_size: int, out_dim: int, rank: int,
                    dtype=jnp.float32) -> ProceduralMemory:
  """Zero fast weights and traces: the projection is the slow one alone."""
  for name, value in (("batch_size", batch_size), ("out_dim", out_dim), ("rank", rank)):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise ValueError(f"init_procedural: {name} must be a positive integer, got {value!r}")
  shape = (batch_size, out_dim, rank)  # Two buffers: a caller may donate the memory.
  return ProceduralMemory(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def apply(pm: ProceduralMemory, code_BTR: jax.Array) -> jax.Array:
  """The projection's delta A c_t [B, T, O] (the fast weights as of the span's start)."""
  if code_BTR.ndim != 3 or code_BTR.shape[-1] != pm.fast_BOR.shape[-1]:
    raise ValueError(f"apply: codes must be [B, T, {pm.fast_BOR.shape[-1]}], got "
                     f"{code_BTR.shape}")
  return jnp.einsum("bor,btr->bto", pm.fast_BOR, code_BTR.astype(pm.fast_BOR.dtype))


def accumulate(pm: ProceduralMemory, post_BTO: jax.Array, code_BTR: jax.Array,
               mask_BT=None) -> ProceduralMemory:
  """Adds the span's Hebbian eligibility sum_t mask_t y_t c_t^T to the trace (A unchanged)."""
  b, o, r = pm.trace_BOR.shape
  if post_BTO.shape[::2] != (b, o) or code_BTR.shape[::2] != (b, r) or \
      post_BTO.shape[1] != code_BTR.shape[1]:
    raise ValueError(f"accumulate: post [{b}, T, {o}] and codes [{b}, T, {r}] expected, got "
                     f"{post_BTO.shape} and {code_BTR.shape}")
  if mask_BT is not None:
    post_BTO = post_BTO * mask_BT[..., None]
  return pm.replace(trace_BOR=pm.trace_BOR + jnp.einsum("bto,btr->bor", post_BTO, code_BTR))


def consolidate(pm: ProceduralMemory, modulator_B: jax.Array, *, lr: float, decay: float,
                budget: float) -> ProceduralMemory:
  """At a span boundary: A <- clip(decay A + lr m trace, ||A||_F <= budget); the trace empties.

  Raises:
    ValueError: lr < 0, decay outside [0, 1] or budget <= 0.
  """
  if not lr >= 0 or not 0 <= decay <= 1 or not budget > 0:
    raise ValueError(f"consolidate: lr >= 0, decay in [0, 1] and budget > 0 expected, got "
                     f"lr={lr}, decay={decay}, budget={budget}")
  fast = decay * pm.fast_BOR + lr * modulator_B[:, None, None] * pm.trace_BOR
  norm = jnp.sqrt(jnp.sum(jnp.square(fast), axis=(1, 2), keepdims=True))
  fast = fast * jnp.minimum(1.0, budget / jnp.maximum(norm, 1e-12))
  return ProceduralMemory(fast, jnp.zeros_like(pm.trace_BOR))


def reset_rows(pm: ProceduralMemory, reset_B: jax.Array) -> ProceduralMemory:
  """Clears the fast weights and traces of the examples where `reset_B` is true."""
  keep = ~reset_B[:, None, None]
  return ProceduralMemory(pm.fast_BOR * keep, pm.trace_BOR * keep)


def scale(pm: ProceduralMemory, factor) -> ProceduralMemory:
  """Fast weights times `factor` (a scalar or one per example): a document boundary's soft
  reset under 'decay'."""
  factor = jnp.asarray(factor, pm.fast_BOR.dtype)
  if factor.ndim == 1:
    factor = factor[:, None, None]
  return pm.replace(fast_BOR=pm.fast_BOR * factor)

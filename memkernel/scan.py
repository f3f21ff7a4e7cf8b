"""Diagonal linear recurrences h_t = a_t * h_{t-1} + b_t, in pure JAX.

Two implementations of the same recurrence, chosen by name (the trunk's `scan_impl`):
`associative` uses `lax.associative_scan` (log-depth, the parallel form's default) and `linear`
uses `lax.scan` (compiles faster, as fast on CPU when matmuls dominate). Both accumulate in float32
and take an initial state, so a chunk of a sequence continues exactly where the last one stopped.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def _combine(left, right):
  a_l, b_l = left
  a_r, b_r = right
  return a_l * a_r, a_r * b_l + b_r


def linear_recurrence(a_BTD: jax.Array, b_BTD: jax.Array, h0_BD: jax.Array,
                      impl: str = "associative") -> jax.Array:
  """Returns h_BTD with h_t = a_t * h_{t-1} + b_t and h_{-1} = h0.

  Args:
    a_BTD: decay per token and channel, [B, T, D].
    b_BTD: input per token and channel, [B, T, D].
    h0_BD: state before the first token, [B, D].
    impl: 'associative' or 'linear'.
  Returns:
    float32 [B, T, D], the state after every token.
  """
  a_BTD = a_BTD.astype(jnp.float32)
  b_BTD = b_BTD.astype(jnp.float32)
  # Fold the initial state into the first input: h_0 = a_0 * h0 + b_0.
  b_BTD = b_BTD.at[:, 0].add(a_BTD[:, 0] * h0_BD.astype(jnp.float32))
  if impl == "associative":
    _, h_BTD = jax.lax.associative_scan(_combine, (a_BTD, b_BTD), axis=1)
    return h_BTD
  if impl == "linear":
    def step(h_BD, ab):
      a_BD, b_BD = ab
      h_BD = a_BD * h_BD + b_BD
      return h_BD, h_BD
    _, h_TBD = jax.lax.scan(step, jnp.zeros_like(h0_BD, jnp.float32),
                            (jnp.swapaxes(a_BTD, 0, 1), jnp.swapaxes(b_BTD, 0, 1)))
    return jnp.swapaxes(h_TBD, 0, 1)
  raise ValueError(f"unknown scan impl {impl!r}; expected 'associative' or 'linear'")


def timescale_gate_bias(count: int, min_timescale: float, max_timescale: float) -> np.ndarray:
  """Gate logits for `count` channels whose decays exp(-1/tau) have tau log-spaced from
  `min_timescale` to `max_timescale` tokens (clipped to [1e-4, 1 - 1e-4]), float64 [count]:
  the initial spread of a recurrence's memory lengths."""
  tau = np.exp(np.linspace(math.log(min_timescale), math.log(max_timescale), count))
  a = np.clip(np.exp(-1.0 / tau), 1e-4, 1 - 1e-4)
  return np.log(a) - np.log1p(-a)

"""The brain-core's scan-friendly core (seed 002): h_t = a_t * h_{t-1} + b_t, with a_t and b_t
from the input alone, so a sequence is one `memkernel.scan.linear_recurrence` (linear or
associative) and a chunk continues exactly from the state the last one left.

    core = AffineCore(d_model=64)
    y_BTD, h_BD = core.apply(params, x_BTD, h0_BD, carry_BT)     # any chunking, same outputs

a_t = sigmoid(W_a x_t + c) with c spreading the channels' timescales from 1 to 256 tokens at
initialisation; b_t = sqrt(1 - a_t^2) (W_b x_t), which keeps the state's scale near the input's;
y_t = W_o h_t. `carry_BT` multiplies the carried state at each token (0 starts a document afresh,
a fraction decays it, 1 carries it): the document boundary rule of the family's streams.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from memkernel.scan import linear_recurrence, timescale_gate_bias


class AffineCore(nn.Module):
  """A gated diagonal affine recurrence over the residual stream."""

  d_model: int
  scan_impl: str = "linear"
  # Standard deviation of the output projection at initialisation, times d_model ** -0.5: below
  # 1 the core enters the residual stream small, so a token's own embedding dominates it.
  output_scale: float = 1.0

  @nn.compact
  def __call__(self, x_BTD: jax.Array, h0_BD: jax.Array,
               carry_BT: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
    """(y [B, T, D], the state after the last token [B, D])."""
    d = self.d_model
    gate = nn.Dense(d, kernel_init=nn.initializers.normal(0.02),
                    bias_init=lambda *_: jnp.asarray(timescale_gate_bias(d, 1.0, 256.0),
                                                     jnp.float32), name="gate")
    a_BTD = jax.nn.sigmoid(gate(x_BTD).astype(jnp.float32))
    b_BTD = jnp.sqrt(jnp.maximum(1.0 - a_BTD * a_BTD, 0.0)) * nn.Dense(
        d, use_bias=False, name="input")(x_BTD).astype(jnp.float32)
    if carry_BT is not None:
      a_BTD = a_BTD * carry_BT[:, :, None].astype(jnp.float32)
    h_BTD = linear_recurrence(a_BTD, b_BTD, h0_BD, self.scan_impl)
    y_BTD = nn.Dense(d, use_bias=False, kernel_init=nn.initializers.normal(self.output_scale * d ** -0.5),
                     name="output")(h_BTD)
    return y_BTD, h_BTD[:, -1]

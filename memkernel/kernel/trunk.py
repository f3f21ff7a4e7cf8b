"""LocalTrunk: a short causal convolution followed by R gated diagonal affine recurrences (roots).

The recurrence itself is the shared pure `memkernel.scan.linear_recurrence`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from memkernel.kernel.config import KernelConfig
from memkernel.scan import linear_recurrence, timescale_gate_bias


def _root_gate_bias(config: KernelConfig) -> np.ndarray:
  """Logit of a per-token decay exp(-1/tau), tau log-spaced; root r owns the r-th band of scales."""
  r, d = config.num_roots, config.d_model
  return timescale_gate_bias(r * d, config.min_timescale, config.max_timescale).reshape(r, d)


class LocalTrunk(nn.Module):
  """Short causal depthwise convolution followed by R gated diagonal affine recurrences.

  Root r: a_t = sigmoid(u_t Wa_r + ba_r), h_t = a_t * h_{t-1} + sqrt(1 - a_t^2) * (u_t Wb_r).
  The gate biases start at distinct timescales per root so the roots do not start collapsed.
  """

  config: KernelConfig

  def setup(self):
    c = self.config
    r, d = c.num_roots, c.d_model
    self.conv_w = self.param("conv_w", nn.initializers.normal(0.5), (c.conv_width, d))
    self.conv_b = self.param("conv_b", nn.initializers.zeros, (d,))
    self.gate_w = self.param("gate_w", nn.initializers.normal(0.02), (r, d, d))
    self.gate_b = self.param("gate_b", lambda *_: jnp.asarray(_root_gate_bias(c), jnp.float32))
    self.in_w = self.param("in_w", nn.initializers.lecun_normal(), (r, d, d))
    self.out_w = self.param("out_w", nn.initializers.normal(d ** -0.5 / r), (r, d, d))

  def conv(self, xn_BTD, conv_BWD, lag_valid_BTW=None):
    """Causal conv over [previous W-1 inputs, xn].

    Args:
      xn_BTD: normed inputs.
      conv_BWD: the W - 1 inputs before them.
      lag_valid_BTW: optional bool [B, T, W]; lag j of token t reads zeros where False (a lag that
        reaches before its document's start, `pos_in_doc < j`).
    Returns:
      u_BTD (the depthwise conv), the W lags [B, T, D] (xn_t, xn_{t-1}, ..., xn_{t-W+1}) and the
      new conv state.
    """
    w = self.config.conv_width
    full = jnp.concatenate([conv_BWD, xn_BTD], axis=1)
    t = xn_BTD.shape[1]
    lags = [full[:, w - 1 - j: w - 1 - j + t] for j in range(w)]
    if lag_valid_BTW is not None:
      lags = [jnp.where(lag_valid_BTW[:, :, j, None], lag, 0.0) for j, lag in enumerate(lags)]
    u = self.conv_b + sum(lag * self.conv_w[j] for j, lag in enumerate(lags))
    return u, lags, full[:, t:]

  def recur(self, u_BTD, roots_BRD, impl, carry_scale_BT=None):
    """All roots over the chunk; returns (per-root outputs [B, T, R, D], final states [B, R, D]).

    `carry_scale_BT` (optional float [B, T]) multiplies the carried state at each token, in the
    `a_t * h_{t-1}` term only: 0 restarts a root at a document start, a decay shrinks it.
    """
    a = jax.nn.sigmoid(jnp.einsum("btd,rde->btre", u_BTD, self.gate_w) + self.gate_b)
    x = jnp.einsum("btd,rde->btre", u_BTD, self.in_w)
    b = jnp.sqrt(jnp.maximum(1.0 - a * a, 0.0)) * x
    if carry_scale_BT is not None:
      a = a * carry_scale_BT[:, :, None, None]
    bt, t, r, d = a.shape
    h = linear_recurrence(jnp.moveaxis(a, 2, 1).reshape(bt * r, t, d),
                          jnp.moveaxis(b, 2, 1).reshape(bt * r, t, d),
                          roots_BRD.reshape(bt * r, d), impl)
    h = jnp.moveaxis(h.reshape(bt, r, t, d), 1, 2)
    return h, h[:, -1]

  def project(self, roots_BTRD, keep_R):
    """Sum of the roots' output projections, dropped roots zeroed."""
    return jnp.einsum("btrd,rde->bte", roots_BTRD * keep_R[:, None], self.out_w)

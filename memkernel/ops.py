"""Small shared array operations used by the hot paths of more than one module."""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -1e30


def matvec(mat: jax.Array, vec: jax.Array) -> jax.Array:
  """[..., C, X] @ [..., X] -> [..., C] as one batched matmul (XLA:CPU runs the equivalent
  many-batch-dim einsum several times slower)."""
  lead = vec.shape[:-1]
  out = jnp.matmul(mat.reshape((-1,) + mat.shape[-2:]), vec.reshape(-1, vec.shape[-1], 1))
  return out.reshape(lead + mat.shape[-2:-1])


def vecmat(vec: jax.Array, mat: jax.Array) -> jax.Array:
  """[..., C] @ [..., C, X] -> [..., X] as one batched matmul."""
  lead = vec.shape[:-1]
  out = jnp.matmul(vec.reshape(-1, 1, vec.shape[-1]), mat.reshape((-1,) + mat.shape[-2:]))
  return out.reshape(lead + mat.shape[-1:])

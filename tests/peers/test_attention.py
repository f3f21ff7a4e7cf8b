"""Tests for the peers' pure attention functions (no Flax)."""

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np

from memkernel.peers import attention

# Two rows, three documents each, with different boundaries (37 tokens).
_SEGMENTS = np.array([[0] * 5 + [1] * 14 + [2] * 18, [0] * 11 + [3] * 3 + [4] * 23], np.int32)


def _qkv(seed: int, seq_len: int, batch: int = 2):
  return jax.random.normal(jax.random.PRNGKey(seed), (3, batch, seq_len, 2, 4))


class AttentionFunctionTest(parameterized.TestCase):

  @parameterized.parameters((37, 8, False), (32, 8, False), (5, 8, False), (20, 3, False),
                            (37, 8, True), (37, 3, True))
  def test_blockwise_matches_band_mask(self, seq_len, window, documents):
    q, k, v = _qkv(seq_len * 100 + window, seq_len)
    segments = jnp.asarray(_SEGMENTS[:, :seq_len]) if documents else None
    blockwise = jax.jit(attention.blockwise_sliding_window_attention, static_argnums=3)
    banded = jax.jit(attention.banded_attention, static_argnums=3)
    out = blockwise(q, k, v, window, segments)
    chex.assert_shape(out, (2, seq_len, 2, 4))
    chex.assert_trees_all_close(out, banded(q, k, v, window, segments), atol=1e-5)

  def test_band_mask_with_large_window_is_causal_attention(self):
    q, k, v = _qkv(1, 11, batch=1)
    banded = jax.jit(attention.banded_attention, static_argnums=3)
    chex.assert_trees_all_close(banded(q, k, v, 11), jax.jit(attention.causal_attention)(q, k, v),
                                atol=1e-5)

  @parameterized.parameters((37, 8, False), (32, 8, False), (5, 8, False), (37, 8, True))
  def test_blocked_causal_attention_matches_causal_attention(self, seq_len, block, documents):
    q, k, v = _qkv(seq_len + block, seq_len)
    segments = jnp.asarray(_SEGMENTS[:, :seq_len]) if documents else None
    blocked = lambda q, k, v: attention.blocked_causal_attention(q, k, v, block, segments)
    causal = lambda q, k, v: attention.causal_attention(q, k, v, segments)
    chex.assert_trees_all_close(jax.jit(blocked)(q, k, v), jax.jit(causal)(q, k, v), atol=1e-5)
    # And its gradient, which the blocks recompute.
    loss = lambda fn: lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))
    grads = jax.jit(jax.grad(loss(blocked), argnums=(0, 1, 2)))(q, k, v)
    chex.assert_trees_all_close(grads, jax.grad(loss(causal), argnums=(0, 1, 2))(q, k, v),
                                atol=1e-5)

  @parameterized.parameters(None, 4)
  def test_documents_attend_as_if_alone(self, window):
    q, k, v = _qkv(7, 37)
    segments = jnp.asarray(_SEGMENTS)
    if window is None:
      out = attention.causal_attention(q, k, v, segments)
      alone = attention.causal_attention
    else:
      out = attention.blockwise_sliding_window_attention(q, k, v, window, segments)
      alone = lambda q, k, v: attention.banded_attention(q, k, v, window)
    for row in range(2):
      starts = np.flatnonzero(np.diff(_SEGMENTS[row], prepend=-1))
      for start, end in zip(starts, list(starts[1:]) + [37]):
        part = lambda x: x[row:row + 1, start:end]
        chex.assert_trees_all_close(part(out), alone(part(q), part(k), part(v)), atol=1e-5)

  def test_band_mask(self):
    np.testing.assert_array_equal(attention.band_mask(3, 4, 2, offset=1),
                                  [[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]])
    np.testing.assert_array_equal(attention.band_mask(2, 2, None), [[1, 0], [1, 1]])

  def test_blocking(self):
    self.assertEqual(attention.sliding_window_blocking(37, 8), (8, 5, 16))
    self.assertEqual(attention.sliding_window_blocking(32, 8), (8, 4, 16))
    self.assertEqual(attention.sliding_window_blocking(6, 8), (6, 1, 6))

  def test_rope_depends_on_relative_position_only(self):
    q, k, _ = _qkv(3, 5, batch=1)
    scores = lambda offset: jnp.einsum(
        "bqnh,bknh->bnqk", attention.apply_rope(q, offset + jnp.arange(5)),
        attention.apply_rope(k, offset + jnp.arange(5)))
    chex.assert_trees_all_close(scores(0), scores(100), atol=1e-4)


if __name__ == "__main__":
  absltest.main()

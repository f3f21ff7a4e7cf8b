"""The brain-core's working memory: the window of the last W tokens, in any chunking, causal,
reset at document boundaries."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memkernel.braincore.working import WorkingMemory, init_window
from memkernel.peers import attention

D, N, W = 16, 2, 5


@pytest.fixture(scope="module")
def setup():
  wm = WorkingMemory(d_model=D, num_heads=N, window=W)
  x = jax.random.normal(jax.random.key(0), (2, 19, D))
  params = wm.init(jax.random.key(1), x, init_window(2, W, N, D // N))
  return wm, params, x


def test_chunks_equal_the_whole_sequence_and_a_band_of_w_tokens(setup):
  wm, params, x = setup
  whole, cache = wm.apply(params, x, init_window(2, W, N, D // N))
  pieces, c = [], init_window(2, W, N, D // N)
  for a, b in ((0, 1), (1, 8), (8, 9), (9, 19)):   # one token, more than W, one, the rest
    y, c = wm.apply(params, x[:, a:b], c)
    pieces.append(y)
  np.testing.assert_allclose(jnp.concatenate(pieces, 1), whole, atol=1e-5)
  assert int(c.position) == 19 == int(cache.position)
  # The same as the sliding-window peer's banded attention on the whole sequence.
  p = params["params"]
  positions = jnp.arange(19)
  q = attention.apply_rope(jnp.einsum("btd,dnh->btnh", x, p["query"]["kernel"]), positions)
  k = attention.apply_rope(jnp.einsum("btd,dnh->btnh", x, p["key"]["kernel"]), positions)
  v = jnp.einsum("btd,dnh->btnh", x, p["value"]["kernel"])
  o = attention.masked_attention(q, k, v, jnp.asarray(attention.band_mask(19, 19, W)))
  np.testing.assert_allclose(jnp.einsum("btnh,nhd->btd", o, p["out"]["kernel"]), whole,
                             atol=1e-5)


def test_the_future_does_not_change_the_past(setup):
  wm, params, x = setup
  changed = x.at[:, 12:].add(1.0)
  empty = init_window(2, W, N, D // N)
  np.testing.assert_allclose(wm.apply(params, changed, empty)[0][:, :12],
                             wm.apply(params, x, empty)[0][:, :12], atol=1e-6)


def test_a_document_boundary_resets_the_window_unless_carried(setup):
  wm, params, x = setup
  segments = jnp.broadcast_to((jnp.arange(19) >= 10).astype(jnp.int32), (2, 19))
  y, _ = wm.apply(params, x, init_window(2, W, N, D // N), segments)
  fresh, _ = wm.apply(params, x[:, 10:], init_window(2, W, N, D // N))
  np.testing.assert_allclose(y[:, 10:], fresh, atol=1e-5)   # positions differ; RoPE is relative
  carried = WorkingMemory(d_model=D, num_heads=N, window=W, carry=True)
  y_carry, _ = carried.apply(params, x, init_window(2, W, N, D // N), segments)
  np.testing.assert_allclose(y_carry, wm.apply(params, x, init_window(2, W, N, D // N))[0],
                             atol=1e-5)


def test_a_cache_of_another_shape_is_named(setup):
  wm, params, x = setup
  with pytest.raises(ValueError, match="this layer needs"):
    wm.apply(params, x, init_window(2, W + 1, N, D // N))

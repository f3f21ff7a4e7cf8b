"""The brain-core's episodic memory: reads find what writes stored, the weakest item goes first,
every example owns its items, and gradients reach the gate through the reads."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memkernel.braincore import episodic


def _filled(strengths):
  """A memory of one example whose item i has key e_i, value i + 1, the given strength and
  origin 10 i."""
  m = len(strengths)
  return episodic.EpisodicMemory(jnp.eye(m)[None] * 4.0, (jnp.arange(m) + 1.0)[None, :, None],
                                 jnp.asarray(strengths, jnp.float32)[None],
                                 (10 * jnp.arange(m, dtype=jnp.int32))[None])


def test_a_written_item_is_what_a_later_read_returns():
  memory = episodic.init_episodic(2, items=8, key_dim=4, value_dim=3)
  key = jnp.array([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]) * 4.0
  value = jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
  out, weights, _ = episodic.read(memory, key[:, None], k=2)
  np.testing.assert_array_equal(out, 0.0)            # empty: nothing to read
  np.testing.assert_array_equal(weights, 0.0)
  memory = episodic.write(memory, key, value, jnp.array([0.9, 0.9]))
  out, weights, _ = episodic.read(memory, key[:, None], k=2)
  chex.assert_shape(out, (2, 1, 3))
  np.testing.assert_allclose(out[:, 0], value, rtol=1e-6)   # the only live item
  np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(episodic.occupancy(memory), [1 / 8, 1 / 8])


def test_the_weakest_item_is_evicted_only_by_a_stronger_gate():
  memory = _filled([0.5, 0.2, 0.9, 0.7])
  new_key, new_value = jnp.full((1, 4), 0.5), jnp.array([[100.0]])
  weak = episodic.write(memory, new_key, new_value, jnp.array([0.1]))   # below 0.2: no write
  chex.assert_trees_all_equal(weak, memory)
  strong = episodic.write(memory, new_key, new_value, jnp.array([0.3]))
  np.testing.assert_allclose(strong.strength_BM[0], [0.5, 0.3, 0.9, 0.7])
  np.testing.assert_allclose(strong.values_BME[0, :, 0], [1.0, 100.0, 3.0, 4.0])
  np.testing.assert_allclose(strong.keys_BMD[0, 1], new_key[0])


def test_many_candidates_take_the_weakest_items_strongest_first():
  memory = _filled([0.5, 0.2, 0.9, 0.1, 0.7])
  keys = jnp.stack([jnp.full((5,), float(i)) for i in (1, 2, 3)])[None]
  values = jnp.array([[[10.0], [20.0], [30.0]]])
  # Ranked by gate: candidate 2 (0.6) takes item 3 (0.1), candidate 0 (0.4) item 1 (0.2),
  # candidate 1 (0.3) would take item 0 (0.5) but is weaker: not written.
  written = episodic.write_many(memory, keys, values, jnp.array([[0.4, 0.3, 0.6]]))
  np.testing.assert_allclose(written.strength_BM[0], [0.5, 0.4, 0.9, 0.6, 0.7])
  np.testing.assert_allclose(written.values_BME[0, :, 0], [1.0, 10.0, 3.0, 30.0, 5.0])
  np.testing.assert_allclose(written.keys_BMD[0, 3], keys[0, 2])
  # One candidate: the weakest item only.
  one = episodic.write_many(memory, keys[:, :1], values[:, :1], jnp.array([[0.3]]))
  np.testing.assert_allclose(one.strength_BM[0], [0.5, 0.2, 0.9, 0.3, 0.7])
  np.testing.assert_allclose(one.values_BME[0, :, 0], [1.0, 2.0, 3.0, 10.0, 5.0])
  with pytest.raises(ValueError, match="write_many: keys"):   # Keys 4 wide, items' 5.
    episodic.write_many(memory, jnp.ones((1, 3, 4)), jnp.ones((1, 3, 1)), jnp.ones((1, 3)))


def test_offer_counts_the_candidates_it_stores():
  memory = _filled([0.5, 0.2, 0.9, 0.1, 0.7])
  keys, values = jnp.ones((1, 3, 5)), jnp.ones((1, 3, 1))
  written, stored = episodic.offer(memory, keys, values, jnp.array([[0.4, 0.3, 0.6]]))
  np.testing.assert_array_equal(stored, [2])
  np.testing.assert_allclose(written.strength_BM[0], [0.5, 0.4, 0.9, 0.6, 0.7])
  _, stored = episodic.offer(memory, keys[:, :2], values[:, :2], jnp.array([[0.05, 0.01]]))
  np.testing.assert_array_equal(stored, [0])
  # Random memories and gates: the count is the items the write changed.
  k1, k2 = jax.random.split(jax.random.key(0))
  strengths = jax.random.uniform(k1, (3, 6)) * (jax.random.uniform(k2, (3, 6)) > 0.3)
  memory = episodic.EpisodicMemory(jnp.zeros((3, 6, 2)), jnp.zeros((3, 6, 1)), strengths,
                                   jnp.full((3, 6), -1, jnp.int32))
  gates = jax.random.uniform(jax.random.key(1), (3, 4))
  written, stored = episodic.offer(memory, jnp.ones((3, 4, 2)), jnp.ones((3, 4, 1)), gates)
  np.testing.assert_array_equal(stored, jnp.sum(written.strength_BM != strengths, axis=-1))


def test_an_item_keeps_the_position_of_the_token_that_wrote_it():
  memory = _filled([0.5, 0.2, 0.9, 0.0])
  keys, values = jnp.ones((1, 2, 4)), jnp.ones((1, 2, 1))
  written = episodic.write_many(memory, keys, values, jnp.array([[0.3, 0.6]]),
                                origins_BC=jnp.array([[77, 88]]))
  # The stronger candidate (origin 88) takes the empty slot 3, the weaker one the weakest item.
  np.testing.assert_array_equal(written.origin_BM, [[0, 77, 20, 88]])
  # The query-blind read: the k strongest live items, whatever the query.
  np.testing.assert_array_equal(episodic.strongest(written, 3), [[2, 3, 0]])
  np.testing.assert_array_equal(episodic.origins(written, episodic.strongest(written, 3)),
                                [[20, 88, 0]])
  # Past the live items a slot is -1, and so is its origin; without origins a write gives -1.
  np.testing.assert_array_equal(episodic.strongest(memory, 4), [[2, 0, 1, -1]])
  np.testing.assert_array_equal(episodic.origins(memory, jnp.array([[3, -1, 1]])), [[-1, -1, 10]])
  anonymous = episodic.write(memory, jnp.ones((1, 4)), jnp.ones((1, 1)), jnp.array([0.6]))
  np.testing.assert_array_equal(anonymous.origin_BM, [[0, 10, 20, -1]])
  with pytest.raises(ValueError, match="origins must be"):
    episodic.offer(memory, keys, values, jnp.array([[0.3, 0.6]]), origins_BC=jnp.array([[1]]))


def test_of_more_candidates_than_items_the_strongest_land():
  memory = episodic.init_episodic(1, 4, 2, 1)
  gates = jnp.array([[0.3, 0.9, 0.1, 0.7, 0.8, 0.5]])
  written, stored = episodic.offer(memory, jnp.ones((1, 6, 2)), jnp.ones((1, 6, 1)), gates,
                                   origins_BC=jnp.arange(6)[None])
  np.testing.assert_array_equal(stored, [4])
  assert sorted(np.asarray(written.origin_BM[0]).tolist()) == [1, 3, 4, 5]
  np.testing.assert_allclose(jnp.sort(written.strength_BM[0]), [0.5, 0.7, 0.8, 0.9])


def test_a_threshold_keeps_weak_candidates_out_even_of_empty_slots():
  memory = episodic.init_episodic(1, 4, 2, 1)
  keys, values = jnp.ones((1, 3, 2)), jnp.ones((1, 3, 1))
  gates = jnp.array([[0.3, 0.7, 0.5]])
  written, stored = episodic.offer(memory, keys, values, gates, threshold=0.5)
  np.testing.assert_array_equal(stored, [1])  # 0.5 is not above the threshold.
  np.testing.assert_allclose(jnp.sort(written.strength_BM[0]), [0.0, 0.0, 0.0, 0.7])
  _, stored = episodic.offer(memory, keys, values, gates)
  np.testing.assert_array_equal(stored, [3])  # No threshold: every gate above 0 lands.
  with pytest.raises(ValueError, match="threshold must lie in"):
    episodic.offer(memory, keys, values, gates, threshold=1.0)


def test_every_example_owns_its_items():
  memory = episodic.init_episodic(3, items=4, key_dim=2, value_dim=2)
  memory = episodic.write(memory, jnp.ones((3, 2)), jnp.ones((3, 2)), jnp.array([0.8, 0.0, 0.8]))
  np.testing.assert_array_equal(episodic.occupancy(memory), [0.25, 0.0, 0.25])
  reset = episodic.reset_rows(memory, jnp.array([True, False, False]))
  np.testing.assert_array_equal(episodic.occupancy(reset), [0.0, 0.0, 0.25])
  faded = episodic.decay(memory, jnp.array([0.5, 1.0, 0.25]))
  np.testing.assert_allclose(faded.strength_BM[:, 0], [0.4, 0.0, 0.2])


def test_a_stronger_item_wins_between_equally_close_keys():
  memory = episodic.EpisodicMemory(jnp.ones((1, 2, 2)), jnp.array([[[1.0], [2.0]]]),
                                   jnp.array([[0.2, 0.8]]), jnp.array([[0, 1]], jnp.int32))
  out, weights, index = episodic.read(memory, jnp.ones((1, 1, 2)), k=2)
  assert int(index[0, 0, 0]) == 1
  np.testing.assert_allclose(weights[0, 0], [0.8, 0.2], rtol=1e-5)   # softmax of log strengths
  np.testing.assert_allclose(out[0, 0, 0], 0.8 * 2.0 + 0.2 * 1.0, rtol=1e-5)


def test_gradients_reach_the_gate_and_the_candidate_through_a_later_read():
  memory = _filled([0.5, 0.0, 0.9, 0.7])

  def loss(gate, value):
    written = episodic.write(memory, jnp.array([[0.0, 4.0, 0.0, 0.0]]), value, gate)
    out, _, _ = episodic.read(written, jnp.array([[[0.0, 1.0, 0.0, 1.0]]]), k=2)
    return out.sum()

  d_gate, d_value = jax.jit(jax.grad(loss, argnums=(0, 1)))(jnp.array([0.6]), jnp.array([[7.0]]))
  assert float(jnp.abs(d_gate).sum()) > 0
  assert float(jnp.abs(d_value).sum()) > 0


def test_bad_shapes_and_k_are_named():
  memory = episodic.init_episodic(1, items=4, key_dim=2, value_dim=2)
  with pytest.raises(ValueError, match="k must lie in"):
    episodic.read(memory, jnp.ones((1, 1, 2)), k=5)
  with pytest.raises(ValueError, match="queries must be"):
    episodic.read(memory, jnp.ones((1, 3)), k=1)
  with pytest.raises(ValueError, match="write: key"):
    episodic.write(memory, jnp.ones((1, 3)), jnp.ones((1, 2)), jnp.ones((1,)))
  with pytest.raises(ValueError, match="items must be a positive integer"):
    episodic.init_episodic(1, items=0, key_dim=2, value_dim=2)

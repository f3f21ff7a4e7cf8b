"""The brain-core's procedural memory: reads come before writes, a consolidated association
changes later reads, the norm stays within budget, examples stay apart, the modulator trains."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memkernel.braincore import procedural


def _span(b=2, t=3, o=4, r=2, seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return jax.random.normal(k1, (b, t, o)), jax.random.normal(k2, (b, t, r))


def test_writes_land_only_at_the_boundary_and_change_later_reads():
  pm = procedural.init_procedural(2, out_dim=4, rank=2)
  post, code = _span()
  pm = procedural.accumulate(pm, post, code)
  np.testing.assert_array_equal(procedural.apply(pm, code), 0.0)   # read-only inside the span
  pm = procedural.consolidate(pm, jnp.ones(2), lr=0.1, decay=1.0, budget=100.0)
  expected = 0.1 * np.einsum("bto,btr->bor", post, code)
  np.testing.assert_allclose(pm.fast_BOR, expected, rtol=1e-5)
  np.testing.assert_array_equal(pm.trace_BOR, 0.0)
  np.testing.assert_allclose(procedural.apply(pm, code),
                             np.einsum("bor,btr->bto", expected, code), rtol=1e-5)


def test_the_norm_budget_holds_and_a_zero_modulator_writes_nothing():
  pm = procedural.init_procedural(2, out_dim=4, rank=2)
  post, code = _span(seed=1)
  for _ in range(5):
    pm = procedural.consolidate(procedural.accumulate(pm, 10 * post, code),
                                jnp.array([1.0, 0.0]), lr=1.0, decay=1.0, budget=0.5)
  norms = np.sqrt((np.asarray(pm.fast_BOR) ** 2).sum(axis=(1, 2)))
  np.testing.assert_allclose(norms[0], 0.5, rtol=1e-5)
  assert norms[1] == 0.0


def test_examples_stay_apart_and_boundaries_reset_or_scale():
  pm = procedural.init_procedural(2, out_dim=4, rank=2)
  post, code = _span(seed=2)
  mask = jnp.array([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
  pm = procedural.consolidate(procedural.accumulate(pm, post, code, mask), jnp.ones(2), lr=1.0,
                              decay=1.0, budget=100.0)
  assert float(jnp.abs(pm.fast_BOR[0]).sum()) > 0 and float(jnp.abs(pm.fast_BOR[1]).sum()) == 0
  halved = procedural.scale(pm, jnp.array([0.5, 1.0]))
  np.testing.assert_allclose(halved.fast_BOR[0], 0.5 * pm.fast_BOR[0])
  cleared = procedural.reset_rows(pm, jnp.array([True, False]))
  np.testing.assert_array_equal(cleared.fast_BOR, 0.0)


def test_a_loss_after_the_boundary_trains_the_modulator():
  post, code = _span(seed=3)

  def loss(modulator):
    pm = procedural.accumulate(procedural.init_procedural(2, 4, 2), post, code)
    pm = procedural.consolidate(pm, modulator, lr=0.5, decay=0.9, budget=10.0)
    return jnp.sum(procedural.apply(pm, code) * post)

  grad = jax.jit(jax.grad(loss))(jnp.ones(2))
  assert np.all(np.asarray(grad) > 0)   # Hebbian: more plasticity, more agreement with post


def test_bad_input_is_named():
  pm = procedural.init_procedural(1, 4, 2)
  with pytest.raises(ValueError, match="codes must be"):
    procedural.apply(pm, jnp.ones((1, 3, 5)))
  with pytest.raises(ValueError, match="accumulate"):
    procedural.accumulate(pm, jnp.ones((1, 3, 4)), jnp.ones((1, 2, 2)))
  with pytest.raises(ValueError, match="decay in"):
    procedural.consolidate(pm, jnp.ones(1), lr=0.1, decay=1.5, budget=1.0)
  with pytest.raises(ValueError, match="rank must be"):
    procedural.init_procedural(1, 4, 0)

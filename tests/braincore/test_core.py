"""The brain-core's affine core: any chunking gives the same outputs, causal, and a document
boundary restarts or decays the state."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memkernel.braincore.core import AffineCore


@pytest.fixture(scope="module")
def setup():
  core = AffineCore(d_model=8)
  x = jax.random.normal(jax.random.key(0), (2, 24, 8))
  h0 = jnp.zeros((2, 8))
  params = core.init(jax.random.key(1), x, h0)
  return core, params, x, h0


@pytest.mark.parametrize("impl", ["linear", "associative"])
def test_chunks_and_single_steps_agree_with_the_whole_sequence(setup, impl):
  core, params, x, h0 = setup
  core = AffineCore(d_model=8, scan_impl=impl)
  whole, h_end = core.apply(params, x, h0)
  h, pieces = h0, []
  for a, b in ((0, 1), (1, 10), (10, 11), (11, 24)):   # one token, several, one, the rest
    y, h = core.apply(params, x[:, a:b], h)
    pieces.append(y)
  np.testing.assert_allclose(jnp.concatenate(pieces, 1), whole, atol=1e-5)
  np.testing.assert_allclose(h, h_end, atol=1e-5)


def test_the_future_does_not_change_the_past(setup):
  core, params, x, h0 = setup
  changed = x.at[:, 15:].set(jax.random.normal(jax.random.key(5), (2, 9, 8)))
  np.testing.assert_allclose(core.apply(params, changed, h0)[0][:, :15],
                             core.apply(params, x, h0)[0][:, :15], atol=1e-6)


def test_a_boundary_restarts_or_decays_the_state(setup):
  core, params, x, h0 = setup
  carry = jnp.ones((2, 24)).at[:, 12].set(0.0)   # a document starts at token 12
  y, _ = core.apply(params, x, h0, carry)
  fresh, _ = core.apply(params, x[:, 12:], h0)   # the second document alone
  np.testing.assert_allclose(y[:, 12:], fresh, atol=1e-5)
  half = jnp.ones((2, 24)).at[:, 12].set(0.5)
  y_half, _ = core.apply(params, x, h0, half)
  assert not np.allclose(y_half[:, 12:], fresh, atol=1e-4)   # decayed, not forgotten
  assert not np.allclose(y_half[:, 12:], core.apply(params, x, h0)[0][:, 12:], atol=1e-4)

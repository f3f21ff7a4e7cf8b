"""The write gate's hindsight teacher: a candidate's target says whether a later scored
position's dense read wants it first; only candidates such a position could read count."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memkernel.braincore import write_teacher

SPAN, K = 4, 8


def _setup(matches, b=1, n=3, c=2, t=16, scale=8.0):
  """Random keys; query t set to `scale` times the unit key of candidate (span, slot) for each
  (t, span, slot) in `matches`."""
  keys = jax.random.normal(jax.random.key(0), (b, n, c, K)) * 0.1
  queries = jax.random.normal(jax.random.key(1), (b, t, K)) * 0.1
  for position, span, slot in matches:
    unit = jnp.zeros((K,)).at[(span * c + slot) % K].set(1.0)
    keys = keys.at[:, span, slot].set(unit * scale)
    queries = queries.at[:, position].set(unit * scale)
  return queries, keys


@pytest.mark.parametrize("target", write_teacher.TARGETS)
def test_the_candidate_a_scored_query_finds_is_the_target(target):
  queries, keys = _setup([(9, 0, 1)])  # Position 9 lies in span 2: it reads spans 0 and 1.
  mask = jnp.zeros((1, 16)).at[0, 9].set(1.0)
  targets, weights = write_teacher.write_targets(queries, keys, mask, SPAN, target=target)
  assert float(targets[0, 0, 1]) > 0.99
  assert float(jnp.max(targets.at[0, 0, 1].set(0.0))) < 0.01  # 'near': e^-(gap ~ 64 / sqrt 8)
  # Spans 0 and 1 are visible to the scored position; span 2 is its own: weight 0.
  np.testing.assert_array_equal(weights[0], [[1, 1], [1, 1], [0, 0]])


def test_unscored_positions_and_the_own_span_teach_nothing():
  queries, keys = _setup([(9, 0, 1), (10, 2, 0)])
  scored = jnp.zeros((1, 16)).at[0, 13].set(1.0)  # Neither matching position is scored.
  targets, _ = write_teacher.write_targets(queries, keys, scored, SPAN)
  other = queries.at[:, 9:11].set(-queries[:, 9:11])  # What unscored positions ask is moot.
  np.testing.assert_array_equal(targets, write_teacher.write_targets(other, keys, scored, SPAN)[0])
  assert float(jnp.max(targets)) == 1.0  # Position 13's own best item.
  own = jnp.zeros((1, 16)).at[0, 10].set(1.0)  # 10 matches a candidate of its own span.
  targets, weights = write_teacher.write_targets(queries, keys, own, SPAN)
  assert float(targets[0, 2, 0]) == 0.0 and float(weights[0, 2, 0]) == 0.0


def test_a_resetting_memory_reads_only_its_own_document():
  queries, keys = _setup([(9, 0, 1)])
  mask = jnp.zeros((1, 16)).at[0, 9].set(1.0)
  segments = jnp.array([[0] * 8 + [1] * 8])  # Span 2 (position 9) starts document 1.
  targets, weights = write_teacher.write_targets(queries, keys, mask, SPAN, segments)
  assert float(jnp.max(targets)) == 0.0 and float(jnp.max(weights)) == 0.0
  carried, _ = write_teacher.write_targets(queries, keys, mask, SPAN)
  assert float(carried[0, 0, 1]) > 0.99


def test_the_loss_pulls_each_weighted_gate_to_its_target_and_ignores_the_rest():
  targets = jnp.array([0.9, 0.1, 0.5])
  weights = jnp.array([1.0, 1.0, 0.0])
  at_target = jnp.log(targets / (1 - targets))
  grad = jax.grad(write_teacher.gate_loss)(at_target, targets, weights)
  np.testing.assert_allclose(grad, 0.0, atol=1e-6)
  grad = jax.grad(write_teacher.gate_loss)(jnp.zeros(3), targets, weights)
  assert float(grad[0]) < 0 < float(grad[1]) and float(grad[2]) == 0.0
  assert float(write_teacher.gate_loss(jnp.zeros(3), targets, jnp.zeros(3))) == 0.0


def test_first_marks_each_scored_reads_first_choice_alone():
  queries, keys = _setup([(9, 0, 1)])
  queries = queries.at[:, 13].set(0.0)  # A flat read: every visible candidate ties.
  mask = jnp.zeros((1, 16)).at[0, 9].set(1.0).at[0, 13].set(1.0)
  near, _ = write_teacher.write_targets(queries, keys, mask, SPAN, target="near")
  first, _ = write_teacher.write_targets(queries, keys, mask, SPAN)
  assert float(jnp.min(near)) == 1.0  # 'near' marks every candidate of the flat read.
  assert float(first[0, 0, 1]) == 1.0 and float(jnp.sum(first)) == 2.0
  with pytest.raises(ValueError, match="target must be one of"):
    write_teacher.write_targets(queries, keys, mask, SPAN, target="last")


def test_bad_shapes_are_named():
  with pytest.raises(ValueError, match="write_targets: queries"):
    write_teacher.write_targets(jnp.ones((1, 8, K)), jnp.ones((1, 3, 2, K)), jnp.ones((1, 8)),
                                SPAN)  # 3 spans of 4 do not fit in 8 positions.

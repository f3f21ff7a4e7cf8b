"""Routing metrics (`memkernel.metrics`) and the evaluation's standard error."""

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

from memkernel import evaluate
from memkernel import metrics
from memkernel import probes
from memkernel.outputs import RouteTrace


def _trace(leaves_BTHK):
  shape = leaves_BTHK.shape
  zeros = jnp.zeros(shape[:3])
  return RouteTrace(leaves=leaves_BTHK, weights=jnp.ones(shape), runner_up=-jnp.ones(shape, int),
                    entropy=zeros, start_level=zeros.astype(int),
                    read_probs=jnp.zeros(shape + (1,)), read_active=zeros > 0)


class QueryBlindTest(absltest.TestCase):

  def test_the_most_frequent_answer_leaves(self):
    answers = jnp.asarray([[0, 0, 0, 1, 2, 5]])[..., None]
    mask = jnp.asarray([[1, 1, 1, 1, 1, 0]], jnp.float32)  # leaf 5 is not scored
    self.assertAlmostEqual(float(metrics.query_blind_recall(answers, mask, 1, 8)), 3 / 5)
    self.assertAlmostEqual(float(metrics.query_blind_recall(answers, mask, 2, 8)), 4 / 5)
    self.assertAlmostEqual(float(metrics.query_blind_recall(answers, mask, 8, 8)), 1.0)

  def test_zoology_mqar_is_found_blind_and_scattered_is_not(self):
    def blind(layout):
      task = probes.TaskConfig("mqar", seq_len=2048, layout=layout)
      batch = probes.generate(task, jax.random.key(0), 8)
      return float(metrics.query_blind_recall(batch["answer_leaves"], batch["mask"], 8, 128))
    self.assertEqual(blind("zoology"), 1.0)  # 4 heads x beam 2 cover the first 4 leaves
    self.assertLess(blind("scattered"), 0.25)  # 8 of 64 leaves of the first half


class RoutingMetricsTest(absltest.TestCase):

  def test_per_head_recall_and_its_baseline(self):
    t, leaf = 64, 16
    answers = jnp.full((1, t, 2), -1).at[0, 40, 0].set(1).at[0, 50, 0].set(2)
    mask = jnp.zeros((1, t)).at[0, 40].set(1.0).at[0, 50].set(1.0)
    # Head 0 selects the answer leaf, head 1 always leaf 0 (a query-blind head).
    head0 = jnp.broadcast_to(answers[..., :1], (1, t, 1))
    leaves = jnp.concatenate([head0, jnp.zeros((1, t, 1), int)], axis=2)[..., None]
    batch = {"tokens": jnp.zeros((1, t), jnp.int32), "answer_leaves": answers, "mask": mask}
    m = metrics.routing_metrics([_trace(leaves)], batch, leaf)
    self.assertEqual(float(m["layer_0/routing_recall"]), 1.0)
    self.assertEqual(float(m["layer_0/routing_recall/head_0"]), 1.0)
    self.assertEqual(float(m["layer_0/routing_recall/head_1"]), 0.0)
    self.assertEqual(float(m["layer_0/routing_recall_blind/head"]), 0.5)  # one slot: one answer
    self.assertEqual(float(m["layer_0/routing_recall_blind"]), 1.0)  # two slots: both


class SummaryTest(absltest.TestCase):

  def test_queries_are_summed_and_the_standard_error_is_binomial(self):
    per_batch = [{"accuracy": 0.75, "loss": 1.0, "queries": 512.0},
                 {"accuracy": 0.25, "loss": 3.0, "queries": 512.0}]
    out = evaluate._summary(per_batch)  # pylint: disable=protected-access
    self.assertEqual(out["queries"], 1024.0)
    self.assertEqual(out["accuracy"], 0.5)
    self.assertEqual(out["loss"], 2.0)
    np.testing.assert_allclose(out["accuracy_se"], np.sqrt(0.25 / 1024))


if __name__ == "__main__":
  absltest.main()

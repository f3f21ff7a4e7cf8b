"""A real learning test: on a tiny retrieval task the memory is what makes the model learn.

Smoke MQAR (V 64, T 64 = 4 leaves, 4 key-value pairs, 1 layer, d 16) trained through the harness
for a few hundred steps. The full kernel reading the true answer leaves (oracle routes: reading,
separated from finding) reaches high accuracy; the same model with both memory reads switched off
stays near chance, so the probe can falsify the memory. (The routed kernel learning the same task
is `test_audit`'s trained model.)
"""

import importlib
import tempfile

from absl.testing import absltest

from memkernel import train as train_lib


def _train(arg, **model):
  config = importlib.import_module("configs.mqar").get_config(arg)
  config.train.update(dict(steps=200, batch_size=16, lr=1e-2, warmup_steps=10, log_every=100,
                           ckpt_every=200))
  config.eval.update(dict(lengths=(config.task.seq_len,), batches=2, audit_batches=0))
  config.model.update(model)
  with tempfile.TemporaryDirectory() as workdir:
    summary = train_lib.train_and_evaluate(config, workdir)
  return summary["lengths"][str(config.task.seq_len)]


class LearningTest(absltest.TestCase):

  def test_oracle_routes_learn_and_no_memory_does_not(self):
    oracle = _train("smoke,oracle")
    self.assertGreater(oracle["accuracy"], 0.9, oracle)
    no_memory = _train("smoke", use_tree_read=False, use_exact_read=False)
    self.assertLess(no_memory["accuracy"], 0.3, no_memory)


if __name__ == "__main__":
  absltest.main()

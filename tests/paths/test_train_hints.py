"""Training with routing hints from the run's own read traces (`memkernel.paths.train_hints`).

Checked: a table of no hints trains exactly as a run without hints, and a table that hints every
query changes the step; the refresher's table is a function of (parameters, step), its gate
switches heads on by their held-out read hit rate, and the shuffled control builds another
table from the same reads; a hinted run resumed from a checkpoint ends where the uninterrupted
run ends, with the same metrics rows, and its evaluation says which hints it used; bad settings
are refused before anything compiles.
"""

import importlib
import json
import os
import tempfile

from absl.testing import absltest
import jax
import numpy as np

from memkernel import evaluate as evaluate_lib
from memkernel import experiment as experiment_lib
from memkernel import optim
from memkernel import train as train_lib
from memkernel.paths import train_hints

RUN = {"train.steps": 6, "train.decay_steps": 20, "train.log_every": 1, "train.ckpt_every": 3,
       "train.eval_every": 0, "train.hints_every": 3, "train.route_hints": "traces"}


def config(overrides=None, task="mqar_scattered"):
  cfg = importlib.import_module(f"configs.{task}").get_config("smoke")
  cfg.eval.lengths = (cfg.task.seq_len,)
  cfg.eval.batches = 1
  for path, value in (overrides or {}).items():
    section, field = path.split(".")
    cfg[section][field] = value
  return cfg


def rows(workdir):
  with open(os.path.join(workdir, experiment_lib.METRICS_FILE)) as f:
    return [{k: v for k, v in json.loads(line).items() if k not in ("time", "steps_per_s")}
            for line in f]


class TrainHintsTest(absltest.TestCase):
  """One class, so that its tests share one worker's compiled steps."""

  def test_no_hints_train_as_none_and_hints_change_the_step(self):
    mesh = evaluate_lib.make_mesh()
    hinted = experiment_lib.parse_config(config(RUN))
    plain = experiment_lib.parse_config(config({**RUN, "train.route_hints": "off"}))
    key = experiment_lib.data_key(0)
    init = lambda: optim.init_state(plain, jax.random.key(0))
    groups = hinted.model.num_layers * hinted.model.num_route_heads
    vocab = hinted.task.vocab_size
    empty = train_hints.HintRefresher(hinted).empty()
    self.assertEqual(empty[0].shape, (groups, vocab))
    # Every query hinted toward what follows one filler token (fillers are [V/2, V)).
    every = (np.full((groups, vocab), vocab // 2 + 8, np.int32),
             np.full((groups, vocab), 16.0, np.float32))
    base, base_metrics = train_lib.make_train_step(plain, mesh)(init(), key)
    none, _ = train_lib.make_train_step(hinted, mesh)(init(), key, empty)
    some, some_metrics = train_lib.make_train_step(hinted, mesh)(init(), key, every)
    for a, b in zip(jax.tree.leaves(base.params), jax.tree.leaves(none.params)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-7)
    self.assertGreater(max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                           for a, b in zip(jax.tree.leaves(base.params),
                                           jax.tree.leaves(some.params))), 1e-5)
    self.assertNotEqual(float(base_metrics["loss"]), float(some_metrics["loss"]))

  def test_the_table_is_a_function_of_the_parameters_and_the_step(self):
    experiment = experiment_lib.parse_config(config({**RUN, "train.hints_gate": 0.0}))
    params = optim.init_state(experiment, jax.random.key(1)).params
    refresher = train_hints.HintRefresher(experiment)
    (token, weight), stats = refresher.refresh(params, 3)
    (token2, weight2), _ = train_hints.HintRefresher(experiment).refresh(params, 3)
    np.testing.assert_array_equal(token, token2)
    np.testing.assert_array_equal(weight, weight2)
    # Gate 0: every head is on; each head's strongest hint has the full weight alpha.
    self.assertEqual(stats["hints/heads_on"], 1.0)
    self.assertGreater(stats["hints/edges"], 0)
    np.testing.assert_allclose(weight.max(axis=1), experiment.train.hints_alpha, rtol=1e-6)
    self.assertTrue(np.all((token >= 0) == (weight > 0)))
    # Another step reads other batches; the shuffled control permutes the same reads.
    (token3, _), _ = refresher.refresh(params, 6)
    self.assertFalse(np.array_equal(token, token3))
    shuffled = experiment_lib.parse_config(
        config({**RUN, "train.hints_gate": 0.0, "train.route_hints": "shuffled"}))
    (token4, _), _ = train_hints.HintRefresher(shuffled).refresh(params, 3)
    self.assertFalse(np.array_equal(token, token4))
    # A gate above every head's held-out hit rate switches every head off.
    gated = experiment_lib.parse_config(config({**RUN, "train.hints_gate": 1.0}))
    (token5, weight5), stats5 = train_hints.HintRefresher(gated).refresh(params, 3)
    if stats5["hints/read_hit"] < 1.0:
      self.assertLess(stats5["hints/heads_on"], 1.0)
    # Each head's row is the ungated one or switched off whole.
    for g in range(len(token)):
      kept = np.array_equal(token5[g], token[g]) and np.array_equal(weight5[g], weight[g])
      off = np.all(token5[g] == -1) and np.all(weight5[g] == 0)
      self.assertTrue(kept or off, g)

  def test_a_hinted_run_resumes_exactly(self):
    tmp = tempfile.TemporaryDirectory()
    self.addCleanup(tmp.cleanup)
    whole, halves = os.path.join(tmp.name, "whole"), os.path.join(tmp.name, "halves")
    summary = train_lib.train_and_evaluate(config(RUN), whole)
    train_lib.train_and_evaluate(config({**RUN, "train.steps": 3}), halves)
    resumed = train_lib.train_and_evaluate(config(RUN), halves)
    self.assertEqual(rows(whole), rows(halves))
    self.assertEqual(summary["lengths"], resumed["lengths"])
    self.assertEqual(summary["route_hints"]["mode"], "traces")
    self.assertIn("hints/heads_on", rows(whole)[0])

  def test_bad_settings_are_refused_before_compiling(self):
    cases = [
        ({"train.route_hints": "yes"}, "train.route_hints must be one of"),
        ({"train.hints_gate": 1.5}, "train.hints_gate must be in"),
        ({"train.hints_every": 0}, "train.hints_every must be"),
        ({"train.hints_every": 2}, "ckpt_every=3 must be a multiple of train.hints_every=2"),
        ({"train.oracle": True}, "trained without oracle routes"),
        ({"train.batch_size": 1}, "batch_size must be at least 2"),
    ]
    for overrides, message in cases:
      with self.assertRaisesRegex(ValueError, message, msg=str(overrides)):
        experiment_lib.parse_config(config({**RUN, **overrides}))
    dense_config = importlib.import_module("configs.mqar_scattered").get_config("smoke,dense")
    dense_config.train.update({k.split(".")[1]: v for k, v in RUN.items()})
    with self.assertRaisesRegex(ValueError, "needs a routing family"):
      experiment_lib.parse_config(dense_config)


if __name__ == "__main__":
  absltest.main()

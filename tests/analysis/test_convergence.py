"""Steps to an accuracy threshold and the group comparison (`memkernel.analysis.convergence`),
on hand-written metrics files whose answers are known, and the command's one-line errors."""

import json
import os
import tempfile

from absl.testing import absltest
import cli_checks
import numpy as np

from memkernel.analysis import convergence


def make_run(root, name, accuracies, evals=None):
  workdir = os.path.join(root, name)
  os.makedirs(workdir)
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    for i, a in enumerate(accuracies):
      f.write(json.dumps({"step": 10 * (i + 1), "split": "train", "accuracy": a}) + "\n")
      f.write(json.dumps({"step": 10 * (i + 1), "split": "eval", "accuracy": 1.0}) + "\n")
  for file, lengths in (evals or {}).items():
    with open(os.path.join(workdir, file), "w") as f:
      json.dump({"lengths": {str(n): {"accuracy": a, "queries": 2048}
                             for n, a in lengths.items()}}, f)
  return workdir


class ConvergenceTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    tmp = tempfile.TemporaryDirectory()
    self.addCleanup(tmp.cleanup)
    self.root = tmp.name

  def test_steps_to_a_threshold_use_the_trailing_mean(self):
    steps = np.array([10, 20, 30, 40, 50])
    acc = np.array([0.5, 0.96, 0.80, 0.96, 0.97])
    self.assertEqual(convergence.steps_to(steps, acc, 0.95, window=1), 20)
    # Trailing means of 2: 0.73, 0.88, 0.88, 0.965 -> step 50.
    self.assertEqual(convergence.steps_to(steps, acc, 0.95, window=2), 50)
    self.assertIsNone(convergence.steps_to(steps, acc, 0.99, window=1))
    with self.assertRaisesRegex(ValueError, "window must be a positive integer"):
      convergence.steps_to(steps, acc, 0.9, window=0)

  def test_groups_report_means_only_when_every_run_got_there(self):
    fast = [make_run(self.root, f"fast{i}", [0.5, 0.95 + 0.01 * i, 0.99],
                     {"eval.json": {512: (0.9, 0.95)[i]}}) for i in range(2)]
    slow = [make_run(self.root, "slow0", [0.1, 0.5, 0.96]),
            make_run(self.root, "slow1", [0.1, 0.2, 0.3], {"eval.json": {512: 0.3}})]
    report = convergence.compare({"fast": fast, "slow": slow}, thresholds=(0.95,), window=1)
    s = report["groups"]["fast"]["steps_to"]["0.95"]
    self.assertEqual((s["reached"], s["runs"], s["mean"], s["se"]), (2, 2, 20.0, 0.0))
    s = report["groups"]["slow"]["steps_to"]["0.95"]
    self.assertEqual((s["reached"], s["mean"]), (1, None))
    cell = report["groups"]["fast"]["evals"]["eval.json"]["512"]
    self.assertAlmostEqual(cell["mean"], 0.925)
    self.assertEqual((cell["min"], cell["max"], cell["queries_per_run"]), (0.9, 0.95, 2048))
    self.assertEqual(report["groups"]["slow"]["evals"], {})   # slow0 has no eval.json.
    np.testing.assert_allclose(report["groups"]["slow"]["curve"]["accuracy"], [0.1, 0.35, 0.63])
    table = convergence.format_table(report)
    self.assertIn("| fast | 2 | 20 ± 0 |", table)
    self.assertIn("| slow | 2 | 1/2 reached |", table)
    paths = convergence.write(report, os.path.join(self.root, "out"))
    self.assertTrue(all(os.path.getsize(p) > 0 for p in paths))
    with open(paths[0]) as f:
      self.assertEqual(json.load(f)["groups"]["fast"]["runs"][0]["steps_to"], {"0.95": 20})

  def test_the_command_fails_in_one_line(self):
    run = make_run(self.root, "run", [0.5])
    cases = {
        ("--group=off",): "--group must be LABEL=RUN[,RUN...], got 'off'",
        (f"--group=a={run}", f"--group=a={run}"): "label 'a' given twice",
        (f"--group=a={run}", "--thresholds=x"): "--thresholds must be comma-separated numbers",
        (f"--group=a={os.path.join(self.root, 'none')}",): "no metrics.jsonl in",
    }
    out = f"--out={self.root}/out"
    cli_checks.assert_fatal_lines(self, "convergence",
                                  {(out, *args): expected for args, expected in cases.items()},
                                  workdir=False)


if __name__ == "__main__":
  absltest.main()

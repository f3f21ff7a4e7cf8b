"""ROADMAP.md is what `python -m experiments.roadmap` makes of ROADMAP.toml and the committed
result files, and the measurements behind it read those files as documented."""

import json
import os
import subprocess
import sys
import tempfile

from absl.testing import absltest

from memkernel import roadmap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write(root, path, value):
  path = os.path.join(root, path)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(value, f)


def _eval(name, accuracy, length=512, stream=None, **extra):
  value = {"task": {"name": name}, "lengths": {str(length): {"accuracy": accuracy,
                                                             "accuracy_se": 0.01}}, **extra}
  if stream:
    value["stream"] = stream
  return value


class CommittedRoadmapTest(absltest.TestCase):

  def test_regenerating_the_committed_roadmap_changes_nothing(self):
    source = roadmap.load(os.path.join(REPO, "ROADMAP.toml"))
    with open(os.path.join(REPO, "ROADMAP.md")) as f:
      self.assertEqual(f.read(), roadmap.render(source, REPO),
                       "ROADMAP.md is out of date: run python -m experiments.roadmap")

  def test_check_flag_fails_on_a_stale_roadmap(self):
    out = os.path.join(tempfile.mkdtemp(), "ROADMAP.md")
    with open(out, "w") as f:
      f.write("stale\n")
    cmd = [sys.executable, "-m", "experiments.roadmap", f"--out={out}"]
    stale = subprocess.run(cmd + ["--check"], cwd=REPO, capture_output=True, text=True)
    self.assertEqual(stale.returncode, 1)
    self.assertIn("out of date", stale.stderr)
    self.assertEqual(subprocess.run(cmd, cwd=REPO, capture_output=True).returncode, 0)
    fresh = subprocess.run(cmd + ["--check"], cwd=REPO, capture_output=True, text=True)
    self.assertEqual(fresh.returncode, 0, fresh.stderr)


class MeasureTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.root = tempfile.mkdtemp()
    _write(self.root, "r/a/eval.json", _eval("mqar", 0.90))
    _write(self.root, "r/b/eval.json", _eval("mqar", 0.80))
    _write(self.root, "r/c/eval.json", _eval("copy", 0.10))
    _write(self.root, "r/d/eval.json", _eval("mqar", 0.99, stream="validation"))  # Tuning.
    _write(self.root, "r/e/eval.json", _eval("mqar", 0.50, length=2048))
    _write(self.root, "b/bench.json", [
        {"model": "kernel", "mode": "forward", "length": 1024, "status": "ok",
         "tokens_per_s": 10.0},
        {"model": "kernel", "mode": "forward", "length": 4096, "status": "skipped",
         "tokens_per_s": None},
        {"model": "dense", "mode": "forward", "length": 4096, "status": "ok",
         "tokens_per_s": 99.0}])

  def test_mean_over_the_matching_test_stream_files(self):
    value = roadmap.measure(roadmap.Measure(files="r/*/eval.json", metric="accuracy",
                                            tasks=("mqar",), length=512), self.root)
    self.assertAlmostEqual(value.value, 0.85)
    self.assertAlmostEqual(value.se, 0.05)       # Over two runs.
    self.assertEqual(value.count, 2)

  def test_max_names_its_file_and_min_length_filters(self):
    value = roadmap.measure(roadmap.Measure(files="r/**/*.json", metric="accuracy",
                                            min_length=1024, combine="max"), self.root)
    self.assertEqual((value.value, value.source, value.se), (0.5, "r/e/eval.json", 0.01))
    nothing = roadmap.measure(roadmap.Measure(files="r/*/eval.json", metric="accuracy",
                                              min_length=10 ** 6), self.root)
    self.assertIsNone(nothing.value)

  def test_metric_patterns_combine_per_file(self):
    _write(self.root, "g/eval.json", {"task": {"name": "x"}, "lengths": {"64": {
        "layer_0/em_density": 0.2, "layer_1/em_density": 0.05}}})
    densest = roadmap.measure(roadmap.Measure(files="g/eval.json", metric="layer_*/em_density"),
                              self.root)
    self.assertEqual(densest.value, 0.2)

  def test_bench_rows(self):
    value = roadmap.measure(roadmap.Measure(kind="bench", files="b/bench.json", model="kernel",
                                            metric="tokens_per_s", combine="max"), self.root)
    self.assertEqual(value.value, 10.0)   # The skipped row and the other model do not count.

  def test_criteria_and_differences(self):
    spec = {"files": "r/*/eval.json", "metric": "accuracy", "tasks": ["mqar"], "length": 512}
    met = roadmap._criterion({"name": "x", "target": ">= 0.8", "measure": spec}, 0)
    self.assertEqual(met.check(self.root)[0], True)
    missed = roadmap._criterion({"name": "x", "target": "> 0.9", "measure": spec}, 0)
    self.assertEqual(missed.check(self.root)[0], False)
    copy = {"files": "r/c/eval.json", "metric": "accuracy"}
    better = roadmap._criterion({"name": "x", "target": "> 0", "measure": spec, "minus": copy}, 0)
    ok, text = better.check(self.root)
    self.assertTrue(ok)
    self.assertIn("85.00%", text)
    one_run = roadmap._criterion({"name": "x", "target": "> 0", "measure": spec,
                                  "minus": copy, "min_runs": 2}, 0)
    ok, text = one_run.check(self.root)
    self.assertIsNone(ok)                          # The copy side has one run.
    self.assertIn("2 runs each needed", text)
    unmeasured = roadmap._criterion(
        {"name": "x", "target": "> 0", "measure": {"files": "none/*.json", "metric": "a"}}, 0)
    self.assertEqual(unmeasured.check(self.root), (None, "no measurement in `none/*.json` yet"))

  def test_bad_source_is_named(self):
    for spec, message in (
        ({"name": "x", "target": "about 3", "measure": {"files": "a", "metric": "b"}},
         "target must be"),
        ({"name": "x", "target": "> 1", "measure": {"files": "a"}}, "needs 'metric'"),
        ({"name": "x", "target": "> 1", "measure": {"files": "a", "metric": "b",
                                                     "combine": "median"}}, "combine must be"),
        ({"name": "x", "target": "> 1", "measure": {"files": "a", "metric": "b", "lenght": 3}},
         r"unknown field\(s\) \['lenght'\]")):
      with self.assertRaisesRegex(ValueError, message):
        roadmap._criterion(spec, 0)
    path = os.path.join(self.root, "bad.toml")
    with open(path, "w") as f:
      f.write('title = "x"\nvision = "v"\n')
    with self.assertRaisesRegex(ValueError, "needs 'status'"):
      roadmap.load(path)


if __name__ == "__main__":
  absltest.main()

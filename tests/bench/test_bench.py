"""Tests for the scaling benchmark (`memkernel.bench`, `memkernel.bench.report`, the binary).

Benchmark numbers are never asserted: the tests check that a run covers every point, records what
it could not run instead of crashing, and writes its JSON, tables and plots; and that the kernel's
analytic FLOP count is O(T log T).

* The smoke variant end to end through the binary, in a subprocess that inherits the suite's
  quick-compile XLA flags and compile cache (`conftest.py`; the numbers are not looked at). It
  starts when the module is set up, so the other tests run on the second core meanwhile.
* Over-budget points (memory before and after compiling, time after the first call) are skipped.
* Config validation names the field; the FLOP model's growth.
"""

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from unittest import mock

import jax
from absl.testing import absltest
from absl.testing import parameterized

from configs import bench as bench_config
from memkernel.bench import bench
from memkernel.bench import report

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMOKE_LENGTHS = (64, 128)     # The smoke config's.
RUN_LENGTHS = (64,)           # The smoke run's here: every model, mode and component compiles
                              # once per length, and one length covers every code path.
REQUIRED = ("model", "length", "mode", "status", "reason", "tokens_per_s", "median_s", "min_s",
            "max_s", "peak_mem_bytes", "compile_s", "flops", "gflops_per_s",
            "ceiling_gflops_per_s")


_SMOKE = {}


def setUpModule():
  out = tempfile.mkdtemp()
  env = dict(os.environ, JAX_PLATFORMS="cpu")  # With conftest's XLA flags and compile cache.
  log = open(os.path.join(out, "stderr.txt"), "w")  # A file: a pipe nobody reads would fill up.
  _SMOKE.update(out=out, log=log, proc=subprocess.Popen(
      [sys.executable, "-m", "experiments.bench", "--config=configs/bench.py:smoke",
       "--config.lengths=" + ",".join(map(str, RUN_LENGTHS)), f"--out={out}"],
      cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=log))


def tearDownModule():
  proc = _SMOKE.get("proc")
  if proc is not None and proc.poll() is None:  # Not waited for: only other tests were selected.
    proc.kill()
    proc.wait()
  if "log" in _SMOKE:
    _SMOKE["log"].close()


def _rows(out_dir):
  with open(os.path.join(out_dir, bench.JSON_FILE)) as f:
    return json.load(f)


def _smoke(**overrides):
  config = bench_config.get_config("smoke")
  config.update(dict(components=False, observability=False, **overrides))
  return config


class BudgetTest(absltest.TestCase):

  def test_over_memory_budget_is_skipped_not_run(self):
    out = tempfile.mkdtemp()
    rows = bench.run(_smoke(models="dense,sliding_window,scan", lengths="64,128",
                            modes="forward", max_memory_gb=1e-6), out)
    by_point = {(r["model"], r["length"]): r for r in rows}
    self.assertLen(rows, 6)
    for row in rows:
      self.assertEqual(row["status"], "skipped", row)
      self.assertIsNone(row["median_s"])
    # Attention's score buffers are estimated before compiling (`costs.activation_bytes`); the
    # kernel's by XLA after compiling.
    self.assertIn("estimated", by_point["dense", 64]["reason"])
    self.assertIn("estimated", by_point["sliding_window", 64]["reason"])
    self.assertIn("XLA estimates", by_point["scan", 64]["reason"])
    self.assertIn("shorter length", by_point["scan", 128]["reason"])
    self.assertTrue(os.path.exists(os.path.join(out, bench.MD_FILE)))

  def test_a_stopped_run_keeps_its_tables(self):
    # A run killed (or out of time) after its first point still has bench.json, bench_meta.json
    # and bench.md with that point in them.
    out, real, calls = tempfile.mkdtemp(), bench._run_point, []

    def stop_at_second(*args, **kwargs):
      calls.append(1)
      if len(calls) == 2:
        raise KeyboardInterrupt
      return real(*args, **kwargs)

    with mock.patch.object(bench, "_run_point", stop_at_second), \
         self.assertRaises(KeyboardInterrupt):
      bench.run(_smoke(models="dense", lengths="64,128", modes="forward", max_memory_gb=1e-6),
                out)
    self.assertEqual([(r["model"], r["length"]) for r in _rows(out)], [("dense", 64)])
    with open(os.path.join(out, bench.META_FILE)) as f:
      meta = json.load(f)
    self.assertEqual((meta["points_done"], meta["points_planned"]), (1, 2))
    with open(os.path.join(out, bench.MD_FILE)) as f:
      self.assertIn("| dense | forward | 64 | skipped: estimated", f.read())
    self.assertFalse([n for n in os.listdir(out) if n.endswith(".tmp")])

  def test_over_time_budget_is_skipped(self):
    rows = bench.run(_smoke(models="sliding_window", lengths="64,128", modes="forward",
                            max_point_s=1e-6), tempfile.mkdtemp())
    self.assertEqual([r["status"] for r in rows], ["skipped", "skipped"])
    self.assertIn("found over the time budget", rows[0]["reason"])
    self.assertIn("shorter length", rows[1]["reason"])

  def test_default_memory_budget_is_what_is_available_on_the_cpu(self):
    # 80% of MemAvailable, not of physical memory: other processes' memory is not the run's.
    meminfo = {"/proc/meminfo": {"MemAvailable": 10 * 2**20}}  # kB: 10 GiB available.
    with mock.patch.object(bench, "_device_memory_stats", return_value=None), \
         mock.patch.object(bench, "_proc_kb", lambda path, field: meminfo[path][field]):
      self.assertEqual(bench._auto_memory_budget(), int(0.8 * 10 * 2**30))
    if sys.platform.startswith("linux"):  # The real file parses, and is below physical memory.
      available = bench._proc_kb("/proc/meminfo", "MemAvailable")
      self.assertIsNotNone(available)
      self.assertBetween(available * 1024, 1,
                         os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))

  def test_quadratic_limit(self):
    rows = bench.run(_smoke(models="dense", lengths="128", modes="forward",
                            quadratic_max_length=64), tempfile.mkdtemp())
    self.assertEqual(rows[0]["status"], "skipped")
    self.assertIn("quadratic_max_length", rows[0]["reason"])


class ConfigTest(parameterized.TestCase):

  def test_default_and_smoke_parse(self):
    full = bench.parse_config(bench_config.get_config())
    self.assertEqual(full.lengths[0], 256)
    self.assertEqual(full.lengths[-1], 65536)
    self.assertEqual((full.kernel.d_model, full.kernel.num_layers, full.batch_size), (256, 4, 1))
    smoke = bench.parse_config(bench_config.get_config("smoke"))
    self.assertEqual(smoke.lengths, SMOKE_LENGTHS)
    self.assertEqual((smoke.kernel.d_model, smoke.kernel.num_layers, smoke.repeats), (32, 1, 2))

  def test_execution_choices_follow_the_backend(self):
    # The CPU's choices are for its memory and its fast lax.scan; an accelerator gets the parallel
    # scan and unblocked queries (the blocks run one after another there).
    for backend, scan_impl, block in (("cpu", "linear", 512), ("gpu", "associative", 0),
                                      ("tpu", "associative", 0)):
      with mock.patch.object(jax, "default_backend", return_value=backend):
        parsed = bench.parse_config(bench_config.get_config())
      self.assertEqual((parsed.kernel.scan_impl, parsed.kernel.query_block), (scan_impl, block))
      self.assertEqual(parsed.peer["query_block"], block)

  def test_selection_overrides(self):
    parsed = bench.parse_config(_smoke(models="kernel,dense", lengths="8k,32768",
                                       modes="forward"))
    self.assertEqual(parsed.models, ("kernel", "dense"))
    self.assertEqual(parsed.lengths, (8192, 32768))
    self.assertEqual(parsed.modes, ("forward",))

  @parameterized.parameters(
      ("models", "kernel,transformer", "config.models"),
      ("modes", "", "config.modes"),
      ("lengths", "256,abc", "config.lengths"),
      ("lengths", "0", "config.lengths"),
      ("repeats", 0, "config.repeats"),
      ("max_point_s", 0.0, "config.max_point_s"),
      ("components", "yes", "config.components"),
  )
  def test_invalid_field_is_named(self, field, value, message):
    config = _smoke()
    with config.ignore_type():
      config[field] = value
    with self.assertRaisesRegex(ValueError, message):
      bench.parse_config(config)

  def test_model_sections(self):
    values = _smoke().to_dict()
    values["peer"]["d_model"] = 48
    with self.assertRaisesRegex(ValueError, "config.peer.d_model"):
      bench.parse_config(values)
    config = _smoke()
    config.model.beam_width = 0
    with self.assertRaisesRegex(ValueError, "beam_width"):
      bench.parse_config(config)
    config = _smoke()
    config.model.max_seq_len = 512
    with self.assertRaisesRegex(ValueError, "max_seq_len"):
      bench.parse_config(config)


class PerTokenCostTest(absltest.TestCase):

  def test_per_token_cost_table(self):
    """Routing grows by a constant per doubling of n; dense attention per token grows like n."""
    config = bench_config.get_config()
    config.lengths = "1024,4096,16384,65536"
    rows = bench.per_token_costs(bench.parse_config(config), (1024, 4096, 16384, 65536))
    route = [r["kernel_route_flops_per_token"] for r in rows]
    self.assertGreater(route[1] - route[0], 0)
    self.assertEqual(route[3] - route[2], route[1] - route[0])
    kernel = [r["kernel_flops_per_token"] for r in rows]
    self.assertLess(kernel[-1] / kernel[0], 1.1)
    dense = [r["dense_flops_per_token"] for r in rows]
    self.assertGreater((dense[-1] - dense[-2]) / (dense[1] - dense[0]), 15)  # linear in n: 16.
    state = [r["kernel_state_bytes_per_token"] for r in rows]
    self.assertLess(max(state) / min(state), 1.1)  # O(n) memory: constant per token.
    table = bench.per_token_costs_markdown(rows)
    self.assertIn("| 65,536 | 13 |", table)


class BinaryTest(absltest.TestCase):

  def test_bad_input_fails_in_one_line_before_anything_runs(self):
    root = tempfile.mkdtemp()
    a_file = os.path.join(root, "a_file")
    open(a_file, "w").close()
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    for args, message in (
        ([f"--out={a_file}"], f"FATAL --out={a_file} is a file; it must be a directory"),
        ([f"--out={root}/new", "--config.repeats=0"], "FATAL invalid config: config.repeats")):
      result = subprocess.run(
          [sys.executable, "-m", "experiments.bench", "--config=configs/bench.py:smoke", *args],
          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
      self.assertEqual(result.returncode, 1, result.stderr)
      self.assertEqual(result.stdout, "")
      lines = result.stderr.strip().splitlines()
      self.assertLen(lines, 1, result.stderr)
      self.assertTrue(lines[0].startswith(message), lines[0])
    self.assertEqual(sorted(os.listdir(root)), ["a_file"])


def _row(model, mode, length, status="ok", component=None, **fields):
  return dict(model=model, mode=mode, length=length, status=status, component=component,
              reason="" if status == "ok" else "over budget",
              **{**dict.fromkeys(REQUIRED[5:]), **fields})


class ReportTest(absltest.TestCase):
  """The target ratios and breakdowns on rows with known times (exact in binary floating point)."""

  TARGETS = {"short_length": 1024, "long_length": 8192, "decode_short": 1024,
             "decode_long": 8192}
  ROWS = [
      _row("kernel", "forward", 1024, "skipped", median_s=100.0),  # Not a measurement.
      _row("kernel", "forward", 1024, median_s=1.0, tokens_per_s=1000.0),
      _row("kernel", "forward", 8192, median_s=4.5, tokens_per_s=2048.0, peak_mem_bytes=300),
      _row("kernel", "train", 1024, median_s=2.0, tokens_per_s=500.0),
      _row("kernel", "train", 8192, median_s=10.0, peak_mem_bytes=500),
      _row("dense", "forward", 1024, tokens_per_s=250.0),
      _row("dense", "train", 1024, tokens_per_s=125.0),
      _row("sliding_window", "forward", 8192, tokens_per_s=4096.0, peak_mem_bytes=200),
      _row("sliding_window", "train", 8192, "skipped"),
      _row("braincore", "forward", 8192, tokens_per_s=1024.0),
      _row("kernel", "decode", 1024, median_s=0.5),
      _row("kernel", "decode", 8192, median_s=0.625),
      _row("kernel", "component", 8192, component="summarize", median_s=0.5),
      _row("kernel", "component", 8192, component="route", median_s=1.0),
      _row("kernel", "component", 8192, component="exact_read", status="skipped"),
  ]

  def test_target_checks(self):
    checks = report.target_checks(self.ROWS, self.TARGETS)
    self.assertEqual([(c["name"], c["value"], c["bound"], c["passed"]) for c in checks], [
        ("kernel forward time(8192) / time(1024)", 4.5, "<= 4.5", True),  # On the bound.
        ("kernel train time(8192) / time(1024)", 5.0, "<= 4.5", False),
        ("kernel / dense forward tokens/s at 1024", 4.0, ">= 3", True),
        ("kernel / sliding_window forward tokens/s at 8192", 0.5, ">= 0.6", False),
        ("kernel / dense train tokens/s at 1024", 4.0, ">= 5", False),
        ("kernel / dense_params forward tokens/s at 1024", None, ">= 3", None),
        ("kernel / sliding_window_params forward tokens/s at 8192", None, ">= 0.6", None),
        ("kernel / dense_params train tokens/s at 1024", None, ">= 5", None),
        ("kernel decode latency at 8192 / at 1024", 1.25, "<= 1.5", True),
        ("kernel / sliding_window forward peak memory at 8192", 1.5, "<= 2", True),
        ("kernel / sliding_window train peak memory at 8192", None, "<= 2", None),
        ("braincore / sliding_window forward tokens/s at 8192", 0.25, ">= 0.5", False),
    ])
    self.assertEqual([c["note"] for c in checks],
                     [""] * 5 + [f"not measured: {m}" for m in (
                         "dense_params forward T=1024", "sliding_window_params forward T=8192",
                         "dense_params train T=1024")]
                     + [""] * 2 + ["not measured: sliding_window train T=8192", ""])

  def test_peers_at_the_kernels_parameter_count(self):
    """The *_params peers widen their MLP to the kernel's parameter count (within one step of
    the ratio), everything else as the peers at its width."""
    for arg in (None, "smoke"):
      config = bench.parse_config(bench_config.get_config(arg))
      kernel = bench.param_count(config.model_config("kernel", 64))
      for model, kind in bench.PARAM_MATCHED.items():
        matched, plain = config.model_config(model, 64), config.model_config(kind, 64)
        self.assertEqual(dataclasses.replace(matched, mlp_ratio=plain.mlp_ratio), plain)
        step = (bench.param_count(dataclasses.replace(matched, mlp_ratio=2))
                - bench.param_count(dataclasses.replace(matched, mlp_ratio=1)))
        self.assertGreater(matched.mlp_ratio, plain.mlp_ratio)
        self.assertLessEqual(abs(bench.param_count(matched) - kernel), step / 2, (arg, model))

  def test_breakdown_and_hot_path(self):
    self.assertEqual(report.forward_breakdown(self.ROWS, 8192, num_layers=2), {
        "summarize": 1.0, "route": 2.0, "rest (trunk, projections, MLP, head)": 1.5})
    self.assertIsNone(report.forward_breakdown(self.ROWS, 1024, num_layers=2))  # No components.
    self.assertEqual(report.hot_path(self.ROWS, num_layers=2),
                     "kernel forward at T=8192: route 44%, rest (trunk, projections, MLP, head) "
                     "33%, summarize 22% (components timed alone, x 2 layers)")

  def test_markdown_verdicts(self):
    text = report.markdown(self.ROWS, {}, targets=self.TARGETS, num_layers=2)
    for line in ("| kernel forward time(8192) / time(1024) | 4.50 | <= 4.5 | met |",
                 "| kernel train time(8192) / time(1024) | 5.00 | <= 4.5 | missed |",
                 "| kernel / sliding_window train peak memory at 8192 | - | <= 2 | "
                 "not measured: sliding_window train T=8192 |"):
      self.assertIn(line, text.splitlines())


class SmokeRunTest(absltest.TestCase):
  """One run of `python -m experiments.bench --config=configs/bench.py:smoke --out=DIR`."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.out = _SMOKE["out"]
    proc = _SMOKE["proc"]
    proc.wait(timeout=900)
    with open(os.path.join(cls.out, "stderr.txt")) as f:
      cls.proc = subprocess.CompletedProcess(proc.args, proc.returncode, "", f.read())

  def test_exits_cleanly_with_progress_lines(self):
    self.assertEqual(self.proc.returncode, 0, self.proc.stderr[-3000:])
    points = (len(bench.MODELS) * len(bench.MODES) + len(bench.COMPONENTS)) * len(RUN_LENGTHS)
    self.assertIn(f"[{points}/{points}]", self.proc.stderr)
    self.assertIn("ETA", self.proc.stderr)

  def test_every_model_length_mode_has_a_row(self):
    rows = _rows(self.out)
    points = {(r["model"], r["length"], r["mode"]) for r in rows if r["mode"] != "component"}
    self.assertEqual(points, {(m, t, mode) for m in bench.MODELS for t in RUN_LENGTHS
                              for mode in bench.MODES})
    for row in rows:
      self.assertContainsSubset(REQUIRED, row.keys())
      self.assertIn(row["status"], ("ok", "skipped"), row)
      if row["status"] == "skipped":
        self.assertTrue(row["reason"])

  def test_measured_rows(self):
    for row in _rows(self.out):  # Every family, every mode (the peers' recurrent forms too).
      self.assertEqual(row["status"], "ok", row)
      self.assertGreater(row["tokens_per_s"], 0)
      self.assertLessEqual(row["min_s"], row["median_s"])
      self.assertLessEqual(row["median_s"], row["max_s"])
      self.assertGreaterEqual(row["repeats"], 2)
      self.assertGreater(row["peak_mem_bytes"], 0)
      self.assertGreaterEqual(row["compile_s"], 0)
      self.assertGreater(row["ceiling_gflops_per_s"], 0)
      if row["mode"] != "component":
        self.assertGreater(row["flops"], 0)
        self.assertGreater(row["gflops_per_s"], 0)
      if row["mode"] == "decode":
        self.assertEqual(row["context"], row["length"])

  def test_components_and_observability(self):
    rows = _rows(self.out)
    for length in RUN_LENGTHS:
      components = {r["component"] for r in rows
                    if r["mode"] == "component" and r["length"] == length and r["status"] == "ok"}
      self.assertEqual(components, set(bench.COMPONENTS))
      (forward,) = [r for r in rows if (r["model"], r["mode"], r["length"]) == (
          "kernel", "forward", length)]
      layers = forward["observability"]["layers"]
      self.assertLen(layers, 1)
      layer = layers[0]
      for key in ("routing_sparsity", "depth_histogram", "candidate_entropy_per_head",
                  "head_agreement", "root_similarity", "root_0_norm", "exact_read_usage",
                  "retrieval_distance_histogram", "dead_nodes", "nodes_per_level"):
        self.assertIn(key, layer)
      self.assertEqual(sum(layer["depth_histogram"]), length * 4)  # every token x head
      self.assertEqual(sum(layer["nodes_per_level"]), 2 * (length // 16) - 1)
      self.assertLen(layer["candidate_entropy_per_head"], 4)

  def test_markdown_and_plots(self):
    with open(os.path.join(self.out, bench.MD_FILE)) as f:
      text = f.read()
    for heading in ("## Targets", "## Tokens/s", "## Peak memory, MiB",
                    "## Kernel components", "## Kernel observability", "## All points"):
      self.assertIn(heading, text)
    self.assertIn("kernel / dense forward tokens/s at 64", text)
    self.assertIn("experiments.bench", text)
    for name in bench.PLOT_FILES:
      with open(os.path.join(self.out, name), "rb") as f:
        self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")
    with open(os.path.join(self.out, bench.META_FILE)) as f:
      self.assertGreater(json.load(f)["ceiling_gflops"], 0)

  def test_the_command_sets_the_allocator(self):
    """Started without GLIBC_TUNABLES, the command restarted itself with the recommended ones
    (bench_meta.json records the setting the run had)."""
    with open(os.path.join(self.out, bench.META_FILE)) as f:
      meta = json.load(f)
    if os.environ.get("GLIBC_TUNABLES"):
      self.assertEqual(meta["glibc_tunables"], os.environ["GLIBC_TUNABLES"])
    else:
      self.assertEqual(meta["glibc_tunables"], bench.RECOMMENDED_GLIBC_TUNABLES)
      self.assertIn("restarting with GLIBC_TUNABLES=", self.proc.stderr)
    self.assertIsNone(bench.allocator_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}))
    env = bench.allocator_environment({"HOME": "/x"})     # The suite runs on the CPU.
    self.assertEqual(env, {"HOME": "/x", "GLIBC_TUNABLES": bench.RECOMMENDED_GLIBC_TUNABLES})


if __name__ == "__main__":
  absltest.main()

"""Tests for the ablation sweep (`memkernel.sweeps.ablate`, `experiments/ablate.py`, `configs/ablate.py`).

* The smoke variant end to end through the binary, into a temp dir, in a subprocess that inherits
  the suite's quick-compile XLA flags and compile cache (`conftest.py`). It starts when the module
  is set up, so the config tests run on the second core meanwhile. The tests read what it wrote,
  rerun the sweep in process (every cell is finished, so nothing is compiled) and check that
  nothing was trained or written again.
* The nine configurations' definitions and equal parameter budgets on the default config, the
  state per token, skipped peer lengths and config validation: shapes only, nothing compiled.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

from configs import ablate as ablate_config
from memkernel.sweeps import ablate
from memkernel import train as train_lib
from memkernel.kernel.interventions import Interventions
from memkernel.peers import PeerConfig
from memkernel import experiment as experiment_lib
from memkernel import costs
from memkernel.braincore import model as braincore_model

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMOKE_TASKS = ("mqar",)
SMOKE_MODELS = (ablate.FULL_KERNEL, ablate.WITHOUT_EXACT_READ, "dense")
ROW_KEYS = ("task", "model", "seed", "length", "length_factor", "train_length", "status",
            "reason", "accuracy", "accuracy_se", "queries", "loss", "routing_recall", "params",
            "mlp_dim",
            "state_bytes_per_token", "state_bytes_per_token_read", "state_bytes_formula",
            "train_wall_s", "steps", "config_hash", "command", "workdir", "audit",
            "evaluated_from", "interventions")


def _env():
  return dict(os.environ, JAX_PLATFORMS="cpu")  # With conftest's XLA flags and compile cache.


def binary(out, *flags):
  """Runs experiments/ablate.py to completion and returns the CompletedProcess."""
  cmd = [sys.executable, "-m", "experiments.ablate", f"--out={out}", *flags]
  return subprocess.run(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT, text=True, timeout=600, check=False)


_SMOKE = {}


def setUpModule():
  out = tempfile.mkdtemp(prefix="memkernel_ablate_test_")
  log = open(os.path.join(out, "log.txt"), "w")  # A file: a pipe nobody reads would fill up.
  _SMOKE.update(out=out, log=log, proc=subprocess.Popen(
      [sys.executable, "-m", "experiments.ablate", "--config=configs/ablate.py:smoke",
       f"--out={out}"], cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT))


def tearDownModule():
  proc = _SMOKE.get("proc")
  if proc is not None and proc.poll() is None:  # Not waited for: only other tests were selected.
    proc.kill()
    proc.wait()
  if "log" in _SMOKE:
    _SMOKE["log"].close()
  shutil.rmtree(_SMOKE.get("out", ""), ignore_errors=True)


def read_rows(out):
  with open(os.path.join(out, ablate.RESULTS_FILE)) as f:
    return [json.loads(line) for line in f]


def snapshot(out):
  """What training writes: metrics rows, checkpoint steps and eval.json of every cell."""
  state = {}
  for root, dirs, files in os.walk(os.path.join(out, ablate.RUNS_DIR)):
    if experiment_lib.METRICS_FILE in files:
      with open(os.path.join(root, experiment_lib.METRICS_FILE)) as f:
        state[root, "metrics"] = f.read()
    if "checkpoints" in dirs:
      state[root, "checkpoints"] = sorted(os.listdir(os.path.join(root, "checkpoints")))
    for name in (experiment_lib.EVAL_FILE, ablate.CELL_FILE):
      if name in files:
        state[root, name] = os.stat(os.path.join(root, name)).st_mtime_ns
  return state


class SweepConfigTest(parameterized.TestCase):

  def test_nine_configurations_have_equal_parameter_budgets(self):
    budget = ablate.parameter_budget(ablate_config.get_config(), "mqar")
    self.assertEqual(list(budget), list(ablate.KERNEL_MODELS))
    full = budget[ablate.FULL_KERNEL]["params"]
    self.assertEqual(full, budget[ablate.WITHOUT_EXACT_READ]["params"])
    self.assertEqual(budget[ablate.FULL_KERNEL]["mlp_dim"], 256)  # The probe default, untouched.
    for model, entry in budget.items():
      self.assertLess(abs(entry["params"] - full) / full, 0.01, (model, entry, full))
    # Without a memory source its parameters go to the MLP.
    self.assertGreater(budget["multi_root/no_memory"]["mlp_dim"],
                       budget["multi_root/sparse_retrieval"]["mlp_dim"])
    self.assertGreater(budget["single_root/no_memory"]["mlp_dim"],
                       budget["multi_root/no_memory"]["mlp_dim"])

  def test_cells_and_model_definitions(self):
    config = ablate_config.get_config()
    config.tasks = "mqar"
    config.seeds = "0"
    sweep = ablate.parse_config(config)
    cells = {c.model: c for c in sweep.cells}
    # The default: every model but the brain-core's (chosen by name, below).
    self.assertEqual(set(cells), set(ablate.MODELS) - set(ablate.BRAINCORE_MODELS))
    self.assertEqual(sweep.seeds, (0,))
    want = {  # model: (num_roots, use_tree_read, use_exact_read, route_descend)
        "single_root/no_memory": (1, False, False, True),
        "multi_root/no_memory": (2, False, False, True),
        "single_root/summaries_only": (1, True, False, False),
        "single_root/sparse_retrieval": (1, True, False, True),
        "single_root/sparse_retrieval+exact_read": (1, True, True, True),
        "multi_root/summaries_only": (2, True, False, False),
        "multi_root/sparse_retrieval": (2, True, False, True),
        ablate.FULL_KERNEL: (2, True, True, True),
        ablate.ORACLE: (2, True, True, True),
    }
    for model, flags in want.items():
      m = cells[model].config["model"]
      self.assertEqual((m["num_roots"], m["use_tree_read"], m["use_exact_read"],
                        m["route_descend"]), flags, model)
      self.assertEqual(cells[model].config["model_type"], "kernel")
      self.assertEqual(cells[model].config["train"]["oracle"], model == ablate.ORACLE)
      self.assertEqual(cells[model].config["eval"]["oracle"], model == ablate.ORACLE)
      self.assertTrue(cells[model].trains)
    ablated = cells[ablate.WITHOUT_EXACT_READ]
    self.assertEqual(ablated.source, cells[ablate.FULL_KERNEL].workdir)
    self.assertEqual(ablated.interventions, Interventions(drop=("exact",)))
    self.assertEqual(ablated.config, cells[ablate.FULL_KERNEL].config)
    self.assertNotEqual(ablated.config_hash, cells[ablate.FULL_KERNEL].config_hash)
    order = [c.model for c in sweep.cells]
    self.assertLess(order.index(ablate.FULL_KERNEL), order.index(ablate.WITHOUT_EXACT_READ))
    config.model.d_model = 32  # Reaches the peers.
    cells.update({c.model: c for c in ablate.parse_config(config).cells if c.model in ablate.PEERS})
    for peer in ablate.PEERS:
      c = cells[peer].config
      self.assertEqual(c["peer"]["d_model"], 32)
      self.assertEqual(c["model_type"], peer)
      for field in ("d_model", "num_layers", "mlp_ratio", "vocab_size"):
        self.assertEqual(c["peer"][field], c["model"][field], (peer, field))
    for cell in sweep.cells:
      self.assertEqual(cell.lengths, (128, 512, 2048, 8192))
      self.assertEqual(cell.workdir, os.path.join("runs", "mqar", cell.model, "seed0"))
      self.assertEqual(cell.config["eval"]["lengths"], (128,))
    # Dense attention's [B, N, T, T] scores at 8192 exceed the 2 GB budget: skipped, not run.
    self.assertEqual(list(cells["dense"].skipped), [8192])
    self.assertIn("max_eval_memory_gb=2", cells["dense"].skipped[8192])
    self.assertEqual(cells["sliding_window"].skipped, {})
    self.assertEqual(cells[ablate.FULL_KERNEL].skipped, {})

  def test_brain_core_ablations_leave_a_memory_out_at_an_equal_budget(self):
    config = ablate_config.get_config()
    config.tasks = "mqar"
    config.seeds = "0"
    config.models = ",".join(ablate.BRAINCORE_MODELS)
    config.model.d_model = 32  # The shared sizes reach the brain-core.
    config.braincore.em_items = 64  # Its own section reaches every brain-core cell.
    cells = {c.model: c for c in ablate.parse_config(config).cells}
    self.assertEqual(list(cells), list(ablate.BRAINCORE_MODELS))
    models = {m: experiment_lib.parse_config(c.config).model for m, c in cells.items()}
    full = models[ablate.BRAINCORE]
    self.assertEqual((full.d_model, full.em_items, full.without, full.mlp_dim), (32, 64, "", 0))
    budget = costs.num_params(full)
    for name in ("working", "episodic", "procedural"):
      model = models[f"braincore/no_{name}"]
      self.assertEqual(model.without, name)
      self.assertNotIn(name, braincore_model.sources(model))
      self.assertGreater(model.mlp_hidden, full.mlp_hidden, name)  # Its parameters went there.
      self.assertLess(abs(costs.num_params(model) - budget) / budget, 0.01, name)
    lifelong_off = models["braincore/lifelong_off"]
    self.assertEqual((lifelong_off.em_boundary, lifelong_off.pm_boundary), ("reset", "reset"))
    self.assertEqual((full.em_boundary, full.pm_boundary), ("decay", "decay"))
    self.assertEqual(costs.num_params(lifelong_off), budget)
    for cell in cells.values():
      self.assertEqual(cell.config["model_type"], "braincore")
    config.match_params = False
    unmatched = {c.model: c for c in ablate.parse_config(config).cells}
    self.assertEqual(unmatched["braincore/no_working"].config["braincore"]["mlp_dim"], 0)
    with self.assertRaisesRegex(ValueError, r"config.braincore: \['without'\] are set per cell"):
      config.braincore.without = "working"
      ablate.parse_config(config)

  def test_an_evaluation_only_model_trains_its_source(self):
    config = ablate_config.get_config("smoke")
    config.models = ablate.WITHOUT_EXACT_READ
    sweep = ablate.parse_config(config)
    self.assertEqual([c.model for c in sweep.cells if c.task == "mqar"],
                     [ablate.FULL_KERNEL, ablate.WITHOUT_EXACT_READ])

  def test_variants_parse(self):
    for arg in (None, "smoke", "gpu"):
      config = ablate_config.get_config(arg)
      config.tasks = "far_compare"
      config.models = "dense,sliding_window"
      ablate.parse_config(config)
    with self.assertRaisesRegex(ValueError, "unknown config arg"):
      ablate_config.get_config("big")

  def test_state_bytes(self):
    # The KV cache (K and V per layer), each slot's document, the current document and position.
    dense = PeerConfig(kind="dense", d_model=64, num_layers=2, max_seq_len=1024)
    self.assertEqual(ablate.state_bytes(dense, 1024)["state_bytes_per_token"],
                     (1024 * (2 * 2 * 64 * 4 + 4) + 4 + 4) / 1024)
    window = PeerConfig(kind="sliding_window", d_model=64, num_layers=2, window=64,
                        max_seq_len=256)
    self.assertEqual(ablate.state_bytes(window, 256)["state_bytes_per_token"],
                     (64 * (2 * 2 * 64 * 4 + 4) + 4 + 4) / 256)
    config = ablate.parse_config(ablate_config.get_config("smoke")).cells[0].config
    full = experiment_lib.parse_config(config).model
    no_memory = full.__class__(**{**full.to_dict(), "use_tree_read": False,
                                  "use_exact_read": False})
    held = ablate.state_bytes(full, 64)
    self.assertEqual(held["state_bytes_per_token"], held["state_bytes_per_token_read"])
    empty = ablate.state_bytes(no_memory, 64)
    self.assertEqual(empty["state_bytes_per_token"], held["state_bytes_per_token"])
    self.assertLess(empty["state_bytes_per_token_read"], held["state_bytes_per_token_read"] / 10)

  @parameterized.parameters(
      ("tasks", "mqar,sorting", r"config\.tasks .*unknown: \['sorting'\]"),
      ("models", "dense,tiny", r"config\.models .*unknown: \['tiny'\]"),
      ("seeds", "0,x", r"config\.seeds must be"),
      ("seeds", "0,0", r"config\.seeds must be"),
      ("length_factors", "1,0", r"config\.length_factors must be"),
      ("max_eval_memory_gb", 0.0, r"config\.max_eval_memory_gb must be a positive"),
      ("task_arg", "tiny", r"config\.task_arg must be one of"),
      ("match_params", 1, r"config\.match_params must be a bool"),
  )
  def test_bad_field_is_named(self, field, value, regex):
    config = ablate_config.get_config("smoke").to_dict()
    config[field] = value
    with self.assertRaisesRegex(ValueError, regex):
      ablate.parse_config(config)

  @parameterized.parameters(
      ("model", "num_roots", 3, r"config\.model: \['num_roots'\] are set per cell"),
      ("train", "seed", 3, r"config\.train: \['seed'\] are set per cell"),
      ("eval", "lengths", (64,), r"config\.eval: \['lengths'\] are set per cell"),
      ("train", "steps", -1, r"mqar / multi_root/sparse_retrieval\+exact_read: train\.steps"),
      ("model", "d_model", 15, r"KernelConfig\.d_model=15 must be divisible"),
      ("peer", "d_model", 32, r"config\.peer: \['d_model'\] are set per cell"),
  )
  def test_bad_section_field_is_named(self, section, field, value, regex):
    config = ablate_config.get_config("smoke").to_dict()
    config[section][field] = value
    with self.assertRaisesRegex(ValueError, regex):
      ablate.parse_config(config)

  def test_diverged_cell_is_recorded_and_the_sweep_goes_on(self):
    out = tempfile.mkdtemp(prefix="memkernel_ablate_failed_")
    self.addCleanup(shutil.rmtree, out, ignore_errors=True)
    config = ablate_config.get_config("smoke")
    config.tasks = "far_compare"
    config.models = f"{ablate.WITHOUT_EXACT_READ},sliding_window"
    diverged = train_lib.NonFiniteLossError("stopping at step 3: 20 consecutive non-finite losses")
    with mock.patch.object(train_lib, "train_and_evaluate", side_effect=diverged) as train:
      rows = ablate.run(config, out)
    self.assertEqual(train.call_count, 2)  # The full kernel and the peer; nothing else trains.
    self.assertLen(rows, 3 * 2)
    for row in rows:
      self.assertEqual(row["status"], "failed")
      self.assertIn("training diverged: stopping at step 3", row["reason"])
      self.assertIsNone(row["accuracy"])
      self.assertGreater(row["params"], 0)
    with open(os.path.join(out, ablate.TABLES_FILE)) as f:
      self.assertIn("| failed | failed |", f.read())
    self.assertEqual(ablate.pending_cells(ablate.parse_config(config), out), [])

  def test_bad_flags_exit_with_one_line(self):
    out = tempfile.mkdtemp(prefix="memkernel_ablate_flags_")
    self.addCleanup(shutil.rmtree, out, ignore_errors=True)
    result = binary(out, "--config=configs/ablate.py:smoke", "--config.tasks=mqar,sorting")
    self.assertNotEqual(result.returncode, 0)
    self.assertIn("FATAL invalid config: config.tasks", result.stdout)
    self.assertNotIn("Traceback", result.stdout)
    self.assertEqual(os.listdir(out), [])
    a_file = os.path.join(out, "a_file")
    open(a_file, "w").close()
    result = binary(a_file, "--config=configs/ablate.py:smoke")
    self.assertEqual(result.returncode, 1)
    self.assertEqual(result.stdout.strip().splitlines(),
                     [f"FATAL --out={a_file} is a file; it must be a directory"])
    os.remove(a_file)
    result = binary(out, "--config=configs/ablate.py:big")
    self.assertNotEqual(result.returncode, 0)
    self.assertEqual(result.stdout.strip().splitlines(), [
        "FATAL Flags parsing error: flag --config=configs/ablate.py:big: Error whilst parsing "
        "config file: ValueError: unknown config arg(s) ['big']; known: ['smoke', 'gpu']"])


  def test_logging_fields_at_their_default_leave_the_hash_alone(self):
    """Cells finished before `train.tensorboard` existed are still finished; turning it on is a
    new config."""
    config = ablate_config.get_config("smoke")
    cell = ablate.parse_config(config).cells[0]
    without = {**cell.config, "train": {k: v for k, v in cell.config["train"].items()
                                        if k != "tensorboard"}}
    self.assertIn("tensorboard", cell.config["train"])
    self.assertEqual(ablate._config_hash(without), ablate._config_hash(cell.config))
    with_tb = {**cell.config, "train": {**cell.config["train"], "tensorboard": True}}
    self.assertNotEqual(ablate._config_hash(with_tb), ablate._config_hash(cell.config))


class SmokeSweepTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.out = _SMOKE["out"]
    cls.returncode = _SMOKE["proc"].wait(timeout=600)
    _SMOKE["log"].flush()
    with open(os.path.join(cls.out, "log.txt")) as f:
      cls.log = f.read()
    cls.before = snapshot(cls.out)
    cls.rows = read_rows(cls.out) if cls.returncode == 0 else []

  def setUp(self):
    super().setUp()
    self.assertEqual(self.returncode, 0, self.log[-3000:])

  def test_a_row_per_task_model_length_seed(self):
    got = sorted((r["task"], r["model"], r["length"], r["seed"]) for r in self.rows)
    want = sorted((t, m, length, 0) for t in SMOKE_TASKS for m in SMOKE_MODELS
                  for length in (64, 256))
    self.assertEqual(got, want)
    for row in self.rows:
      self.assertContainsSubset(ROW_KEYS, row)
      self.assertEqual(row["status"], "ok", row["reason"])
      self.assertTrue(np.isfinite(row["loss"]))
      self.assertGreater(row["queries"], 0)
      self.assertAlmostEqual(row["accuracy_se"], np.sqrt(
          row["accuracy"] * (1 - row["accuracy"]) / row["queries"]), places=6)
      self.assertEqual(row["length_factor"], row["length"] // 64)
      self.assertEqual(row["command"], "python -m experiments.ablate "
                       f"--config=configs/ablate.py:smoke --out={self.out}")
      self.assertLen(row["config_hash"], 12)
      self.assertGreater(row["params"], 0)
      self.assertGreater(row["state_bytes_per_token"], 0)
      self.assertEqual(row["steps"], 4)

  def test_training_length_rows_are_the_harness_evaluation(self):
    """A trained cell's row at its training length is its `eval.json`, to the last bit."""
    for task in SMOKE_TASKS:
      for model in (ablate.FULL_KERNEL, "dense"):
        (row,) = [r for r in self.rows if (r["task"], r["model"], r["length"]) == (task, model, 64)]
        with open(os.path.join(self.out, row["workdir"], experiment_lib.EVAL_FILE)) as f:
          evaluated = json.load(f)["lengths"]["64"]
        self.assertEqual((row["accuracy"], row["loss"]),
                         (evaluated["accuracy"], evaluated["loss"]))

  def test_progress_line_per_cell(self):
    for i, label in enumerate(("mqar / multi_root/sparse_retrieval+exact_read",
                               "mqar / multi_root/sparse_retrieval_without_exact_read",
                               "mqar / dense")):
      self.assertRegex(self.log, rf"\[{i + 1}/3\] {re.escape(label)} / seed 0 done in .* ETA ")

  def test_kernel_rows_have_recall_and_audit(self):
    by_key = {(r["task"], r["model"], r["length"]): r for r in self.rows}
    for task in SMOKE_TASKS:
      for length in (64, 256):
        full = by_key[task, ablate.FULL_KERNEL, length]
        ablated = by_key[task, ablate.WITHOUT_EXACT_READ, length]
        dense = by_key[task, "dense", length]
        self.assertEqual(set(full["routing_recall"]), {"layer_0"})
        # Same weights, same batches; the intervention acts after layer 0's routing.
        self.assertEqual(ablated["routing_recall"], full["routing_recall"])
        self.assertEqual(ablated["params"], full["params"])
        self.assertEqual(ablated["evaluated_from"], full["workdir"])
        self.assertEqual(ablated["interventions"]["drop"], ["exact"])
        self.assertIsNone(ablated["audit"])
        self.assertIsNone(dense["routing_recall"])
        self.assertIsNone(dense["audit"])
        # The dense KV cache: K and V, and each slot's document.
        self.assertAlmostEqual(dense["state_bytes_per_token"], 2 * 1 * 16 * 4 + 4, delta=1)
        audit = full["audit"]
        self.assertEqual(audit["length"], 64)
        self.assertContainsSubset(("exact", "tree", "memory", "root_0", "root_1"),
                                  audit["sources"])
        self.assertIn("no_exact_read", audit["interventions"])
        self.assertIsNotNone(full["train_wall_s"])

  def test_tables_and_plots(self):
    with open(os.path.join(self.out, ablate.TABLES_FILE)) as f:
      text = f.read()
    for task in SMOKE_TASKS:
      self.assertIn(f"## {task} (trained at 64 tokens)", text)
    for model in SMOKE_MODELS:
      self.assertIn(f"| {model} |", text)
    self.assertIn(f"`python -m experiments.ablate --config=configs/ablate.py:smoke "
                  f"--out={self.out}`", text)
    self.assertIn("64 (1×) | 256 (4×)", text)
    self.assertIn("Memory audit", text)
    for name in (ablate.ACCURACY_PLOT, ablate.CURVES_PLOT):
      with open(os.path.join(self.out, name), "rb") as f:
        self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")

  def test_rerun_skips_finished_cells(self):
    rows = ablate.run(ablate_config.get_config("smoke"), self.out, command="rerun")
    self.assertEqual(snapshot(self.out), self.before)
    self.assertEqual(rows, self.rows)
    self.assertEqual(read_rows(self.out), self.rows)

  def test_finished_cell_with_another_config_is_refused(self):
    config = ablate_config.get_config("smoke")
    config.eval.batches = 2
    sweep = ablate.parse_config(config)
    with self.assertRaisesRegex(ValueError, r"different config.*eval\.batches"):
      ablate.pending_cells(sweep, self.out)


if __name__ == "__main__":
  absltest.main()

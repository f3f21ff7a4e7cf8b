"""Tests for the training harness (`memkernel.train`, `memkernel.runs`, `experiments/train.py`).

Everything runs the smoke configs (one tiny layer, 64-token sequences), and the runs that share a
config share one compiled step (the harness caches it), so the suite stays small:

* end to end through the library for the kernel (mqar, far_compare) and both peers (induction,
  noisy_retrieval), and non-finite handling on copy: every task trains a few steps;
* resume equivalence (bitwise params, identical metrics rows) and no recompilation on resume;
* bad resumes: another architecture, model type or task (refused unless forced), a damaged newest
  checkpoint (falls back to the previous one), a torn metrics row (dropped);
* config validation before compilation;
* the binaries: bad flags and values end in one FATAL line, non-finite losses stop the run,
  SIGKILL mid-run then `load_run` and resume, 4-device data parallel.
"""

import dataclasses
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
import numpy as np
from tensorboard.backend.event_processing import event_accumulator

from memkernel import checkpoint as checkpoint_lib
from memkernel import train as train_lib
from memkernel.kernel.config import KernelConfig
from memkernel.peers import PeerConfig
from memkernel import runs
from memkernel.runs import load_run
from memkernel.kernel import family as kernel_family
from memkernel import family as family_lib
from memkernel import experiment as experiment_lib
from memkernel import evaluate as evaluate_lib
from memkernel import metrics_log

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = ("mqar", "copy", "induction", "noisy_retrieval", "far_compare", "passkey", "cross_doc")
# Fields that differ between two runs of the same steps.
TIME_FIELDS = ("time", "steps_per_s")
# The reference run: shared by the resume, SIGKILL and data-parallel tests (one compiled step).
REFERENCE = {"train.steps": 6, "train.decay_steps": 20, "train.log_every": 1,
             "train.ckpt_every": 3}


def smoke_config(task="mqar", arg="smoke", overrides=None):
  config = importlib.import_module(f"configs.{task}").get_config(arg)
  config.eval.lengths = (config.task.seq_len,)
  for path, value in (overrides or {}).items():
    section, field = path.split(".")
    config[section][field] = value
  return config


def as_flags(overrides):
  flags = []
  for path, value in overrides.items():
    flags.append(f"--config.{path}={value}")
  return flags


def read_rows(workdir, split="train"):
  with open(os.path.join(workdir, experiment_lib.METRICS_FILE)) as f:
    rows = [json.loads(line) for line in f]
  return [r for r in rows if r["split"] == split]


def strip_times(rows):
  return [{k: v for k, v in r.items() if k not in TIME_FIELDS} for r in rows]


def run_binary(workdir, config_arg, overrides, env=None, **kwargs):
  cmd = [sys.executable, "-m", "experiments.train", f"--config=configs/{config_arg}",
         f"--workdir={workdir}"] + as_flags(overrides)
  full_env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_DEFAULT_MATMUL_PRECISION="highest",
                  **(env or {}))
  return cmd, dict(cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                   text=True, **kwargs)


def assert_bitwise_equal(test, a, b):
  test.assertEqual(jax.tree.structure(a), jax.tree.structure(b))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


class TrainTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.mkdtemp(prefix="memkernel_train_test_")
    cls.ref_dir = os.path.join(cls.tmp, "reference")
    config = smoke_config(overrides=REFERENCE)
    config.eval.lengths = (64, 128)
    cls.ref_summary = train_lib.train_and_evaluate(config, cls.ref_dir)

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.tmp, ignore_errors=True)
    super().tearDownClass()

  def workdir(self, name):
    return os.path.join(self.tmp, name)

  # -- end to end --------------------------------------------------------------------------------

  def test_reference_run_writes_metrics_eval_and_checkpoints(self):
    rows = read_rows(self.ref_dir)
    self.assertEqual([r["step"] for r in rows], [1, 2, 3, 4, 5, 6])
    for key in ("loss", "accuracy", "grad_norm", "lr", "nonfinite", "loss/teacher",
                "layer_0/routing_recall", "layer_0/routing_sparsity", "layer_0/root_similarity",
                "steps_per_s", "time"):
      self.assertIn(key, rows[-1])
    self.assertTrue(all(np.isfinite(r["loss"]) and r["nonfinite"] == 0 for r in rows))
    with open(os.path.join(self.ref_dir, experiment_lib.EVAL_FILE)) as f:
      summary = json.load(f)
    self.assertEqual(summary, json.loads(json.dumps(self.ref_summary)))
    self.assertEqual(summary["step"], 6)
    self.assertEqual(set(summary["lengths"]), {"64", "128"})
    for m in summary["lengths"].values():
      for key in ("accuracy", "loss", "layer_0/routing_recall", "layer_0/routing_sparsity",
                  "layer_0/leaves_read", "layer_0/root_similarity", "layer_0/exact_read_usage",
                  "layer_0/head_disagreement"):
        self.assertIn(key, m)
        self.assertTrue(np.isfinite(m[key]), key)
      self.assertNotIn("loss/teacher", m)  # Evaluation never uses the teacher.
    # Twice the length is another evaluation, not a copy of the first.
    self.assertNotEqual(summary["lengths"]["64"]["loss"], summary["lengths"]["128"]["loss"])
    ckpt = checkpoint_lib.Checkpointer(self.ref_dir, read_only=True)
    self.assertEqual(ckpt.all_steps(), [3, 6])
    self.assertIn("routing recall", train_lib.format_summary(summary))

  def test_load_run(self):
    model_config, params = load_run(self.ref_dir)
    self.assertIsInstance(model_config, KernelConfig)
    self.assertEqual((model_config.d_model, model_config.max_seq_len), (16, 64))
    # At a longer capacity the loaded parameters run past the trained length, and predict the
    # first leaf (before any memory is sealed, so before capacity can matter) as at the trained
    # capacity.
    tokens = np.asarray(jax.random.randint(jax.random.key(0), (1, 100), 0,
                                           model_config.vocab_size))
    longer = family_lib.build(dataclasses.replace(model_config, max_seq_len=128))
    logits, _ = jax.jit(longer.apply)({"params": params}, tokens)
    chex.assert_tree_all_finite(logits)
    trained, _ = jax.jit(family_lib.build(model_config).apply)({"params": params}, tokens[:, :64])
    leaf = model_config.leaf_size
    np.testing.assert_allclose(logits[:, :leaf], trained[:, :leaf], atol=1e-5, rtol=0)
    _, params_3 = load_run(self.ref_dir, step=3)
    self.assertFalse(np.array_equal(params_3["embed"]["embedding"], params["embed"]["embedding"]))

  def test_far_compare_kernel_with_oracle_and_periodic_eval(self):
    workdir = self.workdir("far_compare")
    config = smoke_config("far_compare", "smoke,oracle", {"train.steps": 3, "train.eval_every": 2})
    summary = train_lib.train_and_evaluate(config, workdir)
    self.assertEqual(summary["step"], 3)
    # The oracle feeds both answer leaves of each comparison to the read.
    self.assertEqual(summary["lengths"]["64"]["layer_0/routing_recall"], 1.0)
    self.assertEqual([r["step"] for r in read_rows(workdir)], [3])  # log_every=5, and the end.
    (eval_row,) = read_rows(workdir, "eval")
    self.assertEqual((eval_row["step"], eval_row["length"]), (2, 64))
    self.assertEqual(eval_row["layer_0/routing_recall"], 1.0)

  @parameterized.parameters(("dense", "induction"), ("sliding_window", "noisy_retrieval"))
  def test_peer_trains_in_the_same_harness(self, model_type, task):
    workdir = self.workdir(model_type)
    config = smoke_config(task, f"smoke,{model_type}", {"train.steps": 3})
    summary = train_lib.train_and_evaluate(config, workdir)
    self.assertEqual(summary["model_type"], model_type)
    self.assertTrue(np.isfinite(summary["lengths"]["64"]["loss"]))
    self.assertEqual([r["step"] for r in read_rows(workdir)], [3])
    model_config, params = load_run(workdir)
    self.assertEqual(model_config, PeerConfig(
        kind=model_type, vocab_size=64, d_model=16, num_layers=1, num_heads=4, mlp_ratio=2,
        window=32, max_seq_len=64))
    self.assertIn("block_0", params)
    with self.assertRaisesRegex(ValueError, f"beam_width applies to kernel runs.*{model_type}"):
      runs.evaluate_run(workdir, beam_width=4)

  def test_braincore_trains_in_the_same_harness(self):
    """The brain-core trains, evaluates and re-evaluates by its recurrent form; on cross_doc the
    batches' documents reach every form (the recurrent evaluation scores what the parallel one
    does)."""
    task = "cross_doc"
    workdir = self.workdir(f"braincore_{task}")
    config = smoke_config(task, "smoke,braincore", {"train.steps": 3})
    summary = train_lib.train_and_evaluate(config, workdir)
    self.assertEqual(summary["model_type"], "braincore")
    self.assertTrue(np.isfinite(summary["lengths"]["64"]["loss"]))
    (row,) = read_rows(workdir)
    self.assertIn("layer_0/em_occupancy", row)
    model_config, params = load_run(workdir)
    self.assertEqual((model_config.family, model_config.span, model_config.em_items),
                     ("braincore", 16, 16))
    self.assertIn("layer_0", params)
    parallel = runs.evaluate_run(workdir, lengths=(128,), batches=1, batch_size=2)
    recurrent = runs.evaluate_run(workdir, lengths=(128,), batches=1, batch_size=2, chunk=40)
    for k in ("loss", "accuracy", "queries"):
      self.assertAlmostEqual(recurrent["lengths"]["128"][k], parallel["lengths"]["128"][k],
                             places=4, msg=k)
    dropped = runs.evaluate_run(workdir, lengths=(128,), batches=1, batch_size=2,
                                drop=("episodic", "procedural"))
    self.assertEqual(dropped["drop"], ["episodic", "procedural"])
    self.assertNotEqual(dropped["lengths"]["128"]["loss"], parallel["lengths"]["128"]["loss"])
    with self.assertRaisesRegex(ValueError, r"drop names \['tree'\].*'working'"):
      runs.evaluate_run(workdir, drop=("tree",))
    # The memory's size changes at evaluation (no parameter depends on it); architecture does not.
    smaller = runs.evaluate_run(workdir, lengths=(128,), batches=1, batch_size=2,
                                memory={"em_items": 4})
    self.assertEqual(smaller["memory"], {"em_items": 4})
    self.assertNotEqual(smaller["lengths"]["128"]["loss"], parallel["lengths"]["128"]["loss"])
    with self.assertRaisesRegex(ValueError, r"\['d_model'\] cannot change.*'em_items'"):
      runs.evaluate_run(workdir, memory={"d_model": 32})
    with self.assertRaisesRegex(ValueError, "em_k must be <= em_items"):
      runs.evaluate_run(workdir, memory={"em_items": 4, "em_k": 5})

  # -- resume --------------------------------------------------------------------------------

  def test_resume_is_bitwise_equivalent(self):
    workdir = self.workdir("resumed")
    first = train_lib.train_and_evaluate(
        smoke_config(overrides={**REFERENCE, "train.steps": 4}), workdir)
    self.assertEqual(first["step"], 4)
    final = train_lib.train_and_evaluate(smoke_config(overrides=REFERENCE), workdir)
    self.assertEqual(final["step"], 6)
    assert_bitwise_equal(self, load_run(workdir)[1], load_run(self.ref_dir)[1])
    self.assertEqual(strip_times(read_rows(workdir)), strip_times(read_rows(self.ref_dir)))
    self.assertEqual(final["lengths"]["64"], self.ref_summary["lengths"]["64"])
    # Another seed trains other parameters on other batches...
    seed1 = self.workdir("seed1")
    train_lib.train_and_evaluate(
        smoke_config(overrides={**REFERENCE, "train.steps": 1, "train.seed": 1}), seed1)
    first_loss = lambda workdir: read_rows(workdir)[0]["loss"]
    self.assertNotEqual(first_loss(seed1), first_loss(self.ref_dir))
    # ...but one compiled step served the reference run, both halves, the resume and the seed.
    experiment = experiment_lib.parse_config(smoke_config(overrides=REFERENCE))
    self.assertEqual(train_lib.make_train_step(experiment, evaluate_lib.make_mesh())._cache_size(), 1)

  def test_evaluate_run_again(self):
    """Re-evaluation reproduces the run's own eval, and another task setting changes it."""
    again = runs.evaluate_run(self.ref_dir, lengths=(64,))
    self.assertEqual(again["lengths"]["64"], self.ref_summary["lengths"]["64"])
    uniform = runs.evaluate_run(self.ref_dir, lengths=(64,), task={"distance": "uniform"},
                                batches=1)
    self.assertEqual(uniform["task"]["distance"], "uniform")
    self.assertNotEqual(uniform["lengths"]["64"], again["lengths"]["64"])
    with self.assertRaisesRegex(ValueError, "unknown task field.*distanse"):
      runs.evaluate_run(self.ref_dir, task={"distanse": "uniform"})
    with self.assertRaisesRegex(ValueError, "distance must be one of"):
      runs.evaluate_run(self.ref_dir, task={"distance": "far"})
    with self.assertRaisesRegex(ValueError, "seq_len"):
      runs.evaluate_run(self.ref_dir, task={"seq_len": 128})

  def test_evaluate_run_on_the_validation_stream(self):
    """The validation stream is other batches than the test stream (the run's default), and the
    same ones every time; an unknown stream is named."""
    test = runs.evaluate_run(self.ref_dir, lengths=(64,), batches=1)
    validation = runs.evaluate_run(self.ref_dir, lengths=(64,), batches=1, stream="validation")
    self.assertEqual((test["stream"], validation["stream"]), ("test", "validation"))
    self.assertNotEqual(validation["lengths"]["64"], test["lengths"]["64"])
    again = runs.evaluate_run(self.ref_dir, lengths=(64,), batches=1, stream="validation")
    self.assertEqual(again["lengths"]["64"], validation["lengths"]["64"])
    with self.assertRaisesRegex(ValueError, "eval.stream must be one of.*'tset'"):
      runs.evaluate_run(self.ref_dir, stream="tset")

  def test_evaluate_run_by_the_recurrent_form(self):
    """Chunks of the recurrent form (40 tokens: chunks end mid-leaf) score what the parallel
    form scores: the same loss, accuracy, queries and routing recall per head; each length
    records its wall time and peak memory."""
    parallel = runs.evaluate_run(self.ref_dir, lengths=(128,), batches=1, batch_size=2)
    recurrent = runs.evaluate_run(self.ref_dir, lengths=(128,), batches=1, batch_size=2,
                                  chunk=40)
    self.assertEqual((recurrent["chunk"], recurrent["batch_size"]), (40, 2))
    want, got = parallel["lengths"]["128"], recurrent["lengths"]["128"]
    keys = [k for k in want if k in ("loss", "accuracy", "queries", "accuracy_se")
            or "routing_recall" in k]
    self.assertGreater(len([k for k in keys if "/head_" in k]), 1)
    self.assertEqual(sorted(k for k in got), sorted(keys))
    for k in keys:
      self.assertAlmostEqual(got[k], want[k], places=4, msg=k)
    self.assertGreater(recurrent["cost"]["128"]["wall_s"], 0.0)
    self.assertGreater(recurrent["cost"]["128"]["peak_rss_mib"], 0.0)
    # Routing hints: the recurrent form's memory keeps the presence the parallel form builds.
    model = experiment_lib.parse_config(smoke_config(overrides=REFERENCE)).model
    rng = np.random.default_rng(0)
    shape = (model.num_layers * model.num_route_heads, model.vocab_size)
    table = (rng.integers(-1, model.vocab_size, shape).astype(np.int32),
             rng.uniform(0.0, 4.0, shape).astype(np.float32))
    hinted = runs.evaluate_run(self.ref_dir, lengths=(128,), batches=1, batch_size=2,
                               route_hints=table)["lengths"]["128"]
    hinted_recurrent = runs.evaluate_run(self.ref_dir, lengths=(128,), batches=1, batch_size=2,
                                         chunk=40, route_hints=table)["lengths"]["128"]
    self.assertNotEqual(hinted["loss"], want["loss"])
    for k in keys:
      self.assertAlmostEqual(hinted_recurrent[k], hinted[k], places=4, msg=k)
    for bad in (0, -1, 2.5):
      with self.assertRaisesRegex(ValueError, "chunk must be a positive integer"):
        runs.evaluate_run(self.ref_dir, chunk=bad)
    with self.assertRaisesRegex(ValueError, "batch_size must be a positive integer"):
      runs.evaluate_run(self.ref_dir, batch_size=0)

  def test_evaluate_run_with_another_beam(self):
    """The run's own beam reproduces its eval; a beam as wide as the 8 leaves of 128 tokens reads
    every sealed leaf, so the answer leaf is always among them (recall 1)."""
    own = runs.load_experiment(self.ref_dir).model.beam_width
    same = runs.evaluate_run(self.ref_dir, lengths=(128,), beam_width=own)
    self.assertEqual(same["beam_width"], own)
    self.assertEqual(same["lengths"]["128"], self.ref_summary["lengths"]["128"])
    wide = runs.evaluate_run(self.ref_dir, lengths=(128,), beam_width=8, batches=1)
    self.assertEqual(wide["beam_width"], 8)
    self.assertEqual(wide["lengths"]["128"]["layer_0/routing_recall"], 1.0)
    # Representative keys change how nodes are scored, not the parameters: any run takes them.
    reps = runs.evaluate_run(self.ref_dir, lengths=(128,), node_reps=4, batches=1)
    self.assertEqual((reps["node_reps"], same["node_reps"]), (4, 0))
    # ... and reach the router: the routes (and so the metrics) differ from the pooled keys'.
    self.assertNotEqual(reps["lengths"]["128"], runs.evaluate_run(
        self.ref_dir, lengths=(128,), batches=1)["lengths"]["128"])
    with self.assertRaisesRegex(ValueError, "node_reps must be a non-negative integer, got -1"):
      runs.evaluate_run(self.ref_dir, node_reps=-1)
    for bad in (0, -2, 1.5, True):
      with self.assertRaisesRegex(ValueError, "beam_width must be a positive integer"):
        runs.evaluate_run(self.ref_dir, beam_width=bad)

  @parameterized.parameters(("model.d_model", 32, "model.d_model: saved 16, now 32"),
                            ("model.leaf_size", 8, "model.leaf_size: saved 16, now 8"),
                            ("model_type", "dense", "model_type: saved 'kernel', now 'dense'"),
                            ("task.distance", "uniform", "task.distance: saved"),
                            ("task.num_pairs", 3, "task.num_pairs: saved"))
  def test_incompatible_config_on_existing_workdir_fails(self, field, value, named):
    workdir = self.workdir(f"incompatible_{field}")
    shutil.copytree(self.ref_dir, workdir)
    if field == "model_type":
      config = smoke_config(arg="smoke,dense", overrides=REFERENCE)
    else:
      config = smoke_config(overrides={**REFERENCE, field: value})
    with self.assertRaises(checkpoint_lib.CheckpointMismatchError) as cm:
      train_lib.train_and_evaluate(config, workdir)
    message = str(cm.exception)
    self.assertIn(named, message)
    self.assertIn("--force_resume", message)
    self.assertLen(message.splitlines(), 1)
    self.assertEqual(checkpoint_lib.Checkpointer(workdir, read_only=True).all_steps(), [3, 6])

  def test_force_resume_takes_a_changed_task(self):
    workdir = self.workdir("forced")
    shutil.copytree(self.ref_dir, workdir)
    config = smoke_config(overrides={**REFERENCE, "task.distance": "uniform"})
    config.eval.batches = 1
    summary = train_lib.train_and_evaluate(config, workdir, force_resume=True)
    self.assertEqual(summary["step"], 6)  # Resumed at the end: evaluated on the new task.
    self.assertEqual(summary["task"]["distance"], "uniform")
    assert_bitwise_equal(self, load_run(workdir)[1], load_run(self.ref_dir)[1])
    # Parameter shapes cannot be forced.
    with self.assertRaisesRegex(checkpoint_lib.CheckpointMismatchError,
                                "other parameter shapes: .*embed"):
      train_lib.train_and_evaluate(smoke_config(overrides={**REFERENCE, "model.d_model": 32}),
                                   workdir, force_resume=True)

  def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(self):
    """Every file of step 6 cut to half its size: the run resumes from step 3 with a warning and
    trains the same steps again, to the same parameters and metrics rows."""
    workdir = self.workdir("damaged")
    shutil.copytree(self.ref_dir, workdir)
    newest = os.path.join(workdir, "checkpoints", "6")
    for root, _, files in os.walk(newest):
      for name in files:
        path = os.path.join(root, name)
        os.truncate(path, os.path.getsize(path) // 2)
    with self.assertLogs(level="WARNING") as logs:
      summary = train_lib.train_and_evaluate(smoke_config(overrides=REFERENCE), workdir)
    self.assertTrue(any("Checkpoint step 6" in line and "damaged" in line
                        and "restored step 3" in line for line in logs.output), logs.output)
    self.assertEqual(summary["step"], 6)
    assert_bitwise_equal(self, load_run(workdir)[1], load_run(self.ref_dir)[1])
    self.assertEqual(strip_times(read_rows(workdir)), strip_times(read_rows(self.ref_dir)))
    self.assertEqual(checkpoint_lib.Checkpointer(workdir, read_only=True).all_steps(), [3, 6])
    self.assertTrue(os.path.isdir(os.path.join(workdir, "checkpoints", "_damaged", "6")))

  def test_torn_metrics_line_is_dropped_on_resume(self):
    """A run killed while writing a row leaves half a line; the resumed run drops it and logs
    on a line of its own."""
    workdir = self.workdir("torn")
    shutil.copytree(self.ref_dir, workdir)
    path = os.path.join(workdir, experiment_lib.METRICS_FILE)
    with open(path) as f:
      lines = f.readlines()
    with open(path, "w") as f:
      f.writelines(lines[:-1])
      f.write(lines[-1][:len(lines[-1]) // 2])  # Row 6, torn.
    summary = train_lib.train_and_evaluate(
        smoke_config(overrides={**REFERENCE, "train.steps": 7}), workdir)
    self.assertEqual(summary["step"], 7)
    rows = read_rows(workdir)
    self.assertEqual([r["step"] for r in rows], [1, 2, 3, 4, 5, 7])
    self.assertEqual(strip_times(rows[:5]), strip_times(read_rows(self.ref_dir)[:5]))

  def test_truncate_metrics(self):
    path = os.path.join(self.tmp, "truncate.jsonl")
    with open(path, "w") as f:
      f.write('{"step": 1}\n{"step": 2\n{"step": 3}\n{"step": 4}')  # Torn 2, no newline after 4.
    metrics_log.truncate(path, 4)
    with open(path) as f:
      self.assertEqual(f.read(), '{"step": 1}\n{"step": 3}\n{"step": 4}\n')
    metrics_log.truncate(path, 3)
    with open(path) as f:
      self.assertEqual(f.read(), '{"step": 1}\n{"step": 3}\n')

  def test_tensorboard_holds_the_metrics_rows_once_after_a_resume(self):
    """Event files carry every train and eval row's scalars; a run killed after logging past its
    last checkpoint resumes without duplicating those steps (TensorBoard's own reader)."""
    workdir = self.workdir("tensorboard")
    overrides = {**REFERENCE, "train.tensorboard": True, "train.eval_every": 2}
    train_lib.train_and_evaluate(smoke_config(overrides=overrides), workdir)
    # Killed after logging step 6 but before checkpoint 6 was committed.
    shutil.rmtree(os.path.join(workdir, "checkpoints", "6"))
    train_lib.train_and_evaluate(smoke_config(overrides=overrides), workdir)
    events = event_accumulator.EventAccumulator(
        os.path.join(workdir, metrics_log.TENSORBOARD_DIR), size_guidance={"scalars": 0})
    events.Reload()
    for split in ("train", "eval"):
      rows = read_rows(workdir, split)
      self.assertNotEmpty(rows)
      for name in ("loss", "accuracy", "layer_0/routing_recall"):
        scalars = events.Scalars(f"{split}/{name}")
        self.assertEqual([s.step for s in scalars], [r["step"] for r in rows], (split, name))
        np.testing.assert_array_equal([s.value for s in scalars],
                                      np.float32([r[name] for r in rows]))
    self.assertEqual([s.step for s in events.Scalars("eval/loss")], [2, 4])
    self.assertNotIn("train/step", events.Tags()["scalars"])
    config = smoke_config().to_dict()
    config["train"]["tensorboard"] = "yes"
    with self.assertRaisesRegex(ValueError, "train.tensorboard must be a bool, got 'yes'"):
      experiment_lib.parse_config(config)

  # -- non-finite losses -------------------------------------------------------------------------

  def test_nonfinite_losses_are_counted_and_stop_the_run(self):
    """Through the binary: `NonFiniteLossError` ends it with one FATAL line and a non-zero exit
    status, and the newest checkpoint is the last finite step."""
    workdir = self.workdir("nonfinite")
    cmd, kwargs = run_binary(workdir, "copy.py:smoke", {
        "train.lr": 1e30, "train.max_nonfinite": 3, "train.log_every": 1,
        "train.ckpt_every": 1, "train.warmup_steps": 0})
    result = subprocess.run(cmd, timeout=300, **kwargs)
    self.assertEqual(result.returncode, 1, result.stdout[-3000:])
    self.assertNotIn("Traceback", result.stdout)
    fatal = [line for line in result.stdout.splitlines() if line.startswith("FATAL")]
    self.assertLen(fatal, 1, result.stdout[-3000:])
    self.assertRegex(fatal[0], r"^FATAL train: stopping at step \d+: 3 consecutive non-finite "
                     r"losses \(train.max_nonfinite=3\); the newest checkpoint is step \d+\.")
    self.assertTrue(result.stdout.rstrip().endswith(fatal[0]))
    rows = read_rows(workdir)
    self.assertEqual([r["nonfinite"] for r in rows[-3:]], [1, 1, 1])
    self.assertEqual(rows[-1]["nonfinite_total"], 3)
    last_good = max(r["step"] for r in rows if not r["nonfinite"])
    self.assertEqual(checkpoint_lib.Checkpointer(workdir, read_only=True).latest_step(), last_good)
    _, params = load_run(workdir)
    self.assertTrue(all(np.all(np.isfinite(p)) for p in jax.tree.leaves(params)))

  # -- validation --------------------------------------------------------------------------------

  def test_every_config_and_variant_validates(self):
    for name, task in [(t, t) for t in TASKS] + [("mqar_scattered", "mqar")]:
      module = importlib.import_module(f"configs.{name}")
      for arg in (None, "smoke", "dense", "sliding_window", "oracle", "smoke,oracle,dense",
                  "braincore", "smoke,braincore"):
        config = module.get_config(arg)
        experiment = experiment_lib.parse_config(config)
        self.assertEqual(experiment.task.name, task)
        if name.startswith("mqar"):
          self.assertEqual(experiment.task.layout,
                           "scattered" if name == "mqar_scattered" else "zoology")
        self.assertEqual(config.model.d_model, config.peer.d_model)
        if "braincore" in (arg or ""):
          self.assertEqual(experiment.model.d_model, config.model.d_model)
        self.assertEqual(config.task.vocab_size, config.model.vocab_size)
        self.assertIn("python -m experiments.train", module.__doc__)
      with self.assertRaisesRegex(ValueError, "unknown config arg"):
        module.get_config("smokey")
    # Shared sizes move together.
    config = smoke_config()
    config.model.d_model = 20
    self.assertEqual(config.peer.d_model, 20)
    # Only the model that trains is validated: width 20 suits the kernel, not the peers' RoPE.
    self.assertEqual(experiment_lib.parse_config(config).model.d_model, 20)
    config.model_type = "dense"
    with self.assertRaisesRegex(ValueError, "PeerConfig.num_heads must leave an even head width"):
      experiment_lib.parse_config(config)

  @parameterized.named_parameters(
      ("negative_width", "model.d_model", -1, "KernelConfig.d_model"),
      ("unknown_model_field", "model.bogus", 1, r"unknown field\(s\) \['bogus'\]"),
      ("unknown_train_field", "train.bogus", 1, r"config.train got unknown field"),
      ("zero_batch", "train.batch_size", 0, "train.batch_size must be >= 1"),
      ("bad_lr", "train.lr", float("nan"), "train.lr must be a finite number"),
      ("bad_schedule", "train.schedule", "linear", "train.schedule must be one of"),
      ("no_lengths", "eval.lengths", (), "eval.lengths must be a non-empty"),
      ("bad_length", "eval.lengths", (64, 8), "eval.lengths: task 'mqar' is invalid at length 8"),
      ("bad_model_type", "model_type", "rnn", "config.model_type must be one of"),
      ("vocab_mismatch", "peer.vocab_size", 32, None),
      ("bad_task", "task.distance", "cubic", "TaskConfig.distance"),
  )
  def test_bad_config_raises_before_compiling(self, path, value, regex):
    config = smoke_config()
    if path == "peer.vocab_size":  # The references keep vocab sizes equal; break them by hand.
      config.model_type = "dense"
      config = config.to_dict()
      config["peer"]["vocab_size"] = value
      regex = r"task.vocab_size=64 must equal peer.vocab_size=32"
    elif "." in path:
      section, field = path.split(".")
      config[section][field] = value
    else:
      config[path] = value
    workdir = self.workdir(f"bad_{path}")
    with self.assertRaisesRegex(ValueError, regex):
      train_lib.train_and_evaluate(config, workdir)
    self.assertFalse(os.path.exists(workdir))

  def test_batch_must_divide_over_devices(self):
    experiment = experiment_lib.parse_config(smoke_config(overrides={"train.batch_size": 6}))
    with self.assertRaisesRegex(ValueError, r"train.batch_size=6 must be divisible by the number "
                                r"of devices \(4\)"):
      experiment_lib.check_devices(experiment, 4)

  def test_capacity(self):
    self.assertEqual([kernel_family.capacity(n, 16) for n in (1, 16, 17, 64, 100, 512, 513)],
                     [16, 16, 32, 64, 128, 512, 1024])

  # -- the binary --------------------------------------------------------------------------------

  def test_bad_flags_exit_nonzero_before_compiling(self):
    a_file = os.path.join(self.tmp, "a_file")
    with open(a_file, "w") as f:
      f.write("not a run")
    for flag, message in (
        ("--config.model.d_model=-1",
         "FATAL train: invalid config: KernelConfig.d_model must be a positive integer, got -1"),
        ("--config.model.bogus=1",
         "FATAL Flags parsing error: --config.model.bogus: the config has no field 'bogus'"),
        (f"--workdir={a_file}", f"FATAL train: --workdir={a_file} is a file"),
        ("extra_argument", "FATAL train: unexpected arguments: ['extra_argument']")):
      workdir = self.workdir("bad_flags")
      cmd, kwargs = run_binary(workdir, "mqar.py:smoke", {})
      result = subprocess.run(cmd + [flag], timeout=120, **kwargs)
      self.assertEqual(result.returncode, 1, result.stdout)
      self.assertIn(message, result.stdout.strip().splitlines()[-1])
      self.assertNotIn("Traceback", result.stdout)
      self.assertFalse(os.path.exists(workdir))
    with open(a_file) as f:
      self.assertEqual(f.read(), "not a run")
    with self.assertRaisesRegex(ValueError, "is a file"):  # The library too.
      train_lib.train_and_evaluate(smoke_config(), a_file)

  def test_evaluate_binary(self):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    evaluate = lambda *flags: subprocess.run(
        [sys.executable, "-m", "experiments.evaluate", f"--workdir={self.ref_dir}", *flags],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        timeout=300)
    a_file = os.path.join(self.tmp, "eval_a_file")
    open(a_file, "w").close()
    for flags, message in ((["--task=distanse=uniform"], "unknown task field(s) ['distanse']"),
                           (["--task=uniform"], "--task must be FIELD=VALUE"),
                           (["--lengths=64,x"], "--lengths must be comma-separated integers"),
                           (["--lengths=0"], "--lengths must be positive integers, got 0"),
                           (["--lengths="], "--lengths must be positive integers, got nothing"),
                           (["--batches=0"], "batches must be a positive integer, got 0"),
                           (["--beam_width=0"], "beam_width must be a positive integer, got 0"),
                           ([f"--workdir={a_file}"], f"--workdir={a_file} is a file")):
      result = evaluate(*flags)
      self.assertEqual(result.returncode, 1, result.stdout)
      last = result.stdout.strip().splitlines()[-1]
      self.assertTrue(last.startswith("FATAL evaluate: "), result.stdout)
      self.assertIn(message, last)
      self.assertNotIn("Traceback", result.stdout)
    for bad in ((0,), (), (64, -1)):  # Not "the default lengths".
      with self.assertRaisesRegex(ValueError, "lengths must be positive integers"):
        runs.evaluate_run(self.ref_dir, lengths=bad)
    out = os.path.join(self.tmp, "eval_uniform.json")
    result = evaluate("--lengths=64", "--task=distance=uniform", "--batches=1", "--beam_width=3",
                      f"--out={out}")
    self.assertEqual(result.returncode, 0, result.stdout)
    self.assertIn("length 64 (beam 3, search 3, reps 0): accuracy", result.stdout)
    with open(out) as f:
      written = json.load(f)
    self.assertEqual(written["task"]["distance"], "uniform")
    self.assertEqual(written["beam_width"], 3)
    self.assertIn("--task=distance=uniform", written["command"])
    self.assertNotEqual(evaluate("--lengths=64", f"--out={out}").returncode, 0)  # No overwrite.

  def test_sigkill_mid_run_then_load_and_resume(self):
    workdir = self.workdir("killed")
    overrides = {**REFERENCE, "train.steps": 100000, "train.ckpt_every": 2,
                 "eval.lengths": "(64,)"}
    cmd, kwargs = run_binary(workdir, "mqar.py:smoke", overrides)
    proc = subprocess.Popen(cmd, **kwargs)
    try:
      reader = None
      deadline = time.time() + 150
      while time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
        if os.path.isdir(os.path.join(workdir, "checkpoints")):
          reader = reader or checkpoint_lib.Checkpointer(workdir, read_only=True)
          if (reader.latest_step() or 0) >= 6:
            break
      self.assertIsNone(proc.poll(), proc.stdout.read() if proc.poll() is not None else "")
      os.kill(proc.pid, signal.SIGKILL)
      proc.wait(timeout=30)
    finally:
      if proc.poll() is None:
        proc.kill()
      proc.stdout.close()
    self.assertEqual(proc.returncode, -signal.SIGKILL)

    model_config, params = load_run(workdir)
    self.assertEqual(model_config.d_model, 16)
    latest = checkpoint_lib.Checkpointer(workdir, read_only=True).latest_step()
    killed_rows = read_rows(workdir)
    # Same program in another process: the same numbers as the in-process reference run.
    np.testing.assert_allclose([r["loss"] for r in killed_rows[:6]],
                               [r["loss"] for r in read_rows(self.ref_dir)], rtol=1e-6)

    summary = train_lib.train_and_evaluate(
        smoke_config(overrides={**REFERENCE, "train.steps": latest + 2}), workdir)
    self.assertEqual(summary["step"], latest + 2)
    rows = read_rows(workdir)
    self.assertEqual([r["step"] for r in rows], list(range(1, latest + 3)))
    self.assertEqual(strip_times(rows[:latest]), strip_times(killed_rows[:latest]))

  def test_data_parallel_on_four_devices_matches_one(self):
    workdir = self.workdir("four_devices")
    overrides = {**REFERENCE, "train.steps": 3, "eval.lengths": "(64,)"}
    cmd, kwargs = run_binary(workdir, "mqar.py:smoke", overrides,
                             env={"XLA_FLAGS": os.environ.get("XLA_FLAGS", "")
                                  + " --xla_force_host_platform_device_count=4"})
    result = subprocess.run(cmd, timeout=170, **kwargs)
    self.assertEqual(result.returncode, 0, result.stdout[-3000:])
    self.assertIn("on 4 device(s)", result.stdout)
    rows, ref = read_rows(workdir), read_rows(self.ref_dir)[:3]
    for key in ("loss", "accuracy", "grad_norm", "layer_0/routing_recall"):
      np.testing.assert_allclose([r[key] for r in rows], [r[key] for r in ref], atol=1e-5,
                                 err_msg=key)


if __name__ == "__main__":
  absltest.main()

"""The real-text task (`memkernel.text_task`, `configs/text.py`) in the training harness.

A small directory corpus written here (so the tests do not depend on this Python's standard
library); the kernel's smoke model. Checked: the config refuses what text cannot do, before
anything compiles; the evaluation's sums are the numpy ones; a run resumed from a checkpoint
reads the same bytes and ends bit-identical to an uninterrupted one; evaluation scores the same
test bytes whatever the run's seed; results record the corpus.
"""

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile

from absl.testing import absltest
import chex
import jax
import jax.numpy as jnp
import numpy as np

from configs import text as text_config
from memkernel import checkpoint as checkpoint_lib
from memkernel import corpus as corpus_lib
from memkernel import evaluate as evaluate_lib
from memkernel import experiment as experiment_lib
from memkernel import text_store
from memkernel import text_task
from memkernel import train as train_lib
from memkernel.runs import load_experiment, load_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ("alpha", "beta", "gamma", "delta", "memory", "leaf", "tree", "route", "byte", "file")


def _write_corpus(root):
  rng = np.random.default_rng(0)
  for i in range(120):
    words = rng.choice(WORDS, size=int(rng.integers(5, 60)))
    with open(os.path.join(root, f"doc_{i:03d}.txt"), "w") as f:
      f.write(f"# document {i}\n" + " ".join(words) + "\n")


def _config(corpus, arg="smoke", **train):
  config = text_config.get_config(arg)
  config.task.corpus = corpus
  config.task.patterns = "*.txt"
  config.task.recall_window = 16   # Words of the little corpus recur within 128 bytes.
  config.train.update(dict(log_every=1, ckpt_every=2, **train))
  config.eval.lengths = (config.task.seq_len,)
  return config


def _rows(workdir):
  with open(os.path.join(workdir, experiment_lib.METRICS_FILE)) as f:
    return [{k: v for k, v in json.loads(line).items() if k not in ("time", "steps_per_s")}
            for line in f]


class TextTaskTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.mkdtemp(prefix="memkernel_text_test_")
    cls.corpus = os.path.join(cls.tmp, "corpus")
    os.makedirs(cls.corpus)
    _write_corpus(cls.corpus)
    cls.ref = os.path.join(cls.tmp, "reference")
    cls.summary = train_lib.train_and_evaluate(_config(cls.corpus, steps=4), cls.ref)

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.tmp, ignore_errors=True)
    super().tearDownClass()

  def test_trains_and_reports_bits_per_byte_by_position(self):
    rows = _rows(self.ref)
    self.assertEqual([r["step"] for r in rows], [1, 2, 3, 4])
    self.assertTrue(all(np.isfinite(r["loss"]) for r in rows))
    self.assertNotIn("layer_0/routing_recall", rows[-1])  # No answers to find in text.
    m = self.summary["lengths"]["128"]
    self.assertAlmostEqual(m["bits_per_byte"], m["loss"] / math.log(2), places=6)
    self.assertGreater(m["bits_per_byte_se"], 0)
    self.assertEqual(sorted(k for k in m if k.startswith("bits_per_byte@")),
                     ["bits_per_byte@0-64", "bits_per_byte@64-128"])
    self.assertGreater(m["recall_common_queries"], 0)
    self.assertTrue(0 <= m["recall_common_accuracy"] <= 1)
    self.assertIn("recall_rare_queries", m)
    text = train_lib.format_summary(self.summary)
    self.assertIn("bits/byte", text)

  def test_store_lines_cover_the_bytes_and_alpha_zero_changes_nothing(self):
    experiment, params = load_experiment(self.ref), load_run(self.ref)[1]
    directory, key = os.path.join(self.tmp, "store"), b"k" * 32
    seal = text_store.write_store(directory, key, experiment, params, sequences=3)
    batch = next(text_task.train_stream(experiment.task, experiment.eval.batch_size,
                                        seed=text_store.LINES_STREAM_SEED))
    self.assertEqual(seal.count, int(np.sum(batch["mask"][:, :-1] > 0)))  # A whole batch read.
    with self.assertRaisesRegex(ValueError, "already holds"):
      text_store.write_store(directory, key, experiment, params, sequences=1)
    result = text_store.ask_store(directory, key, experiment, params, alphas=(0.0, 8.0),
                                  floors=(0.0,), k=3, length=128, progress=lambda m: None)
    off, on = (t["validation"] for t in result["tried"])
    np.testing.assert_equal(off, result["no_store"]["validation"])   # Bit for bit (NaN: no byte).
    self.assertNotEqual(on["bits_per_byte"], off["bits_per_byte"])
    self.assertEqual(on["queries"], off["queries"])
    best = min(result["tried"], key=lambda t: t["validation"]["bits_per_byte"])
    self.assertEqual(result["chosen"]["alpha"], best["alpha"])
    self.assertEqual(result["lines"], seal.count)
    self.assertIs(result["lengths"]["128"], result["chosen"]["test"])

  def test_results_record_the_corpus(self):
    with open(os.path.join(self.ref, experiment_lib.EVAL_FILE)) as f:
      corpus = json.load(f)["corpus"]
    expected = corpus_lib.Corpus.from_directory(self.corpus, ("*.txt",))
    self.assertEqual(corpus["checksum"], expected.checksum)
    self.assertEqual(sorted(sum(corpus["files"].values(), [])), sorted(expected.files))
    self.assertEqual(corpus["files"]["test"], list(expected.split("test")))

  def test_resume_reads_the_same_bytes_and_ends_bit_identical(self):
    workdir = os.path.join(self.tmp, "resumed")
    train_lib.train_and_evaluate(_config(self.corpus, steps=2), workdir)
    meta = checkpoint_lib.Checkpointer(workdir, read_only=True).restore_meta(2)
    self.assertEqual(meta["data_state"]["stream"]["split"], "train")
    summary = train_lib.train_and_evaluate(_config(self.corpus, steps=4), workdir)
    self.assertEqual(_rows(workdir), _rows(self.ref))
    chex.assert_trees_all_equal(load_run(workdir)[1], load_run(self.ref)[1])  # Bit for bit.
    np.testing.assert_equal(summary["lengths"], self.summary["lengths"])  # NaN where no byte.

  def test_the_recurrent_form_scores_the_same_bytes_alike(self):
    experiment, params = load_experiment(self.ref), load_run(self.ref)[1]
    parallel = evaluate_lib.evaluate(experiment, params)["128"]
    for chunk in (32, 48):       # A chunk that does not divide the length too.
      recurrent = evaluate_lib.evaluate(experiment, params, chunk=chunk)["128"]
      self.assertEqual(sorted(recurrent), sorted(parallel))
      for k, v in parallel.items():
        if k.endswith("queries") or k == "sequences":
          self.assertEqual(recurrent[k], v, k)             # The same bytes, buckets and labels.
        else:
          np.testing.assert_allclose(recurrent[k], v, rtol=1e-4, atol=1e-5, err_msg=k)

  def test_another_seed_trains_on_other_rows_and_is_scored_on_the_same_bytes(self):
    task = text_task.TextTaskConfig(corpus=self.corpus, patterns="*.txt", seq_len=64)
    a = next(text_task.train_stream(task, 2, seed=0))
    b = next(text_task.train_stream(task, 2, seed=1))
    self.assertFalse(np.array_equal(a["tokens"], b["tokens"]))
    first = text_task.eval_batches(task, "test", 2, 2)
    again = text_task.eval_batches(task, "test", 2, 2)
    for x, y in zip(first, again):
      for k in x:
        np.testing.assert_array_equal(x[k], y[k])
    test_bytes = b"".join(text_task.corpus_of(task).read(f)
                          for f in text_task.corpus_of(task).split("test"))
    row = bytes(first[0]["tokens"][0][first[0]["tokens"][0] > 0].astype(np.uint8))
    self.assertIn(row[:20], test_bytes)


class SumsTest(absltest.TestCase):

  def test_buckets(self):
    self.assertEqual(text_task.buckets(64), [(0, 64)])
    self.assertEqual(text_task.buckets(300), [(0, 64), (64, 128), (128, 256), (256, 300)])

  def test_position_sums_are_the_numpy_ones(self):
    rng = np.random.default_rng(0)
    b, t, v = 3, 130, 256
    logits = rng.normal(size=(b, t, v)).astype(np.float32)
    targets = rng.integers(0, v, size=(b, t)).astype(np.int32)
    mask = (rng.random((b, t)) < 0.8).astype(np.float32)
    sums = jax.device_get(text_task.position_sums(
        jnp.asarray(logits), {"targets": jnp.asarray(targets), "mask": jnp.asarray(mask)}))
    logp = logits - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1,
                                  keepdims=True)) - logits.max(-1, keepdims=True)
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(sums["nll"], np.sum(nll * mask), rtol=1e-5)
    np.testing.assert_allclose(sums["nll@128"], np.sum((nll * mask)[:, 128:]), rtol=1e-5)
    self.assertEqual(float(sums["queries@64"]), float(np.sum(mask[:, 64:128])))
    out = text_task.summarize([sums], t)
    np.testing.assert_allclose(out["bits_per_byte"], np.sum(nll * mask) / np.sum(mask)
                               / math.log(2), rtol=1e-5)
    per_sequence = np.sum(nll * mask, 1) / math.log(2)
    ratio = per_sequence.sum() / mask.sum()
    se = math.sqrt(np.sum((per_sequence - ratio * mask.sum(1)) ** 2) / (b * (b - 1)))
    np.testing.assert_allclose(out["bits_per_byte_se"], se / mask.sum(1).mean(), rtol=1e-5)
    self.assertEqual(out["sequences"], b)


class LongRangeRecallTest(absltest.TestCase):

  def test_labels_mark_identifiers_seen_beyond_the_window(self):
    root = tempfile.mkdtemp()
    _write_corpus(root)  # 'alpha' is common in its training split; 'zeta_name', 'bar' absent.
    task = text_task.TextTaskConfig(corpus=root, patterns="*.txt", seq_len=512, recall_window=64)
    filler = b"1 " * 40                                          # 80 bytes, no identifier.
    row = (b"\nzeta_name alpha bar\n" + filler + b"zeta_name(alpha) bar\n" + filler
           + b"bar zeta_name alpha_beta\n")
    doc = row + b"alpha zeta_name"                  # A second document: nothing seen before.
    tokens = np.zeros((1, 512), np.int32)
    tokens[0, :len(doc)] = np.frombuffer(doc, np.uint8)
    segments = np.zeros((1, 512), np.int32)
    segments[0, len(row):] = 1
    batch = {"tokens": tokens, "segments": segments, "mask": np.ones((1, 512), np.float32)}
    labels = text_task.long_range_labels(batch, task)[0]
    want = np.zeros(512, np.int32)
    # Every second and third occurrence in the first document is over 64 bytes after the one
    # before it; the first occurrences, 'alpha_beta' and the second document are not scored.
    for word, start, kind in ((b"zeta_name", 21 + 80, text_task.RARE),
                              (b"alpha", 31 + 80, text_task.COMMON),
                              (b"bar", 38 + 80, text_task.RARE),
                              (b"bar", 42 + 160, text_task.RARE),
                              (b"zeta_name", 46 + 160, text_task.RARE)):
      self.assertEqual(row[start:start + len(word)], word)
      want[start:start + len(word) - 1] = kind   # Positions predicting its bytes after the first.
    np.testing.assert_array_equal(labels, want)
    counts = text_task.identifier_counts(task)
    self.assertGreater(counts[b"alpha"], task.rare_count)
    self.assertEqual(counts[b"bar"] + counts[b"zeta_name"], 0)
    wide = dataclasses.replace(task, recall_window=200)    # None is over 200 bytes back.
    self.assertEqual(int(np.sum(text_task.long_range_labels(batch, wide) > 0)), 0)


class ConfigTest(absltest.TestCase):

  def _parse(self, arg="smoke", **changes):
    config = text_config.get_config(arg).to_dict()
    for path, value in changes.items():
      section, name = path.split("__")
      config[section][name] = value
    return experiment_lib.parse_config(config)

  def test_defaults_parse(self):
    for arg in ("", "smoke", "sliding_window", "braincore", "smoke,braincore"):
      experiment = self._parse(arg)
      self.assertTrue(text_task.is_text(experiment.task))
    self.assertEqual(self._parse("braincore").task.leaf_size, 64)  # The plasticity span.

  def test_what_text_cannot_do_is_refused(self):
    for changes, message in (
        ({"task__corpus": "/no/such/dir"}, "task.corpus must be 'stdlib' or a directory"),
        ({"task__vocab_size": 64, "model__vocab_size": 64}, "task.vocab_size must be 256"),
        ({"task__seq_len": 100}, "must be a multiple of task.leaf_size"),
        ({"train__oracle": True}, "has no answer leaves"),
        ({"eval__audit_batches": 2}, "eval.audit_batches=0"),
        ({"task__patterns": " , "}, "task.patterns"),
        ({"task__spelling": 1}, r"unknown field\(s\) \['spelling'\]")):
      with self.assertRaisesRegex(ValueError, message):
        self._parse(**changes)
    with self.assertRaisesRegex(ValueError, "document alignment"):
      self._parse("braincore", task__leaf_size=16, model__leaf_size=16)

  def test_binary_refuses_a_missing_corpus_in_one_line(self):
    result = subprocess.run(
        [sys.executable, "-m", "experiments.train", "--config=configs/text.py:smoke",
         "--config.task.corpus=/no/such/dir", f"--workdir={tempfile.mkdtemp()}"],
        cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
        timeout=120)
    self.assertEqual(result.returncode, 1)
    self.assertRegex(result.stderr.strip().splitlines()[-1],
                     r"^FATAL train: invalid config: task.corpus must be 'stdlib' or a directory")


if __name__ == "__main__":
  absltest.main()

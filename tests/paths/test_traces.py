"""Read traces (`memkernel.paths.traces`, `trace_study`): the EMA with decay and quota, edge keys,
the leaf a trace points at, the hint tables and their gate, and the study on a small kernel.

Checked: an update is the EMA it says (captured edges move toward the batch's salience, the rest
decay) and the quota keeps the strongest edges, never more; overlap is 1 for equal traces and 0
for disjoint ones; a context-keyed trace learned from queries that read the token after an
earlier occurrence of their own token points every query of new sequences (and longer ones) at
that leaf, while the content-keyed trace of the same reads does not; the study on a small kernel
gives equal traces for equal checkpoints, keeps every trace within its quota, and scores
transfer only for keyings that exist beyond the training length; the command fails in one line
on bad input.
"""

import importlib
import os
import tempfile

from absl.testing import absltest
import cli_checks
import jax
import jax.numpy as jnp
import numpy as np

from memkernel import experiment as experiment_lib
from memkernel.kernel.model import KernelModel
from memkernel.paths import trace_study
from memkernel.paths import traces



class ReadTracesTest(absltest.TestCase):

  def test_update_is_an_ema_with_decay_and_a_quota(self):
    trace = traces.ReadTraces(groups=2, edges=6, retention=0.5, decay=0.9, quota=2)
    trace.update(np.array([0, 0, 0, 1]), np.array([1, 1, 4, 2]),
                 np.array([0.5, 0.5, 0.2, 0.8]), queries_per_group=np.array([2, 1]))
    # Group 0: edge 1 sums 1.0 over 2 queries -> S = 0.5; edge 4: S = 0.1. M = 0.5 * S.
    np.testing.assert_allclose(trace.strength[0], [0, 0.25, 0, 0, 0.05, 0], atol=1e-7)
    np.testing.assert_allclose(trace.strength[1], [0, 0, 0.4, 0, 0, 0], atol=1e-7)
    trace.update(np.array([0, 0]), np.array([3, 5]), np.array([0.6, 0.4]),
                 queries_per_group=np.array([1, 1]))
    # Edges 1 and 4 decay (0.225, 0.045); 3 and 5 enter at 0.3 and 0.2; the quota keeps 2.
    np.testing.assert_allclose(trace.strength[0], [0, 0.225, 0, 0.3, 0, 0], atol=1e-7)
    np.testing.assert_allclose(trace.strength[1], [0, 0, 0.36, 0, 0, 0], atol=1e-7)
    self.assertEqual(trace.age[0, 1], 1)
    self.assertEqual(trace.edges_held(), 3)
    self.assertEqual(trace.bytes_held(), 3 * traces.BYTES_PER_EDGE)
    self.assertEqual(trace.top(1), [{3}, {2}])
    tied = traces.ReadTraces(groups=1, edges=5, quota=2)
    tied.update(np.zeros(4, np.int64), np.array([0, 1, 2, 3]), np.ones(4), np.array([1]))
    self.assertEqual(tied.edges_held(), 2)                  # Ties never exceed the quota.
    with self.assertRaisesRegex(ValueError, "edge ids must lie in"):
      trace.update(np.array([0]), np.array([6]), np.array([1.0]), np.array([1, 1]))
    with self.assertRaisesRegex(ValueError, "retention must be in"):
      traces.ReadTraces(1, 1, retention=1.5)

  def test_overlap(self):
    a = traces.ReadTraces(groups=1, edges=8)
    a.update(np.zeros(3, np.int64), np.array([0, 1, 2]), np.ones(3), np.array([1]))
    b = traces.ReadTraces(groups=1, edges=8)
    b.update(np.zeros(3, np.int64), np.array([5, 6, 7]), np.ones(3), np.array([1]))
    self.assertEqual(traces.overlap(a, a, 3), 1.0)
    self.assertEqual(traces.overlap(a, b, 3), 0.0)
    with self.assertRaisesRegex(ValueError, "differ in shape"):
      traces.overlap(a, traces.ReadTraces(groups=2, edges=8), 3)


def _recall_sequences(rng, count, length, vocab=32, leaf=4):
  """Sequences of filler with keys in [1, 8): each key once with a value after it, asked later."""
  out = []
  for _ in range(count):
    tokens = rng.integers(16, vocab, size=length)
    keys = rng.permutation(np.arange(1, 8))[:3]
    places = rng.permutation(np.arange(0, length // 2 - 1, leaf))[:3]
    queries = length // 2 + rng.permutation(np.arange(length // 2 - 1))[:3]
    for key, place, query in zip(keys, places, queries):
      tokens[place] = key
      tokens[query] = key
    out.append((tokens, list(zip(queries, places))))
  return out


class LeafBiasTest(absltest.TestCase):

  def test_a_context_trace_points_at_the_token_after_the_earlier_key(self):
    rng = np.random.default_rng(0)
    leaf, vocab, length = 4, 32, 64
    fit = _recall_sequences(rng, 16, length, vocab, leaf)
    fields = {k: [] for k in ("group", "query", "target", "query_token", "target_token",
                              "target_previous", "salience", "sequence")}
    for s, (tokens, pairs) in enumerate(fit):
      for query, place in pairs:                # Each query reads the value after its key.
        for name, value in (("group", 0), ("query", query), ("target", place + 1),
                            ("query_token", tokens[query]), ("target_token", tokens[place + 1]),
                            ("target_previous", tokens[place]), ("salience", 0.9),
                            ("sequence", s)):
          fields[name].append(value)
    reads = traces.Reads(**{k: np.asarray(v) for k, v in fields.items()})
    geometry = dict(leaf_size=leaf, seq_len=length, vocab_size=vocab)
    built = {}
    for keying in ("content", "context"):
      built[keying] = traces.ReadTraces(1, traces.edge_space(keying, **geometry), quota=64)
      built[keying].update(reads.group, traces.edge_ids(reads, keying, **geometry),
                           reads.salience, np.array([len(reads)]))
    for test_length in (length, 4 * length):   # New sequences, and longer ones.
      test = _recall_sequences(rng, 8, test_length, vocab, leaf)
      tokens = {s: t for s, (t, _) in enumerate(test)}
      targets = {(s, 0, int(q)): int(p) // leaf for s, (_, pairs) in enumerate(test)
                 for q, p in pairs}
      context = traces.hit_rate(built["context"], "context", tokens, targets, leaf_size=leaf,
                                vocab_size=vocab)
      content = traces.hit_rate(built["content"], "content", tokens, targets, leaf_size=leaf,
                                vocab_size=vocab)
      self.assertEqual(context["trace"], 1.0)
      self.assertEqual(context["groups"], [1.0])
      self.assertLess(content["trace"], 0.5)   # Values are random: their edges do not recur.
      self.assertLess(context["chance"], 0.2)


class HintTableTest(absltest.TestCase):

  def test_tables_pick_the_strongest_follower_and_the_gate_switches_heads_off(self):
    vocab = 4
    trace = traces.ReadTraces(groups=2, edges=vocab * vocab, retention=0.0)
    # Group 0: query token 1 reads what follows 3 (0.8) and 2 (0.2); query token 2: 1 (0.4).
    trace.update(np.array([0, 0, 0, 1]), np.array([1 * vocab + 3, 1 * vocab + 2, 2 * vocab + 1,
                                                   0 * vocab + 0]),
                 np.array([0.8, 0.2, 0.4, 0.5]), np.array([1, 1]))
    token, weight = trace_study.hint_table(trace, vocab)
    np.testing.assert_array_equal(token, [[-1, 3, 1, -1], [0, -1, -1, -1]])
    np.testing.assert_allclose(weight, [[0, 1.0, 0.5, 0], [1.0, 0, 0, 0]])
    with tempfile.TemporaryDirectory() as root:
      path = os.path.join(root, "hints.npz")
      trace_study.save_hint_table(path, {"trace": (token, weight)}, read_hit=[0.9, 0.1])
      gated_token, gated_weight = trace_study.load_hint_table(path, "trace", alpha=4.0)
      np.testing.assert_array_equal(gated_token[1], [-1] * vocab)     # Below the 0.5 gate.
      np.testing.assert_allclose(gated_weight[0], 4.0 * weight[0])
      open_token, _ = trace_study.load_hint_table(path, "trace", gate=0.0)
      np.testing.assert_array_equal(open_token, token)
      with self.assertRaisesRegex(ValueError, "no 'shuffled' table"):
        trace_study.load_hint_table(path, "shuffled")
      with self.assertRaisesRegex(FileNotFoundError, "no route hints file"):
        trace_study.load_hint_table(os.path.join(root, "none.npz"))


class StudyTest(absltest.TestCase):

  def test_study_on_a_small_kernel(self):
    config = importlib.import_module("configs.mqar_scattered").get_config("smoke")
    experiment = experiment_lib.parse_config(config)
    model = KernelModel(experiment.model)
    params = jax.jit(model.init)(jax.random.PRNGKey(0),
                                 jnp.zeros((1, experiment.task.seq_len), jnp.int32))["params"]
    length = 2 * experiment.task.seq_len
    report = trace_study.traces_experiment(experiment, {1: params, 2: params}, batches=1,
                                           batch_size=4, quota=16, top=8, lengths=(length,))
    groups = experiment.model.num_layers * experiment.model.num_route_heads
    self.assertEqual(report["groups"], groups)
    self.assertEqual(set(report["keyings"]), set(traces.KEYINGS))
    self.assertGreater(report["reads"], 0)
    for keying, cell in report["keyings"].items():
      self.assertEqual(cell["overlap"]["steps"], 1.0, keying)    # Equal checkpoints.
      self.assertLessEqual(cell["edges_held"], 16)
      self.assertLessEqual(cell["bytes"], cell["quota_bytes"])
      self.assertEqual(set(cell["hit"]), {"read", "answer"})
      for hit in cell["hit"].values():
        self.assertLen(hit["groups"], groups)
        self.assertBetween(hit["trace"], 0.0, 1.0)
      self.assertEqual(keying != "position", "transfer" in cell)
    self.assertIn("| context |", trace_study.format_table(report))
    with self.assertRaisesRegex(ValueError, "longer than the run's"):
      trace_study.traces_experiment(experiment, {1: params}, batches=1, lengths=(8,))

  def test_binary_fails_in_one_line_on_bad_input(self):
    with tempfile.TemporaryDirectory() as root:
      peer = cli_checks.peer_run(root)
      cli_checks.assert_fatal_lines(self, "traces", {
          (peer,): "'dense' run; read traces need a memory-kernel run",
          (peer, "--steps=1"): "--steps takes two checkpoint steps",
          (peer, "--top=0"): "--top must be a positive integer, got 0"})


if __name__ == "__main__":
  absltest.main()

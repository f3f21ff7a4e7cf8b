"""Routing paths (`memkernel.paths`): the trie, paths as symbols, their statistics, the report.

Checked: the trie counts every prefix, ends and utilities exactly, stays prefix-closed and within
its budget when it prunes, keeps the most frequent paths, decays, and round-trips its state; a
path's symbols give back the leaf the descent reached; the statistics see a path that the token
decides as explained by the token and not by the previous token, and recurrences count what
they say; the report on a small kernel counts every scored query once per head, and the
command fails in one line on bad input.
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
from memkernel.kernel import routing
from memkernel.kernel.model import KernelModel
from memkernel.paths import motifs
from memkernel.paths import report as report_lib
from memkernel.paths.trie import PathTrie



def _rows(*paths, width=5):
  return np.array([list(p) + [-1] * (width - len(p)) for p in paths], np.int64)


class TrieTest(absltest.TestCase):

  def test_counts_prefixes_ends_and_utility(self):
    trie = PathTrie(budget=64)
    trie.insert(_rows((0, 2, 1), (0, 2, 1), (0, 2, 0), (1, 0), (-1,)),
                utility=np.array([1.0, 3.0, 5.0, np.nan, 9.0]), step=7)
    self.assertEqual(trie.count((0,)), 3)
    self.assertEqual(trie.count((0, 2)), 3)
    self.assertEqual(trie.count((0, 2, 1)), 2)
    self.assertEqual(trie.count((1, 0)), 1)
    self.assertEqual(trie.count((2,)), 0)
    self.assertLen(trie, 7)                 # root, 0, 0-2, 0-2-1, 0-2-0, 1, 1-0
    motifs_ = {m.path: m for m in trie.motifs()}
    self.assertEqual(set(motifs_), {(0, 2, 1), (0, 2, 0), (1, 0)})
    self.assertEqual(motifs_[(0, 2, 1)].count, 2)
    self.assertEqual(motifs_[(0, 2, 1)].utility, 2.0)     # (1 + 3) / 2
    self.assertIsNone(motifs_[(1, 0)].utility)            # NaN: no utility given
    self.assertEqual(motifs_[(0, 2, 1)].last_seen, 7)
    self.assertEqual(trie.motifs()[0].path, (0, 2, 1))    # Most frequent first.
    # The choice after (0, 2): 2 of 3 go to 1 and 1 of 3 to 0.
    p = np.array([2, 1]) / 3
    self.assertAlmostEqual(trie.entropy(trie.find((0, 2))), float(-np.sum(p * np.log2(p))))
    self.assertEqual(trie.entropy(trie.find((1, 0))), 0.0)   # Every path stops there.

  def test_prune_keeps_the_most_frequent_prefix_closed_within_budget(self):
    rng = np.random.default_rng(0)
    paths = rng.integers(0, 2, size=(2000, 6))
    paths[:, 0] = rng.choice(4, size=2000, p=[0.7, 0.2, 0.07, 0.03])
    full = PathTrie(budget=10_000)
    full.insert(paths)
    once = PathTrie(budget=20)
    once.insert(paths)
    self.assertLen(once, 20)
    kept = dict(once.nodes())
    least = min(kept.values())
    for path, count in full.nodes():      # The 19 most frequent prefixes stay, counts intact.
      if count > least:
        self.assertEqual(kept.get(path), count, path)
    trie = PathTrie(budget=20)
    for chunk in np.array_split(paths, 10):
      trie.insert(chunk)
      self.assertLessEqual(len(trie), 20)
      state = trie.state()
      parents = state["parent"][1:]
      self.assertTrue(np.all(parents < np.arange(1, len(state["parent"]))))  # Prefix-closed.
      self.assertTrue(all(trie.count(p[:-1]) >= c for p, c in trie.nodes()))
    self.assertEqual(trie.count(()), 2000)                                   # Root keeps all.
    self.assertEqual(trie.count((0,)), full.count((0,)))
    with self.assertRaisesRegex(ValueError, "budget must be an integer >= 2"):
      PathTrie(budget=1)

  def test_decay_and_state_round_trip(self):
    trie = PathTrie(budget=64)
    trie.insert(_rows((0, 1), (0, 1), (0, 0)), utility=np.array([1.0, 1.0, 4.0]), step=3)
    trie.decay(0.5)
    self.assertEqual(trie.count((0, 1)), 1.0)
    self.assertEqual({m.path: m.utility for m in trie.motifs()}, {(0, 1): 1.0, (0, 0): 4.0})
    again = PathTrie.from_state(trie.state())
    self.assertEqual(again.motifs(), trie.motifs())
    again.insert(_rows((0, 1)))
    self.assertEqual(again.count((0, 1)), 2.0)
    with self.assertRaisesRegex(ValueError, "decay factor"):
      trie.decay(0.0)
    with self.assertRaisesRegex(ValueError, "before its -1 padding"):
      trie.insert(np.array([[0, -1, 1]]))
    with self.assertRaisesRegex(ValueError, "utility must be"):
      trie.insert(_rows((0,)), utility=np.zeros(2))


class SymbolsTest(absltest.TestCase):

  def test_symbols_give_back_the_leaf_the_descent_reached(self):
    num_leaves, heads = 16, 3
    rng = np.random.default_rng(1)
    c = np.arange(num_leaves)                                           # query leaf per position
    leaf = np.where(c[None, :, None] > 0,
                    rng.integers(0, np.maximum(c, 1)[None, :, None], size=(2, num_leaves, heads)),
                    -1)
    path = routing.descent_path(jnp.asarray(leaf, jnp.int32), jnp.asarray(c, jnp.int32),
                                num_leaves)
    symbols = motifs.encode(jax.device_get(path), num_leaves, layer=1)
    self.assertEqual(symbols.shape[-1], 2 + 4)
    for b, t, h in np.ndindex(leaf.shape):
      s = symbols[b, t, h]
      if leaf[b, t, h] < 0:
        self.assertTrue(np.all(s == -1))
        continue
      self.assertEqual(s[0], heads + h)                                 # layer 1, head h
      level, bits = s[1], [x for x in s[2:] if x >= 0]
      self.assertLen(bits, level)
      # The Fenwick node at `level` starts where c's bits above `level` end; bits go down.
      a = ((c[t] >> (level + 1)) << (level + 1)) + int("".join(map(str, bits)) or "0", 2)
      self.assertEqual(a, leaf[b, t, h], (b, t, h))


class StatisticsTest(absltest.TestCase):

  def test_token_decided_paths_are_explained_by_the_token(self):
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, 8, size=4000)
    previous = rng.integers(0, 8, size=4000)
    sequence = np.repeat(np.arange(40), 100)
    as_rows = lambda x: np.stack([np.zeros_like(x), x // 2, x % 2], 1)   # head 0, level, bit
    decided = motifs.path_statistics(as_rows(tokens % 4), tokens, previous, sequence)
    self.assertAlmostEqual(decided["entropy_bits"], 2.0, delta=0.01)
    self.assertGreater(decided["token"]["fraction"], 0.98)
    self.assertLess(abs(decided["previous_token"]["fraction"]), 0.02)
    self.assertEqual(decided["proposals"]["by_token"],
                     {"accepted": 1.0, "prefix": 1.0, "covered": 1.0})
    self.assertAlmostEqual(decided["proposals"]["most_frequent"]["accepted"], 0.25, delta=0.03)
    self.assertLess(decided["proposals"]["by_previous_token"]["accepted"], 0.35)
    noise = motifs.path_statistics(as_rows(rng.integers(0, 4, size=4000)), tokens, previous,
                                   sequence)
    self.assertLess(abs(noise["token"]["fraction"]), 0.02)

  def test_proposals_confirm_the_prefix_they_get_right(self):
    paths = np.array([[0, 2, 1, 0], [0, 2, 1, 0], [0, 2, 1, 1], [0, 2, 0, 1], [1, 0, -1, -1]])
    keys = np.array([5, 5, 5, 5, 6])
    sequence = np.array([0, 2, 1, 3, 5])     # Even rows crystallize, odd rows are proposed.
    p = motifs.proposals(paths, keys, sequence)
    # Key 5 proposes (0, 2, 1, 0): the first odd query matches 3 of 4 symbols, the second 2;
    # key 6 was never crystallized.
    self.assertEqual(p, {"accepted": 0.0, "prefix": (3 / 4 + 2 / 4 + 0) / 3, "covered": 2 / 3})

  def test_recurrence_counts_within_and_across_sequences(self):
    paths = np.array([0, 0, 1, 2, 2, 3])
    sequence = np.array([0, 0, 0, 1, 1, 2])
    r = motifs.recurrence(paths, sequence)
    self.assertAlmostEqual(r["within_sequence"], 4 / 6)     # the two 0s and the two 2s
    self.assertAlmostEqual(r["across_sequences"], 0.0)      # no path is in two sequences
    r = motifs.recurrence(np.array([0, 1, 0]), np.array([0, 0, 1]))
    self.assertAlmostEqual(r["across_sequences"], 2 / 3)


class ReportTest(absltest.TestCase):

  def test_report_counts_every_scored_query_once_per_head(self):
    config = importlib.import_module("configs.mqar_scattered").get_config("smoke")
    experiment = experiment_lib.parse_config(config)
    model = KernelModel(experiment.model)
    params = jax.jit(model.init)(jax.random.PRNGKey(0),
                                 jnp.zeros((1, experiment.task.seq_len), jnp.int32))["params"]
    report, tries = report_lib.paths_experiment(experiment, params, batches=1, batch_size=4,
                                                tasks={"a": {}, "b": {}}, budget=1 << 12)
    a = report["tasks"]["a"]
    self.assertEqual(a, report["tasks"]["b"])                       # The same batches.
    self.assertEqual(report["shared"], {"b_in_a": 1.0, "a_in_b": 1.0})
    layers, heads = experiment.model.num_layers, experiment.model.num_route_heads
    self.assertLen(a["heads"], layers * heads)
    taken = sum(s["queries"] for s in a["heads"].values())
    self.assertLessEqual(taken, a["queries"] * layers * heads)
    self.assertGreater(taken, 0)
    self.assertLessEqual(sum(m["count"] for m in a["motifs"]), taken)
    self.assertEqual([m["count"] for m in a["motifs"]],
                     [m.count for m in tries["a"].motifs()[:len(a["motifs"])]])
    with tempfile.TemporaryDirectory() as root:
      report_lib.save_trie(os.path.join(root, "trie"), tries["a"])
      report_lib.save_trie(os.path.join(root, "trie"), tries["a"])   # Replaces.
      self.assertEqual(report_lib.load_trie(os.path.join(root, "trie")).motifs(),
                       tries["a"].motifs())
    table = report_lib.format_table(report)
    self.assertIn("| layer_0/head_0 |", table)
    with self.assertRaisesRegex(ValueError, "unknown task field"):
      report_lib.paths_experiment(experiment, params, batches=1, tasks={"x": {"spelling": 1}})

  def test_binary_fails_in_one_line_on_bad_input(self):
    with tempfile.TemporaryDirectory() as root:
      peer = cli_checks.peer_run(root)
      cli_checks.assert_fatal_lines(self, "paths", {
          (peer,): "'dense' run; routing paths need a memory-kernel run",
          (peer, "--task=nofields"): "--task must be NAME:FIELD=VALUE",
          (peer, "--batches=0"): "--batches must be a positive integer, got 0"})


if __name__ == "__main__":
  absltest.main()

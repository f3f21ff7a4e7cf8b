"""The routing diagnostic: its funnel against plain-numpy loops, and its command."""

import os
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

import memkernel
from memkernel import metrics as metrics_lib
from memkernel import probes
from memkernel.analysis import diagnose
from memkernel.kernel import tree as tree_lib
from memkernel.kernel.state import level_offset

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
B, N, L, H, P, E, K = 2, 8, 16, 2, 4, 4, 2


def _reference(inputs, leaves, runner_up, pos, answers):
  """The funnel's hits and counts by loops over (row, query, answer, head)."""
  rq, q, k, node_keys, node_sal = (np.asarray(inputs[n])
                                   for n in ("rq", "q", "k", "node_keys", "node_sal"))
  hits, counts = {}, {}

  def add(name, hit):
    hits[name] = hits.get(name, 0) + int(hit)
    counts[name] = counts.get(name, 0) + 1

  for b in range(pos.shape[0]):
    for j, t in enumerate(pos[b]):
      c = t // L
      for a in answers[b, j]:
        if not 0 <= a < c:
          continue
        any_head = {}
        for h in range(H):
          logits = np.array([q[b, t, h] @ k[b, s, h] for s in range(c * L)])
          lse = [np.log(np.sum(np.exp(logits[i * L:(i + 1) * L] - logits.max()))) for i in range(c)]
          got = {"read_argmax_in_answer": np.argmax(logits) // L == a,
                 "leaf_first_by_tokens": int(np.argmax(lse)) == a}
          for level in range(N.bit_length() - 1):
            seen = c >> level
            if seen >= 2 and (a >> level) < seen:
              s = [node_keys[b, level_offset(N, level) + i, h] @ rq[b, t, h] for i in range(seen)]
              got[f"level_first/{level}"] = int(np.argmax(s)) == a >> level
          fen, start = [], 0                     # the Fenwick nodes, highest level first
          for level in range(N.bit_length() - 1, -1, -1):
            if start + (1 << level) <= c:
              fen.append((level, start >> level))
              start += 1 << level
          s = [node_keys[b, level_offset(N, lv) + i, h] @ rq[b, t, h] for lv, i in fen]
          holder = [n for n, (lv, i) in enumerate(fen) if a >> lv == i][0]
          rank = sum(x > s[holder] for x in s)
          got["fenwick_first"], got["fenwick_in_beam"] = rank == 0, rank < K
          for name, hit in got.items():
            any_head[name] = any_head.get(name, False) or hit
        for level in range(N.bit_length() - 1):    # the answer leaf's share of its ancestor
          if (a >> level) < (c >> level):
            share = max(np.exp(node_sal[b, a, h] - node_sal[b, level_offset(N, level) + (a >> level), h])
                        for h in range(H))
            hits[f"answer_share/{level}"] = hits.get(f"answer_share/{level}", 0) + share
            counts[f"answer_share/{level}"] = counts.get(f"answer_share/{level}", 0) + 1
        any_head["recall"] = a in leaves[b, t]
        any_head["candidate_recall"] = a in leaves[b, t] or a in runner_up[b, t]
        for name, hit in any_head.items():
          add(name, hit)
  return hits, counts


class LayerTraceTest(absltest.TestCase):

  def test_matches_reference_loops(self):
    t = N * L
    keys = jax.random.split(jax.random.key(0), 8)
    rq = jax.random.normal(keys[0], (B, t, H, P))
    q = jax.random.normal(keys[1], (B, t, H, E))
    k = jax.random.normal(keys[2], (B, t, H, E))
    node_keys, _, node_sal, _ = tree_lib.build_tree(jax.random.normal(keys[3], (B, N, H, P)),
                                                   jnp.zeros((B, N, H, E)),
                                                   jax.random.normal(keys[4], (B, N, H)), N)
    inputs = {"rq": rq, "q": q, "k": k, "node_keys": node_keys, "node_sal": node_sal}
    leaves = jax.random.randint(keys[5], (B, t, H, K), -1, N)
    runner_up = jax.random.randint(keys[6], (B, t, H, K), -1, N)
    pos = jnp.asarray([[20, 70, 100, 127, 5], [40, 90, 111, 64, 33]], jnp.int32)
    # Answers: visible ones, one in the query's own leaf (not counted) and -1 (none).
    answers = jnp.asarray([[[0, -1], [3, 1], [5, 2], [7, 6], [0, -1]],
                           [[1, 0], [4, 5], [6, -1], [3, 2], [2, 1]]], jnp.int32)
    got = jax.jit(lambda *a: diagnose.layer_trace(*a, leaf_size=L, beam_width=K))(
        inputs, leaves, runner_up, pos, answers)
    hits, counts = _reference(inputs, np.asarray(leaves), np.asarray(runner_up),
                              np.asarray(pos), np.asarray(answers))
    names = {n for n in got if not n.endswith("/n")}
    self.assertEqual(set(hits), names - {"level_first/2"})  # no query sees two level-2 nodes
    for name in names:
      self.assertEqual(float(got[name + "/n"]), counts.get(name, 0), name)
      self.assertAlmostEqual(float(got[name]), hits.get(name, 0), places=4, msg=name)
    self.assertAlmostEqual(float(got["answer_share/0"]), counts["answer_share/0"], places=4)
    self.assertLess(float(got["answer_share/2"]), counts["answer_share/2"])  # diluted above
    self.assertEqual(counts["recall"], 12)  # every visible pair; the funnel's events vary
    self.assertTrue(0 < hits["read_argmax_in_answer"] < 12)

  def test_recall_is_the_routing_recall_of_a_model(self):
    config = memkernel.KernelConfig(d_model=32, num_layers=2, num_route_heads=2, route_dim=8,
                                   max_seq_len=128, leaf_rerank=True, vocab_size=64)
    task = probes.TaskConfig(name="mqar", vocab_size=64, seq_len=128, num_pairs=8)
    model = memkernel.KernelModel(config)
    batch = probes.generate(task, jax.random.key(1), 4)
    params = model.init(jax.random.key(2), batch["tokens"])["params"]
    report = diagnose.diagnose(model, params, [batch], task.num_queries, node_scores=(4, 16))
    self.assertLen(report, 2)
    _, aux = model.apply({"params": params}, batch["tokens"])
    for layer, route in zip(report, aux.routes):
      want = metrics_lib.routing_recall(route.leaves, batch["answer_leaves"], batch["mask"])
      self.assertAlmostEqual(layer["recall"], float(want), places=6)
      self.assertEqual(layer["pairs"], 4 * task.num_queries)
      self.assertLessEqual(layer["recall"], layer["candidate_recall"])
      self.assertLen(layer["level_first"], 3)     # 8 leaves: levels 0-2 hold >= 2 nodes
      # Other node scores beside it: the pooled rule is level_first itself, and 16 keys are
      # every token of a leaf.
      self.assertEqual(list(layer["node_first"]), ["pooled", "reps_4", "reps_16", "bound",
                                                   "exact"])
      self.assertEqual(layer["node_first"]["pooled"], layer["level_first"])
      self.assertEqual(layer["node_first"]["reps_16"][0], layer["node_first"]["exact"][0])
    text = diagnose.format_report({"beam_width": 2, "lengths": {"128": report}})
    self.assertIn("| 0 | 32 |", text)
    self.assertIn("| 1 | reps_4 |", text)
    with self.assertRaisesRegex(ValueError, "node_scores must be positive integers"):
      diagnose.diagnose_run("/nonexistent", node_scores=(0,))

  def test_command_fails_in_one_line_on_bad_input(self):
    with tempfile.TemporaryDirectory() as root:
      env = dict(os.environ, JAX_PLATFORMS="cpu")
      a_file = os.path.join(root, "a_file")
      open(a_file, "w").close()
      cases = {(f"--workdir={root}",): "no committed checkpoint",
               (f"--workdir={a_file}",): f"--workdir={a_file} is a file",
               (f"--workdir={root}", "--lengths=12x"): "--lengths must be comma-separated",
               # 0 is not "the default" (the training length, the run's batch size).
               (f"--workdir={root}", "--lengths=0"): "--lengths must be positive integers",
               (f"--workdir={root}", "--lengths="): "--lengths must be positive integers",
               (f"--workdir={root}", "--batch_size=0"): "--batch_size must be a positive",
               (f"--workdir={root}", "--batches=0"): "--batches must be a positive"}
      procs = {args: subprocess.Popen(
          [sys.executable, "-m", "experiments.diagnose", *args], cwd=REPO, env=env,
          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for args in cases}
      for args, expected in cases.items():
        stdout, stderr = procs[args].communicate(timeout=120)
        proc = subprocess.CompletedProcess(args, procs[args].returncode, stdout, stderr)
        self.assertEqual(proc.returncode, 1, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        self.assertLen(lines, 1, proc.stderr)
        self.assertTrue(lines[0].startswith("FATAL diagnose:"), lines[0])
        self.assertIn(expected, lines[0])


if __name__ == "__main__":
  absltest.main()

"""The causal memory auditor (`memkernel.analysis.audit`, `experiments/audit.py`) and its interventions.

* each intervention keeps every shape and removes exactly its own source: it equals the model with
  only that source's output weights zeroed (tree / exact projections in every layer, one root's
  output projection);
* next-best substitution reads the best leaves the beam pruned at leaf depth (checked against a
  numpy beam search), all sealed and never the selected ones;
* the reference forward is bit-identical to the plain forward, and auditing "no intervention"
  reports exact zeros;
* groups (distance, depth) and verdicts (dead weight, inactive, ...) on hand-made inputs;
* a memory-disabled model has zero memory utility and no active memory source;
* a smoke MQAR model trained here (through the harness, whose final eval runs the auditor) needs
  its exact read: removing it raises the loss measurably; the binary fails in one line on bad input.
"""

import dataclasses
import functools
import importlib
import json
import os
import subprocess
import sys
import tempfile
from unittest import mock

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest
from absl.testing import parameterized

from memkernel import KernelModel, Interventions, KernelConfig
from memkernel.analysis import audit
import cli_checks
from memkernel.kernel import routing
from memkernel import runs
from memkernel import train as train_lib
from memkernel.kernel.state import level_offset
from memkernel import experiment as experiment_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
L = 16
# Sizes for the report tests on hand-made sums (nothing is compiled for it).
SUMMARY_CONFIG = KernelConfig(num_roots=2, max_seq_len=128)
_RUN_DIR = tempfile.TemporaryDirectory()


@functools.lru_cache(maxsize=None)
def _trained():
  """Smoke MQAR (1 layer, d 16, T 64, 4 pairs) trained here through the harness, whose final
  evaluation runs the auditor on `eval.audit_batches` batches. Shared by every test that needs a
  model: the interventions are checked on trained weights, and the auditor's compiled forwards
  (cached per model and intervention) serve them all."""
  config = importlib.import_module("configs.mqar").get_config("smoke")
  config.train.update(dict(steps=150, batch_size=16, lr=1e-2, warmup_steps=10, log_every=50,
                           ckpt_every=150))
  config.eval.update(dict(lengths=(config.task.seq_len,), batches=1, audit_batches=4))
  workdir = _RUN_DIR.name
  summary = train_lib.train_and_evaluate(config, workdir)
  experiment = runs.load_experiment(workdir)
  _, params = runs.load_run(workdir)
  model = KernelModel(experiment.model)
  batch = audit.eval_batches(experiment.task, experiment.train.seed, 1,
                             experiment.eval.batch_size)[0]
  return dict(workdir=workdir, summary=summary, experiment=experiment, model=model,
              variables={"params": params}, tokens=batch["tokens"])


@functools.lru_cache(maxsize=None)
def _plain(model):
  return jax.jit(lambda v, t: model.apply(v, t))


def _logits(iv):
  """Logits of the trained model on an audit batch, through the auditor's (cached) forwards."""
  run = _trained()
  return audit.intervened_logits(run["model"], run["variables"], run["tokens"], iv)


def _zeroed(variables, paths):
  """Variables with the named parameter of every layer zeroed; a path ending in an index r
  (("trunk", "out_w", r)) zeroes only slice r (root r's output projection)."""

  def zero(path, x):
    names = tuple(k.key for k in path)
    for p in paths:
      if isinstance(p[-1], int) and names[-len(p) + 1:] == p[:-1]:
        return x.at[p[-1]].set(0.0)
      if names[-len(p):] == p:
        return jnp.zeros_like(x)
    return x

  return jax.tree_util.tree_map_with_path(zero, variables)


def _max_diff(a, b):
  return float(jnp.max(jnp.abs(a - b)))


class InterventionTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("no_tree_read", Interventions(drop=("tree",))),
      ("no_exact_read", Interventions(drop=("exact",))),
      ("next_best_span", Interventions(next_best_span=True)),
      ("root_drop", Interventions(root_drop=(1,))),
      ("all", Interventions(("tree", "exact"), True, (0, 1))))
  def test_shapes_are_preserved(self, iv):
    run = _trained()
    model, variables, tokens = run["model"], run["variables"], run["tokens"]
    # Every output of the model (logits and the whole aux tree) keeps its shape and dtype.
    want = jax.eval_shape(lambda v, t: model.apply(v, t), variables, tokens)
    got = jax.eval_shape(lambda v, t: model.apply(v, t, interventions=iv), variables, tokens)
    chex.assert_trees_all_equal_shapes_and_dtypes(got, want)
    if iv in audit.standard_interventions(model.config).values():  # Compiled by the audit.
      logits = _logits(iv)
      chex.assert_shape(logits, want[0].shape)
      chex.assert_tree_all_finite(logits)
      self.assertGreater(_max_diff(logits, _logits(Interventions())), 1e-3)

  @parameterized.named_parameters(
      ("no_tree_read", Interventions(drop=("tree",)), [("fusion", "tree_proj", "kernel")]),
      ("no_exact_read", Interventions(drop=("exact",)), [("fusion", "exact_proj", "kernel")]),
      ("no_memory", Interventions(drop=("tree", "exact")),
       [("fusion", "tree_proj", "kernel"), ("fusion", "exact_proj", "kernel")]),
      ("root_drop_0", Interventions(root_drop=(0,)), [("trunk", "out_w", 0)]),
      ("root_drop_1", Interventions(root_drop=(1,)), [("trunk", "out_w", 1)]))
  def test_intervention_removes_only_its_own_contribution(self, iv, paths):
    """Each intervention == the model whose *only* change is that source's zeroed output
    weights (the fusion projection of the tree value or of the exact read, in every layer; or
    root r's slice of the trunk output projection, which feeds both the fusion and the memory
    projections)."""
    run = _trained()
    ref, out = _logits(Interventions()), _logits(iv)
    zeroed, _ = _plain(run["model"])(_zeroed(run["variables"], paths), run["tokens"])
    np.testing.assert_allclose(out, zeroed, atol=1e-5, rtol=0)
    self.assertGreater(_max_diff(out, ref), 1e-3)  # the source did contribute
    if not iv.root_drop:  # Memory is empty in the first leaf: nothing to remove there.
      np.testing.assert_allclose(out[:, :L], ref[:, :L], atol=1e-5, rtol=0)  # Float32 noise:
      # two compiled programs; the memory's contribution elsewhere is > 1e-3 (above).

  def test_root_drop_names_one_root(self):
    a, b = _logits(Interventions(root_drop=(0,))), _logits(Interventions(root_drop=(1,)))
    self.assertGreater(_max_diff(a, b), 1e-3)
    with self.assertRaisesRegex(ValueError, "root_drop names root 2"):
      _logits(Interventions(root_drop=(2,)))

  def test_next_best_span_reads_best_pruned_leaves_at_leaf_depth(self):
    """Against a numpy beam search, at 4x the training length (16 leaves, 5 Fenwick levels).

    Without the exact re-rank (no parameters of its own), so the runner-ups are the beam's: with
    it they are the candidates the re-rank did not choose (`test_routing`'s re-rank test).
    """
    run = _trained()
    length = 4 * run["experiment"].task.seq_len
    config = dataclasses.replace(run["experiment"].model_for_length(length), leaf_rerank=False)
    model = KernelModel(config)
    vocab, beam = config.vocab_size, config.beam_width
    tokens = jax.random.randint(jax.random.PRNGKey(4), (2, length), 0, vocab)
    calls = []
    original = routing.route_beam

    def spy(rq, node_keys, node_vals, query_leaf, beam_width, *args, **kwargs):
      result = original(rq, node_keys, node_vals, query_leaf, beam_width, *args, **kwargs)
      calls.append((rq, node_keys, query_leaf, result.leaves))
      return result

    def forward(v, t):
      calls.clear()
      with mock.patch.object(routing, "route_beam", spy):
        _, aux = model.apply(v, t, interventions=Interventions(next_best_span=True))
      return aux, list(calls)

    aux, recorded = jax.jit(forward)(run["variables"], tokens)
    self.assertLen(recorded, config.num_layers)
    qleaf = np.arange(length) // L
    for layer, (rq, node_keys, query_leaf, selected) in enumerate(recorded):
      np.testing.assert_array_equal(query_leaf, qleaf)
      rq, node_keys, selected = map(np.asarray, (rq, node_keys, selected))
      swapped = np.asarray(aux.routes[layer].leaves)
      weights = np.asarray(aux.routes[layer].weights)
      for b in range(2):
        for t in range(0, length, 5):
          for h in range(config.num_route_heads):
            want_sel, want_alt = _reference_beam(rq[b, t, h], node_keys[b, :, h], qleaf[t], beam,
                                                 config.num_leaves)
            where = f"layer {layer}, row {b}, position {t}, head {h}"
            np.testing.assert_array_equal(selected[b, t, h], want_sel, err_msg=where)
            np.testing.assert_array_equal(swapped[b, t, h], want_alt, err_msg=where)
      valid = swapped >= 0
      c = np.broadcast_to(qleaf[None, :, None, None], swapped.shape)
      self.assertTrue(np.all(swapped[valid] < c[valid]), "read an unsealed leaf")
      self.assertFalse(np.any((swapped[..., :, None] == selected[..., None, :]) & valid[..., None]))
      np.testing.assert_array_equal(weights[~valid], 0.0)
      self.assertGreater(valid[:, qleaf >= 3].mean(), 0.5)  # most heads had a runner-up

  def test_reference_forward_is_the_plain_forward_bitwise(self):
    run = _trained()
    model, variables, tokens = run["model"], run["variables"], run["tokens"]
    plain_logits, plain_aux = _plain(model)(variables, tokens)
    logits, aux = audit.reference_forward(model, variables["params"], tokens)
    np.testing.assert_array_equal(logits, plain_logits)
    chex.assert_trees_all_equal(aux, plain_aux)
    # Through the whole auditor, "no intervention" is exactly nothing.
    batches = audit.eval_batches(run["experiment"].task, 0, 1, tokens.shape[0])
    report = audit.audit(model, variables["params"], {"mqar": batches},
                         interventions={"none": Interventions()})
    row = report["interventions"]["none"]
    for key in ("loss_delta", "target_logit_delta", "kl", "accuracy_delta"):
      self.assertEqual(row[key], 0.0, key)
    self.assertEqual(row["count"], tokens.shape[0] * run["experiment"].task.num_queries)


def _reference_beam(rq, node_keys, c, k, n):
  """Numpy beam search for one query and head: (selected leaves, best pruned leaves), -1 padded.

  At every step the candidates are ranked (stable by slot), the best k kept, and the leaf-level
  candidates ranked k..2k-1 join a pool; the pool keeps its best k (earlier entries win ties).
  """
  score = lambda level, i: float(node_keys[level_offset(n, level) + i] @ rq) * len(rq) ** -0.5
  rank = lambda cands: sorted(cands, key=lambda li: -score(*li))[:2 * k]
  pool = []

  def prune(ranked):
    nonlocal pool
    dropped = [(score(*li), li[1]) for li in ranked[k:] if li[0] == 0]
    pool = sorted(pool + dropped, key=lambda si: -si[0])[:k]
    return ranked[:k]

  beam = prune(rank([(l, (c >> (l + 1)) << 1) for l in range(n.bit_length() - 1, -1, -1)
                     if (c >> l) & 1]))
  for _ in range(routing.num_expansions(n)):
    lefts = [(l, i) if l == 0 else (l - 1, 2 * i) for l, i in beam]
    rights = [(l - 1, 2 * i + 1) for l, i in beam if l > 0]
    beam = prune(rank(lefts + rights))
  pad = lambda xs: list(xs) + [-1] * (k - len(xs))
  return pad([i for _, i in beam]), pad([i for _, i in pool])


class GroupsAndVerdictsTest(parameterized.TestCase):

  def test_position_groups(self):
    # Query leaf 5 = 0b101: its Fenwick start set is the level-2 node over leaves [0, 4) and
    # the level-0 node (leaf 4).
    answers = jnp.full((1, 6 * L, 2), -1, jnp.int32)
    answers = answers.at[0, 5 * L, 0].set(4).at[0, 5 * L + 1, 0].set(0)
    answers = answers.at[0, 5 * L + 2, 0].set(3).at[0, 5 * L + 3, 0].set(5)
    start = jnp.full((1, 6 * L, 2), -1, jnp.int32).at[0, 5 * L, :].set(jnp.array([0, 2]))
    ids = np.asarray(audit.position_groups(answers, start, L, 5))[:, 0]
    distance, depth, start_level = ids
    row = 5 * L + np.arange(4)
    labels = lambda grouping, x: [audit.group_labels(grouping, 5)[i] for i in x]
    self.assertEqual(labels("by_distance", distance[row]), ["1", "4-7", "2-3", "unsealed"])
    self.assertEqual(labels("by_depth", depth[row]), ["0", "2", "2", "unsealed"])
    self.assertEqual(labels("by_start_level", start_level[row[:2]]), ["2", "none"])
    self.assertTrue(np.all(distance[:5 * L] == 0) and np.all(depth[:5 * L] == 0))

  def _sums(self, gate, utilities):
    """Synthetic per-task sums: 100 scored positions, one layer, every delta = utility."""
    g = audit.num_groups(SUMMARY_CONFIG)
    ref = np.zeros((3, g, 4))
    ref[:, 0] = [100, 100 * 2.0, 50, 300]
    sums = {"reference": ref, "gates": np.full((1, 3), 100 * gate)}
    for name, u in utilities.items():
      s = np.zeros((3, g, 6))
      s[:, 0] = [100, 100 * u, 100 * u * u, -100 * u, 100 * abs(u), 0]
      sums[name] = s
    return {"t": sums}

  @parameterized.parameters(
      dict(gate=0.5, tree=0.001, exact=0.8, verdicts=("dead_weight", "useful")),
      dict(gate=0.5, tree=-0.3, exact=0.02, verdicts=("harmful", "useful")),
      dict(gate=0.01, tree=0.0, exact=0.8, verdicts=("inactive", "inactive")))
  def test_verdicts(self, gate, tree, exact, verdicts):
    utilities = {"no_tree_read": tree, "no_exact_read": exact, "no_memory": exact,
                 "root_drop_0": 0.5, "root_drop_1": 0.0}
    report = audit.summarize(SUMMARY_CONFIG, self._sums(gate, utilities), dead_weight_threshold=0.01,
                             active_gate_threshold=0.05)
    self.assertEqual((report["sources"]["tree"]["verdict"], report["sources"]["exact"]["verdict"]),
                     verdicts)
    self.assertAlmostEqual(report["reference"]["loss"], 2.0)
    self.assertAlmostEqual(report["interventions"]["no_tree_read"]["loss_delta"], tree)
    self.assertAlmostEqual(report["interventions"]["no_tree_read"]["loss_delta_se"], 0.0)
    want = [s for s, v in report["sources"].items() if v["verdict"] == "dead_weight"]
    self.assertEqual(report["dead_weight"], want)
    self.assertEqual("root_1" in report["dead_weight"], gate > 0.05)
    self.assertEqual("tree" in report["dead_weight"], verdicts[0] == "dead_weight")
    json.dumps(report)

  def test_bad_settings_raise(self):
    model, variables = KernelModel(SUMMARY_CONFIG), {}
    with self.assertRaisesRegex(ValueError, "dead_weight_threshold"):
      audit.audit(model, variables, {"mqar": []}, dead_weight_threshold=-1.0)
    with self.assertRaisesRegex(ValueError, "active_gate_threshold"):
      audit.audit(model, variables, {"mqar": []}, active_gate_threshold=1.5)
    with self.assertRaisesRegex(ValueError, "holds no batch"):
      audit.audit(model, variables, {"mqar": []})
    config = importlib.import_module("configs.mqar").get_config("smoke")
    config.eval.audit_batches = -1
    with self.assertRaisesRegex(ValueError, "eval.audit_batches"):
      experiment_lib.parse_config(config)


class AuditTest(parameterized.TestCase):

  def test_memory_disabled_model_has_no_memory_utility(self):
    """The trained run's weights with both reads switched off (the parameter tree is the same)."""
    run = _trained()
    config = dataclasses.replace(run["experiment"].model, use_tree_read=False,
                                 use_exact_read=False)
    model, variables = KernelModel(config), run["variables"]
    batches = audit.eval_batches(run["experiment"].task, 1, 2, run["tokens"].shape[0])
    report = audit.audit(model, variables["params"], {"mqar": batches})
    # No read is a source of this model: only the joint and next-best rows remain, as no-ops.
    self.assertNotIn("no_tree_read", report["interventions"])
    self.assertNotIn("no_exact_read", report["interventions"])
    for name in ("no_memory", "next_best_span"):
      row = report["interventions"][name]
      self.assertLess(abs(row["loss_delta"]), 1e-6, name)
      self.assertLess(row["kl"], 1e-6, name)
    for source in ("tree", "exact", "memory"):
      s = report["sources"][source]
      self.assertEqual((s["enabled"], s["active"], s["verdict"]), (False, False, "disabled"))
      self.assertEqual(s["gate_mean"], 0.0)
      self.assertNotIn(source, report["dead_weight"])
    # Without its memory the trained model cannot retrieve; the roots are still audited.
    self.assertLess(report["reference"]["accuracy"], 0.5)
    self.assertGreater(report["interventions"]["root_drop_0"]["kl"], 1e-6)
    self.assertEqual(report["num_scored"], sum(int(b["mask"].sum()) for b in batches))
    self.assertEqual(list(report["gates"]["layer_0"]), ["roots"])
    # The auditor skips the memory interventions here as no-ops; the model agrees, and rejects
    # dropping a read it does not have.
    tokens = batches[0]["tokens"]
    memory_off = Interventions(drop=("tree", "exact"), next_best_span=True)
    self.assertEqual(audit.effective_interventions(config, memory_off), Interventions())
    with self.assertRaisesRegex(ValueError, "names source 'tree'"):
      model.apply(variables, tokens, interventions=memory_off)
    with self.assertRaisesRegex(ValueError, "names source 'exakt'"):
      audit.effective_interventions(config, Interventions(drop=("exakt",)))
    next_best = Interventions(next_best_span=True)
    out = jax.jit(lambda v, t: model.apply(v, t, interventions=next_best)[0])(variables, tokens)
    ref, _ = audit.reference_forward(model, variables, tokens)
    np.testing.assert_allclose(out, ref, atol=1e-6, rtol=0)

  def test_trained_retrieval_model_needs_its_exact_read(self):
    run = _trained()
    report = run["summary"]["audit"]  # From the harness's final evaluation.
    with open(os.path.join(run["workdir"], audit.AUDIT_FILE)) as f:
      self.assertEqual(json.load(f), json.loads(json.dumps(report)))
    with open(os.path.join(run["workdir"], experiment_lib.EVAL_FILE)) as f:
      self.assertEqual(json.load(f)["audit"], json.loads(json.dumps(report)))
    self.assertEqual(report["num_batches"], {"mqar": 4})
    exact = report["interventions"]["no_exact_read"]
    self.assertGreater(exact["loss_delta"], 0.5)
    self.assertGreater(exact["loss_delta"], 5 * exact["loss_delta_se"])
    self.assertGreater(exact["kl"], 0.1)
    self.assertLess(exact["accuracy_delta"], -0.2)
    self.assertEqual(report["sources"]["exact"]["verdict"], "useful")
    self.assertNotIn("exact", report["dead_weight"])
    self.assertGreater(report["reference"]["accuracy"], 0.5)
    self.assertEqual(set(report["by_root"]), {"0", "1"})
    self.assertEqual(set(exact["by_task"]), {"mqar"})
    for grouping in audit.GROUPINGS:
      self.assertEqual(sum(g["count"] for g in exact[grouping].values()), exact["count"])
    # The binary's library path: the checkpoint audited afresh, with its table and plot.
    again = audit.audit_run(run["workdir"], num_batches=4)
    self.assertEqual(again["step"], 150)
    for name, row in report["interventions"].items():  # The same batches (seed stream).
      self.assertAlmostEqual(again["interventions"][name]["loss_delta"], row["loss_delta"],
                             places=5)
    with open(os.path.join(run["workdir"], audit.PLOT_FILE), "rb") as f:
      self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")
    table = audit.format_report(again)
    self.assertIn("no_exact_read", table)
    self.assertIn("answer depth", table)

  def test_binary_fails_in_one_line_on_bad_input(self):
    with tempfile.TemporaryDirectory() as root:
      peer = cli_checks.peer_run(root)
      env = dict(os.environ, JAX_PLATFORMS="cpu")
      with self.assertRaisesRegex(FileNotFoundError, "not a directory"):
        audit.audit_run(os.path.join(root, "missing"))
      a_file = os.path.join(root, "a_file")
      open(a_file, "w").close()
      cases = {(root,): "no committed checkpoint", (peer,): "'dense' peer run",
               (a_file,): f"--workdir={a_file} is a file",
               # 0 is not "the default" (the training length, the run's batch size).
               (peer, "--length=0"): "--length must be a positive integer, got 0",
               (peer, "--batch_size=0"): "--batch_size must be a positive integer, got 0",
               (peer, "--batches=0"): "--batches must be a positive integer, got 0"}
      procs = {args: subprocess.Popen(
          [sys.executable, "-m", "experiments.audit", f"--workdir={args[0]}", *args[1:]],
          cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for args in cases}
      for args, expected in cases.items():
        out, err = procs[args].communicate(timeout=120)
        self.assertEqual(procs[args].returncode, 1, err)
        self.assertEqual(out, "")
        lines = err.strip().splitlines()
        self.assertLen(lines, 1, err)
        self.assertIn(expected, lines[0])
        self.assertTrue(lines[0].startswith("FATAL audit:"), lines[0])


if __name__ == "__main__":
  absltest.main()

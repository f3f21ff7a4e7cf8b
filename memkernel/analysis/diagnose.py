"""Where finding fails: a per-level trace of routing at a probe's scored queries.

Routing recall says how often the answer leaf was selected; this says where it was lost. For every
scored (query, answer leaf) pair whose answer leaf is sealed before the query's leaf, per layer,
"any head" throughout (a pair counts when at least one routing head gets it right, as in
`metrics_lib.routing_recall`):

  read_argmax_in_answer   the exact read's own attention over *every* visible token (the routing
                          teacher's target) puts its largest weight on a token of the answer leaf.
  leaf_first_by_tokens    the answer leaf has the largest log-sum-exp of q . k among visible leaves
                          (what the re-rank scores candidates by).
  level_first/l           the answer's level-l ancestor has the best summary score q . key among the
                          complete level-l nodes the query sees (the teacher's per-level view;
                          pairs whose query sees fewer than two level-l nodes, or whose ancestor
                          is not yet complete, are left out of level l).
  answer_share/l          not a hit rate: the mean, over pairs whose level-l ancestor is
                          complete, of the answer leaf's share of that ancestor's pooling mass
                          (best head), exp(salience(leaf) - salience(ancestor)): how much of the
                          ancestor's key is the answer leaf's (`tree.merge_nodes`).
  fenwick_first           the query's first routing step: the Fenwick candidate holding the answer
                          scores best among the query's Fenwick candidates;
  fenwick_in_beam         ... ranks within the beam width K (it survives the first step).
  candidate_recall        the answer leaf is among the 2K leaves the beam ends with (selected
                          and runner-ups; with `leaf_rerank`, the leaves the re-rank chooses from).
  recall                  the answer leaf is selected (`metrics_lib.routing_recall`).

Read top to bottom it is a funnel: a summary problem shows as level_first falling with the level
(the pooled keys of large nodes lose the answer), a cross-level problem as fenwick_in_beam below
the level_first values, a beam problem as candidate_recall below fenwick_in_beam, a re-rank
problem as recall below candidate_recall, and a read problem as read_argmax_in_answer below 1.

    report = diagnose_run("runs/exp/induction", lengths=(512, 8192))
    print(format_report(report))

With `node_scores=(M, ...)` every layer also reports `node_first`: level_first under other ways
to score a node (pooled, the best of its M most salient tokens, per-dimension bounds, the best of
all its tokens; `memkernel.analysis.node_scores`), computed from the tokens under each node.

`experiments/diagnose.py` is the command.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp

from memkernel import ops
from memkernel.analysis import audit as audit_lib
from memkernel.analysis import node_scores as node_scores_lib
from memkernel.kernel import routing
from memkernel import runs
from memkernel.kernel.model import KernelModel
from memkernel.kernel.state import level_offset

NEG_INF = ops.NEG_INF
FUNNEL = ("read_argmax_in_answer", "leaf_first_by_tokens", "fenwick_first", "fenwick_in_beam",
          "candidate_recall", "recall")


def _take(x_BT, pos_BQ):
  """x[b, pos[b, q]] for x of any trailing shape."""
  return jax.vmap(lambda x, p: x[p])(x_BT, pos_BQ)


def layer_trace(inputs: Mapping[str, jax.Array], leaves_BTHK: jax.Array,
                runner_up_BTHK: jax.Array, pos_BQ: jax.Array, answers_BQA: jax.Array, *,
                leaf_size: int, beam_width: int) -> dict[str, jax.Array]:
  """Sums and counts of the funnel's events for one layer.

  Args:
    inputs: the layer's sown route inputs: rq [B, T, H, P], q and k [B, T, H, E], node_keys
      [B, S, H, P], node_sal [B, S, H].
    leaves_BTHK, runner_up_BTHK: the routing aux's selected and runner-up leaves.
    pos_BQ: scored query positions.
    answers_BQA: answer leaves of those queries (-1: none).
    leaf_size, beam_width: L and K.
  Returns:
    {name: float32 hits} and {name + "/n": float32 pairs counted}, for the names of FUNNEL,
    level_first/l and answer_share/l (a sum of shares) for every level.
  """
  rq, q, k, node_keys = inputs["rq"], inputs["q"], inputs["k"], inputs["node_keys"]
  node_sal = inputs["node_sal"]
  b, t, h, e = q.shape
  num_leaves = (node_keys.shape[1] + 1) // 2
  c_BQ = pos_BQ // leaf_size
  a = answers_BQA                                                    # [B, Q, A]
  pair = (a >= 0) & (a < c_BQ[..., None])                            # answer sealed and visible
  out: dict[str, jax.Array] = {}

  def add(name, hit_BQA, valid_BQA):
    valid = valid_BQA & pair
    out[name] = jnp.sum(hit_BQA & valid).astype(jnp.float32)
    out[name + "/n"] = jnp.sum(valid).astype(jnp.float32)

  rq_q, q_q = _take(rq, pos_BQ), _take(q, pos_BQ)                    # [B, Q, H, *]

  # The exact read's dense attention over every visible sealed token, and leaves by their tokens.
  n_full = t // leaf_size
  keys = k[:, :n_full * leaf_size]
  logits = jnp.einsum("bqhe,bshe->bqhs", q_q, keys)
  tok_leaf = jnp.arange(n_full * leaf_size) // leaf_size
  visible_tok = tok_leaf[None, None, None, :] < c_BQ[:, :, None, None]
  logits = jnp.where(visible_tok, logits, NEG_INF)
  argmax_leaf = tok_leaf[jnp.argmax(logits, axis=-1)]                # [B, Q, H]
  add("read_argmax_in_answer",
      jnp.any(argmax_leaf[..., None, :] == a[..., None], axis=-1), pair)
  leaf_lse = jax.nn.logsumexp(logits.reshape(b, -1, h, n_full, leaf_size), axis=-1)
  best_leaf = jnp.argmax(leaf_lse, axis=-1)
  add("leaf_first_by_tokens", jnp.any(best_leaf[..., None, :] == a[..., None], axis=-1), pair)

  # Each level's summaries, as the teacher compares them.
  level = 0
  while (num_leaves >> level) >= 2:
    n_l = num_leaves >> level
    off = level_offset(num_leaves, level)
    scores = jnp.einsum("bnhp,bqhp->bqhn", node_keys[:, off:off + n_l], rq_q)
    seen = c_BQ >> level                                             # complete nodes visible
    scores = jnp.where(jnp.arange(n_l)[None, None, None, :] < seen[..., None, None], scores,
                       NEG_INF)
    best = jnp.argmax(scores, axis=-1)                               # [B, Q, H]
    anc = a >> level
    add(f"level_first/{level}", jnp.any(best[..., None, :] == anc[..., None], axis=-1),
        (anc < seen[..., None]) & (seen[..., None] >= 2))
    complete = (anc < seen[..., None]) & pair
    sal = lambda idx: jax.vmap(lambda s_, i: s_[i])(node_sal, jnp.maximum(idx, 0))  # [B, Q, A, H]
    share = jnp.max(jnp.exp(sal(a) - sal(off + anc)), axis=-1)
    out[f"answer_share/{level}"] = jnp.sum(jnp.where(complete, share, 0.0))
    out[f"answer_share/{level}/n"] = jnp.sum(complete).astype(jnp.float32)
    level += 1

  # The first routing step: the query's Fenwick candidates.
  f_level, f_index, f_valid = routing.fenwick_candidates(c_BQ, num_leaves)   # [B, Q, F]
  flat = jnp.where(f_valid, routing.flat_index(f_level, f_index, num_leaves), 0)
  flat = jnp.broadcast_to(flat[:, :, None], (b, flat.shape[1], h, flat.shape[-1]))
  f_scores = ops.matvec(routing.gather_nodes(node_keys, flat), rq_q)      # [B, Q, H, F]
  f_scores = jnp.where(f_valid[:, :, None], f_scores, NEG_INF)
  holds = f_valid[:, :, None, None, :] & (
      (a[:, :, None, :, None] >> f_level[:, :, None, None, :]) == f_index[:, :, None, None, :])
  holder_score = jnp.max(jnp.where(holds, f_scores[:, :, :, None], NEG_INF), axis=-1)  # B Q H A
  rank = jnp.sum(f_scores[:, :, :, None] > holder_score[..., None], axis=-1)         # B Q H A
  add("fenwick_first", jnp.any(rank == 0, axis=2), pair)
  add("fenwick_in_beam", jnp.any(rank < beam_width, axis=2), pair)

  sel = _take(leaves_BTHK, pos_BQ).reshape(b, -1, 1, h * leaves_BTHK.shape[-1])
  run = _take(runner_up_BTHK, pos_BQ).reshape(b, -1, 1, h * runner_up_BTHK.shape[-1])
  selected = jnp.any(sel == a[..., None], axis=-1)
  add("candidate_recall", selected | jnp.any(run == a[..., None], axis=-1), pair)
  add("recall", selected, pair)
  return out


def _trace_fn(model: KernelModel, num_queries: int, node_scores: Optional[tuple[int, ...]]):
  c = model.config

  @jax.jit
  def trace(params, batch):
    (_, aux), state = model.apply({"params": params}, batch["tokens"],
                                  mutable=["intermediates"])
    inputs = state["intermediates"]["route_inputs"]
    # Every row scores `num_queries` positions, so the teacher's choice of S of them is all of them.
    b, t = batch["mask"].shape
    pos, _ = routing.teacher_positions(num_queries, t, b, batch["mask"])
    answers = _take(batch["answer_leaves"], pos)
    sums = []
    for layer_inputs, route in zip(inputs, aux.routes):
      sums.append(layer_trace(layer_inputs, route.leaves, route.runner_up, pos, answers,
                              leaf_size=c.leaf_size, beam_width=c.beam_width))
      if node_scores is not None:
        sums[-1].update({"node_first/" + k: v for k, v in node_scores_lib.node_score_trace(
            layer_inputs, pos, answers, leaf_size=c.leaf_size, reps=node_scores).items()})
    return sums

  return trace


def diagnose(model: KernelModel, params, batches: Sequence[Mapping[str, jax.Array]],
             num_queries: int, node_scores: Optional[Sequence[int]] = None
             ) -> list[dict[str, Any]]:
  """The funnel of every layer over `batches` of one task and length.

  Returns:
    One dict per layer: {name: fraction of counted pairs, or None where none counted} with
    "pairs" (the pairs counted for `recall`) and "level_first" as a list over levels; with
    `node_scores` (the M of every reps_M rule) also "node_first": {rule: list over levels}
    (`node_scores.rule_names`).
  """
  if not (model.config.use_tree_read or model.config.use_exact_read):
    raise ValueError("the routing diagnostic needs a model that routes (a memory read is off)")
  node_scores = None if node_scores is None else tuple(node_scores)
  trace = _trace_fn(model, num_queries, node_scores)
  totals: Optional[list[dict[str, float]]] = None
  for batch in batches:
    sums = jax.device_get(trace(params, dict(batch)))
    if totals is None:
      totals = [{key: 0.0 for key in layer} for layer in sums]
    for total, layer in zip(totals, sums):
      for key, value in layer.items():
        total[key] += float(value)
  report = []
  for total in totals or []:
    frac = {name: (total[name] / total[name + "/n"] if total[name + "/n"] else None)
            for name in total if not name.endswith("/n")}
    levels = sorted(int(name.split("/")[1]) for name in frac if name.startswith("level_first/"))
    layer = {name: frac[name] for name in FUNNEL}
    layer["level_first"] = [frac[f"level_first/{lv}"] for lv in levels]
    layer["answer_share"] = [frac[f"answer_share/{lv}"] for lv in levels]
    layer["level_pairs"] = [int(total[f"level_first/{lv}/n"]) for lv in levels]
    layer["pairs"] = int(total["recall/n"])
    if node_scores is not None:
      layer["node_first"] = {rule: [frac[f"node_first/{rule}/{lv}"] for lv in levels]
                             for rule in node_scores_lib.rule_names(node_scores)}
    report.append(layer)
  return report


def diagnose_run(workdir: str, *, lengths: Optional[Sequence[int]] = None,
                 task: Optional[Mapping[str, Any]] = None, batches: int = 4,
                 batch_size: Optional[int] = None, step: Optional[int] = None,
                 seed: Optional[int] = None,
                 node_scores: Optional[Sequence[int]] = None) -> dict[str, Any]:
  """The funnel of a training run's kernel at each length, on fresh batches of its task.

  Uses the auditor's seed stream (never training or evaluation batches), the run's evaluation
  beam and, by default, its training length. Everything is validated before anything compiles.

  Args:
    workdir: the run's --workdir.
    lengths: sequence lengths (default: the training length).
    task: TaskConfig fields to change (not name, vocab_size, leaf_size or seq_len).
    batches, batch_size: fresh batches per length (default batch size: the run's eval one).
    step: checkpoint step (default: the newest).
    seed: the batches' seed (default: the run's).
    node_scores: also compare node scoring rules, with these M for the reps_M rules (`diagnose`).
  Returns:
    {"step", "task", "beam_width", "lengths": {str(length): [per-layer funnel]}}.
  Raises:
    ValueError: a peer run, or a bad setting (named).
  """
  if not isinstance(batches, int) or isinstance(batches, bool) or batches < 1:
    raise ValueError(f"batches must be a positive integer, got {batches!r}")
  for m in node_scores or ():
    if not isinstance(m, int) or isinstance(m, bool) or m < 1:
      raise ValueError(f"node_scores must be positive integers (the M of each reps_M rule), "
                       f"got {m!r}")
  if step is None:
    step = runs.latest_step(workdir)
  experiment = runs.load_experiment(workdir, step)
  if not experiment.family.routes:
    raise ValueError(f"the routing diagnostic needs a memory-kernel run; this run trains the "
                     f"{experiment.model_type!r} peer, which does not route")
  experiment = runs.with_task(experiment, task)
  lengths = tuple(lengths or (experiment.task.seq_len,))
  for length in lengths:
    if not isinstance(length, int) or length <= 0:
      raise ValueError(f"lengths must be positive integers, got {length!r}")
    experiment.task_for_length(length)          # validates the task at this length
  batch_size = batch_size or experiment.eval.batch_size
  seed = experiment.train.seed if seed is None else seed
  _, params = runs.load_run(workdir, step)
  out = {"step": step, "task": dataclasses.asdict(experiment.task),
         "beam_width": experiment.model.beam_width, "lengths": {}}
  for length in lengths:
    t = experiment.task_for_length(length)
    model = KernelModel(experiment.model_for_length(length))
    data = audit_lib.eval_batches(t, seed, batches, batch_size)
    out["lengths"][str(length)] = diagnose(model, params, data, t.num_queries, node_scores)
  return out


def _pct(x: Optional[float]) -> str:
  return "—" if x is None else f"{100 * x:.1f}"


def format_report(report: Mapping[str, Any]) -> str:
  """Markdown: one table per length, one row per layer, the funnel then level_first by level."""
  lines = []
  for length, layers in report["lengths"].items():
    depth = max(len(layer["level_first"]) for layer in layers)
    head = ["layer", "pairs", *FUNNEL, *(f"level {lv} first" for lv in range(depth)),
            *(f"level {lv} share" for lv in range(depth))]
    lines += [f"length {length} (percent of scored query/answer pairs, any head; beam "
              f"{report['beam_width']})", "", "| " + " | ".join(head) + " |",
              "|" + "---|" * len(head)]
    for i, layer in enumerate(layers):
      row = [str(i), str(layer["pairs"]), *(_pct(layer[name]) for name in FUNNEL),
             *(_pct(x) for x in layer["level_first"]),
             *("—" for _ in range(depth - len(layer["level_first"]))),
             *(_pct(x) for x in layer["answer_share"]),
             *("—" for _ in range(depth - len(layer["answer_share"])))]
      lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    if "node_first" in layers[0]:
      head = ["layer", "node score", *(f"level {lv} first" for lv in range(depth))]
      lines += [f"length {length}: level first by node score", "",
                "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
      for i, layer in enumerate(layers):
        for rule, values in layer["node_first"].items():
          lines.append("| " + " | ".join([str(i), rule, *(_pct(x) for x in values)]) + " |")
      lines.append("")
  return "\n".join(lines)

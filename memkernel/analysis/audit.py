"""The causal memory auditor: what each memory source is worth, measured by taking it away.

    report = audit(model, params, {"mqar": batches})
    print(format_report(report))

runs the reference forward (exactly the plain `model.apply`, no intervention) and one forward per
intervention (`standard_interventions`) on the same evaluation batches, and compares them at the
scored positions (`batch["mask"]`). Everything here is a pure function of (model, params, batches):
nothing is written into the model, and the reference forward is not altered in any way.

Per intervention, over scored positions (delta = intervened - reference):
  loss_delta          mean change of the target's negative log-likelihood (nats). This is the
                      *utility* of what the intervention removed: > 0 means the model needs it.
  loss_delta_se       its standard error over scored positions (the forwards are paired).
  target_logit_delta  mean change of the target's raw logit.
  kl                  mean KL(reference || intervened) of the next-token distributions.
  accuracy_delta      change of the argmax accuracy.

Interventions (`memkernel.Interventions`, composable, shape-preserving), enumerated from the
family's sources (`Family.sources(config)`: the trunk's "roots" and the memory reads the config
enables):
  no_<source>_read    `drop=(source,)` for each memory read: its contribution is zeroed in every
                      layer (no_tree_read: the routed tree value; no_exact_read: the exact
                      token-level read).
  no_memory           every memory read dropped at once: the joint utility of the memory. Two
                      redundant sources can each look useless alone while together they carry
                      the task; this row shows it.
  next_best_span      each head reads its best *unselected* leaves (pruned by the beam at leaf
                      depth, always sealed) instead of its selected ones: the utility of the
                      router's choice, as opposed to the utility of reading at all.
  root_drop_<r>       trunk root r's output is zeroed everywhere (also where it feeds the memory
                      projections).

Groupings of the scored positions (each intervention's deltas are reported per group):
  by_task             the task family (the key of the `batches` mapping).
  by_depth            the routing depth of the answer: the level of the node of the query's
                      Fenwick start set that holds the answer leaf, i.e. how many beam steps
                      separate the start set from the answer (bit_length(c ^ a) - 1 for query leaf
                      c and answer leaf a < c). It is a property of the query, the same for every
                      intervention and every model, so groups are comparable across runs; the
                      router's own `start_level` (below) depends on the model.
  by_start_level      the routing aux `start_level` of layer 0 in the reference forward (the level
                      of the best first-step candidate), deepest over heads: how far the router's
                      top path had to descend.
  by_distance         query leaf minus answer leaf, in leaves, in log2 buckets (1, 2-3, 4-7, ...).
  Positions with no answer leaf are grouped as "none"; with an answer leaf the memory cannot reach
  yet (in the query's own, live leaf) as "unsealed". Depth and distance use answer slot 0 (for
  far_compare, the first and farther of the two numbers).

Sources (`report["sources"]`): each memory read the kernel declares (tree, exact; one the config
switches off is reported as disabled, with gate 0 and no utility), memory (all reads) and each
root, with their fusion gate (the per-token `aux.gates` mean over scored positions, the largest
over layers), their utility (the loss_delta of the intervention that removes them;
`significant` when it is more than two standard errors from 0) and a verdict:
  disabled     switched off in the model config;
  inactive     gate mean <= `active_gate_threshold`;
  dead_weight  active, but |utility| < `dead_weight_threshold` nats per scored token: the model
               spends a gate on the source and loses nothing without it;
  harmful      utility <= -`dead_weight_threshold` (removing it lowers the loss);
  useful       utility >= `dead_weight_threshold`.
`report["dead_weight"]` lists the dead-weight sources.

An intervention that cannot change the model (e.g. next_best_span with every read switched off)
is not run (`effective_interventions`): its deltas are exactly zero.

Cost: 1 + M + 2 + R forwards per batch (M enabled memory reads, R roots), each intervention
compiled once per model config and batch shape. `eval.audit_batches` in the experiment config sets
how many eval batches the training harness audits at its final evaluation (0 disables it);
`experiments/audit.py` audits a finished run.

Shape key in `memkernel.shapes`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import math
import os
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from memkernel import family as family_lib
from memkernel import probes
from memkernel import runs
from memkernel.kernel import fusion
from memkernel.kernel.config import KernelConfig
from memkernel.kernel.interventions import NONE, Interventions
from memkernel.kernel.model import KernelModel

AUDIT_FILE = "audit.json"
PLOT_FILE = "audit.png"
# The auditor's own random stream (memkernel.train uses 0: init, 1: training data, 2: eval data).
AUDIT_STREAM = 3
DEAD_WEIGHT_THRESHOLD = 0.01
ACTIVE_GATE_THRESHOLD = 0.05
GROUPINGS = ("by_distance", "by_depth", "by_start_level")
# Per-position statistics summed per group (intervened vs reference, and the reference alone).
_DELTA_FIELDS = ("count", "loss_delta", "loss_delta_sq", "target_logit_delta", "kl",
                 "accuracy_delta")
_REFERENCE_FIELDS = ("count", "loss", "accuracy", "target_logit")
_GROUP_NONE, _GROUP_UNSEALED = 0, 1


# ------------------------------------------------------------------------------------------------
# Interventions and forwards.


def drop_name(source: str) -> str:
  """The report's name of the intervention that drops one memory read."""
  return f"no_{source}_read"


def _memory_reads(config: KernelConfig) -> tuple[str, ...]:
  """The family's sources that read the memory (all but the trunk's roots), in gate order."""
  return tuple(s for s in family_lib.of_config(config).sources(config) if s != fusion.TRUNK)


def standard_interventions(config: KernelConfig) -> dict[str, Interventions]:
  """The audited interventions, by name (see the module docstring): each memory read of the
  family's sources dropped alone, all of them at once, next_best_span, root_drop_<r> per root."""
  reads = _memory_reads(config)
  ivs = {drop_name(s): Interventions(drop=(s,)) for s in reads}
  ivs["no_memory"] = Interventions(drop=reads)
  ivs["next_best_span"] = Interventions(next_best_span=True)
  for r in range(config.num_roots):
    ivs[f"root_drop_{r}"] = Interventions(root_drop=(r,))
  return ivs


def _variables(params) -> dict:
  """`{"params": params}` for a parameter tree (as `load_run` returns it); variables pass as is."""
  if isinstance(params, Mapping) and "params" in params:
    return params
  return {"params": params}


def effective_interventions(config: KernelConfig, interventions: Interventions) -> Interventions:
  """`interventions` without the parts that cannot change this model.

  A read switched off in the config adds nothing to remove, and which leaves the router picks
  cannot matter once no read is fused. The auditor runs the effective intervention (so two that
  coincide share one compiled forward) and none at all when it is empty: its deltas are then
  exactly zero.

  Raises:
    ValueError: `drop` names a source the kernel does not have under any config.
  """
  interventions.check(fusion.SOURCES)
  sources = family_lib.of_config(config).sources(config)
  drop = tuple(s for s in sources if s in interventions.drop)
  reads = any(s != fusion.TRUNK and s not in drop for s in sources)
  return Interventions(drop=drop, next_best_span=interventions.next_best_span and reads,
                       root_drop=tuple(sorted(set(interventions.root_drop))))


@functools.lru_cache(maxsize=64)
def _forward_fn(model: KernelModel, interventions: Interventions):
  if interventions == NONE:  # The plain forward, literally (NONE is `apply`'s default).
    return jax.jit(lambda variables, tokens: model.apply(variables, tokens))
  # Logits only: without the aux outputs (diagnostics, routing) the program compiles faster.
  return jax.jit(lambda variables, tokens: model.apply(variables, tokens,
                                                       interventions=interventions)[0])


def reference_forward(model: KernelModel, params, tokens_BT: jax.Array):
  """The full forward the auditor compares against: `model.apply(variables, tokens)`, jitted.

  Returns:
    (logits float32 [B, T, V], aux), bit-identical to a jitted plain forward.
  """
  return _forward_fn(model, NONE)(_variables(params), tokens_BT)


def intervened_logits(model: KernelModel, params, tokens_BT: jax.Array,
                      interventions: Interventions) -> jax.Array:
  """Logits float32 [B, T, V] of the parallel forward under `interventions` (jitted, cached per
  model and effective intervention; an empty one is the reference forward's logits)."""
  interventions = effective_interventions(model.config, interventions)
  if interventions == NONE:
    return reference_forward(model, params, tokens_BT)[0]
  return _forward_fn(model, interventions)(_variables(params), tokens_BT)


# ------------------------------------------------------------------------------------------------
# Per-position groups and statistics.


def _bit_length(x: jax.Array) -> jax.Array:
  """bit_length of non-negative int32 values (0 for 0)."""
  return 32 - jax.lax.clz(x.astype(jnp.int32))


def num_groups(config: KernelConfig) -> int:
  """Groups per grouping: none, unsealed, and one per level / log2-distance bucket."""
  return 2 + max(config.num_levels - 1, 1)


def group_labels(grouping: str, count: int) -> list[str]:
  """Names of the `count` groups of `grouping` (ids as in `position_groups`)."""
  labels = ["none", "unsealed"]
  for b in range(count - 2):
    if grouping == "by_distance":
      labels.append("1" if b == 0 else f"{2 ** b}-{2 ** (b + 1) - 1}")
    else:
      labels.append(str(b))
  return labels


def position_groups(answer_leaves_BTA: jax.Array, start_level_BTH: Optional[jax.Array],
                    leaf_size: int, groups: int) -> jax.Array:
  """Group ids of every position for each of `GROUPINGS` (see the module docstring).

  Args:
    answer_leaves_BTA: int32 [B, T, A], the batch's answer leaves (-1: none); slot 0 is used.
    start_level_BTH: int32 [B, T, H], layer 0's routing start level (-1: nothing visible), or
      None for a model without routing.
    leaf_size: L.
    groups: ids are clipped to [0, groups).
  Returns:
    int32 [3, B, T]: distance bucket, answer depth and start level, each as 2 + value, or 0
    ("none") / 1 ("unsealed").
  """
  b, t = answer_leaves_BTA.shape[:2]
  query = (jnp.arange(t, dtype=jnp.int32) // leaf_size)[None, :]
  answer = answer_leaves_BTA[..., 0].astype(jnp.int32)
  has = answer >= 0
  sealed = has & (answer < query)
  safe = jnp.where(sealed, answer, 0)
  distance = _bit_length(jnp.maximum(query - safe, 1)) - 1
  depth = _bit_length(jnp.where(sealed, query ^ safe, 1)) - 1
  outside = jnp.where(has, _GROUP_UNSEALED, _GROUP_NONE)
  by_answer = [jnp.where(sealed, 2 + v, outside) for v in (distance, depth)]
  if start_level_BTH is None:
    start = jnp.full((b, t), _GROUP_NONE, jnp.int32)
  else:
    level = jnp.max(start_level_BTH, axis=-1)
    start = jnp.where(level >= 0, 2 + level, _GROUP_NONE)
  return jnp.clip(jnp.stack(by_answer + [start]).astype(jnp.int32), 0, groups - 1)


def _segment_sums(values_BTF: jax.Array, ids_KBT: jax.Array, groups: int) -> jax.Array:
  """[K, G, F] sums of the per-position values over each grouping's groups."""
  flat = values_BTF.reshape(-1, values_BTF.shape[-1])
  return jax.vmap(lambda ids: jax.ops.segment_sum(flat, ids.reshape(-1), groups))(ids_KBT)


def _target_stats(logits_BTV, targets_BT):
  logp = jax.nn.log_softmax(logits_BTV, axis=-1)
  nll = -jnp.take_along_axis(logp, targets_BT[..., None], axis=-1)[..., 0]
  logit = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
  correct = (jnp.argmax(logits_BTV, axis=-1) == targets_BT).astype(jnp.float32)
  return logp, nll, logit, correct


@functools.partial(jax.jit, static_argnames=("leaf_size", "groups"))
def _reference_sums(logits_BTV, gates, start_level_BTH, batch, *, leaf_size: int, groups: int):
  """Group ids, [K, G, len(_REFERENCE_FIELDS)] sums and per-layer gate sums [layers, S]."""
  ids = position_groups(batch["answer_leaves"], start_level_BTH, leaf_size, groups)
  mask = batch["mask"].astype(jnp.float32)
  _, nll, logit, correct = _target_stats(logits_BTV, batch["targets"])
  values = jnp.stack([jnp.ones_like(nll), nll, correct, logit], axis=-1) * mask[..., None]
  gate_sums = jnp.stack([jnp.sum(g * mask[..., None], axis=(0, 1)) for g in gates])
  return ids, _segment_sums(values, ids, groups), gate_sums


@functools.partial(jax.jit, static_argnames=("groups",))
def _delta_sums(ref_logits_BTV, logits_BTV, batch, ids_KBT, *, groups: int):
  """[K, G, len(_DELTA_FIELDS)] sums of intervened-minus-reference statistics."""
  targets, mask = batch["targets"], batch["mask"].astype(jnp.float32)
  ref_logp, ref_nll, ref_logit, ref_correct = _target_stats(ref_logits_BTV, targets)
  logp, nll, logit, correct = _target_stats(logits_BTV, targets)
  kl = jnp.sum(jnp.exp(ref_logp) * (ref_logp - logp), axis=-1)
  d_nll = nll - ref_nll
  values = jnp.stack([jnp.ones_like(nll), d_nll, d_nll * d_nll, logit - ref_logit, kl,
                      correct - ref_correct], axis=-1) * mask[..., None]
  return _segment_sums(values, ids_KBT, groups)


def audit_batch(model: KernelModel, params, batch: Mapping[str, jax.Array],
                interventions: Mapping[str, Interventions]) -> dict[str, np.ndarray]:
  """Raw sums of one batch: the reference and every intervention.

  Args:
    model: the kernel (its `max_seq_len` must hold the batch).
    params: its parameters (or the full variables dict).
    batch: `memkernel.probes.generate` output (tokens, targets, mask, answer_leaves).
    interventions: name -> `Interventions`.
  Returns:
    {"reference": float64 [K, G, 4], "gates": float64 [layers, S], name: float64 [K, G, 6]} with
    K = len(GROUPINGS), G = `num_groups(model.config)`; fields `_REFERENCE_FIELDS` and
    `_DELTA_FIELDS`. Sums, so batches (and tasks) add up.
  """
  config = model.config
  groups = num_groups(config)
  tokens = batch["tokens"]
  effective = {name: effective_interventions(config, iv) for name, iv in interventions.items()}
  distinct = list(dict.fromkeys(iv for iv in effective.values() if iv != NONE))
  # The forwards are dispatched from threads: XLA compiles them in parallel on the first batch
  # (the auditor's main cost), and later calls only enqueue work.
  workers = max(1, min(len(distinct) + 1, os.cpu_count() or 1))
  with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
    reference = pool.submit(reference_forward, model, params, tokens)
    intervened = dict(zip(distinct, pool.map(
        lambda iv: intervened_logits(model, params, tokens, iv), distinct)))
    logits, aux = reference.result()
  route0 = aux.routes[0]
  start_level = None if route0 is None else route0.start_level
  ids, ref, gates = _reference_sums(logits, aux.gates, start_level, dict(batch),
                                    leaf_size=config.leaf_size, groups=groups)
  out = {"reference": ref, "gates": gates}
  for name, iv in effective.items():
    out[name] = _delta_sums(logits, intervened.get(iv, logits), dict(batch), ids, groups=groups)
  return {k: np.asarray(jax.device_get(v), np.float64) for k, v in out.items()}


# ------------------------------------------------------------------------------------------------
# Aggregation into a report.


def _delta_summary(sums: np.ndarray) -> Optional[dict[str, float]]:
  """Means of one row of `_DELTA_FIELDS` sums (None when it counts no position)."""
  s = dict(zip(_DELTA_FIELDS, map(float, sums)))
  n = s["count"]
  if n <= 0:
    return None
  mean = s["loss_delta"] / n
  var = max(s["loss_delta_sq"] / n - mean * mean, 0.0)
  return {"count": int(round(n)), "loss_delta": mean, "loss_delta_se": math.sqrt(var / n),
          "target_logit_delta": s["target_logit_delta"] / n, "kl": s["kl"] / n,
          "accuracy_delta": s["accuracy_delta"] / n}


def _reference_summary(sums: np.ndarray) -> Optional[dict[str, float]]:
  s = dict(zip(_REFERENCE_FIELDS, map(float, sums)))
  n = s["count"]
  if n <= 0:
    return None
  return {"count": int(round(n)), "loss": s["loss"] / n, "accuracy": s["accuracy"] / n,
          "target_logit": s["target_logit"] / n}


def _grouped(sums_KGF: np.ndarray, summarize) -> dict[str, dict[str, dict[str, float]]]:
  out = {}
  for k, grouping in enumerate(GROUPINGS):
    labels = group_labels(grouping, sums_KGF.shape[1])
    rows = {label: summarize(row) for label, row in zip(labels, sums_KGF[k])}
    out[grouping] = {label: row for label, row in rows.items() if row is not None}
  return out


def _verdict(enabled: bool, gate: float, utility: Optional[float], dead_weight_threshold: float,
             active_gate_threshold: float) -> str:
  if not enabled:
    return "disabled"
  if gate <= active_gate_threshold:
    return "inactive"
  if utility is None:
    return "not_audited"
  if abs(utility) < dead_weight_threshold:
    return "dead_weight"
  return "useful" if utility > 0 else "harmful"


def _check_thresholds(dead_weight_threshold: float, active_gate_threshold: float) -> None:
  if not (isinstance(dead_weight_threshold, (int, float)) and math.isfinite(dead_weight_threshold)
          and dead_weight_threshold >= 0):
    raise ValueError(f"dead_weight_threshold must be a finite number >= 0 (nats per scored "
                     f"token), got {dead_weight_threshold!r}")
  if not (isinstance(active_gate_threshold, (int, float)) and 0 <= active_gate_threshold < 1):
    raise ValueError(f"active_gate_threshold must be in [0, 1) (a fusion gate mean), got "
                     f"{active_gate_threshold!r}")


def summarize(config: KernelConfig, sums_by_task: Mapping[str, Mapping[str, np.ndarray]],
              *, dead_weight_threshold: float = DEAD_WEIGHT_THRESHOLD,
              active_gate_threshold: float = ACTIVE_GATE_THRESHOLD) -> dict[str, Any]:
  """Turns per-task sums (`audit_batch`, added over batches) into the JSON-ready report."""
  _check_thresholds(dead_weight_threshold, active_gate_threshold)
  tasks = list(sums_by_task)
  if not tasks:
    raise ValueError("the audit needs at least one task with at least one batch")
  names = [k for k in sums_by_task[tasks[0]] if k not in ("reference", "gates")]
  total = {k: sum(np.asarray(sums_by_task[t][k]) for t in tasks) for k in sums_by_task[tasks[0]]}
  # Every position falls in exactly one group of a grouping: grouping 0 sums to the total.
  ref_total = total["reference"][0].sum(0)
  if ref_total[0] <= 0:
    raise ValueError("the audited batches hold no scored position (batch['mask'] is all zero)")
  reference = {**_reference_summary(ref_total),
               "by_task": {t: _reference_summary(sums_by_task[t]["reference"][0].sum(0))
                           for t in tasks},
               **_grouped(total["reference"], _reference_summary)}
  count = ref_total[0]
  gates = total["gates"] / max(count, 1.0)  # [layers, S] mean gate over scored positions
  sources = family_lib.of_config(config).sources(config)  # the gates' order

  interventions = {}
  for name in names:
    row = _delta_summary(total[name][0].sum(0))
    row["by_task"] = {t: _delta_summary(sums_by_task[t][name][0].sum(0)) for t in tasks}
    row.update(_grouped(total[name], _delta_summary))
    interventions[name] = row

  def utility(name, field="loss_delta"):
    return interventions[name][field] if name in interventions else None

  gate_max = {s: float(np.max(gates[:, i])) for i, s in enumerate(sources)}
  # Every memory read the kernel declares, so a config's disabled reads keep their rows.
  declared = [s for s in fusion.SOURCES if s != fusion.TRUNK]
  candidates = {s: (s in sources, gate_max.get(s, 0.0), drop_name(s)) for s in declared}
  reads = [s for s in declared if s in sources]
  candidates["memory"] = (bool(reads), max((gate_max[s] for s in reads), default=0.0),
                          "no_memory")
  for r in range(config.num_roots):
    candidates[f"root_{r}"] = (True, gate_max[fusion.TRUNK], f"root_drop_{r}")
  verdicts = {}
  for source, (enabled, gate, name) in candidates.items():
    verdict = _verdict(enabled, gate, utility(name), dead_weight_threshold, active_gate_threshold)
    u, se = utility(name), utility(name, "loss_delta_se")
    verdicts[source] = {"enabled": bool(enabled), "gate_mean": gate,
                       "active": verdict not in ("disabled", "inactive"),
                       "intervention": name, "utility": u, "utility_se": se,
                       "significant": bool(u is not None and abs(u) > 2 * se),
                       "verdict": verdict}
  return {
      "num_scored": int(round(count)),
      "thresholds": {"dead_weight": dead_weight_threshold, "active_gate": active_gate_threshold},
      "reference": reference,
      "gates": {f"layer_{i}": dict(zip(sources, map(float, g))) for i, g in enumerate(gates)},
      "interventions": interventions,
      "by_root": {str(r): interventions.get(f"root_drop_{r}")
                  for r in range(config.num_roots)},
      "sources": verdicts,
      "dead_weight": [s for s, v in verdicts.items() if v["verdict"] == "dead_weight"],
  }


def audit(model: KernelModel, params, batches: Mapping[str, Sequence[Mapping[str, jax.Array]]],
          *, interventions: Optional[Mapping[str, Interventions]] = None,
          dead_weight_threshold: float = DEAD_WEIGHT_THRESHOLD,
          active_gate_threshold: float = ACTIVE_GATE_THRESHOLD) -> dict[str, Any]:
  """Audits `model` on evaluation batches: every intervention against the reference forward.

  Args:
    model: a `KernelModel` whose `max_seq_len` holds every batch.
    params: its parameter tree (as `load_run` returns it) or the full variables dict.
    batches: task family name -> batches of `memkernel.probes.generate` (tokens, targets, mask,
      answer_leaves); by_task reports each family.
    interventions: name -> `Interventions`; default `standard_interventions(model.config)`.
    dead_weight_threshold: |loss delta| (nats per scored token) below which an active source
      counts as dead weight.
    active_gate_threshold: fusion gate mean above which an enabled source counts as active.
  Returns:
    The report (JSON-ready; layout in the module docstring and `summarize`).
  Raises:
    ValueError: not a kernel model, no batches, or a bad threshold.
  """
  if not isinstance(model, KernelModel):
    raise ValueError(f"the auditor needs a memkernel.KernelModel, got {type(model).__name__} "
                     "(the attention peers have no memory to remove)")
  _check_thresholds(dead_weight_threshold, active_gate_threshold)
  if interventions is None:
    interventions = standard_interventions(model.config)
  sums_by_task = {}
  for task, task_batches in batches.items():
    for batch in task_batches:
      sums = audit_batch(model, params, batch, interventions)
      prev = sums_by_task.get(task)
      sums_by_task[task] = sums if prev is None else {k: prev[k] + sums[k] for k in sums}
    if task not in sums_by_task:
      raise ValueError(f"batches[{task!r}] holds no batch")
  report = summarize(model.config, sums_by_task, dead_weight_threshold=dead_weight_threshold,
                     active_gate_threshold=active_gate_threshold)
  report["num_batches"] = {t: len(b) for t, b in batches.items()}
  report["intervention_specs"] = {k: dataclasses.asdict(v) for k, v in interventions.items()}
  return report


# ------------------------------------------------------------------------------------------------
# Experiments: fresh batches, a run's audit, the table and the plot.


_generate = jax.jit(probes.generate, static_argnums=(0, 2))


def eval_batches(task: probes.TaskConfig, seed: int, num_batches: int,
                 batch_size: int) -> list[dict[str, jax.Array]]:
  """`num_batches` fresh batches from the auditor's own seed stream (never training batches)."""
  key = jax.random.fold_in(jax.random.key(seed), AUDIT_STREAM)
  return [_generate(task, jax.random.fold_in(key, i), batch_size) for i in range(num_batches)]


def audit_experiment(experiment, params, *, num_batches: int, length: Optional[int] = None,
                     batch_size: Optional[int] = None, seed: Optional[int] = None,
                     dead_weight_threshold: float = DEAD_WEIGHT_THRESHOLD,
                     active_gate_threshold: float = ACTIVE_GATE_THRESHOLD) -> dict[str, Any]:
  """Audits a run's parameters on fresh batches of its task.

  Args:
    experiment: a `memkernel.train.Experiment` (e.g. `memkernel.runs.load_experiment`).
    params: the run's parameters.
    num_batches: batches to audit (>= 1).
    length: sequence length; default the training length.
    batch_size: default `eval.batch_size`.
    seed: default `train.seed` (the auditor's stream of it, `AUDIT_STREAM`).
    dead_weight_threshold, active_gate_threshold: see `audit`.
  Returns:
    The `audit` report plus the run's model_type, task, length, seed and batch_size.
  Raises:
    ValueError: a peer (no memory) or a bad setting.
  """
  if not experiment.family.routes:
    raise ValueError(f"the auditor needs a memory-kernel run; this run trains the "
                     f"{experiment.model_type!r} peer, which has no memory to audit")
  if not isinstance(num_batches, int) or num_batches < 1:
    raise ValueError(f"num_batches must be a positive integer, got {num_batches!r}")
  length = length or experiment.task.seq_len
  batch_size = batch_size or experiment.eval.batch_size
  seed = experiment.train.seed if seed is None else seed
  task = experiment.task_for_length(length)
  model = KernelModel(experiment.model_for_length(length))
  report = audit(model, params, {task.name: eval_batches(task, seed, num_batches, batch_size)},
                 dead_weight_threshold=dead_weight_threshold,
                 active_gate_threshold=active_gate_threshold)
  report.update(model_type=experiment.model_type, task=task.to_dict(), length=length, seed=seed,
                batch_size=batch_size)
  return report


def audit_run(workdir: str, *, step: Optional[int] = None, num_batches: int = 8,
              length: Optional[int] = None, batch_size: Optional[int] = None,
              seed: Optional[int] = None, dead_weight_threshold: float = DEAD_WEIGHT_THRESHOLD,
              active_gate_threshold: float = ACTIVE_GATE_THRESHOLD,
              write: bool = True) -> dict[str, Any]:
  """Audits a training run's checkpoint and (with `write`) writes `audit.json` and `audit.png`.

  Safe beside a live training process (only committed checkpoints are read). Arguments after
  `step` are those of `audit_experiment`.

  Returns:
    The report, with the audited checkpoint's step.
  Raises:
    FileNotFoundError: `workdir` holds no committed checkpoint (at `step`).
    ValueError: the run trains a peer, which has no memory, or a bad setting.
  """
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"{workdir} is not a directory (expected a training run's --workdir)")
  if step is None:
    step = runs.latest_step(workdir)
  experiment = runs.load_experiment(workdir, step)
  if not experiment.family.routes:  # Before any array is read.
    raise ValueError(f"{workdir} holds a {experiment.model_type!r} peer run: the attention peers "
                     "have no memory to audit")
  _, params = runs.load_run(workdir, step)
  report = audit_experiment(experiment, params, num_batches=num_batches, length=length,
                            batch_size=batch_size, seed=seed,
                            dead_weight_threshold=dead_weight_threshold,
                            active_gate_threshold=active_gate_threshold)
  report["step"] = step
  if write:
    write_report(report, os.path.join(workdir, AUDIT_FILE))
    save_plot(report, os.path.join(workdir, PLOT_FILE))
  return report


def write_report(report: Mapping[str, Any], path: str) -> None:
  """Writes the report as JSON, atomically (a reader never sees half a file)."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(report, f, indent=2)
  os.replace(tmp, path)


def _signed(x: Optional[float], width: int = 8, digits: int = 4) -> str:
  return f"{'-':>{width}}" if x is None else f"{x:>+{width}.{digits}f}"


def format_report(report: Mapping[str, Any]) -> str:
  """A readable table of an audit report."""
  ref = report["reference"]
  head = "audit"
  if "task" in report:
    head += f" of {report['model_type']} on {report['task']['name']} (T={report['length']})"
  lines = [f"{head}: {ref['count']} scored positions; reference loss {ref['loss']:.4f}, "
           f"accuracy {ref['accuracy']:.4f}",
           f"  {'intervention':<16} {'loss Δ':>8} {'± se':>7} {'logit Δ':>8} {'KL':>8} "
           f"{'acc Δ':>8}"]
  for name, row in report["interventions"].items():
    lines.append(f"  {name:<16} {_signed(row['loss_delta'])} {row['loss_delta_se']:>7.4f} "
                 f"{_signed(row['target_logit_delta'])} {row['kl']:>8.4f} "
                 f"{_signed(row['accuracy_delta'])}")
  for grouping, title in (("by_depth", "answer depth (levels)"),
                          ("by_distance", "retrieval distance (leaves)"),
                          ("by_start_level", "router start level, layer 0")):
    labels = list(ref[grouping])
    if not labels:
      continue
    lines.append(f"  loss Δ by {title}:")
    lines.append(f"  {'':<16} " + " ".join(f"{label:>8}" for label in labels))
    lines.append(f"  {'(count)':<16} " + " ".join(f"{ref[grouping][label]['count']:>8}"
                                                  for label in labels))
    for name, row in report["interventions"].items():
      cells = [_signed(row[grouping].get(label, {}).get("loss_delta")) for label in labels]
      lines.append(f"  {name:<16} " + " ".join(cells))
  if len(ref["by_task"]) > 1:
    lines.append("  loss Δ by task: " + "; ".join(
        f"{t}: " + ", ".join(f"{n} {row['by_task'][t]['loss_delta']:+.4f}"
                             for n, row in report["interventions"].items())
        for t in ref["by_task"]))
  lines.append(f"  {'source':<16} {'gate':>8} {'utility':>8}  verdict")
  for source, s in report["sources"].items():
    noise = "" if s["significant"] or s["utility"] is None else " (within 2 se of 0)"
    lines.append(f"  {source:<16} {s['gate_mean']:>8.4f} {_signed(s['utility'])}  "
                 f"{s['verdict']}{noise}")
  t = report["thresholds"]
  if report["dead_weight"]:
    lines.append(f"  DEAD WEIGHT: {', '.join(report['dead_weight'])} (gate > {t['active_gate']}, "
                 f"|loss Δ| < {t['dead_weight']} nats per scored token)")
  else:
    lines.append(f"  no dead-weight source (threshold {t['dead_weight']} nats per scored token)")
  return "\n".join(lines)


def save_plot(report: Mapping[str, Any], path: str) -> None:
  """Writes a PNG of loss delta by answer depth and by retrieval distance, per intervention."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # Lazy: only plots need it.
  from matplotlib.figure import Figure

  fig = Figure(figsize=(11, 4))
  FigureCanvasAgg(fig)
  for ax, (grouping, xlabel) in zip(fig.subplots(1, 2), (
      ("by_depth", "answer depth (tree levels below the start set)"),
      ("by_distance", "retrieval distance (leaves, log2 buckets)"))):
    labels = [l for l in report["reference"][grouping] if l not in ("none", "unsealed")]
    x = np.arange(len(labels))
    for name, row in report["interventions"].items():
      y = [row[grouping].get(l, {}).get("loss_delta", np.nan) for l in labels]
      ax.plot(x, y, marker="o", label=name)
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_xticks(x, labels)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("loss delta (nats per scored token)")
  title = "memory utility"
  if "task" in report:
    title += f": {report['model_type']} on {report['task']['name']}, T={report['length']}"
  fig.suptitle(title)
  fig.axes[0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)

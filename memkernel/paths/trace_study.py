"""The read-trace study of a trained kernel run: do salient read edges persist across sequences,
queries and training steps, and would a trace point routing at the right leaf?

    report = traces_run("runs/mqar_scattered", batches=8)

On the routing-path study's batches (`report.study_batches`), the reference forward's route
trace gives every scored query's reads: for each head, the selected leaves' tokens with their
read weight (`RouteTrace.weights` × `read_probs`). Reads above `min_read` become `traces.Reads`.
Per keying (`traces.KEYINGS`) the study builds `ReadTraces`, one update per batch, and reports:

- `overlap`: the share of the top-`top` edges two traces hold in common, for traces built on
  disjoint *sequences* (even / odd rows), disjoint *queries* of the same sequences (even / odd
  positions), two *steps* of training (the first and the last checkpoint studied, on the same
  batches), and the *shuffled* control (the odd rows' read targets permuted among their reads:
  what the edges' marginal frequencies alone share);
- `hit`: on the odd rows, how often the best leaf by a trace built on the even rows is the leaf
  the model read most (`read`) and, on recall probes, the leaf of the query token's previous
  occurrence (`answer`), beside the same with the shuffled trace and chance;
- `bytes`: the trace's size against its quota (`traces.BYTES_PER_EDGE` per edge).

`experiments/traces.py` is the command; it writes `traces.json` and `traces.md`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Optional, Sequence

import jax.numpy as jnp
import numpy as np

from memkernel import runs
from memkernel import text_task
from memkernel.kernel.model import KernelModel
from memkernel.paths import report as report_lib
from memkernel.paths import traces as traces_lib

TRACES_FILE, TRACES_TABLE, HINTS_FILE = "traces.json", "traces.md", "route_hints.npz"
HINT_GATE = 0.5            # Default: a head gets hints if its held-out read hit rate reaches it.
MAX_HIT_QUERIES = 2048     # Per group: the hit rates' sample of odd-row queries.


def collect_reads(model: KernelModel, params, batch: Mapping[str, Any], *, row0: int,
                  min_read: float) -> tuple[traces_lib.Reads, np.ndarray]:
  """One batch's reads above `min_read` and its scored queries per group [groups]."""
  tokens = jnp.asarray(batch["tokens"])
  segments = batch.get("segments")
  segments = None if segments is None else jnp.asarray(segments)
  _, aux = report_lib.reference_forward(model, None)(params, tokens, segments)
  tok = np.asarray(tokens)
  mask = np.asarray(batch["mask"]) > 0
  leaf_size = model.config.leaf_size
  parts: dict[str, list] = {f: [] for f in ("group", "query", "target", "query_token",
                                            "target_token", "target_previous", "salience",
                                            "sequence")}
  routes = [r for r in aux.routes if r is not None]
  heads = routes[0].leaves.shape[2]
  queries = np.zeros(len(routes) * heads, np.int64)
  for layer, route in enumerate(routes):
    leaves = np.asarray(route.leaves)                               # [B, T, H, K]
    weight = np.asarray(route.weights)[..., None] * np.asarray(route.read_probs)   # [B,T,H,K,L]
    active = np.asarray(route.read_active) & mask[:, :, None]       # [B, T, H]
    queries[layer * heads:(layer + 1) * heads] = active.sum(axis=(0, 1))
    ok = (weight > min_read) & (leaves >= 0)[..., None] & active[..., None, None]
    b, t, h, k, j = np.nonzero(ok)
    target = leaves[b, t, h, k] * leaf_size + j
    keep = target <= t                                              # Causal reads only.
    b, t, h, target = b[keep], t[keep], h[keep], target[keep]
    parts["group"].append(layer * heads + h)
    parts["query"].append(t)
    parts["target"].append(target)
    parts["query_token"].append(tok[b, t])
    parts["target_token"].append(tok[b, target])
    parts["target_previous"].append(np.where(target > 0, tok[b, np.maximum(target - 1, 0)], 0))
    parts["salience"].append(weight[ok][keep])
    parts["sequence"].append(row0 + b)
  reads = traces_lib.Reads(**{k: np.concatenate(v).astype(np.float32 if k == "salience"
                                                           else np.int64)
                              for k, v in parts.items()})
  return reads, queries


def shuffled_reads(reads: traces_lib.Reads, rng: np.random.Generator) -> traces_lib.Reads:
  """The reads with their targets permuted among the reads of each group."""
  target = reads.target.copy()
  target_token, target_previous = reads.target_token.copy(), reads.target_previous.copy()
  for g in np.unique(reads.group):
    idx = np.nonzero(reads.group == g)[0]
    perm = rng.permutation(idx)
    target[idx] = reads.target[perm]
    target_token[idx], target_previous[idx] = reads.target_token[perm], reads.target_previous[perm]
  # A permuted target may lie after its query: clamp it to the query (still a causal edge).
  return traces_lib.Reads(reads.group, reads.query, np.minimum(target, reads.query),
                          reads.query_token, target_token, target_previous, reads.salience,
                          reads.sequence)


def build(per_batch: Sequence[tuple[traces_lib.Reads, np.ndarray]], keying: str, *,
          geometry: Mapping[str, int], groups: int, quota: int,
          keep=None) -> traces_lib.ReadTraces:
  """A trace over the batches' reads (`keep(reads) -> bool mask` selects some of them)."""
  trace = traces_lib.ReadTraces(groups, traces_lib.edge_space(keying, **geometry), quota=quota)
  for reads, queries in per_batch:
    if keep is not None:
      reads = reads.select(keep(reads))
    trace.update(reads.group, traces_lib.edge_ids(reads, keying, **geometry), reads.salience,
                 queries)
  return trace


def read_targets(per_batch, leaf_size: int, rng: np.random.Generator
                  ) -> dict[tuple[int, int, int], int]:
  """Per odd-row (sequence, group, query): the leaf the model read most; a sample of at most
  MAX_HIT_QUERIES per group."""
  out: dict[tuple[int, int, int], int] = {}
  for reads, _ in per_batch:
    odd = reads.select(reads.sequence % 2 == 1)
    mass: dict[tuple[int, int, int], dict[int, float]] = {}
    for g, s, q, t, w in zip(odd.group, odd.sequence, odd.query, odd.target, odd.salience):
      leaves = mass.setdefault((int(s), int(g), int(q)), {})
      leaves[int(t) // leaf_size] = leaves.get(int(t) // leaf_size, 0.0) + float(w)
    for key, leaves in mass.items():
      out[key] = max(leaves, key=leaves.get)
  return _sample(out, rng)


def _answer_targets(data, batch_size: int, groups: int, leaf_size: int,
                    rng: np.random.Generator, *, odd_only: bool
                    ) -> dict[tuple[int, int, int], int]:
  """Per scored (sequence, query) of a recall probe, for every group: the leaf of the query
  token's previous occurrence (where the answer sits); odd rows only with `odd_only`."""
  out: dict[tuple[int, int, int], int] = {}
  for i, batch in enumerate(data):
    tok, mask = np.asarray(batch["tokens"]), np.asarray(batch["mask"]) > 0
    for r in range(tok.shape[0]):
      sequence = i * batch_size + r
      if odd_only and sequence % 2 == 0:
        continue
      for q in np.nonzero(mask[r])[0]:
        earlier = np.nonzero(tok[r, :q] == tok[r, q])[0]
        if len(earlier):
          for g in range(groups):
            out[(sequence, g, int(q))] = int(earlier[-1]) // leaf_size
  return _sample(out, rng)


def _sample(targets: Mapping[tuple[int, int, int], int], rng: np.random.Generator
            ) -> dict[tuple[int, int, int], int]:
  sample: dict[tuple[int, int, int], int] = {}
  for g in sorted({k[1] for k in targets}):
    keys = [k for k in targets if k[1] == g]
    for i in rng.permutation(len(keys))[:MAX_HIT_QUERIES]:
      sample[keys[i]] = targets[keys[i]]
  return sample


def tokens_by_row(data, batch_size: int) -> dict[int, np.ndarray]:
  return {i * batch_size + r: row for i, batch in enumerate(data)
          for r, row in enumerate(np.asarray(batch["tokens"]))}


def _hits(fit, fit_shuffled, keying: str, tokens, targets, *, leaf_size: int,
          vocab_size: int) -> dict[str, Any]:
  hit = traces_lib.hit_rate(fit, keying, tokens, targets, leaf_size=leaf_size,
                            vocab_size=vocab_size)
  shuffled = traces_lib.hit_rate(fit_shuffled, keying, tokens, targets, leaf_size=leaf_size,
                                 vocab_size=vocab_size)
  hit["shuffled"], hit["shuffled_groups"] = shuffled["trace"], shuffled["groups"]
  return hit


def traces_experiment(experiment, params_by_step: Mapping[int, Any], *, batches: int,
                      quota: int = 2048, top: int = 64, min_read: float = 0.02,
                      lengths: Sequence[int] = (), batch_size: Optional[int] = None,
                      seed: Optional[int] = None) -> dict[str, Any]:
  """The study on `batches` batches, for the checkpoints of `params_by_step` (the last one is
  the run's state the traces describe; the first, if different, is the earlier step). On a
  recall probe, `lengths` (longer than the run's) also score the traces built at the training
  length on the answer leaves of sequences that long (`transfer`: no forward needed)."""
  if not experiment.family.routes:
    raise ValueError(f"read traces need a memory-kernel run; this run trains the "
                     f"{experiment.model_type!r} family, which does not route")
  for name, value in (("batches", batches), ("quota", quota), ("top", top)):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise ValueError(f"{name} must be a positive integer, got {value!r}")
  if not 0.0 <= min_read < 1.0:
    raise ValueError(f"min_read must be in [0, 1), got {min_read}")
  task = experiment.task
  recall_probe = not text_task.is_text(task)
  bad = [length for length in lengths if not isinstance(length, int) or length <= task.seq_len]
  if bad:
    raise ValueError(f"lengths must be integers longer than the run's {task.seq_len}, got {bad}")
  if lengths and not recall_probe:
    raise ValueError("lengths: the transfer needs a recall probe (answers where the query "
                     "token occurred before); text has none")
  batch_size = batch_size or experiment.eval.batch_size
  if batch_size < 2:
    raise ValueError("read traces compare even and odd rows: batch_size must be at least 2")
  seed = experiment.train.seed if seed is None else seed
  model = KernelModel(experiment.model_for_length(task.seq_len))
  leaf_size, vocab_size = model.config.leaf_size, task.vocab_size
  data = report_lib.study_batches(task, seed, batches, batch_size)
  tokens = tokens_by_row(data, batch_size)
  steps = sorted(params_by_step)
  reads_by_step = {step: [collect_reads(model, params_by_step[step], batch,
                                        row0=i * batch_size, min_read=min_read)
                          for i, batch in enumerate(data)]
                   for step in (steps[0], steps[-1])}
  per_batch = reads_by_step[steps[-1]]
  groups = len(per_batch[0][1])
  geometry = dict(leaf_size=leaf_size, seq_len=task.seq_len, vocab_size=vocab_size)
  rng = np.random.default_rng(seed)
  shuffled = [(shuffled_reads(r, rng), q) for r, q in per_batch]
  even, odd = (lambda r: r.sequence % 2 == 0), (lambda r: r.sequence % 2 == 1)
  targets = {"read": read_targets(per_batch, leaf_size, rng)}
  if recall_probe:
    targets["answer"] = _answer_targets(data, batch_size, groups, leaf_size, rng, odd_only=True)
  long_data = {}
  for length in lengths:
    long_task = dataclasses.replace(task, seq_len=length)
    batch = report_lib.study_batches(long_task, seed, batches, batch_size)
    long_data[length] = (tokens_by_row(batch, batch_size),
                         _answer_targets(batch, batch_size, groups, leaf_size, rng,
                                         odd_only=False))
  report: dict[str, Any] = {
      "task": task.to_dict(), "batches": batches, "batch_size": batch_size, "seed": seed,
      "steps": [steps[0], steps[-1]], "quota": quota, "top": top, "min_read": min_read,
      "groups": groups, "heads": model.config.num_route_heads,
      "reads": int(sum(len(r) for r, _ in per_batch)),
      "queries_per_group": int(sum(q for _, q in per_batch).mean()), "keyings": {}}
  for keying in traces_lib.KEYINGS:
    def make(source, keep=None):
      return build(source, keying, geometry=geometry, groups=groups, quota=quota, keep=keep)
    full = make(per_batch)
    fit, fit_shuffled = make(per_batch, even), make(shuffled, even)
    cell: dict[str, Any] = {
        "edge_space": full.shape[1], "edges_held": full.edges_held() // groups,
        "bytes": full.bytes_held(), "quota_bytes": groups * quota * traces_lib.BYTES_PER_EDGE,
        "overlap": {
            "sequences": traces_lib.overlap(fit, make(per_batch, odd), top),
            "queries": traces_lib.overlap(make(per_batch, lambda r: r.query % 2 == 0),
                                          make(per_batch, lambda r: r.query % 2 == 1), top),
            "steps": traces_lib.overlap(make(reads_by_step[steps[0]]), full, top),
            "shuffled": traces_lib.overlap(fit, make(shuffled, odd), top)},
        "hit": {name: _hits(fit, fit_shuffled, keying, tokens, target, leaf_size=leaf_size,
                            vocab_size=vocab_size)
                for name, target in targets.items()}}
    if keying == "context":
      report["hints"] = {"read_hit": cell["hit"]["read"]["groups"], "tables": {
          "trace": hint_table(full, vocab_size), "shuffled": hint_table(make(shuffled),
                                                                        vocab_size)}}
    if keying != "position":        # Position edges do not exist beyond the training length.
      cell["transfer"] = {str(length): _hits(fit, fit_shuffled, keying, long_tokens, target,
                                             leaf_size=leaf_size, vocab_size=vocab_size)
                          for length, (long_tokens, target) in long_data.items()}
    report["keyings"][keying] = cell
  return report


def hint_table(trace: traces_lib.ReadTraces, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
  """A context-keyed trace as routing hints: per group and query token, the token whose
  followers the query read most (-1: none) and that edge's strength over the group's strongest
  (in [0, 1]). (token int32, weight float32), each [groups, vocab]."""
  m = trace.strength.reshape(trace.shape[0], vocab_size, vocab_size)
  token = np.argmax(m, axis=2).astype(np.int32)
  strength = np.max(m, axis=2)
  top = np.maximum(strength.max(axis=1, keepdims=True), 1e-30)
  on = strength > 0
  return np.where(on, token, -1).astype(np.int32), np.where(on, strength / top, 0.0).astype(
      np.float32)


def save_hint_table(path: str, tables: Mapping[str, tuple[np.ndarray, np.ndarray]],
                    read_hit: Sequence[float]) -> None:
  """Writes the hint tables (`hint_table`; names 'trace', 'shuffled') and each group's
  held-out read hit rate (the gate's measure) to an .npz, atomically."""
  arrays = {"read_hit": np.asarray(read_hit, np.float32)}
  for name, (token, weight) in tables.items():
    arrays[f"{name}_token"], arrays[f"{name}_weight"] = token, weight
  tmp = path + ".tmp.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, path)


def load_hint_table(path: str, table: str = "trace", alpha: float = 1.0,
                    gate: float = HINT_GATE) -> tuple[np.ndarray, np.ndarray]:
  """(token, alpha * weight) of one table in a `save_hint_table` file, with the groups whose
  trace predicted the leaf read on fewer than `gate` of the held-out queries switched off."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no route hints file at {path} (experiments.traces writes "
                            f"WORKDIR/{HINTS_FILE})")
  if not 0.0 <= gate <= 1.0:
    raise ValueError(f"gate must be in [0, 1], got {gate}")
  with np.load(path) as data:
    if f"{table}_token" not in data or "read_hit" not in data:
      names = sorted(k[:-len("_token")] for k in data.files if k.endswith("_token"))
      raise ValueError(f"{path} has no {table!r} table with read hit rates (it has {names}); "
                       "rerun experiments.traces")
    on = (data["read_hit"] >= gate)[:, None]
    return (np.where(on, data[f"{table}_token"], -1).astype(np.int32),
            np.where(on, alpha * data[f"{table}_weight"], 0.0).astype(np.float32))


def format_table(report: Mapping[str, Any]) -> str:
  """The report as markdown: one row per keying, then each keying's hit rates per head."""
  cells = report["keyings"]
  targets = list(next(iter(cells.values()))["hit"])
  lengths = list(next(iter(cells.values())).get("transfer", {}))
  lines = [f"## {report['task']['name']}: read traces ({report['reads']:,} reads over "
           f"{report['queries_per_group']:,} scored queries per head; steps "
           f"{report['steps'][0]} and {report['steps'][1]}; top {report['top']} edges, quota "
           f"{report['quota']})", "",
           "| keying | edges held / space | bytes (quota) | overlap: sequences | queries | steps | "
           "shuffled | " + " | ".join(f"hit {t}: trace / shuffled / chance" for t in targets)
           + "".join(f" | answer at {int(n):,}: trace / shuffled / chance" for n in lengths)
           + " |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
           + " ---: |" * (len(targets) + len(lengths))]

  def triple(h):
    return f"{h['trace']:.3f} / {h['shuffled']:.3f} / {h['chance']:.3f}"

  for keying, c in cells.items():
    o = c["overlap"]
    hits = " | ".join(triple(c["hit"][t]) for t in targets)
    transfer = "".join(f" | {triple(c['transfer'][n])}" if n in c.get("transfer", {}) else " | -"
                       for n in lengths)
    lines.append(f"| {keying} | {c['edges_held']:,} / {c['edge_space']:,} | {c['bytes']:,} "
                 f"({c['quota_bytes']:,}) | {o['sequences']:.3f} | {o['queries']:.3f} | "
                 f"{o['steps']:.3f} | {o['shuffled']:.3f} | {hits}{transfer} |")
  groups, heads = report["groups"], report["heads"]
  lines += ["", "Hit rates per head (layer, head), traces built on the even rows:", "",
            "| keying | target | " + " | ".join(f"L{g // heads}H{g % heads}"
                                              for g in range(groups))
            + " |", "| --- | --- |" + " ---: |" * groups]
  for keying, c in cells.items():
    rows = [(t, c["hit"][t]) for t in targets]
    rows += [(f"answer at {int(n):,}", c["transfer"][n]) for n in c.get("transfer", {})]
    for name, h in rows:
      lines.append(f"| {keying} | {name} | " + " | ".join(f"{x:.3f}" for x in h["groups"])
                   + " |")
  return "\n".join(lines) + "\n"


def traces_run(workdir: str, *, batches: int = 4, steps: Optional[Sequence[int]] = None,
               quota: int = 2048, top: int = 64, min_read: float = 0.02,
               lengths: Sequence[int] = (), write: bool = True,
               command: Optional[str] = None) -> dict[str, Any]:
  """`traces_experiment` on a run's checkpoints (`steps`: the earlier and the studied one;
  default the oldest and the newest kept); with `write`, `traces.json` and `traces.md`."""
  experiment = runs.load_experiment(workdir)
  if not experiment.family.routes:   # Before any array is read.
    raise ValueError(f"{workdir} holds a {experiment.model_type!r} run; read traces need a "
                     "memory-kernel run")
  kept = runs.checkpoint_steps(workdir)
  missing = sorted(set(steps or ()) - set(kept))
  if missing:
    raise ValueError(f"steps {missing} have no committed checkpoint in {workdir} (kept: {kept})")
  steps = list(steps) if steps else kept
  if not steps:
    raise FileNotFoundError(f"no committed checkpoint in {workdir}")
  chosen = sorted({min(steps), max(steps)})
  params = {step: runs.load_run(workdir, step)[1] for step in chosen}
  report = traces_experiment(experiment, params, batches=batches, quota=quota, top=top,
                             min_read=min_read, lengths=lengths)
  report["workdir"] = workdir
  if command:
    report["command"] = command
  hints = report.pop("hints")
  report["hint_heads"] = [h >= HINT_GATE for h in hints["read_hit"]]
  if write:
    save_hint_table(os.path.join(workdir, HINTS_FILE), hints["tables"], hints["read_hit"])
    runs.write_json(os.path.join(workdir, TRACES_FILE), report)
    runs.write_text(os.path.join(workdir, TRACES_TABLE), format_table(report))
  return report

"""Evaluation: fresh batches from the evaluation seed stream, at any length, for any family.

The evaluation batches come from their own seed stream (never training batches), with the
evaluation beam and no teacher; the same batches for every call with the same seed. The parallel
form scores a whole batch in one call; for lengths whose parallel form does not fit in memory,
`chunk` runs the recurrent form (`module.scan`) over chunks of the sequence with the memory
carried, which holds the logits of one chunk at a time and agrees with the parallel form.
"""

from __future__ import annotations

import functools
import resource
import sys
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from memkernel import experiment as experiment_lib
from memkernel import family as family_lib
from memkernel import metrics as metrics_lib
from memkernel import probes
from memkernel import text_task
from memkernel.experiment import Experiment


def make_mesh() -> Mesh:
  """A 1-D mesh with axis 'data' over every local device."""
  return Mesh(np.asarray(jax.devices()), ("data",))


@functools.lru_cache(maxsize=8)
def _generate_fn(mesh: Mesh):
  """The jitted `generate(task, key, batch_size)`, its batch sharded along 'data' over `mesh`
  (over every process's devices in a multi-process run: each computes its own rows).

  Batches are generated outside the model's compiled step: generating a long batch compiles for
  seconds, once per task and length, and the step is then shared by every task, seed and run of
  one model configuration.
  """
  return jax.jit(probes.generate, static_argnums=(0, 2),
                 out_shardings=NamedSharding(mesh, P("data")))


_generate_one_device = jax.jit(probes.generate, static_argnums=(0, 2))


def hints_for(tokens_BT: jax.Array, table: tuple[jax.Array, jax.Array], num_layers: int
              ) -> tuple[jax.Array, jax.Array]:
  """Per-query routing hints from a table of (token, weight) [layers * heads, V] by query token
  (`memkernel.paths.trace_study.hint_table`): (token, weight) [B, T, layers, H]."""
  token_GV, weight_GV = table
  g = token_GV.shape[0]

  def per_query(x_GV):
    x = x_GV[:, tokens_BT]                                        # [G, B, T]
    return jnp.moveaxis(x, 0, -1).reshape(tokens_BT.shape + (num_layers, g // num_layers))

  return per_query(token_GV), per_query(weight_GV)


@functools.lru_cache(maxsize=64)
def _metrics_fn(model_config: Any, oracle: bool, interventions: Any, mesh: Mesh,
                hinted: bool = False):
  """The jitted `metrics(params, batch)` of one model configuration; with `hinted`,
  `metrics(params, batch, hint_table)` (`hints_for`)."""
  model = family_lib.build(model_config)
  batch_sharding = NamedSharding(mesh, P("data"))
  replicated = NamedSharding(mesh, P())

  def metrics(params, batch, table=None):
    hints = None if table is None else hints_for(batch["tokens"], table, model_config.num_layers)
    return metrics_lib.forward_metrics(model, params, batch, train=False, oracle=oracle,
                                       interventions=interventions, route_hints=hints)[1]

  if hinted:
    return jax.jit(metrics, in_shardings=(replicated, batch_sharding, replicated),
                   out_shardings=replicated)
  return jax.jit(metrics, in_shardings=(replicated, batch_sharding), out_shardings=replicated)


def evaluate(experiment: Experiment, params, *, lengths: Optional[Sequence[int]] = None,
             interventions: Any = None, mesh: Optional[Mesh] = None,
             chunk: Optional[int] = None, progress: bool = False,
             route_hints: Optional[tuple[Any, Any]] = None) -> dict[str, dict[str, float]]:
  """Evaluates `params` on `eval.batches` fresh batches at each length (evaluation beam).

  The batches come from the evaluation seed stream `eval.stream` ('test' or 'validation';
  `experiment.eval_key`, batch i from `fold_in(key, i)`), so they are never training batches and
  every call with the same seed and stream sees the same ones.

  Args:
    experiment: the run's experiment (its model at each length, task, eval settings and seed).
    params: the parameters.
    lengths: sequence lengths (default `eval.lengths`).
    interventions: the family's run-time ablations (e.g. `memkernel.Interventions`; None: none).
    mesh: the devices the batch is sharded over (default: every local device; the parallel
      form only).
    chunk: None: the parallel form. A positive number of tokens: the recurrent form over chunks
      of that many tokens, the memory carried (one device; no oracle routes). Its metrics are the
      loss, accuracy and routing recall (all heads, each head, and the query-blind baselines).
    progress: print a line per batch to stderr (long lengths take minutes per batch).
    route_hints: optional (token, weight) tables [layers * heads, vocab]: every routing head
      favours the nodes holding a token that follows the hint its query token looks up
      (`hints_for`; a kernel run, a synthetic probe; either form).

  Returns:
    {str(length): {metric: mean over batches}} with the metrics of `forward_metrics`; `queries`
    is the number of scored positions and `accuracy_se` the accuracy's standard error over them.
    For a text task the metrics of `text_task.summarize` (bits per byte, long-range recall).
  """
  if interventions is not None and not experiment.family.sources(experiment.model):
    raise ValueError(f"interventions drop memory sources; the {experiment.model_type!r} family "
                     "declares none")
  ev = experiment.eval
  if chunk is not None:
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk <= 0:
      raise ValueError(f"chunk must be a positive integer number of tokens, got {chunk!r}")
    if ev.oracle:
      raise ValueError("oracle routes are fed to the parallel form only; evaluate them without "
                       "chunk")
  if route_hints is not None:
    if not experiment.family.routes:
      raise ValueError(f"route_hints bias routing; the {experiment.model_type!r} family does "
                       "not route")
    if text_task.is_text(experiment.task):
      raise ValueError("route_hints are fed to synthetic probes only")
    want = (experiment.model.num_layers * experiment.model.num_route_heads,
            experiment.task.vocab_size)
    if any(tuple(np.shape(x)) != want for x in route_hints):
      raise ValueError(f"route_hints tables must be [layers * heads, vocab] = {list(want)}, got "
                       f"{[list(np.shape(x)) for x in route_hints]}")
    route_hints = (jnp.asarray(route_hints[0], jnp.int32),
                   jnp.asarray(route_hints[1], jnp.float32))
  mesh = mesh or make_mesh()
  if text_task.is_text(experiment.task):
    return _evaluate_text(experiment, params, lengths or ev.lengths, interventions, mesh,
                          chunk, progress)
  key = experiment_lib.eval_key(experiment.train.seed, ev.stream)
  results = {}
  for length in lengths or ev.lengths:
    start = time.perf_counter()
    model_config = experiment.model_for_length(length)
    task = experiment.task_for_length(length)
    per_batch = []
    for i in range(ev.batches):
      batch_key = jax.random.fold_in(key, i)
      if chunk is None:
        batch = _generate_fn(mesh)(task, batch_key, ev.batch_size)
        if route_hints is None:
          per_batch.append(_metrics_fn(model_config, ev.oracle, interventions, mesh)(params,
                                                                                     batch))
        else:
          per_batch.append(_metrics_fn(model_config, ev.oracle, interventions, mesh, True)(
              params, batch, route_hints))
      else:
        batch = _generate_one_device(task, batch_key, ev.batch_size)
        per_batch.append(_recurrent_metrics(model_config, params, batch, chunk, interventions,
                                            route_hints))
      if progress:
        print(f"  length {length}: batch {i + 1}/{ev.batches}, "
              f"{time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    results[str(length)] = _summary(jax.device_get(per_batch))
  return results


@functools.lru_cache(maxsize=16)
def _text_sums_fn(model_config: Any, interventions: Any, mesh: Mesh):
  """The jitted `sums(params, batch)` of one model configuration on text
  (`text_task.position_sums`)."""
  model = family_lib.build(model_config)

  def sums(params, batch):
    logits, _ = model.apply({"params": params}, batch["tokens"], batch["segments"],
                            interventions=interventions)
    return text_task.position_sums(logits, batch)

  return jax.jit(sums, in_shardings=(NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))),
                 out_shardings=NamedSharding(mesh, P()))


def _evaluate_text(experiment: Experiment, params, lengths: Sequence[int], interventions: Any,
                   mesh: Mesh, chunk: Optional[int], progress: bool
                   ) -> dict[str, dict[str, float]]:
  """`evaluate` on a text task: the first `eval.batches` batches of the `eval.stream` split at
  each length (`text_task.eval_batches`): bits per byte overall and by context position, and
  long-range recall (`text_task.long_range_labels`, labelled on the host). With `chunk`, the
  recurrent form over chunks of the sequence (one device), summing the chunks' sums."""
  ev = experiment.eval
  results = {}
  for length in lengths:
    start = time.perf_counter()
    task = experiment.task_for_length(length)
    model_config = experiment.model_for_length(length)
    per_batch = []
    for i, batch in enumerate(text_task.eval_batches(task, ev.stream, ev.batch_size,
                                                     ev.batches)):
      batch["recall"] = text_task.long_range_labels(batch, task)
      if chunk is None:
        run = _text_sums_fn(model_config, interventions, mesh)
        per_batch.append(run(params, text_task.as_global(batch, NamedSharding(mesh, P("data")))))
      else:
        per_batch.append(_recurrent_text_sums(model_config, params, batch, chunk, interventions))
      if progress:
        print(f"  length {length}: batch {i + 1}/{ev.batches}, "
              f"{time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    results[str(length)] = text_task.summarize(jax.device_get(per_batch), length)
  return results


@functools.lru_cache(maxsize=16)
def _text_chunk_fn(model_config: Any, interventions: Any, seq_len: int):
  """The jitted `(params, memory, part, offset) -> (memory', sums)`: the recurrent form over one
  chunk of a text batch and its `text_task.position_sums` (buckets of the whole `seq_len`)."""
  model = family_lib.build(model_config)

  def run(params, memory, part, offset):
    logits, memory = model.apply({"params": params}, part["tokens"], memory, part["segments"],
                                 interventions=interventions, method=model.scan)
    return memory, text_task.position_sums(logits, part, offset=offset, seq_len=seq_len)

  return jax.jit(run, donate_argnums=(1,))


def _recurrent_text_sums(model_config: Any, params, batch, chunk: int,
                         interventions: Any) -> dict[str, np.ndarray]:
  """One text batch's `position_sums` by the recurrent form over chunks, the memory carried:
  the sums of its chunks (per sequence where they are per sequence)."""
  family = family_lib.of_config(model_config)
  length = batch["tokens"].shape[1]
  memory = family.init_memory(model_config, batch["tokens"].shape[0])
  run = _text_chunk_fn(model_config, interventions, length)
  total: dict[str, np.ndarray] = {}
  for begin in range(0, length, chunk):
    part = {k: jnp.asarray(v[:, begin:begin + chunk]) for k, v in batch.items()}
    memory, sums = run(params, memory, part, jnp.int32(begin))
    for k, v in jax.device_get(sums).items():
      total[k] = total[k] + v if k in total else np.asarray(v, np.float64)
  return total


@functools.lru_cache(maxsize=16)
def _chunk_fn(model_config: Any, interventions: Any):
  """The jitted `(params, memory, chunk, hint_table) -> (memory', sums)` of one model
  configuration: the recurrent form over one chunk of a batch (with the routing hints of
  `hint_table`, `hints_for`, where it is not None), and the sums its metrics need; and {layer:
  (heads, leaves per head)} of its routing layers, filled when it traces."""
  model = family_lib.build(model_config)
  slots: dict[int, tuple[int, int]] = {}

  def run(params, memory, part, table):
    hinted = {} if table is None else {
        "route_hints": hints_for(part["tokens"], table, model_config.num_layers)}
    logits, memory, out = model.apply({"params": params}, part["tokens"], memory,
                                      part.get("segments"), interventions=interventions,
                                      return_aux=True, method=model.scan, **hinted)
    mask = part["mask"]
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, part["targets"][..., None], axis=-1)[..., 0]
    sums = {"nll": jnp.sum(nll * mask), "queries": jnp.sum(mask),
            "correct": jnp.sum((jnp.argmax(logits, -1) == part["targets"]) * mask)}
    answers = part["answer_leaves"]
    for i, layer in enumerate(out.routes or ()):
      if layer is None:
        continue
      slots[i] = layer.leaves.shape[2:]                                  # static: (H, K)
      hits, sums["want"] = metrics_lib.routing_hits(layer.leaves, answers, mask)
      sums[f"layer_{i}/routing_recall"] = hits
      for h in range(layer.leaves.shape[2]):
        sums[f"layer_{i}/routing_recall/head_{h}"] = metrics_lib.routing_hits(
            layer.leaves[:, :, h:h + 1], answers, mask)[0]
    return memory, sums

  return jax.jit(run, donate_argnums=(1,)), slots


def _recurrent_metrics(model_config: Any, params, batch, chunk: int, interventions: Any,
                       route_hints: Optional[tuple[Any, Any]] = None) -> dict[str, float]:
  """`forward_metrics`' loss, accuracy and routing recall of one batch, by the recurrent form
  (with `route_hints` tables, `hints_for`: a memory that keeps the tokens' presence)."""
  family = family_lib.of_config(model_config)
  extra = {} if route_hints is None else {"presence": True}
  memory = family.init_memory(model_config, batch["tokens"].shape[0], **extra)
  run, slots = _chunk_fn(model_config, interventions)
  length = batch["tokens"].shape[1]
  total: dict[str, float] = {}
  for begin in range(0, length, chunk):
    part = {k: v[:, begin:begin + chunk] for k, v in batch.items()}
    memory, sums = run(params, memory, part, route_hints)
    for k, v in jax.device_get(sums).items():
      total[k] = total.get(k, 0.0) + float(v)
  queries = max(total["queries"], 1.0)
  out = {"loss": total["nll"] / queries, "accuracy": total["correct"] / queries,
         "queries": total["queries"]}
  want = max(total.get("want", 0.0), 1.0)
  for k, v in total.items():
    if k.startswith("layer_"):
      out[k] = v / want
  for i, (heads, k) in slots.items():
    num_leaves = -(-length // model_config.leaf_size)
    out[f"layer_{i}/routing_recall_blind"] = float(metrics_lib.query_blind_recall(
        batch["answer_leaves"], batch["mask"], heads * k, num_leaves))
    out[f"layer_{i}/routing_recall_blind/head"] = float(metrics_lib.query_blind_recall(
        batch["answer_leaves"], batch["mask"], k, num_leaves))
  return out


def peak_memory_mib() -> dict[str, float]:
  """The process's peak resident memory so far, and the first device's peak where it reports one
  (accelerators), in MiB."""
  out = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
  stats = jax.devices()[0].memory_stats()
  if stats and "peak_bytes_in_use" in stats:
    out["peak_device_mib"] = stats["peak_bytes_in_use"] / 2**20
  return out


def _summary(per_batch: Sequence[dict]) -> dict[str, float]:
  """Means over batches; `queries` summed, and the accuracy's binomial standard error over them."""
  out = {k: float(np.mean([m[k] for m in per_batch])) for k in per_batch[0]}
  queries = float(np.sum([m["queries"] for m in per_batch]))
  out["queries"] = queries
  p = out["accuracy"]
  out["accuracy_se"] = float(np.sqrt(p * (1.0 - p) / max(queries, 1.0)))
  return out

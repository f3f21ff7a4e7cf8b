"""Reading finished (or running) training runs back: model config and parameters from a workdir.

    model_config, params = load_run("/tmp/mqar")
    model = memkernel.KernelModel(model_config)      # or peers.build_peer for a peer
    logits, aux = model.apply({"params": params}, tokens)

Needs no flags and no config file: the run's full config is stored in every checkpoint.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import json
import numbers
import os
import time
from typing import Any, Mapping, Optional, Sequence

import jax
import ml_collections

from memkernel import checkpoint as checkpoint_lib

from memkernel import optim
from memkernel import experiment as experiment_lib
from memkernel import evaluate as evaluate_lib
from memkernel.kernel.interventions import Interventions


FIXED_TASK_FIELDS = ("name", "vocab_size", "leaf_size", "seq_len")


def latest_step(workdir: str) -> int:
  """The newest committed checkpoint step of a run, resolved once (a live run may commit a newer
  one meanwhile). Raises FileNotFoundError when there is none."""
  checkpointer = checkpoint_lib.Checkpointer(workdir, read_only=True)
  try:
    step = checkpointer.latest_step()
  finally:
    checkpointer.close()
  if step is None:
    raise FileNotFoundError(f"no committed checkpoint in {workdir}")
  return step


def parse_task_overrides(items: Sequence[str], flag: str = "task") -> dict[str, Any]:
  """FIELD=VALUE strings (a command's repeated --task or --model flag) as a dict; values are
  Python literals where they parse as one (`num_pairs=8`), else strings (`distance=uniform`)."""
  task = {}
  for item in items:
    field, sep, value = item.partition("=")
    if not sep or not field:
      raise ValueError(f"--{flag} must be FIELD=VALUE, got {item!r}")
    try:
      task[field] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      task[field] = value
  return task


def with_task(experiment: experiment_lib.Experiment,
              task: Optional[Mapping[str, Any]]) -> experiment_lib.Experiment:
  """The experiment with `TaskConfig` fields changed for a trained run; rejects unknown fields
  and those the model fixes (name, vocab_size, leaf_size) or lengths set (seq_len)."""
  task = dict(task or {})
  fixed = sorted(set(task) & set(FIXED_TASK_FIELDS))
  if fixed:
    raise ValueError(f"task fields {fixed} cannot change for a trained run (seq_len: use lengths)")
  known = {f.name for f in dataclasses.fields(experiment.task)}
  unknown = sorted(set(task) - known)
  if unknown:
    raise ValueError(f"unknown task field(s) {unknown}; known: {sorted(known)}")
  return dataclasses.replace(experiment, task=dataclasses.replace(experiment.task, **task))


def with_memory(experiment: experiment_lib.Experiment,
                memory: Optional[Mapping[str, Any]]) -> experiment_lib.Experiment:
  """The experiment with model-config fields of its memory changed for a trained run (the
  family's `memory_fields`: no parameter depends on them); rejects every other field."""
  memory = dict(memory or {})
  allowed = experiment.family.memory_fields
  refused = sorted(set(memory) - set(allowed))
  if refused:
    raise ValueError(f"model field(s) {refused} cannot change for a trained "
                     f"{experiment.model_type} run; an evaluation may change "
                     f"{sorted(allowed) if allowed else 'none of its fields'}")
  if not memory:
    return experiment
  return dataclasses.replace(  # The config validates the values.
      experiment, model=dataclasses.replace(experiment.model, **memory))


def write_text(path: str, text: str) -> None:
  """Writes `text` through a temporary file, so a crash leaves no half-written file."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def write_json(path: str, value: Any) -> None:
  """Writes `value` as JSON, atomically (`write_text`)."""
  write_text(path, json.dumps(value, indent=1))


def load_experiment(workdir: str, step: Optional[int] = None) -> experiment_lib.Experiment:
  """The validated experiment config saved with a checkpoint (default: the newest)."""
  checkpointer = checkpoint_lib.Checkpointer(workdir, read_only=True)
  try:
    config = checkpointer.restore_meta(step)["config"]
  finally:
    checkpointer.close()
  return experiment_lib.parse_config(ml_collections.ConfigDict(config))


def checkpoint_steps(workdir: str) -> list[int]:
  """The steps of a run's committed checkpoints, oldest first."""
  checkpointer = checkpoint_lib.Checkpointer(workdir, read_only=True)
  try:
    return checkpointer.all_steps()
  finally:
    checkpointer.close()


def load_run(workdir: str, step: Optional[int] = None) -> tuple[Any, Any]:
  """Loads a run's model config and parameters.

  Safe beside a live training process: only committed checkpoints are read.

  Args:
    workdir: the run's `--workdir`.
    step: the checkpoint step; None means the newest committed one.

  Returns:
    (model_config, params): a `KernelConfig` (kernel) or `PeerConfig` (peers) with the capacity the
    model was trained at (use `dataclasses.replace(model_config, max_seq_len=...)` for longer
    inputs), and the parameter pytree for `model.apply({"params": params}, ...)`.

  Raises:
    FileNotFoundError: no committed checkpoint (at `step`) in `workdir`.
  """
  checkpointer = checkpoint_lib.Checkpointer(workdir, read_only=True)
  try:
    if step is None:  # Resolved once: a live run may commit a newer step meanwhile.
      step = checkpointer.latest_step()
      if step is None:
        raise FileNotFoundError(f"no committed checkpoint in {workdir}")
    config = checkpointer.restore_meta(step)["config"]
    experiment = experiment_lib.parse_config(ml_collections.ConfigDict(config))
    abstract = jax.eval_shape(functools.partial(optim.init_state, experiment))
    state, _ = checkpointer.restore(step, abstract_state=abstract)
  finally:
    checkpointer.close()
  return experiment.model, state.params


def evaluate_run(workdir: str, *, lengths: Optional[Sequence[int]] = None,
                 task: Optional[Mapping[str, Any]] = None, batches: Optional[int] = None,
                 step: Optional[int] = None, beam_width: Optional[int] = None,
                 stream: Optional[str] = None,
                 search_width: Optional[int] = None,
                 node_reps: Optional[int] = None, batch_size: Optional[int] = None,
                 chunk: Optional[int] = None, progress: bool = False,
                 drop: Sequence[str] = (),
                 route_hints: Optional[tuple[Any, Any]] = None,
                 memory: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
  """Evaluates a trained run again, at other lengths, on another setting of its task, or with
  another routing beam.

  The run's own evaluation (`train.evaluate`: its eval seed stream, batch size and beam) with
  these changes; everything is validated before anything compiles. A wider beam at a longer
  length separates near misses (the answer leaf ranked just outside the trained beam) from
  lost answers: the parameters do not depend on the beam, and the cost per token grows with K.

  Args:
    workdir: the run's `--workdir`.
    lengths: sequence lengths, each positive (None: the run's `eval.lengths`).
    task: `TaskConfig` fields to change, e.g. {"distance": "uniform"} for MQAR (not name,
      vocab_size, leaf_size or seq_len: the model fixes the first three, `lengths` the last).
    batches: evaluation batches per length (default: the run's `eval.batches`).
    step: the checkpoint step (default: the newest).
    beam_width: leaves each routing head selects (K; default: the run's `model.beam_width`).
      Kernel runs only.
    stream: the evaluation stream, 'test' or 'validation' (default: the run's `eval.stream`).
    search_width: nodes each head's beam keeps per routing step (S >= K, the same K leaves
      read; default: the run's `model.search_width`). Kernel runs with the leaf re-rank only.
    node_reps: representative keys per tree node the router scores nodes by (M; 0: the pooled
      summary keys; default: the run's `model.node_reps`). Kernel runs only.
    batch_size: sequences per evaluation batch (default: the run's `eval.batch_size`); 1 with
      `chunk` for the longest lengths.
    chunk: None: the parallel form; a positive number of tokens: the recurrent form over chunks
      of that many tokens, the memory carried (`evaluate.evaluate(chunk=)`), for lengths whose
      parallel form does not fit in memory.
    progress: print a line per batch to stderr.
    drop: memory sources to switch off (names from the family's `sources`), the run-time
      ablation of what each memory contributes.
    route_hints: optional (token, weight) tables [layers * heads, vocab] biasing each routing
      head toward what follows its query token's hint (`evaluate.evaluate(route_hints=)`; the
      tables `experiments.traces` writes). Kernel runs, either form.
    memory: model-config fields of the memory to change (the family's `memory_fields`, e.g.
      {"em_items": 32} for a brain-core run: capacity without retraining).

  Returns:
    {"step", "task", "drop", "beam_width", "search_width" and "node_reps" (None for a peer), "stream",
    "memory" (the memory fields changed),
    "batch_size", "chunk", "cost": {str(length): {"wall_s" (compiles included), "peak_rss_mib"
    (the process's peak so far) and, on an accelerator, "peak_device_mib"}}, "lengths":
    {str(length): {metric: mean over batches}}}.

  Raises:
    ValueError: an unknown or fixed task field, an invalid value, or a beam for a peer (named).
  """
  experiment = with_memory(with_task(load_experiment(workdir, step), task), memory)
  for name, value, least in (("beam_width", beam_width, 1), ("search_width", search_width, 1),
                             ("node_reps", node_reps, 0)):
    if value is None:
      continue
    if not experiment.family.routes:
      raise ValueError(f"{name} applies to kernel runs; {workdir} is a "
                       f"{experiment.model_type} run")
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
      kind = "a positive" if least else "a non-negative"
      raise ValueError(f"{name} must be {kind} integer, got {value!r}")
    experiment = dataclasses.replace(   # KernelConfig validates the combination.
        experiment, model=dataclasses.replace(experiment.model, **{name: value}))
  drop = tuple(drop)
  sources = experiment.family.sources(experiment.model)
  unknown = [s for s in drop if s not in sources]
  if unknown:
    raise ValueError(f"drop names {unknown}, not sources of this {experiment.model_type} run "
                     f"(its sources: {list(sources)})")
  interventions = Interventions(drop=drop) if drop else None
  ev = experiment.eval
  for name, value in (("batches", batches), ("batch_size", batch_size)):
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                              or value <= 0):
      raise ValueError(f"{name} must be a positive integer, got {value!r}")
  if batches is not None:
    ev = dataclasses.replace(ev, batches=batches)
  if batch_size is not None:
    ev = dataclasses.replace(ev, batch_size=batch_size)
  if stream is not None:
    ev = dataclasses.replace(ev, stream=stream)  # Validated by EvalConfig.
  lengths = ev.lengths if lengths is None else tuple(lengths)
  if not lengths or any(not isinstance(n, numbers.Integral) or isinstance(n, bool) or n <= 0
                        for n in lengths):
    raise ValueError(f"lengths must be positive integers, got {lengths!r}")
  for length in lengths:
    experiment.task_for_length(length)  # Validates the task at every length before compiling.
  experiment = dataclasses.replace(experiment, eval=ev)
  if step is None:
    step = latest_step(workdir)
  _, params = load_run(workdir, step)
  beam = experiment.model.beam_width if experiment.family.routes else None
  search = experiment.model.search(beam) if experiment.family.routes else None
  reps = experiment.model.node_reps if experiment.family.routes else None
  results, cost = {}, {}
  for length in lengths:
    start = time.perf_counter()
    results.update(evaluate_lib.evaluate(experiment, params, lengths=(length,), chunk=chunk,
                                         progress=progress, interventions=interventions,
                                         route_hints=route_hints))
    cost[str(length)] = {"wall_s": time.perf_counter() - start, **evaluate_lib.peak_memory_mib()}
  return {"step": step, "task": dataclasses.asdict(experiment.task), "drop": list(drop),
          "beam_width": beam,
          "search_width": search, "node_reps": reps, "stream": ev.stream,
          "batch_size": ev.batch_size, "chunk": chunk, "memory": dict(memory or {}),
          "cost": cost, "lengths": results}

"""Evaluation: fresh batches from the evaluation seed stream, at any length, for any family.

The evaluation batches come from their own seed stream (never training batches), with the
evaluation beam and no teacher; the same batches for every call with the same seed.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from memkernel import experiment as experiment_lib
from memkernel import family as family_lib
from memkernel import metrics as metrics_lib
from memkernel import probes
from memkernel.experiment import Experiment


def make_mesh() -> Mesh:
  """A 1-D mesh with axis 'data' over every local device."""
  return Mesh(np.asarray(jax.devices()), ("data",))


@functools.lru_cache(maxsize=16)
def _eval_fn(model_config: Any, task: probes.TaskConfig, batch_size: int,
             oracle: bool, mesh: Mesh):
  """The jitted `eval_batch(params, key) -> metrics`; the batch is generated from `key`."""
  model = family_lib.build(model_config)
  batch_sharding = NamedSharding(mesh, P("data"))
  replicated = NamedSharding(mesh, P())

  def eval_batch(params, key):
    batch = probes.generate(task, key, batch_size)
    batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
    return metrics_lib.forward_metrics(model, params, batch, train=False, oracle=oracle)[1]

  return jax.jit(eval_batch, in_shardings=(replicated, replicated), out_shardings=replicated)


def evaluate(experiment: Experiment, params, *, lengths: Optional[tuple[int, ...]] = None,
             mesh: Optional[Mesh] = None) -> dict[str, dict[str, float]]:
  """Evaluates `params` on `eval.batches` fresh batches at each length (evaluation beam).

  The eval batches come from their own seed stream, so they are never training batches; the same
  batches are used for every call with the same seed.

  Returns:
    {str(length): {metric: mean over batches}} with the metrics of `forward_metrics`.
  """
  mesh = mesh or make_mesh()
  ev = experiment.eval
  results = {}
  for length in lengths or ev.lengths:
    step = _eval_fn(experiment.model_for_length(length), experiment.task_for_length(length),
                    ev.batch_size, ev.oracle, mesh)
    key = experiment_lib.eval_key(experiment.train.seed)
    per_batch = jax.device_get([step(params, jax.random.fold_in(key, i))
                                for i in range(ev.batches)])
    results[str(length)] = {k: float(np.mean([m[k] for m in per_batch])) for k in per_batch[0]}
  return results


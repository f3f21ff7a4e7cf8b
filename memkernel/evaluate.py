"""Evaluation: fresh batches from the evaluation seed stream, at any length, for any family.

The evaluation batches come from their own seed stream (never training batches), with the
evaluation beam and no teacher; the same batches for every call with the same seed.
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Sequence

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


# Batches are generated outside the model's compiled step: generating a long batch compiles for
# seconds, once per task and length, and the step is then shared by every task, seed and run of
# one model configuration.
_generate = jax.jit(probes.generate, static_argnums=(0, 2))


@functools.lru_cache(maxsize=64)
def _metrics_fn(model_config: Any, oracle: bool, interventions: Any, mesh: Mesh):
  """The jitted `metrics(params, batch)` of one model configuration."""
  model = family_lib.build(model_config)
  batch_sharding = NamedSharding(mesh, P("data"))
  replicated = NamedSharding(mesh, P())

  def metrics(params, batch):
    return metrics_lib.forward_metrics(model, params, batch, train=False, oracle=oracle,
                                       interventions=interventions)[1]

  return jax.jit(metrics, in_shardings=(replicated, batch_sharding), out_shardings=replicated)


def evaluate(experiment: Experiment, params, *, lengths: Optional[Sequence[int]] = None,
             interventions: Any = None, mesh: Optional[Mesh] = None) -> dict[str, dict[str, float]]:
  """Evaluates `params` on `eval.batches` fresh batches at each length (evaluation beam).

  The batches come from the evaluation seed stream `eval.stream` ('test' or 'validation';
  `experiment.eval_key`, batch i from `fold_in(key, i)`), so they are never training batches and
  every call with the same seed and stream sees the same ones.

  Args:
    experiment: the run's experiment (its model at each length, task, eval settings and seed).
    params: the parameters.
    lengths: sequence lengths (default `eval.lengths`).
    interventions: the family's run-time ablations (e.g. `memkernel.Interventions`; None: none).
    mesh: the devices the batch is sharded over (default: every local device).

  Returns:
    {str(length): {metric: mean over batches}} with the metrics of `forward_metrics`; `queries`
    is the number of scored positions and `accuracy_se` the accuracy's standard error over them.
  """
  if interventions is not None and not experiment.family.sources(experiment.model):
    raise ValueError(f"interventions drop memory sources; the {experiment.model_type!r} family "
                     "declares none")
  mesh = mesh or make_mesh()
  ev = experiment.eval
  key = experiment_lib.eval_key(experiment.train.seed, ev.stream)
  results = {}
  for length in lengths or ev.lengths:
    step = _metrics_fn(experiment.model_for_length(length), ev.oracle, interventions, mesh)
    task = experiment.task_for_length(length)
    per_batch = jax.device_get([
        step(params, _generate(task, jax.random.fold_in(key, i), ev.batch_size))
        for i in range(ev.batches)])
    results[str(length)] = _summary(per_batch)
  return results


def _summary(per_batch: Sequence[dict]) -> dict[str, float]:
  """Means over batches; `queries` summed, and the accuracy's binomial standard error over them."""
  out = {k: float(np.mean([m[k] for m in per_batch])) for k in per_batch[0]}
  queries = float(np.sum([m["queries"] for m in per_batch]))
  out["queries"] = queries
  p = out["accuracy"]
  out["accuracy_se"] = float(np.sqrt(p * (1.0 - p) / max(queries, 1.0)))
  return out

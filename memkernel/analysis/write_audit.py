"""Which candidates the brain-core's write gate lets in: the answers' sources against the rest.

    report = audit_writes(experiment, params, batches=16)
    print(format_report(report))

A probe's answer has a source: the token the question must recall (the value of an MQAR pair,
the passkey; the batch's `answer_sources`). With every token a candidate (`em_writes` =
`span`), the write gate decides for each; this reports per layer the share of answer sources
whose gate is above `em_threshold` (open: stored unless every item is stronger) and the share
of all other candidates, with their mean gates. A selective gate opens for nearly every source
and nearly nothing else; its density is the second share. Batches come from the run's
evaluation stream (`eval.stream`), as in evaluation.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import jax
import numpy as np

from memkernel import experiment as experiment_lib
from memkernel import probes


def audit_writes(experiment: experiment_lib.Experiment, params, *, batches: Optional[int] = None,
                 batch_size: Optional[int] = None) -> dict[str, Any]:
  """Per layer: {'sources_open', 'others_open', 'sources_gate', 'others_gate', 'sources',
  'others'} over `batches` evaluation batches (default `eval.batches`)."""
  config = experiment.model
  if experiment.model_type != "braincore":
    raise ValueError(f"audit_writes reads the brain-core's write gates; this run is a "
                     f"{experiment.model_type!r} run")
  if config.em_writes != config.span:
    raise ValueError(f"audit_writes needs every token a candidate (em_writes = span = "
                     f"{config.span}), got em_writes={config.em_writes}")
  model = experiment.family.build(config)
  ev = experiment.eval
  batches, batch_size = batches or ev.batches, batch_size or ev.batch_size
  gates_fn = jax.jit(lambda p, t, s: model.apply({"params": p}, t, s, method=model.write_gates))
  key = experiment_lib.eval_key(experiment.train.seed, ev.stream)
  sums = [dict(sources_open=0.0, others_open=0.0, sources_gate=0.0, others_gate=0.0,
               sources=0, others=0) for _ in range(config.num_layers)]
  for i in range(batches):
    batch = probes.generate(experiment.task, jax.random.fold_in(key, i), batch_size)
    answer_sources = np.asarray(batch["answer_sources"])
    rows, _, _ = np.nonzero(answer_sources >= 0)  # Row-major, as the boolean index below.
    sources = np.zeros(answer_sources.shape[:2], bool)
    sources[rows, answer_sources[answer_sources >= 0]] = True
    layers = gates_fn(params, batch["tokens"], batch.get("segments"))
    for total, gates_BNC in zip(sums, layers):
      gates = np.asarray(gates_BNC).reshape(batch_size, -1)
      picked = sources[:, :gates.shape[1]]
      for kind, where in (("sources", picked), ("others", ~picked)):
        total[kind] += int(where.sum())
        total[f"{kind}_open"] += float((gates[where] > config.em_threshold).sum())
        total[f"{kind}_gate"] += float(gates[where].sum())
  report = {"threshold": config.em_threshold, "batches": batches, "batch_size": batch_size,
            "stream": ev.stream, "layers": []}
  for total in sums:
    layer = {}
    for kind in ("sources", "others"):
      n = max(total[kind], 1)
      share = total[f"{kind}_open"] / n
      layer.update({kind: total[kind], f"{kind}_open": share,
                    f"{kind}_open_se": math.sqrt(share * (1 - share) / n),
                    f"{kind}_gate": total[f"{kind}_gate"] / n})
    report["layers"].append(layer)
  return report


def format_report(report: dict) -> str:
  lines = [f"write gates above {report['threshold']} ({report['batches']} batches of "
           f"{report['batch_size']}, {report['stream']} stream)",
           "layer   answer sources open ± se (n, mean gate)      other candidates open ± se "
           "(n, mean gate)"]
  for i, layer in enumerate(report["layers"]):
    lines.append(
        f"{i:>5}   {layer['sources_open']:.4f} ± {layer['sources_open_se']:.4f} "
        f"({layer['sources']:,}, {layer['sources_gate']:.3f})      "
        f"{layer['others_open']:.4f} ± {layer['others_open_se']:.4f} "
        f"({layer['others']:,}, {layer['others_gate']:.3f})")
  return "\n".join(lines)

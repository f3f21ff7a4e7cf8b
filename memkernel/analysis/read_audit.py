"""Whether the brain-core's episodic reads find what its writes stored, beside a query-blind read.

    report = audit_reads(experiment, params, batches=16)
    print(format_report(report))

A probe's answer has sources: the tokens the question must recall (the value of an MQAR pair,
the passkey; the batch's `answer_sources`). Every episodic item keeps the stream position of
the token that wrote it (`EpisodicMemory.origin_BM`), so for each scored question and each
layer this counts, over the memory the question's read sees (as its span starts):

- `stored`: every source of the answer is a live item;
- `found`: the question's read (its top k by key) holds every source; `first`: its best item is
  a source;
- `blind`: the k strongest live items hold every source: the read of a router that picks the
  same items for every question, the baseline that `found` must beat to be finding.

Shares of the scored questions with binomial standard errors, `found` among the questions
whose sources are stored, and `stored` and `found` by the age of the fact (the quarters of a
sequence's asked facts by position, oldest first: where a memory too small for its facts
forgets); and `own_span`, the share of questions whose source lies in their own span (written
only when that span ends, after the read, so never stored for them). Needs every token a
candidate (`em_writes` = `span`, so an item's origin is its token) and lengths that are
multiples of the span. Batches come from the run's
evaluation stream (`eval.stream`), as in evaluation.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import jax
import numpy as np

from memkernel import experiment as experiment_lib
from memkernel import probes

KINDS = ("stored", "found", "first", "blind")
AGES = 4  # Quarters of a sequence's facts by where they were written, oldest first.


def _age(b_Q: np.ndarray, source_Q: np.ndarray) -> np.ndarray:
  """int [Q]: the quarter of its sequence's asked facts each question's fact falls in, ordered
  by position (0: the oldest quarter). A fact asked twice counts once per question."""
  age_Q = np.zeros(len(b_Q), np.int64)
  for b in np.unique(b_Q):
    rows = np.nonzero(b_Q == b)[0]
    facts = np.unique(source_Q[rows])
    rank = np.searchsorted(facts, source_Q[rows])
    age_Q[rows] = rank * AGES // len(facts)
  return age_Q


def _holds(sources_QS: np.ndarray, items_QK: np.ndarray) -> np.ndarray:
  """bool [Q]: every source >= 0 of each question is among its items."""
  hit_QS = np.any(sources_QS[:, :, None] == items_QK[:, None, :], axis=-1)
  return np.all(hit_QS | (sources_QS < 0), axis=-1)


def audit_reads(experiment: experiment_lib.Experiment, params, *, batches: Optional[int] = None,
                batch_size: Optional[int] = None,
                seq_len: Optional[int] = None) -> dict[str, Any]:
  """Per layer: the counts and shares of `KINDS` over the scored questions of `batches`
  evaluation batches (default `eval.batches`) at `seq_len` (default the task's)."""
  config = experiment.model
  if experiment.model_type != "braincore":
    raise ValueError(f"audit_reads reads the brain-core's episodic memory; this run is a "
                     f"{experiment.model_type!r} run")
  if not config.has_episodic:
    raise ValueError("audit_reads: the run has no episodic memory (plasticity off or built "
                     "without it)")
  if config.em_writes != config.span:
    raise ValueError(f"audit_reads needs every token a candidate (em_writes = span = "
                     f"{config.span}), got em_writes={config.em_writes}")
  seq_len = seq_len or experiment.task.seq_len
  if seq_len % config.span:
    raise ValueError(f"audit_reads: the length must be a multiple of the span ({config.span}), "
                     f"got {seq_len}")
  model = experiment.family.build(experiment.family.with_capacity(config, seq_len))
  ev = experiment.eval
  batches, batch_size = batches or ev.batches, batch_size or ev.batch_size
  reads_fn = jax.jit(lambda p, t, s: model.apply({"params": p}, t, s,
                                                 method=model.episodic_reads))
  key = experiment_lib.eval_key(experiment.train.seed, ev.stream)
  counts = [dict.fromkeys(KINDS, 0) for _ in range(config.num_layers)]
  by_age = [np.zeros((2, AGES), np.int64) for _ in range(config.num_layers)]  # stored, found
  asked_by_age = np.zeros(AGES, np.int64)
  questions = own_span = 0
  for i in range(batches):
    batch = probes.generate(experiment.task, jax.random.fold_in(key, i), batch_size, seq_len)
    sources_BTS = np.asarray(batch["answer_sources"])
    b_Q, t_Q = np.nonzero(np.any(sources_BTS >= 0, axis=-1))
    sources_QS = sources_BTS[b_Q, t_Q]
    span_Q = t_Q // config.span
    questions += len(t_Q)
    own_span += int(np.any((sources_QS >= 0) & (sources_QS // config.span == span_Q[:, None]),
                           axis=-1).sum())
    age_Q = _age(b_Q, np.max(sources_QS, axis=-1))
    asked_by_age += np.bincount(age_Q, minlength=AGES)
    layers = reads_fn(params, batch["tokens"], batch.get("segments"))
    for count, ages, layer in zip(counts, by_age, layers):
      read_QK = np.asarray(layer["read"])[b_Q, t_Q]
      stored_Q = _holds(sources_QS, np.asarray(layer["live"])[b_Q, span_Q])
      found_Q = _holds(sources_QS, read_QK)
      count["stored"] += int(stored_Q.sum())
      count["found"] += int(found_Q.sum())
      ages[0] += np.bincount(age_Q[stored_Q], minlength=AGES)
      ages[1] += np.bincount(age_Q[found_Q], minlength=AGES)
      count["first"] += int(np.any((sources_QS == read_QK[:, :1]) & (sources_QS >= 0),
                                   axis=-1).sum())
      count["blind"] += int(_holds(sources_QS, np.asarray(layer["blind"])[b_Q, span_Q]).sum())
  report = {"batches": batches, "batch_size": batch_size, "seq_len": seq_len,
            "stream": ev.stream, "questions": questions, "k": config.em_k,
            "items": config.em_items, "own_span": own_span / max(questions, 1), "layers": []}
  n = max(questions, 1)
  report["asked_by_age"] = asked_by_age.tolist()
  for count, ages in zip(counts, by_age):
    layer = {"counts": dict(count),
             "stored_by_age": (ages[0] / np.maximum(asked_by_age, 1)).tolist(),
             "found_by_age": (ages[1] / np.maximum(asked_by_age, 1)).tolist()}
    for kind in KINDS:
      share = count[kind] / n
      layer.update({kind: share, f"{kind}_se": math.sqrt(share * (1 - share) / n)})
    stored = max(count["stored"], 1)
    layer["found_if_stored"] = count["found"] / stored   # Found items are live: <= 1.
    report["layers"].append(layer)
  return report


def format_report(report: dict) -> str:
  lines = [f"episodic reads at {report['seq_len']} tokens: {report['questions']:,} questions "
           f"({report['batches']} batches of {report['batch_size']}, {report['stream']} stream; "
           f"top {report['k']} of {report['items']} items; {report['own_span']:.4f} of them ask for "
           "a token of their own span, written only after the read)",
           "layer   stored ± se        found ± se         first ± se         "
           "query-blind ± se   found if stored"]
  for i, layer in enumerate(report["layers"]):
    cells = "   ".join(f"{layer[k]:.4f} ± {layer[f'{k}_se']:.4f}" for k in KINDS)
    lines.append(f"{i:>5}   {cells}   {layer['found_if_stored']:.4f}")
  lines.append("found by the fact's age (quarters of the asked facts, oldest first; "
               f"{', '.join(f'{n:,}' for n in report['asked_by_age'])} questions)")
  for i, layer in enumerate(report["layers"]):
    lines.append(f"{i:>5}   " + "  ".join(f"{v:.4f}" for v in layer["found_by_age"]))
  return "\n".join(lines)

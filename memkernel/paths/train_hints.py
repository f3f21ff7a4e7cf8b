"""Routing hints while training: the read-trace bias fed back into the run that makes the reads.

With `train.route_hints='traces'` the kernel trains with routing hints (`KernelModel(route_hints=)`)
from a context-keyed read trace of its own reads; with `'shuffled'`, from the same reads with
their targets permuted (the control: the marginal edge frequencies, not the structure). Every
`train.hints_every` steps, `HintRefresher` runs the current parameters without hints on
`train.hints_batches` batches of the training distribution (their own random stream,
`experiment.HINT_STREAM`, so never an evaluation batch), collects the reads
(`trace_study.collect_reads`), builds the trace and its hint table (`trace_study.hint_table`),
and switches off every head whose trace, fitted on the even rows, predicts the leaf the model
read on the odd rows for fewer than `train.hints_gate` of them (as `trace_study.load_hint_table`
does at evaluation). The table is a function of the parameters at the refresh step only, so a run
resumed from a checkpoint on a refresh step (the config requires `ckpt_every` to be a multiple of
`hints_every`) trains exactly as the uninterrupted run.

Hints act on the parallel form, which is the form training uses; evaluation with the trained
run's hints is `experiments.evaluate --route_hints` after `experiments.traces`.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np

from memkernel import experiment as experiment_lib
from memkernel import probes
from memkernel.kernel.model import KernelModel
from memkernel.paths import trace_study
from memkernel.paths import traces as traces_lib

MIN_READ = 0.02       # Reads below this weight are not edges (the study's default).
QUOTA = 2048          # Edges per group (the study's default).


class HintRefresher:
  """`refresh(params, step) -> (table, stats)`: the hint table [groups, V] (token int32, weight
  float32) of the run's own reads at `step`, and what it holds (for the metrics log)."""

  def __init__(self, experiment: experiment_lib.Experiment):
    train, task = experiment.train, experiment.task
    self._mode = train.route_hints
    self._model = KernelModel(experiment.model_for_length(task.seq_len))
    self._task, self._train = task, train
    self._key = experiment_lib.root_key(train.seed, experiment_lib.HINT_STREAM)
    self._groups = self._model.config.num_layers * self._model.config.num_route_heads
    self._geometry = dict(leaf_size=self._model.config.leaf_size, seq_len=task.seq_len,
                          vocab_size=task.vocab_size)

  def empty(self) -> tuple[np.ndarray, np.ndarray]:
    """The table of no hints (the state before the first refresh)."""
    shape = (self._groups, self._task.vocab_size)
    return np.full(shape, -1, np.int32), np.zeros(shape, np.float32)

  def refresh(self, params, step: int) -> tuple[tuple[np.ndarray, np.ndarray], dict[str, Any]]:
    train = self._train
    key = jax.random.fold_in(self._key, step)
    data = [probes.generate(self._task, jax.random.fold_in(key, i), train.batch_size)
            for i in range(train.hints_batches)]
    per_batch = [trace_study.collect_reads(self._model, params, batch,
                                           row0=i * train.batch_size, min_read=MIN_READ)
                 for i, batch in enumerate(data)]
    rng = np.random.default_rng([train.seed, step])
    build = lambda source, keep=None: trace_study.build(
        source, "context", geometry=self._geometry, groups=self._groups, quota=QUOTA, keep=keep)
    fit = build(per_batch, lambda r: r.sequence % 2 == 0)
    held_out = traces_lib.hit_rate(
        fit, "context", trace_study.tokens_by_row(data, train.batch_size),
        trace_study.read_targets(per_batch, self._geometry["leaf_size"], rng),
        leaf_size=self._geometry["leaf_size"], vocab_size=self._task.vocab_size)
    read_hit = np.zeros(self._groups, np.float32)
    read_hit[:len(held_out["groups"])] = held_out["groups"]
    if self._mode == "shuffled":
      per_batch = [(trace_study.shuffled_reads(r, rng), q) for r, q in per_batch]
    token, weight = trace_study.hint_table(build(per_batch), self._task.vocab_size)
    on = (read_hit >= train.hints_gate)[:, None]
    table = (np.where(on, token, -1).astype(np.int32),
             np.where(on, train.hints_alpha * weight, 0.0).astype(np.float32))
    stats = {"hints/heads_on": float(on.mean()), "hints/read_hit": float(read_hit.mean()),
             "hints/edges": float((table[1] > 0).sum())}
    return table, stats


def log_line(stats: Mapping[str, float]) -> str:
  return (f"hints: {stats['hints/heads_on']:.0%} of heads on, held-out read hit "
          f"{stats['hints/read_hit']:.3f}, {int(stats['hints/edges']):,} hinted query tokens")

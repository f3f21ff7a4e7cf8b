"""Does a sleep keep the facts when the memory is wiped, and leave fresh documents alone?

    report = measure(experiment, params, batches=8, batch_size=16, sleep=SleepConfig())
    print(format_report(report))

On the cross-document probe (a brain-core run of `configs/cross_doc.py:braincore`) each stream
is one life: its facts in document 0, its questions in document 1. The memory after document 0
is distilled into that stream's own copy of the slow weights (`braincore.consolidate.sleep`),
then the questions are asked four ways, each scored over every question (binomial standard
error):

  carry_before   the trained model, memory carried across the boundary (what the memory knows);
  wiped_before   the trained model on document 1 alone, memory empty (chance: nothing carried);
  wiped_after    the slept weights on document 1 alone: the facts the slow weights now hold;
  carry_after    the slept weights with the memory carried.

And two checks that the sleep did not cost what the model does with new facts, both with the
memory carried: `fresh` (another stream's episode: new facts) and `conflict` (the stream's own
episode with every value token relabelled by a random permutation, so each consolidated key
now has another value in memory), each before and after, with the loss on the questions and
the next-token loss over every token (mean over sequences, standard error). Streams come from
the run's evaluation stream (`eval.stream`), batch i from `fold_in(key, i)` as in evaluation.
The report also gives each cell's accuracy as an evaluation file does (`lengths`), which the
roadmap reads.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from memkernel import experiment as experiment_lib
from memkernel import probes
from memkernel.braincore import consolidate
from memkernel.braincore.state import init_memory

CELLS = ("carry_before", "wiped_before", "wiped_after", "carry_after", "fresh_before",
         "fresh_after", "conflict_before", "conflict_after")


def _relabel(key: jax.Array, batch: dict, vocab_size: int) -> dict:
  """The batch with every value token v >= V/2 (tokens and targets) mapped by one random
  permutation of [V/2, V) per sequence: the same keys and layout, every fact's value changed."""
  half = vocab_size // 2
  perms = jax.vmap(lambda k: jax.random.permutation(k, half))(
      jax.random.split(key, batch["tokens"].shape[0]))
  def apply(x):
    moved = jnp.take_along_axis(perms, jnp.clip(x - half, 0, half - 1), axis=1) + half
    return jnp.where(x >= half, moved, x)
  return dict(batch, tokens=apply(batch["tokens"]), targets=apply(batch["targets"]))


def _scores(logits, tokens, targets, mask):
  """Per sequence: correct answers [B, T] (at mask), the questions' NLL [B, T] (at mask) and
  the mean next-token NLL over every token [B]."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32))
  correct = (jnp.argmax(logp, -1) == targets) & (mask > 0)
  question_nll = -jnp.take_along_axis(logp, targets[..., None], -1)[..., 0] * mask
  next_nll = -jnp.take_along_axis(logp[:, :-1], tokens[:, 1:, None], -1)[..., 0]
  return correct, question_nll, next_nll.mean(-1)


def check(experiment: experiment_lib.Experiment):
  """A clear error for a run this cannot measure (before its parameters are loaded)."""
  if experiment.model_type != "braincore" or experiment.task.name != "cross_doc":
    raise ValueError(f"consolidation is measured on a brain-core run of the cross_doc probe; "
                     f"this run is {experiment.model_type!r} on {experiment.task.name!r}")


def measure(experiment: experiment_lib.Experiment, params, *, batches: int = 8,
            batch_size: int = 16, sleep: consolidate.SleepConfig = consolidate.SleepConfig(),
            progress: bool = False) -> dict[str, Any]:
  """The report: each cell's accuracy, standard error and question count, the fresh and
  conflicting episodes' losses, and the sleep's KL at its first and last steps."""
  check(experiment)
  for name, value in (("batches", batches), ("batch_size", batch_size)):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise ValueError(f"{name} must be a positive integer, got {value!r}")
  if batch_size < 2:
    raise ValueError("batch_size must be at least 2: a fresh episode is another stream's")
  model = experiment.family.build(experiment.model)
  sleep.check(model, params)
  task = experiment.task
  split = task.scattered_split
  if split % experiment.model.span:
    raise ValueError(f"document 1 starts at {split}, not on a plasticity span start "
                     f"({experiment.model.span})")

  def forward(p, tokens, segments):
    return model.apply({"params": p}, tokens, segments)[0]

  @jax.jit
  def remember(tokens, segments):
    return model.apply({"params": params}, tokens[:, :split], init_memory(model.config,
                                                                          tokens.shape[0]),
                       segments[:, :split], method=model.scan)[1]

  slept_fn = jax.jit(jax.vmap(lambda m, k: consolidate.sleep(model, params, m, sleep, k)))
  before_fn = jax.jit(lambda t, s, y, m: _scores(forward(params, t, s), t, y, m))
  after_fn = jax.jit(jax.vmap(lambda p, t, s, y, m: jax.tree_util.tree_map(
      lambda x: x[0], _scores(forward(p, t[None], s[None]), t[None], y[None], m[None]))))

  key = experiment_lib.eval_key(experiment.train.seed, experiment.eval.stream)
  sums = {cell: [0, 0] for cell in CELLS}           # correct, questions
  question_nll = {cell: [] for cell in CELLS}       # per sequence: mean NLL of its questions
  next_nll = {cell: [] for cell in CELLS}           # per sequence: mean next-token NLL
  kl_first, kl_last = [], []
  start = time.perf_counter()
  for i in range(batches):
    batch_key = jax.random.fold_in(key, i)
    batch = probes.generate(task, batch_key, batch_size)
    conflict = _relabel(jax.random.fold_in(batch_key, 1), batch, task.vocab_size)
    roll = lambda x: jnp.roll(x, -1, axis=0)
    fresh = jax.tree_util.tree_map(roll, batch)
    doc1 = {k: batch[k][:, split:] for k in ("tokens", "targets", "mask")}
    doc1["segments"] = jnp.zeros_like(doc1["tokens"])
    memory = remember(batch["tokens"], batch["segments"])
    slept, kls = slept_fn(consolidate.per_stream(memory),
                          jax.random.split(jax.random.fold_in(batch_key, 2), batch_size))
    kl_first.append(np.asarray(kls[:, 0]))
    kl_last.append(np.asarray(kls[:, -1]))
    runs = {"carry": batch, "wiped": doc1, "fresh": fresh, "conflict": conflict}
    before = {}
    for name, b in runs.items():
      args = (b["tokens"], b["segments"], b["targets"], b["mask"])
      # Before the sleep every stream has the same weights: the fresh episodes are the batch's
      # own, rolled, so their scores are the carried ones, rolled.
      before[name] = (jax.tree_util.tree_map(roll, before["carry"]) if name == "fresh"
                      else before_fn(*args))
      for when, scores in (("before", before[name]), ("after", after_fn(slept, *args))):
        correct, q_nll, n_nll = (np.asarray(x) for x in scores)
        mask = np.asarray(b["mask"]) > 0
        cell = f"{name}_{when}"
        sums[cell][0] += int(correct.sum())
        sums[cell][1] += int(mask.sum())
        question_nll[cell].extend(q_nll.sum(-1) / np.maximum(mask.sum(-1), 1))
        next_nll[cell].extend(n_nll)
    if progress:
      print(f"  batch {i + 1}/{batches}: {time.perf_counter() - start:.1f} s",
            file=sys.stderr, flush=True)

  def mean_se(values):
    values = np.asarray(values, np.float64)
    return float(values.mean()), float(values.std(ddof=1) / math.sqrt(len(values)))

  cells = {}
  for cell in CELLS:
    correct, total = sums[cell]
    accuracy = correct / total
    q_mean, q_se = mean_se(question_nll[cell])
    n_mean, n_se = mean_se(next_nll[cell])
    cells[cell] = {"accuracy": accuracy, "accuracy_se": math.sqrt(accuracy * (1 - accuracy)
                                                                  / total),
                   "queries": total, "question_nll": q_mean, "question_nll_se": q_se,
                   "next_token_nll": n_mean, "next_token_nll_se": n_se}
  # Each cell's accuracy in the evaluation files' layout, for the roadmap (`memkernel.roadmap`).
  flat = {}
  for cell, r in cells.items():
    flat.update({cell: r["accuracy"], f"{cell}_se": r["accuracy_se"]})
  return {"task": task.name, "lengths": {str(task.seq_len): flat},
          "cells": cells, "streams": batches * batch_size, "batches": batches,
          "batch_size": batch_size, "stream": experiment.eval.stream,
          "chance": 1.0 / (task.vocab_size // 2),
          "sleep": {"steps": sleep.steps, "learning_rate": sleep.learning_rate,
                    "replay_batch": sleep.replay_batch, "replay_len": sleep.replay_len,
                    "trainable": list(sleep.trainable), "optimizer": sleep.optimizer},
          "kl_first": float(np.concatenate(kl_first).mean()),
          "kl_last": float(np.concatenate(kl_last).mean()),
          "seconds": time.perf_counter() - start}


def format_report(report: dict) -> str:
  s = report["sleep"]
  lines = [f"{report['streams']} streams ({report['stream']} stream); sleep: {s['steps']} steps "
           f"of {s['replay_batch']} x {s['replay_len']} replay tokens, {s['optimizer']} lr "
           f"{s['learning_rate']}, "
           f"modules {s['trainable'] or 'all'}; KL {report['kl_first']:.4f} -> "
           f"{report['kl_last']:.4f}; chance {100 * report['chance']:.2f}%",
           f"{'cell':<16} {'accuracy %':>16} {'questions':>9} {'question NLL':>16} "
           f"{'next-token NLL':>16}"]
  for cell, r in report["cells"].items():
    lines.append(f"{cell:<16} {100 * r['accuracy']:>8.2f} ± {100 * r['accuracy_se']:<5.2f} "
                 f"{r['queries']:>9,} {r['question_nll']:>8.4f} ± {r['question_nll_se']:<6.4f} "
                 f"{r['next_token_nll']:>8.4f} ± {r['next_token_nll_se']:<6.4f}")
  return "\n".join(lines)

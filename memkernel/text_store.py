"""The memory-line store on real text: a kNN-LM over bytes (seed 003 on seed 001's text task).

    write_store(directory, key, experiment, params, sequences=64)   # training bytes -> lines
    result = ask_store(directory, key, experiment, params, alphas=(1, 4), floors=(0.5,), k=5)

One process reads sequences of the training split and writes a line per byte position: the key
is the model's final hidden state there (`memkernel.hidden`), the value the next byte, one-hot
(`store_bias.write_next_token_lines`). Another verifies the store, chooses alpha and the
similarity floor by the bits per byte of the validation split, and reports the test split with
that setting and without the store: the same bytes and metrics as `evaluate` on text (bits per
byte overall and by position, long-range recall of rare and common identifiers), the logits
plus `StoreBias(hidden)`.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from memkernel import family as family_lib
from memkernel import hidden as hidden_lib
from memkernel import store_bias
from memkernel import text_task
from memkernel.store import store as store_lib
from memkernel.store import verification

LINES_STREAM_SEED = 7_777   # The training split's rows read for lines (not an eval stream).
VALIDATION, TEST = "validation", "test"


def _model(experiment, length: int):
  return family_lib.build(experiment.model_for_length(length))


def write_lines(store: store_lib.MemoryLineStore, experiment, params, *, sequences: int,
                site: str = hidden_lib.FINAL_NORM) -> int:
  """Appends a line per scored byte of `sequences` training sequences (`task.seq_len` bytes,
  read in batches of `eval.batch_size`); returns how many."""
  task, batch_size = experiment.task, experiment.eval.batch_size
  model = _model(experiment, task.seq_len)
  stream = text_task.train_stream(task, batch_size, seed=LINES_STREAM_SEED)
  written = 0
  for _ in range(-(-sequences // batch_size)):
    batch = next(stream)
    _, hidden = hidden_lib.parallel(model, params, jnp.asarray(batch["tokens"]),
                                    jnp.asarray(batch["segments"]), site=site)
    rows, cols = np.nonzero(batch["mask"][:, :-1] > 0)
    positions = [(int(b), int(t)) for b, t in zip(rows, cols)
                 if batch["targets"][b, t] == batch["tokens"][b, t + 1]]
    written += len(store_bias.write_next_token_lines(
        store, np.asarray(jax.device_get(hidden)), batch["tokens"], positions,
        task.vocab_size, ctx=lambda b, t: {}))
  return written


def write_store(directory: str, key: bytes, experiment, params, *, sequences: int,
                site: str = hidden_lib.FINAL_NORM) -> store_lib.Seal:
  """A new store at `directory` holding the lines of `write_lines`, sealed.

  Raises:
    ValueError: the store already holds lines.
  """
  with store_lib.MemoryLineStore.open(directory, key, key_dim=experiment.model.d_model,
                                      value_dim=experiment.task.vocab_size) as store:
    if len(store):
      raise ValueError(f"{directory} already holds {len(store)} lines; write to a new store")
    write_lines(store, experiment, params, sequences=sequences, site=site)
    return store.seal()


def evaluate(experiment, params, *, length: int, split: str,
             bias: Optional[Callable[[np.ndarray], np.ndarray]],
             site: str = hidden_lib.FINAL_NORM) -> dict[str, float]:
  """`evaluate.evaluate`'s text metrics on `split` at `length` (the same batches), the logits
  plus `bias(hidden)` where a bias is given."""
  task = experiment.task_for_length(length)
  model = _model(experiment, length)
  per_batch = []
  for batch in text_task.eval_batches(task, split, experiment.eval.batch_size,
                                      experiment.eval.batches):
    batch["recall"] = text_task.long_range_labels(batch, task)
    logits, hidden = hidden_lib.parallel(model, params, jnp.asarray(batch["tokens"]),
                                         jnp.asarray(batch["segments"]), site=site)
    if bias is not None:
      logits = logits + bias(np.asarray(jax.device_get(hidden)))
    per_batch.append(jax.device_get(text_task.position_sums(
        jnp.asarray(logits), {k: jnp.asarray(v) for k, v in batch.items()})))
  return text_task.summarize(per_batch, length)


def ask_store(directory: str, key: bytes, experiment, params, *, alphas: Sequence[float],
              floors: Sequence[float], k: int, length: int,
              site: str = hidden_lib.FINAL_NORM,
              progress: Callable[[str], None] = print) -> dict[str, Any]:
  """Verifies the store, chooses (alpha, floor) by the lowest validation bits per byte, and
  evaluates the test split with it and without the store.

  Returns the JSON-ready result: every validation setting, the no-store baselines and the chosen
  setting's test metrics, also as `lengths` ({str(length): metrics}, the shape of `eval.json`,
  which the roadmap reads).
  """
  verification.require_ok(directory, key)

  def with_store(floor, alpha, split):
    with store_lib.MemoryLineStore.open(directory, key,
                                        config={"similarity_floor": floor}) as store:
      bias = store_bias.StoreBias(store, alpha=alpha, k=k,
                                  vocab_size=experiment.task.vocab_size)
      return evaluate(experiment, params, length=length, split=split, bias=bias, site=site)

  baseline = evaluate(experiment, params, length=length, split=VALIDATION, bias=None, site=site)
  progress(f"validation without the store: {baseline['bits_per_byte']:.4f} bits/byte")
  tried = []
  for floor, alpha in itertools.product(floors, alphas):
    tried.append({"alpha": alpha, "similarity_floor": floor,
                  "validation": with_store(floor, alpha, VALIDATION)})
    progress(f"validation alpha {alpha:g} floor {floor:g}: "
             f"{tried[-1]['validation']['bits_per_byte']:.4f} bits/byte")
  best = min(tried, key=lambda v: v["validation"]["bits_per_byte"])
  with store_lib.MemoryLineStore.open(directory, key) as store:
    lines = len(store)
  chosen = with_store(best["similarity_floor"], best["alpha"], TEST)
  return {"site": site, "k": k, "length": length, "lines": lines, "tried": tried,
          "no_store": {"validation": baseline,
                       "test": evaluate(experiment, params, length=length, split=TEST,
                                        bias=None, site=site)},
          "chosen": {"alpha": best["alpha"], "similarity_floor": best["similarity_floor"],
                     "test": chosen},
          "lengths": {str(length): chosen}}

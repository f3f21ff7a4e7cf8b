"""Online adaptation: a document's loss when it comes back in the stream, against its first time.

    report = measure(experiment, params, documents=64, doc_len=512)
    print(format_report(report))

Each stream is three documents of a text run's corpus, cut to `doc_len` bytes: A, then another
document B, then A again, each its own segment (so every family's boundary rules apply at both
boundaries, and with B between them a sliding window of fewer than `doc_len` tokens cannot see
the first A from the second). The report gives bits per byte on A's first and second
occurrence and their difference per stream (mean and standard error over streams): what the
memory carried across two document boundaries buys when the same text returns. A memory whose
boundary rule is `reset` scores the second A as the first. Documents are the first files of the
split (sorted paths) that hold `doc_len` bytes, the same for every run; the last byte of each
document is not scored (its target is the next document's first byte).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from memkernel import experiment as experiment_lib
from memkernel import text_task


def streams(experiment: experiment_lib.Experiment, documents: int, doc_len: int,
            split: str = "test") -> tuple[np.ndarray, np.ndarray, list[str]]:
  """(tokens int32 [N, 3 L], segments int32 [N, 3 L], the paths of the N A documents): stream i
  is A_i, B_i = A_{i+1}, A_i."""
  corpus = text_task.corpus_of(experiment.task)
  chosen = []
  for path in corpus.split(split):
    content = corpus.read(path)
    if len(content) >= doc_len:
      chosen.append((path, np.frombuffer(content[:doc_len], np.uint8).astype(np.int32)))
    if len(chosen) == documents + 1:
      break
  if len(chosen) < documents + 1:
    raise ValueError(f"the {split} split holds {len(chosen)} files of at least {doc_len} bytes; "
                     f"{documents + 1} are needed (fewer documents or a shorter doc_len)")
  tokens = np.stack([np.concatenate([chosen[i][1], chosen[i + 1][1], chosen[i][1]])
                     for i in range(documents)])
  segments = np.broadcast_to(np.repeat(np.arange(3, dtype=np.int32), doc_len), tokens.shape)
  return tokens, np.ascontiguousarray(segments), [chosen[i][0] for i in range(documents)]


def measure(experiment: experiment_lib.Experiment, params, *, documents: int = 64,
            doc_len: int = 512, batch_size: int = 8, split: str = "test") -> dict[str, Any]:
  """Bits per byte on each stream's first and second A, their mean difference (first - second)
  and its standard error over streams."""
  if not text_task.is_text(experiment.task):
    raise ValueError(f"online adaptation reads text documents; this run's task is "
                     f"{experiment.task.name!r}")
  for name, value in (("documents", documents), ("doc_len", doc_len), ("batch_size", batch_size)):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise ValueError(f"{name} must be a positive integer, got {value!r}")
  align = experiment.family.segment_align(experiment.model)
  if doc_len % align or doc_len < 2:
    raise ValueError(f"doc_len must be a multiple of the family's document alignment ({align}) "
                     f"and at least 2, got {doc_len}")
  tokens, segments, paths = streams(experiment, documents, doc_len, split)
  model = experiment.family.build(experiment.family.with_capacity(experiment.model,
                                                                  tokens.shape[1]))

  @jax.jit
  def bits(p, t, s):
    logits = model.apply({"params": p}, t, s)[0]
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32)),
                               t[:, 1:, None], axis=-1)[..., 0]
    return nll / math.log(2)

  per_stream = []   # [first, second] bits per byte of each stream
  scored = np.arange(doc_len - 1)  # Positions whose target lies in the same document.
  for begin in range(0, documents, batch_size):
    b_tokens, b_segments = tokens[begin:begin + batch_size], segments[begin:begin + batch_size]
    out = np.asarray(bits(params, jnp.asarray(b_tokens), jnp.asarray(b_segments)))
    per_stream.append(np.stack([out[:, scored].mean(-1), out[:, 2 * doc_len + scored].mean(-1)],
                               axis=-1))
  per_stream = np.concatenate(per_stream)
  gain = per_stream[:, 0] - per_stream[:, 1]
  se = lambda x: float(np.std(x, ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float("nan")
  return {"documents": documents, "doc_len": doc_len, "split": split,
          "bytes_scored": int(documents * (doc_len - 1)), "paths": paths,
          "first_bpb": float(per_stream[:, 0].mean()), "first_bpb_se": se(per_stream[:, 0]),
          "second_bpb": float(per_stream[:, 1].mean()), "second_bpb_se": se(per_stream[:, 1]),
          "gain_bpb": float(gain.mean()), "gain_bpb_se": se(gain),
          "second_over_first": float(per_stream[:, 1].mean() / per_stream[:, 0].mean())}


def format_report(report: dict) -> str:
  return (f"{report['documents']} streams A B A of {report['doc_len']} bytes each "
          f"({report['split']} split, {report['bytes_scored']:,} bytes scored per occurrence)\n"
          f"first A:  {report['first_bpb']:.4f} ± {report['first_bpb_se']:.4f} bits per byte\n"
          f"second A: {report['second_bpb']:.4f} ± {report['second_bpb_se']:.4f} bits per byte\n"
          f"gain:     {report['gain_bpb']:.4f} ± {report['gain_bpb_se']:.4f} "
          f"(second / first {report['second_over_first']:.3f})")

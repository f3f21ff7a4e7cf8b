"""The real-text task: byte-level language modelling on a corpus of files (`memkernel.corpus`).

    config = configs.text.get_config()            # the standard library's sources, 1,024 bytes
    config.task.corpus = "/data/my_texts"         # or any directory of text files

Unlike the probes, whose batches are generated inside the compiled step from the step's key, a
text batch is read on the host from a resumable `corpus.ByteStream` and passed to the step; the
stream's state goes into every checkpoint's data state, so a resumed run reads exactly the bytes
an uninterrupted one would. Documents are files: every row is a stream of whole files, each on a
leaf boundary with its own segment, through the document streams of every family.

Evaluation reads the first `eval.batches` batches of the test split (or the validation split,
`eval.stream`) with the stream seed fixed at 0, so every run, seed and family is scored on the
same bytes. Its metrics are bits per byte overall and by context position (how far into its
sequence a byte is predicted: how much the far context helps), next-byte accuracy, and
long-range recall: next-byte accuracy inside identifiers (after their first byte) whose previous
occurrence in the same file lies beyond the sliding window's reach but inside the sequence, for
rare and for common identifiers (by their count in the training split).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import collections
import os
import re
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from memkernel import corpus as corpus_lib
from memkernel import fields

TEXT_TASKS = ("bytes_lm",)
STDLIB = "stdlib"
# Evaluation batches come from streams of this seed whatever the run's seed: the same bytes for
# every run.
EVAL_STREAM_SEED = 0
# Context-position buckets of the evaluation: [0, 64), [64, 128), [128, 256), ... doubling.
FIRST_BUCKET = 64
# Identifiers, as Python and most languages spell them.
IDENTIFIER = re.compile(rb"[A-Za-z_][A-Za-z0-9_]*")
# Long-range recall classes of a position (`long_range_labels`).
NOT_SCORED, RARE, COMMON = 0, 1, 2
RECALL_CLASSES = {"rare": RARE, "common": COMMON}


@dataclasses.dataclass(frozen=True)
class TextTaskConfig:
  """The `task` section of a text experiment. Frozen and hashable (a static jit argument).

  Attributes:
    name: 'bytes_lm'.
    corpus: 'stdlib' (the installed Python's standard-library sources) or a directory.
    patterns: comma-separated file-name patterns under a directory corpus (the standard library
      is always its `*.py` files).
    vocab_size: 256 (bytes).
    seq_len: bytes per sequence (T).
    leaf_size: files start on multiples of it (the kernel's leaf, the brain-core's span).
    recall_window: long-range recall scores identifiers whose previous occurrence in the file
      is further back than this many bytes (the sliding-window peer's reach) and inside the
      sequence (`long_range_labels`).
    rare_count: an identifier seen fewer times than this in the training split is rare; the
      others are common.
  """

  name: str = "bytes_lm"
  corpus: str = STDLIB
  patterns: str = "*"
  vocab_size: int = corpus_lib.VOCAB_SIZE
  seq_len: int = 1024
  leaf_size: int = 16
  recall_window: int = 256
  rare_count: int = 10

  def __post_init__(self):
    s = "task"
    if self.name not in TEXT_TASKS:
      raise ValueError(f"task.name must be one of {TEXT_TASKS}, got {self.name!r}")
    fields.check_int(s, "seq_len", self.seq_len, 1)
    fields.check_int(s, "leaf_size", self.leaf_size, 1)
    fields.check_int(s, "recall_window", self.recall_window, 1)
    fields.check_int(s, "rare_count", self.rare_count, 1)
    if self.vocab_size != corpus_lib.VOCAB_SIZE:
      raise ValueError(f"task.vocab_size must be {corpus_lib.VOCAB_SIZE} for bytes, got "
                       f"{self.vocab_size!r}")
    if not isinstance(self.corpus, str) or not (
        self.corpus == STDLIB or os.path.isdir(self.corpus)):
      raise ValueError(f"task.corpus must be {STDLIB!r} or a directory, got {self.corpus!r}")
    if not isinstance(self.patterns, str) or not self.pattern_list:
      raise ValueError(f"task.patterns must be comma-separated file-name patterns, got "
                       f"{self.patterns!r}")
    if self.seq_len % self.leaf_size:
      raise ValueError(f"task.seq_len={self.seq_len} must be a multiple of task.leaf_size="
                       f"{self.leaf_size}")

  @property
  def pattern_list(self) -> tuple[str, ...]:
    return tuple(p.strip() for p in str(self.patterns).split(",") if p.strip())

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> "TextTaskConfig":
    return fields.from_mapping(cls, values, "config.task")

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def is_text(task: Any) -> bool:
  return isinstance(task, TextTaskConfig)


@functools.lru_cache(maxsize=4)
def load_corpus(corpus: str, patterns: tuple[str, ...]) -> corpus_lib.Corpus:
  """The corpus a task reads (read once per process: its checksum covers every file)."""
  if corpus == STDLIB:
    return corpus_lib.Corpus.stdlib()
  return corpus_lib.Corpus.from_directory(corpus, patterns)


def corpus_of(task: TextTaskConfig) -> corpus_lib.Corpus:
  return load_corpus(task.corpus, task.pattern_list)


def describe(task: TextTaskConfig) -> dict[str, Any]:
  """What a result records of the corpus: root, checksum, and the files of every split."""
  corpus = corpus_of(task)
  return {"root": corpus.root, "checksum": corpus.checksum,
          "files": {split: list(corpus.split(split)) for split in corpus_lib.SPLITS}}


def train_stream(task: TextTaskConfig, batch_size: int, seed: int,
                 state: Optional[dict] = None) -> corpus_lib.ByteStream:
  """The training split's stream (rows shuffled by `seed`), resumed from `state` if given."""
  return corpus_lib.ByteStream(corpus_of(task), "train", batch_size=batch_size,
                               seq_len=task.seq_len, align=task.leaf_size, seed=seed, state=state)


def eval_batches(task: TextTaskConfig, split: str, batch_size: int, batches: int):
  """The first `batches` batches of `split` ('test' or 'validation'), the same for every run."""
  stream = corpus_lib.ByteStream(corpus_of(task), split, batch_size=batch_size,
                                 seq_len=task.seq_len, align=task.leaf_size,
                                 seed=EVAL_STREAM_SEED)
  return [next(stream) for _ in range(batches)]


@functools.lru_cache(maxsize=4)
def _train_counts(corpus: str, patterns: tuple[str, ...]) -> collections.Counter:
  c = load_corpus(corpus, patterns)
  counts: collections.Counter = collections.Counter()
  for name in c.split("train"):
    counts.update(IDENTIFIER.findall(c.read(name)))
  return counts


def identifier_counts(task: TextTaskConfig) -> collections.Counter:
  """How often each identifier occurs in the training split (computed once per process)."""
  return _train_counts(task.corpus, task.pattern_list)


def long_range_labels(batch: Mapping[str, np.ndarray], task: TextTaskConfig) -> np.ndarray:
  """int32 [B, T]: RARE or COMMON at the positions long-range recall scores, NOT_SCORED
  elsewhere.

  An identifier occurrence qualifies when the same identifier occurred earlier in the same
  document of the same row, the most recent time more than `recall_window` bytes before, and
  neither touches the row's first byte (it may be cut). Scored are the positions whose target
  is one of its bytes after the first: once the first byte is seen, the rest can be recalled
  from the earlier occurrence, which only a memory beyond the window still holds.
  """
  counts = identifier_counts(task)
  tokens, segments, mask = batch["tokens"], batch["segments"], batch["mask"]
  labels = np.zeros(tokens.shape, np.int32)
  for row in range(tokens.shape[0]):
    boundaries = np.flatnonzero(np.diff(segments[row])) + 1
    for lo, hi in zip(np.r_[0, boundaries], np.r_[boundaries, tokens.shape[1]]):
      text = tokens[row, lo:hi].astype(np.uint8).tobytes()
      last: dict[bytes, int] = {}
      for match in IDENTIFIER.finditer(text):
        start, end, word = lo + match.start(), lo + match.end(), match.group()
        previous = last.get(word)
        last[word] = start
        if (previous is None or previous == 0 or start - previous <= task.recall_window
            or end - start < 2 or end == tokens.shape[1]):   # Either may be cut at an end.
          continue
        kind = RARE if counts.get(word, 0) < task.rare_count else COMMON
        labels[row, start:end - 1] = kind    # Position i predicts byte i + 1.
  return labels * (mask > 0)


def buckets(seq_len: int) -> list[tuple[int, int]]:
  """Context-position buckets [lo, hi) covering [0, seq_len): [0, 64), then doubling."""
  edges = [0]
  edge = FIRST_BUCKET
  while edge < seq_len:
    edges.append(edge)
    edge *= 2
  edges.append(seq_len)
  return list(zip(edges[:-1], edges[1:]))


def position_sums(logits_BTV: jax.Array, batch: Mapping[str, jax.Array], *,
                  offset: Any = 0, seq_len: Optional[int] = None) -> dict[str, jax.Array]:
  """Sums the evaluation needs of one batch: scored bytes, their negative log-likelihood in
  nats and correct argmax predictions, overall, per context-position bucket (`buckets`) and,
  with `batch['recall']` (`long_range_labels`), per long-range recall class.

  For one chunk of a longer sequence (the recurrent form), `offset` is the chunk's first
  position (may be traced) and `seq_len` the whole sequence's length: the buckets are the
  sequence's, and the sums of a sequence's chunks add up to the sums of the sequence.
  """
  t = logits_BTV.shape[1]
  mask = batch["mask"]
  logp = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
  correct = (jnp.argmax(logits_BTV, -1) == batch["targets"]).astype(jnp.float32)
  sums = {"nll": jnp.sum(nll * mask), "queries": jnp.sum(mask),
          "correct": jnp.sum(correct * mask),
          "sequence_nll": jnp.sum(nll * mask, axis=1), "sequence_queries": jnp.sum(mask, axis=1)}
  if "recall" in batch:
    for name, kind in RECALL_CLASSES.items():
      inside = (batch["recall"] == kind).astype(jnp.float32)
      sums[f"recall_{name}_nll"] = jnp.sum(nll * inside)
      sums[f"recall_{name}_correct"] = jnp.sum(correct * inside)
      sums[f"recall_{name}_queries"] = jnp.sum(inside)
  positions = offset + jnp.arange(t)
  for lo, hi in buckets(seq_len or t):
    inside = mask * ((positions >= lo) & (positions < hi))
    sums[f"nll@{lo}"] = jnp.sum(nll * inside)
    sums[f"queries@{lo}"] = jnp.sum(inside)
  return sums


def summarize(per_batch: list[Mapping[str, Any]], seq_len: int) -> dict[str, float]:
  """Metrics from summed `position_sums`: loss (nats per byte), bits_per_byte and its standard
  error over the evaluation's sequences' bytes, accuracy, queries, per bucket
  `bits_per_byte@<lo>-<hi>`, and for long-range recall (`recall_rare_*`, `recall_common_*`)
  accuracy with its standard error, bits per byte and the scored bytes."""
  total: dict[str, float] = {}
  sequences = {"sequence_nll": [], "sequence_queries": []}
  for sums in per_batch:
    for k, v in sums.items():
      if k in sequences:
        sequences[k].append(np.asarray(v, np.float64))
      else:
        total[k] = total.get(k, 0.0) + float(v)
  n = max(total["queries"], 1.0)
  accuracy = total["correct"] / n
  bpb = total["nll"] / n / math.log(2)
  # Bytes of one sequence are not independent: the standard error is the ratio estimator's over
  # sequences (their bits over their bytes).
  nll, count = (np.concatenate(sequences[k]) for k in ("sequence_nll", "sequence_queries"))
  m = len(count)
  residual = nll / math.log(2) - bpb * count
  bpb_se = (math.sqrt(float(np.sum(residual ** 2)) / (m * (m - 1))) / float(np.mean(count))
            if m > 1 and np.mean(count) > 0 else float("nan"))
  out = {"loss": total["nll"] / n, "bits_per_byte": bpb, "bits_per_byte_se": bpb_se,
         "accuracy": accuracy, "accuracy_se": math.sqrt(accuracy * (1 - accuracy) / n),
         "queries": total["queries"], "sequences": m}
  for name in RECALL_CLASSES:
    if f"recall_{name}_queries" not in total:
      continue
    count = total[f"recall_{name}_queries"]
    acc = total[f"recall_{name}_correct"] / count if count else float("nan")
    out[f"recall_{name}_accuracy"] = acc
    out[f"recall_{name}_accuracy_se"] = (math.sqrt(acc * (1 - acc) / count) if count
                                         else float("nan"))
    out[f"recall_{name}_bits_per_byte"] = (total[f"recall_{name}_nll"] / count / math.log(2)
                                           if count else float("nan"))
    out[f"recall_{name}_queries"] = count
  for lo, hi in buckets(seq_len):
    count = total[f"queries@{lo}"]
    out[f"bits_per_byte@{lo}-{hi}"] = (total[f"nll@{lo}"] / count / math.log(2)
                                       if count else float("nan"))
  return out


def as_global(batch: Mapping[str, np.ndarray], sharding: jax.sharding.Sharding
              ) -> dict[str, jax.Array]:
  """A host batch (every process holds the whole global batch) as arrays sharded by
  `sharding`: each device gets its own rows, in one process or several."""
  return {k: jax.make_array_from_callback(v.shape, sharding, lambda index, v=v: v[index])
          for k, v in batch.items()}

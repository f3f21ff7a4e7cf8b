"""Real text for byte-level language modelling: a corpus of files, split by file, streamed.

    corpus = Corpus.stdlib()                      # the installed Python's standard-library sources
    corpus = Corpus.from_directory("my_texts")    # or any directory of text files
    stream = ByteStream(corpus, "train", batch_size=8, seq_len=1024, align=16, seed=0)
    batch = next(stream)        # tokens, targets, mask [B, T]; segments [B, T]: one per file
    state = stream.state()      # JSON-ready; ByteStream(..., state=state) resumes exactly

Every machine has the standard library's sources, so results on it can be reproduced anywhere;
`Corpus.checksum` (over every file's path and content) and the file list go into every result.
A file's split is a hash of its path (90% train, 5% validation, 5% test), so it does not move
when files are added. Documents are files: each row of a batch is its own stream of whole files,
one after another, each starting at a multiple of `align` tokens (the kernel's leaf size), with
its own segment number, so the document streams of every family see file boundaries. Bytes are
tokens (vocabulary 256); the padding after a file, up to the next aligned start, is byte 0 in
that file's segment and is never a scored target.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import os
import sysconfig
from typing import Iterator, Optional, Sequence

import numpy as np

SPLITS = ("train", "validation", "test")
SPLIT_EDGES = (0.90, 0.95)
VOCAB_SIZE = 256


def split_of(relative_path: str) -> str:
  """The split a file belongs to, from a hash of its path alone."""
  h = int.from_bytes(hashlib.sha256(relative_path.encode("utf-8")).digest()[:8], "big") / 2**64
  return SPLITS[0] if h < SPLIT_EDGES[0] else SPLITS[1] if h < SPLIT_EDGES[1] else SPLITS[2]


@dataclasses.dataclass(frozen=True)
class Corpus:
  """A sorted list of text files under `root` (paths relative to it) and their checksum."""
  root: str
  files: tuple[str, ...]
  checksum: str

  @classmethod
  def from_directory(cls, root: str, patterns: Sequence[str] = ("*",),
                     max_file_bytes: int = 4 << 20) -> "Corpus":
    """Every file under `root` matching one of `patterns` (non-empty, at most `max_file_bytes`).

    Raises:
      ValueError: `root` is not a directory, or no file matches.
    """
    if not os.path.isdir(root):
      raise ValueError(f"corpus root {root} is not a directory")
    files = []
    for directory, subdirs, names in os.walk(root):
      subdirs.sort()
      for name in sorted(names):
        path = os.path.join(directory, name)
        if (any(fnmatch.fnmatch(name, p) for p in patterns) and os.path.isfile(path)
            and 0 < os.path.getsize(path) <= max_file_bytes):
          files.append(os.path.relpath(path, root))
    if not files:
      raise ValueError(f"no file under {root} matches {list(patterns)}")
    files.sort()
    digest = hashlib.sha256()
    for rel in files:
      with open(os.path.join(root, rel), "rb") as f:
        content = hashlib.sha256(f.read()).digest()
      digest.update(len(rel).to_bytes(4, "big") + rel.encode("utf-8") + content)
    return cls(root, tuple(files), digest.hexdigest())

  @classmethod
  def stdlib(cls) -> "Corpus":
    """The installed Python's standard-library `.py` sources (site-packages left out)."""
    corpus = cls.from_directory(sysconfig.get_paths()["stdlib"], ("*.py",))
    kept = tuple(f for f in corpus.files
                 if not f.startswith(("site-packages", "dist-packages")))
    return corpus if kept == corpus.files else _subset(corpus, kept)

  def split(self, name: str) -> tuple[str, ...]:
    """The files of split `name`, sorted."""
    if name not in SPLITS:
      raise ValueError(f"split must be one of {SPLITS}, got {name!r}")
    return tuple(f for f in self.files if split_of(f) == name)

  def read(self, relative_path: str) -> bytes:
    with open(os.path.join(self.root, relative_path), "rb") as f:
      return f.read()


def _subset(corpus: Corpus, files: tuple[str, ...]) -> Corpus:
  digest = hashlib.sha256()
  for rel in files:
    digest.update(len(rel).to_bytes(4, "big") + rel.encode("utf-8")
                  + hashlib.sha256(corpus.read(rel)).digest())
  return Corpus(corpus.root, files, digest.hexdigest())


class ByteStream:
  """Batches of byte sequences from one split, each row a stream of whole files.

  Row r reads the split's files in an order shuffled by (seed, epoch, r); each file is followed
  by zero bytes up to a multiple of `align`, so every file starts at a multiple of `align` in its
  row. The state (per row: epoch, file number, offset in the padded file, segment number) is a
  small dict; a stream built with it continues exactly where the saved one stopped.
  """

  def __init__(self, corpus: Corpus, split: str, *, batch_size: int, seq_len: int,
               align: int = 1, seed: int = 0, state: Optional[dict] = None):
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len), ("align", align)):
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"ByteStream: {name} must be a positive integer, got {value!r}")
    self.corpus, self.files = corpus, corpus.split(split)
    if not self.files:
      raise ValueError(f"the corpus at {corpus.root} has no {split} file")
    self.split, self.batch_size, self.seq_len, self.align, self.seed = (
        split, batch_size, seq_len, align, seed)
    self._rows = [{"epoch": 0, "file": 0, "offset": 0, "segment": 0} for _ in range(batch_size)]
    if state is not None:
      self._restore(state)
    self._cache: dict[str, bytes] = {}

  def _content(self, row: int, epoch: int, file: int) -> bytes:
    order = np.random.default_rng([self.seed, epoch, row]).permutation(len(self.files))
    name = self.files[order[file]]
    if name not in self._cache:
      if len(self._cache) > 64:
        self._cache.clear()
      self._cache[name] = self.corpus.read(name)
    return self._cache[name]

  def _padded_len(self, content: bytes) -> int:
    return -(-len(content) // self.align) * self.align

  def _take(self, row: int, n: int):
    """n tokens of row `row` from its cursor, and the cursor after them (the stored one is not
    moved): (tokens [n], segments [n], real [n], cursor)."""
    cursor = dict(self._rows[row])
    tokens, segments, real = (np.zeros(n, np.int32), np.zeros(n, np.int32), np.zeros(n, bool))
    filled = 0
    while filled < n:
      content = self._content(row, cursor["epoch"], cursor["file"])
      padded = self._padded_len(content)
      k = min(padded - cursor["offset"], n - filled)
      start = cursor["offset"]
      data = np.frombuffer(content[start:start + k], np.uint8)
      tokens[filled:filled + len(data)] = data
      real[filled:filled + len(data)] = True
      segments[filled:filled + k] = cursor["segment"]
      cursor["offset"] += k
      filled += k
      if cursor["offset"] == padded:   # the next file starts here, aligned
        cursor.update(offset=0, file=cursor["file"] + 1, segment=cursor["segment"] + 1)
        if cursor["file"] == len(self.files):
          cursor.update(file=0, epoch=cursor["epoch"] + 1)
    return tokens, segments, real, cursor

  def state(self) -> dict:
    """Where every row stands, plus what the stream reads (checked when restoring)."""
    return {"checksum": self.corpus.checksum, "split": self.split, "seed": self.seed,
            "align": self.align, "rows": [dict(r) for r in self._rows]}

  def _restore(self, state: dict) -> None:
    expected = {"checksum": self.corpus.checksum, "split": self.split, "seed": self.seed,
                "align": self.align}
    wrong = {k: (state.get(k), v) for k, v in expected.items() if state.get(k) != v}
    if wrong or len(state.get("rows", [])) != self.batch_size:
      raise ValueError(f"the saved stream state does not fit this stream: "
                       f"{wrong or 'another batch size'} (saved, here)")
    self._rows = [dict(r) for r in state["rows"]]

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    """tokens and targets (the next byte) int32 [B, T]; mask float32 [B, T] (1 where the target
    is a byte of the token's own file); segments int32 [B, T] (each file's number in its row).
    The rows advance by T tokens: a batch's last target is the next batch's first token."""
    b, t = self.batch_size, self.seq_len
    tokens, segments, real = (np.zeros((b, t + 1), np.int32), np.zeros((b, t + 1), np.int32),
                              np.zeros((b, t + 1), bool))
    for row in range(b):
      tokens[row], segments[row], real[row], _ = self._take(row, t + 1)
      self._rows[row] = self._take(row, t)[3]
    mask = real[:, 1:] & (segments[:, :-1] == segments[:, 1:])
    return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "mask": mask.astype(np.float32),
            "segments": segments[:, :-1]}

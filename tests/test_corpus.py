"""The byte-level corpus: files split by path, streamed as whole aligned documents, resumable."""

import os

import numpy as np
import pytest

from memkernel import corpus as corpus_lib


@pytest.fixture()
def small(tmp_path):
  rng = np.random.default_rng(0)
  for i in range(40):
    sub = tmp_path / f"d{i % 3}"
    sub.mkdir(exist_ok=True)
    size = int(rng.integers(5, 90))
    (sub / f"f{i}.txt").write_bytes(bytes(rng.integers(1, 256, size=size, dtype=np.uint8)))
  (tmp_path / "skip.bin").write_bytes(b"x")
  return tmp_path


def test_files_split_by_path_and_the_checksum_follows_the_content(small):
  c = corpus_lib.Corpus.from_directory(str(small), ("*.txt",))
  assert len(c.files) == 40 and "skip.bin" not in c.files
  parts = [set(c.split(s)) for s in corpus_lib.SPLITS]
  assert set.union(*parts) == set(c.files) and sum(map(len, parts)) == 40
  assert all(corpus_lib.split_of(f) == s for s, part in zip(corpus_lib.SPLITS, parts)
             for f in part)
  before = c.checksum
  with open(small / c.files[0], "ab") as f:
    f.write(b"!")
  assert corpus_lib.Corpus.from_directory(str(small), ("*.txt",)).checksum != before


def test_each_row_streams_whole_files_from_aligned_starts(small):
  c = corpus_lib.Corpus.from_directory(str(small), ("*.txt",))
  stream = corpus_lib.ByteStream(c, "train", batch_size=2, seq_len=50, align=16, seed=3)
  batches = [next(stream) for _ in range(12)]
  tokens = np.concatenate([b["tokens"] for b in batches], axis=1)
  segments = np.concatenate([b["segments"] for b in batches], axis=1)
  mask = np.concatenate([b["mask"] for b in batches], axis=1)
  for b in batches:   # targets are the next tokens
    np.testing.assert_array_equal(b["targets"][:, :-1], b["tokens"][:, 1:])
  files = c.split("train")
  for row in range(2):
    assert np.all(np.diff(segments[row]) >= 0)
    starts = np.flatnonzero(np.diff(segments[row])) + 1
    assert np.all(starts % 16 == 0)   # every file starts aligned
    order = np.random.default_rng([3, 0, row]).permutation(len(files))
    for n, (a, z) in enumerate(zip(np.r_[0, starts][:-1], starts)):
      content = c.read(files[order[n]])
      np.testing.assert_array_equal(tokens[row, a:a + len(content)], list(content))
      np.testing.assert_array_equal(tokens[row, a + len(content):z], 0)   # the padding
      # Scored: the file's bytes after its first; never the padding or the next file.
      np.testing.assert_array_equal(mask[row, a:z], np.arange(a, z) < a + len(content) - 1)


def test_a_restored_stream_continues_exactly(small):
  c = corpus_lib.Corpus.from_directory(str(small), ("*.txt",))
  make = lambda state=None: corpus_lib.ByteStream(c, "train", batch_size=3, seq_len=37,
                                                  align=8, seed=1, state=state)
  stream = make()
  next(stream)
  saved = stream.state()
  expected = [next(stream) for _ in range(6)]
  resumed = make(state=saved)
  for want in expected:
    got = next(resumed)
    for name in want:
      np.testing.assert_array_equal(got[name], want[name])
  with pytest.raises(ValueError, match="does not fit"):
    corpus_lib.ByteStream(c, "train", batch_size=3, seq_len=37, align=8, seed=2, state=saved)


def test_bad_input_is_named(small, tmp_path):
  c = corpus_lib.Corpus.from_directory(str(small), ("*.txt",))
  with pytest.raises(ValueError, match="split must be one of"):
    c.split("dev")
  with pytest.raises(ValueError, match="batch_size must be a positive integer"):
    corpus_lib.ByteStream(c, "train", batch_size=0, seq_len=8)
  with pytest.raises(ValueError, match="no file under"):
    corpus_lib.Corpus.from_directory(str(small), ("*.md",))
  with pytest.raises(ValueError, match="is not a directory"):
    corpus_lib.Corpus.from_directory(str(tmp_path / "nowhere"))


def test_the_standard_library_is_a_corpus_on_every_machine():
  c = corpus_lib.Corpus.stdlib()
  assert len(c.files) > 100 and all(f.endswith(".py") for f in c.files)
  assert not any(f.startswith("site-packages") for f in c.files)
  assert all(len(c.split(s)) > 0 for s in corpus_lib.SPLITS)
  assert os.path.isfile(os.path.join(c.root, c.files[0]))

"""`MemoryLineStore`: memory lines that outlive the process, chained, sealed and queried.

    with MemoryLineStore.open("runs/store", key=secret) as store:
      anchor = store.put(key_vec, value_vec, {"doc": 3})
      lines = store.query(query_vec, k=5)        # MemoryLine with recency / similarity / weight
      b = store.bias_vector(query_vec, k=5)      # sum(w v) / sum(w)
      store.seal()

Host-side numpy, never jitted. The database (`log.py`) is the truth; this object keeps derived
arrays (unit keys in the vector index, values, timestamps, novelty) and catches up with lines other
processes appended before every query. Writes hold SQLite's write lock (one writer across threads
and processes), so sequence numbers stay contiguous and every line chains to the one before.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import sqlite3
import threading
import time
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import numpy as np

from memkernel.store import config as config_lib
from memkernel.store import encoding
from memkernel.store import index as index_lib
from memkernel.store import lines as lines_lib
from memkernel.store import log
from memkernel.store import merkle
from memkernel.store import scoring

MemoryLine = lines_lib.MemoryLine
Seal = log.SealRecord


class MemoryLineStore:
  """A directory of memory lines. Open it with `MemoryLineStore.open(path, key=...)`."""

  def __init__(self, path: str, secret: bytes, conn, key_dim: int, value_dim: int,
               config: config_lib.StoreConfig, clock: Callable[[], int]):
    self.path = path
    self.config = config
    self.key_dim = key_dim
    self.value_dim = value_dim
    self._secret = secret
    self._conn = conn
    self._clock = clock
    self._lock = threading.RLock()
    self._index = index_lib.VectorIndex(key_dim, config)
    self._values = index_lib.Growing(value_dim)
    self._ts = index_lib.Growing(0, np.int64)
    self._novelty = index_lib.Growing(0, np.float64)
    self._seqs = index_lib.Growing(0, np.int64)
    self._frontier = merkle.MerkleFrontier()   # over every loaded anchor, for seals
    self._last_anchor = encoding.genesis(secret)
    self._last_seq = -1
    self._since_seal = 0
    self._closed = False
    self._cached = self._load_index_cache()   # lines a cached index covered (0: none)
    self._catch_up()

  # -- opening and closing ------------------------------------------------------------------

  @classmethod
  def open(cls, path: str, key: bytes, *, key_dim: Optional[int] = None,
           value_dim: Optional[int] = None,
           config: Optional[config_lib.StoreConfig | Mapping[str, Any]] = None,
           clock: Callable[[], int] = time.time_ns,
           vfs: Optional[str] = None) -> "MemoryLineStore":
    """Opens the store in directory `path`, creating it if it does not exist.

    Args:
      path: the store's directory.
      key: the secret key (16-64 bytes) the chain is keyed with; the same key every time.
      key_dim, value_dim: vector widths; required to create a store, checked when opening one.
      config: a `StoreConfig` (or a mapping of its fields): scoring and index.
      clock: nanoseconds since the epoch (tests pass a fake clock).
      vfs: an SQLite VFS registered through apsw (the fault-injection study); None: the files.
    Raises:
      ValueError: a bad key, a key that is not this store's, widths missing or not matching.
    """
    secret = encoding.check_secret(key)
    if config is None:
      config = config_lib.StoreConfig()
    elif not isinstance(config, config_lib.StoreConfig):
      config = config_lib.StoreConfig.from_mapping(config)
    for name, dim in (("key_dim", key_dim), ("value_dim", value_dim)):
      if dim is not None and (not isinstance(dim, int) or isinstance(dim, bool) or dim < 1):
        raise ValueError(f"{name} must be a positive integer, got {dim!r}")
    if os.path.exists(path) and not os.path.isdir(path):
      raise ValueError(f"store path {path} is a file; it must be a directory")
    if (not os.path.exists(os.path.join(path, log.DB_NAME))
        and (key_dim is None or value_dim is None)):
      raise ValueError(f"{path} holds no store yet: key_dim and value_dim are needed to "
                       f"create one")
    os.makedirs(path, exist_ok=True)
    conn = log.connect(path, config.busy_timeout_s, vfs=vfs)
    try:
      dims = cls._check_meta(conn, secret, key_dim, value_dim, path)
      return cls(path, secret, conn, dims[0], dims[1], config, clock)
    except BaseException:
      conn.close()
      raise

  @staticmethod
  def _check_meta(conn, secret, key_dim, value_dim, path) -> tuple[int, int]:
    conn.execute("BEGIN IMMEDIATE")
    try:
      stored = log.get_meta(conn, "key_check")
      if stored is None:
        if key_dim is None or value_dim is None:
          raise ValueError(f"{path} holds no store yet: key_dim and value_dim are needed to "
                           f"create one")
        conn.executemany("INSERT INTO meta (name, value) VALUES (?, ?)", [
            ("version", encoding.VERSION),
            ("key_check", encoding.key_check(secret, key_dim, value_dim)),
            ("key_dim", str(key_dim).encode()), ("value_dim", str(value_dim).encode())])
        conn.execute("COMMIT")
        return key_dim, value_dim
      conn.execute("COMMIT")
    except BaseException:
      conn.execute("ROLLBACK")
      raise
    dims = log.stored_widths(conn)
    if dims is None or stored != encoding.key_check(secret, *dims):
      raise ValueError(f"the key does not match the store at {path} (or its widths were "
                       f"edited: run `python -m experiments.store verify`)")
    for name, want, have in (("key_dim", key_dim, dims[0]), ("value_dim", value_dim, dims[1])):
      if want is not None and want != have:
        raise ValueError(f"{name}={want} but the store at {path} has {name}={have}")
    return dims

  def close(self) -> None:
    """Closes the database (every acknowledged line is already durable), after caching a built
    faiss index that has grown since it was loaded."""
    with self._lock:
      if not self._closed:
        try:
          self._save_index_cache()
        finally:
          self._conn.close()
          self._closed = True

  # -- the index cache ----------------------------------------------------------------------
  # Rebuilding HNSW over 10^6 keys takes minutes, so a built index is kept beside the log:
  # index.faiss and index.json (the lines it covers, the anchor of the last of them, its
  # settings and a keyed MAC). It is used only if all of these match the log and the config;
  # otherwise it is ignored and rebuilt. The log stays the truth.

  def _index_paths(self) -> tuple[str, str]:
    return (os.path.join(self.path, log.INDEX_NAME), os.path.join(self.path, log.INDEX_META_NAME))

  def _load_index_cache(self) -> int:
    data_path, meta_path = self._index_paths()
    try:
      with open(meta_path) as f:
        meta = json.load(f)
      count, last = int(meta["count"]), bytes.fromhex(meta["last_anchor"])
      if meta["settings"] != self._index.settings() or count < 1:
        return 0
      if log.anchor_at(self._conn, count - 1) != last:
        return 0
      with open(data_path, "rb") as f:
        data = f.read()
      if encoding.index_mac(self._secret, count, last, data) != bytes.fromhex(meta["mac"]):
        logging.warning("memory-line store %s: the cached index does not verify; rebuilding",
                        self.path)
        return 0
      self._index.preload(data, meta["kind"])
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, ImportError):
      return 0   # no cache, or one that does not fit: the index is rebuilt from the log
    return count

  def _save_index_cache(self) -> None:
    if not self._index.built or len(self._index) == self._cached:
      return
    data = self._index.serialize()
    count, last = len(self._index), self._last_anchor
    data_path, meta_path = self._index_paths()
    log.write_atomically(data_path, data)
    log.write_atomically(meta_path, json.dumps({
        "count": count, "last_anchor": last.hex(), "kind": self._index.kind,
        "settings": self._index.settings(),
        "mac": encoding.index_mac(self._secret, count, last, data).hex()}).encode())
    self._cached = count

  def __enter__(self) -> "MemoryLineStore":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __len__(self) -> int:
    with self._lock:
      self._catch_up()
      return self._seqs.size

  # -- the derived arrays -------------------------------------------------------------------

  def _check_open(self) -> None:
    if self._closed:
      raise ValueError(f"the store at {self.path} is closed")

  def _catch_up(self) -> None:
    """Loads lines appended since the arrays were built (by this process or another)."""
    last = log.last_line(self._conn)
    if last is None or last[0] <= self._last_seq:
      return
    batch: list[log.Row] = []
    for row in log.iter_rows(self._conn, self._last_seq + 1):
      batch.append(row)
      if len(batch) == 8192:
        self._remember(batch)
        batch = []
    self._remember(batch)

  def _remember(self, rows: Sequence[log.Row]) -> None:
    if not rows:
      return
    for r in rows:
      if (len(r.fields.key), len(r.fields.value)) != (4 * self.key_dim, 4 * self.value_dim):
        raise ValueError(f"line {r.fields.seq} of the store at {self.path} does not hold "
                         f"[{self.key_dim}] / [{self.value_dim}] vectors: it is damaged (run "
                         f"`python -m experiments.store verify`)")
    keys = np.stack([np.frombuffer(r.fields.key, "<f4") for r in rows])
    self._index.add(index_lib.normalise(keys))
    self._values.extend(np.stack([np.frombuffer(r.fields.value, "<f4") for r in rows]))
    self._ts.extend(np.array([r.fields.ts_ns for r in rows], np.int64))
    self._novelty.extend(np.array([r.fields.novelty for r in rows]))
    self._seqs.extend(np.array([r.fields.seq for r in rows], np.int64))
    self._frontier.extend(r.anchor for r in rows)
    self._last_anchor = rows[-1].anchor
    self._last_seq = rows[-1].fields.seq

  # -- writing ------------------------------------------------------------------------------

  def put(self, key: Any, value: Any, ctx: Optional[Mapping[str, Any]] = None) -> str:
    """Appends one line durably and returns its anchor (hex)."""
    return self.put_many([key], [value], None if ctx is None else [ctx])[0]

  def put_many(self, keys: Any, values: Any,
               ctxs: Optional[Sequence[Optional[Mapping[str, Any]]]] = None) -> list[str]:
    """Appends lines in one durable transaction; returns their anchors (hex), in order.

    Raises:
      ValueError: a vector of the wrong width or with non-finite entries, a context that is not
        a JSON object, or lists of different lengths (nothing is written).
    """
    keys_list, values_list = list(keys), list(values)
    if len(keys_list) != len(values_list):
      raise ValueError(f"put_many got {len(keys_list)} keys and {len(values_list)} values")
    ctx_list = [None] * len(keys_list) if ctxs is None else list(ctxs)
    if len(ctx_list) != len(keys_list):
      raise ValueError(f"put_many got {len(keys_list)} keys and {len(ctx_list)} contexts")
    key_bytes = [encoding.vector_bytes(f"keys[{i}]", k, self.key_dim)
                 for i, k in enumerate(keys_list)]
    value_bytes = [encoding.vector_bytes(f"values[{i}]", v, self.value_dim)
                   for i, v in enumerate(values_list)]
    ctx_bytes = [encoding.canonical_ctx(c) for c in ctx_list]
    if not key_bytes:
      return []
    with self._lock:
      self._check_open()
      self._conn.execute("BEGIN IMMEDIATE")   # the write lock, across processes
      try:
        self._catch_up()
        rows = self._chain(key_bytes, value_bytes, ctx_bytes)
        log.insert_rows(self._conn, rows)
        self._conn.execute("COMMIT")
      except BaseException:
        self._conn.execute("ROLLBACK")
        raise
      self._remember(rows)
      self._since_seal += len(rows)
      if self.config.seal_every and self._since_seal >= self.config.seal_every:
        try:
          self.seal()
        except (OSError, sqlite3.Error) as e:   # the lines are durable: report them anyway
          logging.warning("memory-line store %s: automatic seal failed (%s); the lines are "
                          "written and will be sealed by the next seal", self.path, e)
    return [r.anchor.hex() for r in rows]

  def _chain(self, key_bytes, value_bytes, ctx_bytes) -> list[log.Row]:
    """The new lines' fields, tags and anchors, following the newest stored line (which
    `_catch_up`, under the same write lock, has just loaded)."""
    seq, prev = self._last_seq + 1, self._last_anchor
    last_ts = int(self._ts.array[-1]) if self._ts.size else 0
    unit = index_lib.normalise(np.stack([np.frombuffer(k, "<f4") for k in key_bytes]))
    best = (self._index.search(unit, 1)[0][:, 0] if len(self._index)
            else np.full(len(unit), -np.inf))
    novelty = scoring.novelty(unit, best)
    ts_ns = max(int(self._clock()), last_ts)   # non-decreasing along the chain
    rows = []
    for i in range(len(key_bytes)):
      f = encoding.LineFields(seq + i, ts_ns, prev, key_bytes[i], value_bytes[i], ctx_bytes[i],
                              float(novelty[i]))
      anchor = encoding.anchor(self._secret, f)
      rows.append(log.Row(f, encoding.tags(self._secret, f), anchor))
      prev = anchor
    return rows

  def seal(self) -> Seal:
    """Records the count, the last anchor and the Merkle root of every anchor, MACed, in
    `seal.json` (temp file, fsync, rename) and in the database, under the write lock, so seals
    are written in the order of their counts across processes."""
    with self._lock:
      self._check_open()
      self._conn.execute("BEGIN IMMEDIATE")
      try:
        self._catch_up()
        ts_ns = int(self._clock())
        count, root, last = self._frontier.count, self._frontier.root(), self._last_anchor
        seal = Seal(count, last, root, ts_ns,
                    encoding.seal_mac(self._secret, count, last, root, ts_ns))
        # The file first: it only covers committed lines, so it is valid whether or not the
        # database's copy commits.
        log.write_atomically(os.path.join(self.path, log.SEAL_NAME),
                             json.dumps(seal.to_json(), indent=1).encode())
        log.insert_seal(self._conn, seal)
        self._conn.execute("COMMIT")
      except BaseException:
        self._conn.execute("ROLLBACK")
        raise
      self._since_seal = 0
      return seal

  # -- reading ------------------------------------------------------------------------------

  def _unit_queries(self, vec: Any) -> np.ndarray:
    q = np.asarray(vec, np.float32)
    if q.ndim not in (1, 2) or q.shape[-1] != self.key_dim:
      raise ValueError(f"query must be [{self.key_dim}] or [Q, {self.key_dim}], got {q.shape}")
    if not np.all(np.isfinite(q)):
      raise ValueError("query has non-finite entries")
    if np.any(np.linalg.norm(q, axis=-1) == 0):
      raise ValueError("query has zero norm (cosine similarity is undefined)")
    return index_lib.normalise(np.atleast_2d(q))

  def _score(self, vec: Any, k: int):
    """Per query: positions of the k heaviest matching lines and their score parts, [Q, k]
    (position -1 and weight 0 where fewer than k lines match)."""
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
      raise ValueError(f"k must be a positive integer, got {k!r}")
    unit = self._unit_queries(vec)
    with self._lock:
      self._check_open()
      self._catch_up()
      sims, pos = self._index.search(unit, max(k, self.config.candidates))
      now = int(self._clock())
      valid = (pos >= 0) & (sims >= self.config.similarity_floor)
      safe = np.where(valid, pos, 0)
      rec = scoring.recency(now, self._ts.array[safe], self.config.tau_s) if len(self._ts.array) \
          else np.zeros(pos.shape)
      nov = self._novelty.array[safe] if len(self._novelty.array) else np.zeros(pos.shape)
      w = np.where(valid, scoring.weights(self.config, rec, sims, nov), -np.inf)
      order = np.argsort(-w, axis=1, kind="stable")[:, :k]
      take = lambda a: np.take_along_axis(a, order, axis=1)
      w, keep = take(w), take(valid)
      positions = np.where(keep, take(pos), -1)
      return (positions, take(rec), take(sims.astype(np.float64)), take(nov),
              np.where(keep, w, 0.0))

  def query(self, vec: Any, k: int = 5) -> list[MemoryLine]:
    """The k heaviest lines whose key's cosine to `vec` reaches the similarity floor, heaviest
    first, with their recency, similarity and weight."""
    positions, rec, sim, _, w = self._score(np.asarray(vec, np.float32).reshape(-1), k)
    found = [(int(p), j) for j, p in enumerate(positions[0]) if p >= 0]
    if not found:
      return []
    with self._lock:
      seqs = [int(self._seqs.array[p]) for p, _ in found]
      rows = log.rows_by_seq(self._conn, seqs)
    return [MemoryLine.from_row(rows[s], recency=float(rec[0, j]), similarity=float(sim[0, j]),
                                weight=float(w[0, j]))
            for s, (_, j) in zip(seqs, found) if s in rows]

  def bias_vector(self, vec: Any, k: int = 5) -> np.ndarray:
    """sum(w v) / sum(w) over the k heaviest matching lines: [value_dim] for one query,
    [Q, value_dim] for a batch; zeros where no line matches."""
    positions, _, _, _, w = self._score(vec, k)
    if not (positions >= 0).any():
      return np.zeros(positions.shape[:1] + (self.value_dim,), np.float32)[
          0 if np.asarray(vec).ndim == 1 else slice(None)]
    with self._lock:
      values = self._values.array[np.where(positions >= 0, positions, 0)]
    b = scoring.bias(w, np.where((positions >= 0)[..., None], values, 0.0)).astype(np.float32)
    return b[0] if np.asarray(vec).ndim == 1 else b

  def lines(self, start: int = 0) -> Iterator[MemoryLine]:
    """Every stored line from seq `start` on, in order, read a page at a time (no scores)."""
    while True:
      with self._lock:   # a page at a time, so writers are not held up by a long read
        self._check_open()
        page = list(itertools.islice(log.iter_rows(self._conn, start), 4096))
      for row in page:
        yield MemoryLine.from_row(row)
      if len(page) < 4096:
        return
      start = page[-1].fields.seq + 1

  def export_jsonl(self, out_path: str) -> int:
    """Writes every line, one JSON object per line, atomically; returns how many."""
    with self._lock:
      self._check_open()
      chunks = []
      for row in log.iter_rows(self._conn):
        f = row.fields
        chunks.append(json.dumps({
            "seq": f.seq, "timestamp_ns": f.ts_ns, "prev": f.prev.hex(),
            "anchor": row.anchor.hex(), "key": np.frombuffer(f.key, "<f4").tolist(),
            "value": np.frombuffer(f.value, "<f4").tolist(), "ctx": json.loads(f.ctx),
            "novelty": f.novelty, "tags": row.tags.hex()}, sort_keys=True))
    log.write_atomically(out_path, ("\n".join(chunks) + ("\n" if chunks else "")).encode())
    return len(chunks)

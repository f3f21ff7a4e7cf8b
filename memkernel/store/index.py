"""The vector index over line keys: derived state, rebuilt from the log, never the truth.

Keys are unit-normalised, so inner product is cosine. `exact` is a numpy matmul over every key;
`flat` is faiss's exact inner-product index; `hnsw` and `ivf` are faiss's approximate ones; `auto`
stays exact up to `StoreConfig.exact_max` keys and builds HNSW from every key once past it.
"""

from __future__ import annotations

import numpy as np

from memkernel.store import config as config_lib


def normalise(x: np.ndarray) -> np.ndarray:
  """Rows of `x` scaled to unit length (zero rows stay zero)."""
  x = np.asarray(x, np.float32)
  norm = np.linalg.norm(x, axis=-1, keepdims=True)
  return x / np.where(norm > 0, norm, 1.0)


class Growing:
  """An array (any dtype) that grows by doubling along its first axis."""

  def __init__(self, width: int, dtype=np.float32):
    self._data = np.zeros((1024, width) if width else (1024,), dtype)
    self.size = 0

  def extend(self, rows: np.ndarray) -> None:
    need = self.size + len(rows)
    if need > len(self._data):
      grown = np.zeros((max(need, 2 * len(self._data)),) + self._data.shape[1:], self._data.dtype)
      grown[:self.size] = self._data[:self.size]
      self._data = grown
    self._data[self.size:need] = rows
    self.size = need

  @property
  def array(self) -> np.ndarray:
    return self._data[:self.size]


class VectorIndex:
  """Nearest keys by cosine; positions are the order keys were added (0, 1, ...)."""

  def __init__(self, dim: int, config: config_lib.StoreConfig):
    self.dim = dim
    self.config = config
    self.keys = Growing(dim)
    self._faiss = None
    self._preloaded = 0   # keys a loaded faiss index already holds
    self.kind = "exact" if config.index in ("auto", "exact") else config.index

  def __len__(self) -> int:
    return self.keys.size

  @property
  def built(self) -> bool:
    """Whether a faiss index answers the searches (else numpy over `keys`)."""
    return self._faiss is not None

  def settings(self) -> dict:
    """What shapes a built faiss index: a cached one is reused only under the same settings."""
    c = self.config
    return {"dim": self.dim, "index": c.index, "exact_max": c.exact_max, "hnsw_m": c.hnsw_m,
            "hnsw_ef_construction": c.hnsw_ef_construction, "ivf_lists": c.ivf_lists}

  def serialize(self) -> bytes:
    """The built faiss index's bytes (for a cache beside the log)."""
    import faiss
    return faiss.serialize_index(self._faiss).tobytes()

  def preload(self, data: bytes, kind: str) -> None:
    """Uses a serialized faiss index holding the first keys, before any key is added; `add`
    then extends `keys` from the log and gives the faiss index only the keys it lacks."""
    import faiss
    if len(self):
      raise ValueError("preload comes before any key is added")
    index = faiss.deserialize_index(np.frombuffer(data, np.uint8))
    if index.d != self.dim:
      raise ValueError(f"a cached index of width {index.d}, the store's keys have {self.dim}")
    if kind == "hnsw":
      index.hnsw.efSearch = self.config.hnsw_ef_search
    elif kind == "ivf":
      index.nprobe = min(self.config.ivf_probe, index.nlist)
    self._faiss, self.kind, self._preloaded = index, kind, index.ntotal

  def add(self, unit_keys: np.ndarray) -> None:
    unit_keys = np.ascontiguousarray(unit_keys, np.float32)
    start = self.keys.size
    self.keys.extend(unit_keys)
    if self._faiss is not None:
      held = max(0, self._preloaded - start)   # of these, already in a preloaded index
      if held < len(unit_keys):
        self._faiss.add(unit_keys[held:])
    elif self.kind != "exact" or (self.config.index == "auto"
                                  and len(self) > self.config.exact_max):
      self._build()

  def _build(self) -> None:
    import faiss  # Imported here: the exact index needs no faiss.
    cfg, kind = self.config, ("hnsw" if self.config.index == "auto" else self.config.index)
    keys = np.ascontiguousarray(self.keys.array)
    if kind == "ivf":
      lists = cfg.ivf_lists
      if len(keys) < 39 * lists:   # Too few to train every cluster: exact until there are.
        return
      quantizer = faiss.IndexFlatIP(self.dim)
      index = faiss.IndexIVFFlat(quantizer, self.dim, lists, faiss.METRIC_INNER_PRODUCT)
      index.train(keys)
      index.nprobe = min(cfg.ivf_probe, lists)
      self._quantizer = quantizer   # faiss does not own it: keep it alive with the index.
    elif kind == "hnsw":
      index = faiss.IndexHNSWFlat(self.dim, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
      index.hnsw.efConstruction = cfg.hnsw_ef_construction
      index.hnsw.efSearch = cfg.hnsw_ef_search
    else:
      index = faiss.IndexFlatIP(self.dim)
    index.add(keys)
    self._faiss, self.kind = index, kind

  def search(self, unit_queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k most similar keys per query: (similarities [Q, k], positions [Q, k]).

    Fewer than k keys (or an approximate index that finds fewer) pad with position -1.
    """
    q = np.ascontiguousarray(np.atleast_2d(unit_queries), np.float32)
    k = max(1, k)
    if self._faiss is not None:
      sims, pos = self._faiss.search(q, k)
      return sims, pos.astype(np.int64)
    keys = self.keys.array
    pos = np.full((len(q), k), -1, np.int64)
    sims = np.full((len(q), k), -np.inf, np.float32)
    kk = min(k, len(keys))
    if kk == 0:
      return sims, pos
    for start in range(0, len(q), 1024):   # blocks of queries: memory O(1024 * n)
      block = q[start:start + 1024] @ keys.T
      if kk == 1:
        top = block.argmax(axis=1)[:, None]
      else:
        top = np.argpartition(-block, kk - 1, axis=1)[:, :kk]
      top_sims = np.take_along_axis(block, top, axis=1)
      order = np.argsort(-top_sims, axis=1, kind="stable")
      pos[start:start + 1024, :kk] = np.take_along_axis(top, order, axis=1)
      sims[start:start + 1024, :kk] = np.take_along_axis(top_sims, order, axis=1)
    return sims, pos

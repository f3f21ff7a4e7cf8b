"""The store's frozen, validated settings: the seed's scoring and the vector index."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from memkernel import fields

INDEX_KINDS = ("auto", "exact", "flat", "hnsw", "ivf")


@dataclasses.dataclass(frozen=True)
class StoreConfig:
  """How a store scores lines and finds candidates.

  Scoring (seed 003): recency r = exp(-(t_now - t_i) / tau), cosine similarity s (lines below
  `similarity_floor` are never returned), novelty n_i = 1 - max_j cos(k_i, k_j) over the lines
  before i, fixed at insert (found by the index: exact with `exact` / `flat`, approximate with
  `hnsw` / `ivf`); a line weighs w = alpha r + beta s + gamma n, and the bias vector is
  sum(w v) / sum(w) over the k heaviest lines.

  Attributes:
    tau_s: recency time constant in seconds (6 h).
    alpha, beta, gamma: weights of recency, similarity and novelty.
    similarity_floor: cosine below which a line is not a match.
    candidates: how many nearest lines (by cosine) a query scores before keeping the k heaviest;
      at least k.
    index: `exact` (numpy over every line), `flat` (faiss exact inner product), `hnsw` or `ivf`
      (faiss approximate; IVF is trained once the store holds 39 * ivf_lists lines, exact
      before), or `auto` (exact up to `exact_max` lines, HNSW above).
    exact_max: the size at which `auto` switches to HNSW.
    hnsw_m, hnsw_ef_search, hnsw_ef_construction: HNSW's graph degree and search widths.
    ivf_lists, ivf_probe: IVF's cluster count and how many clusters a query visits.
    seal_every: seal automatically after this many lines (0: only when `seal()` is called).
    bias_alpha, bias_k: a model's logits bias from this store is bias_alpha times the bias
      vector of the bias_k heaviest lines (`memkernel.store_bias.StoreBias`'s defaults).
    busy_timeout_s: how long a writer waits for another process's write lock before failing.
  """
  tau_s: float = 6 * 3600.0
  alpha: float = 0.35
  beta: float = 0.50
  gamma: float = 0.08
  similarity_floor: float = 0.15
  candidates: int = 64
  index: str = "auto"
  exact_max: int = 50_000
  hnsw_m: int = 32
  hnsw_ef_search: int = 128
  hnsw_ef_construction: int = 80
  ivf_lists: int = 1024
  ivf_probe: int = 32
  seal_every: int = 0
  bias_alpha: float = 16.0
  bias_k: int = 5
  busy_timeout_s: float = 60.0

  def __post_init__(self):
    s = "store"
    fields.check_number(s, "tau_s", self.tau_s, 0.0, strict=True)
    for name in ("alpha", "beta", "gamma"):
      fields.check_number(s, name, getattr(self, name), 0.0, strict=False)
    if self.alpha + self.beta + self.gamma <= 0:
      raise ValueError("store.alpha + beta + gamma must be > 0 (a line's weight would be 0)")
    fields.check_number(s, "similarity_floor", self.similarity_floor, -1.0, strict=False)
    if self.similarity_floor > 1.0:
      raise ValueError(f"store.similarity_floor must be <= 1, got {self.similarity_floor!r}")
    fields.check_int(s, "candidates", self.candidates, 1)
    if self.index not in INDEX_KINDS:
      raise ValueError(f"store.index must be one of {INDEX_KINDS}, got {self.index!r}")
    for name in ("exact_max", "hnsw_m", "hnsw_ef_search", "hnsw_ef_construction", "ivf_lists",
                 "ivf_probe"):
      fields.check_int(s, name, getattr(self, name), 1)
    fields.check_int(s, "seal_every", self.seal_every, 0)
    fields.check_number(s, "bias_alpha", self.bias_alpha, 0.0, strict=False)
    fields.check_int(s, "bias_k", self.bias_k, 1)
    fields.check_number(s, "busy_timeout_s", self.busy_timeout_s, 0.0, strict=True)

  @classmethod
  def from_mapping(cls, values: Mapping[str, Any]) -> "StoreConfig":
    return fields.from_mapping(cls, values, "store")

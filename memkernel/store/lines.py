"""What a query returns: a memory line with the parts of its score."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np

from memkernel.store import log


@dataclasses.dataclass(frozen=True)
class MemoryLine:
  """One line of the store, as a query scored it.

  Attributes:
    seq: the line's place in the chain (0, 1, 2, ...).
    timestamp: when it was written, seconds since the epoch.
    key, value: the stored vectors, float32.
    ctx: its context (a JSON object).
    anchor: hex of the keyed hash that chains it to the line before.
    novelty: 1 - the largest cosine to an earlier line's key, fixed at insert.
    recency, similarity, weight: the query's score parts, w = alpha r + beta s + gamma n.
  """
  seq: int
  timestamp: float
  key: np.ndarray
  value: np.ndarray
  ctx: dict[str, Any]
  anchor: str
  novelty: float
  recency: float = float("nan")
  similarity: float = float("nan")
  weight: float = float("nan")

  @classmethod
  def from_row(cls, row: log.Row, **scores: float) -> "MemoryLine":
    f = row.fields
    return cls(seq=f.seq, timestamp=f.ts_ns / 1e9, key=np.frombuffer(f.key, "<f4").copy(),
               value=np.frombuffer(f.value, "<f4").copy(), ctx=json.loads(f.ctx),
               anchor=row.anchor.hex(), novelty=f.novelty, **scores)

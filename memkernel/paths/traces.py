"""Persistent read traces (seed 004): sparse salient read edges, kept as an EMA with decay and a
per-head quota, and the measurements that say whether they could bias routing.

An *edge* joins a query to a token the exact read attended to; its salience is the read weight
(the leaf's selection weight × the read's attention on the token: inference salience). Edges are
keyed three ways (`KEYINGS`):

- `offset`: how many leaves back the token lies (query leaf − token leaf): position-relative,
  blind to the query's content;
- `content`: (the query's token, the read token): content-keyed, as the issue asks;
- `context`: (the query's token, the token before the read token): content-keyed by what the
  read token follows (a recall probe's read lands on the value *after* the matching key);
- `position`: (query position, token position): the seed's absolute coordinates, the control
  that public KV-selection work found does not transfer across queries.

`ReadTraces` holds one dense row of edge strengths per group (layer × head), updated once per
batch as a training loop would: the batch's salience per edge S (summed over the group's
queries, divided by their number); M <- retention · M + (1 - retention) · S where S exceeds
`threshold`, M <- decay · M elsewhere; then every group keeps its `quota` strongest edges (12
bytes each in the seed's format). `overlap` compares the top edges of two traces; `leaf_bias`
scores the leaves a query can see by a trace, the routing bias alpha · trace would add.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

KEYINGS = ("offset", "content", "context", "position")
BYTES_PER_EDGE = 12    # The seed's format: layer, head, query, key (1 + 1 + 2 + 2), salience, age.


@dataclasses.dataclass(frozen=True)
class Reads:
  """Every captured read of some queries, one row per (query, head, read token).

  group: layer * heads + head; query / target: positions; query_token / target_token /
  target_previous: token ids (the token before the target; 0 at position 0); salience: the read
  weight; sequence: a global row number.
  """
  group: np.ndarray
  query: np.ndarray
  target: np.ndarray
  query_token: np.ndarray
  target_token: np.ndarray
  target_previous: np.ndarray
  salience: np.ndarray
  sequence: np.ndarray

  def __len__(self) -> int:
    return len(self.group)

  def select(self, keep: np.ndarray) -> "Reads":
    return Reads(**{f.name: getattr(self, f.name)[keep] for f in dataclasses.fields(self)})


def edge_space(keying: str, *, leaf_size: int, seq_len: int, vocab_size: int) -> int:
  """How many distinct edges a keying has for sequences of `seq_len` tokens."""
  _check_keying(keying)
  return {"offset": -(-seq_len // leaf_size), "content": vocab_size * vocab_size,
          "context": vocab_size * vocab_size, "position": seq_len * seq_len}[keying]


def edge_ids(reads: Reads, keying: str, *, leaf_size: int, seq_len: int,
             vocab_size: int) -> np.ndarray:
  """Each read's edge under `keying` (an index into `edge_space`)."""
  _check_keying(keying)
  if keying == "offset":
    return reads.query // leaf_size - reads.target // leaf_size
  if keying == "content":
    return reads.query_token * vocab_size + reads.target_token
  if keying == "context":
    return reads.query_token * vocab_size + reads.target_previous
  return reads.query * seq_len + reads.target


def _check_keying(keying: str) -> None:
  if keying not in KEYINGS:
    raise ValueError(f"keying must be one of {KEYINGS}, got {keying!r}")


class ReadTraces:
  """Edge strengths per group: an EMA of batch salience, decayed when unused, cut to a quota."""

  def __init__(self, groups: int, edges: int, *, retention: float = 0.9, decay: float = 0.99,
               threshold: float = 0.0, quota: int = 2048):
    for name, value in (("retention", retention), ("decay", decay)):
      if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    if threshold < 0:
      raise ValueError(f"threshold must be >= 0, got {threshold}")
    if groups < 1 or edges < 1 or quota < 1:
      raise ValueError(f"groups, edges and quota must be positive, got {groups}, {edges}, {quota}")
    self.retention, self.decay, self.threshold, self.quota = retention, decay, threshold, quota
    self.strength = np.zeros((groups, edges), np.float32)
    self.age = np.zeros((groups, edges), np.int32)     # Updates since the edge was last captured.

  @property
  def shape(self) -> tuple[int, int]:
    return self.strength.shape

  def update(self, group: np.ndarray, edge: np.ndarray, salience: np.ndarray,
             queries_per_group: np.ndarray) -> None:
    """One batch: `salience` of reads on (`group`, `edge`); `queries_per_group` [groups] the
    batch's scored queries of each group (the normaliser)."""
    groups, edges = self.shape
    if len(group) and (edge.min() < 0 or edge.max() >= edges):
      raise ValueError(f"edge ids must lie in [0, {edges}), got [{edge.min()}, {edge.max()}]")
    s = np.bincount(group * edges + edge, weights=salience, minlength=groups * edges)
    s = (s.reshape(groups, edges) / np.maximum(queries_per_group, 1)[:, None]).astype(np.float32)
    captured = s > self.threshold
    self.strength = np.where(captured, self.retention * self.strength
                             + (1 - self.retention) * s, self.decay * self.strength)
    self.age = np.where(captured, 0, self.age + 1)
    self._cut_to_quota()

  def _cut_to_quota(self) -> None:
    if self.quota >= self.shape[1]:
      return
    kth = np.partition(self.strength, -self.quota, axis=1)[:, -self.quota][:, None]
    above, tied = self.strength > kth, (self.strength == kth) & (self.strength > 0)
    # Of the edges tied with the quota's weakest, keep as many as the quota has room for.
    room = self.quota - above.sum(axis=1, keepdims=True)
    keep = above | (tied & (np.cumsum(tied, axis=1) <= room))
    self.strength = np.where(keep, self.strength, 0.0).astype(np.float32)

  def edges_held(self) -> int:
    return int(np.count_nonzero(self.strength))

  def bytes_held(self) -> int:
    return self.edges_held() * BYTES_PER_EDGE

  def top(self, n: int) -> list[set[int]]:
    """Per group, the ids of its `n` strongest nonzero edges."""
    out = []
    for row in self.strength:
      idx = np.argsort(-row, kind="stable")[:n]
      out.append({int(i) for i in idx if row[i] > 0})
    return out


def overlap(a: ReadTraces, b: ReadTraces, n: int) -> float:
  """Mean over groups of |top_n(a) ∩ top_n(b)| / min(n, |top_n(a)|, |top_n(b)|): the share of
  their strongest edges two traces have in common (0 for a group where either holds none)."""
  if a.shape != b.shape:
    raise ValueError(f"traces differ in shape: {a.shape} and {b.shape}")
  shares = [len(x & y) / min(len(x), len(y)) if x and y else 0.0
            for x, y in zip(a.top(n), b.top(n))]
  return float(np.mean(shares))


def leaf_bias(trace: ReadTraces, keying: str, group: int, query: int, query_token: int,
              tokens: np.ndarray, *, leaf_size: int, vocab_size: int) -> np.ndarray:
  """The trace's score of every leaf the query at position `query` can see (leaves 0 ... its
  own), in one sequence's `tokens`: the strongest edge from the query into the leaf. Edges the
  trace's space does not hold (offsets or positions beyond the length it was built at) are 0."""
  _check_keying(keying)
  row = trace.strength[group]
  leaves = query // leaf_size + 1
  if keying == "offset":
    offsets = query // leaf_size - np.arange(leaves)
    return np.where(offsets < len(row), row[np.minimum(offsets, len(row) - 1)], 0.0)
  positions = np.arange(leaves * leaf_size).reshape(leaves, leaf_size)
  visible = positions <= query
  positions = np.minimum(positions, len(tokens) - 1)
  if keying in ("content", "context"):
    keyed = tokens if keying == "content" else np.concatenate([[0], tokens[:-1]])
    scores = row.reshape(vocab_size, vocab_size)[query_token][keyed[positions]]
  else:
    seq_len = int(round(np.sqrt(row.shape[0])))
    inside = (positions < seq_len) & (query < seq_len)
    scores = np.where(inside, row.reshape(seq_len, seq_len)[min(query, seq_len - 1)][
        np.minimum(positions, seq_len - 1)], 0.0)
  return np.where(visible, scores, 0.0).max(axis=1)


def hit_rate(trace: ReadTraces, keying: str, tokens: Mapping[int, np.ndarray],
             target_leaf: Mapping[tuple[int, int, int], int], *, leaf_size: int,
             vocab_size: int) -> dict[str, Any]:
  """How often the trace's best visible leaf is the target leaf of a (sequence, group, query),
  ties broken toward the query's own leaf: overall, per group (`groups`), and `chance` (the mean
  of 1 / visible leaves)."""
  hits: dict[int, list[bool]] = {}
  chance = []
  for (sequence, group, query), leaf in target_leaf.items():
    seq_tokens = tokens[sequence]
    scores = leaf_bias(trace, keying, group, query, int(seq_tokens[query]), seq_tokens,
                       leaf_size=leaf_size, vocab_size=vocab_size)
    best = len(scores) - 1 - int(np.argmax(scores[::-1]))
    hits.setdefault(group, []).append(best == leaf)
    chance.append(1.0 / len(scores))
  if not chance:
    return {"trace": 0.0, "chance": 0.0, "queries": 0, "groups": []}
  return {"trace": float(np.mean([h for g in hits.values() for h in g])),
          "chance": float(np.mean(chance)), "queries": len(chance),
          "groups": [float(np.mean(hits[g])) if g in hits else 0.0
                     for g in range(trace.shape[0])]}

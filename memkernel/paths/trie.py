"""A path trie with a budget: how often each routing path (and each prefix of one) was taken.

    trie = PathTrie(budget=4096)
    trie.insert(paths_NS, utility=delta_N, step=step)   # rows of symbols, -1 padded
    trie.decay(0.5)                                     # halve every count
    for motif in trie.motifs(min_count=8): ...          # complete paths, most frequent first

A path is a row of small non-negative symbols (`memkernel.paths.motifs.encode`: layer and head,
the level the descent started at, then one child choice per level); every prefix is a trie node
with a count (how many inserted paths passed through it), a utility sum (the loss deltas given
with them), the step it was last seen at, and an end count (paths that stopped there). The
entropy of a node is that of its next choice: its children's counts and its end count. Over
budget, the trie prunes its least frequent leaves (a node's count is at least the sum of its
children's, so what stays is always prefix-closed), as public frequency tries for speculative
decoding do. `state()` / `from_state` are numpy arrays: what a checkpoint or a JSON file holds.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from typing import Any, Mapping, Optional

import numpy as np

ROOT = 0


@dataclasses.dataclass(frozen=True)
class Motif:
  """A complete path: its symbols, how often it was taken, its mean utility (None if no utility
  was given with it), the entropy of the choices along it (mean over its nodes) and the step it
  was last seen at."""
  path: tuple[int, ...]
  count: float
  utility: Optional[float]
  entropy: float
  last_seen: int


class PathTrie:
  """Counts of routing paths and of their prefixes, pruned to at most `budget` nodes."""

  def __init__(self, budget: int = 1 << 16):
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < 2:
      raise ValueError(f"budget must be an integer >= 2 (the root and one node), got {budget!r}")
    self.budget = budget
    self._children: dict[tuple[int, int], int] = {}
    self._parent = [-1]
    self._symbol = [-1]
    self._count = [0.0]
    self._end = [0.0]
    self._utility = [0.0]
    self._utility_n = [0.0]
    self._last = [-1]
    self._free: list[int] = []

  def __len__(self) -> int:
    """Live nodes, the root included."""
    return len(self._parent) - len(self._free)

  # ----------------------------------------------------------------------------------------------
  # Building.

  def _child(self, node: int, symbol: int) -> int:
    found = self._children.get((node, symbol))
    if found is not None:
      return found
    if self._free:
      new = self._free.pop()
      self._parent[new], self._symbol[new] = node, symbol
      self._count[new] = self._end[new] = self._utility[new] = self._utility_n[new] = 0.0
      self._last[new] = -1
    else:
      new = len(self._parent)
      for arr, value in ((self._parent, node), (self._symbol, symbol), (self._count, 0.0),
                         (self._end, 0.0), (self._utility, 0.0), (self._utility_n, 0.0),
                         (self._last, -1)):
        arr.append(value)
    self._children[(node, symbol)] = new
    return new

  def insert(self, paths: Any, *, utility: Any = None, step: int = 0) -> None:
    """Adds every row of `paths` (int [N, S], symbols >= 0 then -1 padding; an all -1 row is
    skipped), each with its `utility` ([N] floats, e.g. the loss delta of taking it away; NaN:
    none), seen at `step`; then prunes to the budget."""
    paths = np.asarray(paths)
    if paths.ndim != 2 or not np.issubdtype(paths.dtype, np.integer):
      raise ValueError(f"paths must be an integer array [N, S], got {paths.dtype} {paths.shape}")
    if utility is not None:
      utility = np.asarray(utility, np.float64)
      if utility.shape != paths.shape[:1]:
        raise ValueError(f"utility must be [N] = [{paths.shape[0]}], got {utility.shape}")
    valid = paths >= 0
    if np.any(valid[:, 1:] & ~valid[:, :-1]):
      raise ValueError("a path's symbols must come before its -1 padding")
    keep = valid[:, 0]
    paths = paths[keep]
    if not len(paths):
      return
    # One walk per distinct path, with its multiplicity and its utility sums.
    rows, inverse, counts = np.unique(paths, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    if utility is not None:
      u = utility[keep]
      has = np.isfinite(u)
      u_sum = np.bincount(inverse, weights=np.where(has, u, 0.0), minlength=len(rows))
      u_n = np.bincount(inverse, weights=has.astype(np.float64), minlength=len(rows))
    for r, row in enumerate(rows):
      node = ROOT
      self._count[ROOT] += counts[r]
      for symbol in row:
        if symbol < 0:
          break
        node = self._child(node, int(symbol))
        self._count[node] += counts[r]
        self._last[node] = step
        if utility is not None:
          self._utility[node] += u_sum[r]
          self._utility_n[node] += u_n[r]
      self._end[node] += counts[r]
    self.prune()

  def decay(self, factor: float) -> None:
    """Multiplies every count and utility sum by `factor` in (0, 1] (ageing); nodes whose count
    falls below 1e-9 are removed."""
    if not 0.0 < factor <= 1.0:
      raise ValueError(f"decay factor must lie in (0, 1], got {factor!r}")
    for arr in (self._count, self._end, self._utility, self._utility_n):
      for i in range(len(arr)):
        arr[i] *= factor
    self.prune(min_count=1e-9)

  def prune(self, min_count: float = 0.0) -> None:
    """Removes the least frequent leaf (the oldest among equal counts), one at a time, while it
    counts below `min_count` or the trie is over budget. A parent counts at least as much as its
    children, so what stays is the most frequent nodes, prefix-closed."""
    children = {n: 0 for n in self._live()}
    for parent, _ in self._children:
      children[parent] += 1
    heap = [(self._count[n], self._last[n], n) for n, c in children.items()
            if c == 0 and n != ROOT]
    heapq.heapify(heap)
    while heap and (len(self) > self.budget or heap[0][0] < min_count):
      _, _, node = heapq.heappop(heap)
      parent = self._parent[node]
      self._remove(node)
      children[parent] -= 1
      if children[parent] == 0 and parent != ROOT:
        heapq.heappush(heap, (self._count[parent], self._last[parent], parent))

  def _live(self):
    free = set(self._free)
    return (n for n in range(len(self._parent)) if n not in free)

  def _remove(self, node: int) -> None:
    parent = self._parent[node]
    self._end[parent] += self._end[node]   # The paths that went on through it now end above.
    del self._children[(parent, self._symbol[node])]
    self._parent[node] = -2
    self._free.append(node)

  # ----------------------------------------------------------------------------------------------
  # Reading.

  def find(self, path) -> Optional[int]:
    """The node of `path` (a sequence of symbols, -1 padding ignored), or None."""
    node = ROOT
    for symbol in path:
      if symbol < 0:
        break
      node = self._children.get((node, int(symbol)))
      if node is None:
        return None
    return node

  def count(self, path) -> float:
    """How many inserted paths began with `path` (0 if pruned or never seen)."""
    node = self.find(path)
    return 0.0 if node is None else self._count[node]

  def _child_map(self) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for (p, _), c in self._children.items():
      out.setdefault(p, []).append(c)
    return out

  def entropy(self, node: int, _children: Optional[dict[int, list[int]]] = None) -> float:
    """Entropy in bits of the choice after `node`: over its children and stopping there."""
    children = (_children if _children is not None else self._child_map()).get(node, [])
    counts = [self._count[c] for c in children] + [self._end[node]]
    total = sum(counts)
    return -sum(c / total * math.log2(c / total) for c in counts if c > 0) if total else 0.0

  def path_of(self, node: int) -> tuple[int, ...]:
    symbols = []
    while node != ROOT:
      symbols.append(self._symbol[node])
      node = self._parent[node]
    return tuple(reversed(symbols))

  def nodes(self) -> list[tuple[tuple[int, ...], float]]:
    """(prefix, count) of every live node but the root."""
    return [(self.path_of(n), self._count[n]) for n in self._live() if n != ROOT]

  def motifs(self, min_count: float = 0.0) -> list[Motif]:
    """Complete paths (nodes where paths ended, at least `min_count` of them), most frequent
    first."""
    out, children = [], self._child_map()
    entropy: dict[int, float] = {}

    def entropy_of(node):
      if node not in entropy:
        entropy[node] = self.entropy(node, children)
      return entropy[node]

    for node in self._live():
      if node == ROOT or self._end[node] <= 0 or self._end[node] < min_count:
        continue
      along, n = [], node
      while n != ROOT:
        along.append(n)
        n = self._parent[n]
      u_n = self._utility_n[node]
      out.append(Motif(path=self.path_of(node), count=self._end[node],
                       utility=self._utility[node] / u_n if u_n else None,
                       entropy=float(np.mean([entropy_of(self._parent[a]) for a in along])),
                       last_seen=self._last[node]))
    return sorted(out, key=lambda m: (-m.count, m.path))

  # ----------------------------------------------------------------------------------------------
  # State.

  def state(self) -> dict[str, np.ndarray]:
    """The live nodes as arrays (renumbered, parents first): what a checkpoint stores."""
    live = sorted(self._live(), key=lambda n: len(self.path_of(n)))
    index = {n: i for i, n in enumerate(live)}
    return {"budget": np.asarray(self.budget, np.int64),
            "parent": np.asarray([index.get(self._parent[n], -1) for n in live], np.int64),
            "symbol": np.asarray([self._symbol[n] for n in live], np.int64),
            "count": np.asarray([self._count[n] for n in live], np.float64),
            "end": np.asarray([self._end[n] for n in live], np.float64),
            "utility": np.asarray([self._utility[n] for n in live], np.float64),
            "utility_n": np.asarray([self._utility_n[n] for n in live], np.float64),
            "last_seen": np.asarray([self._last[n] for n in live], np.int64)}

  @classmethod
  def from_state(cls, state: Mapping[str, Any]) -> "PathTrie":
    """The trie `state()` described."""
    trie = cls(int(np.asarray(state["budget"])))
    parent = np.asarray(state["parent"])
    if len(parent) == 0 or parent[0] != -1 or np.any(parent[1:] < 0) \
        or np.any(parent[1:] >= np.arange(1, len(parent))):
      raise ValueError("a path trie's state lists the root first and every parent before its "
                       "children")
    trie._parent = parent.tolist()
    trie._symbol = np.asarray(state["symbol"]).tolist()
    for name, attr in (("count", "_count"), ("end", "_end"), ("utility", "_utility"),
                       ("utility_n", "_utility_n")):
      setattr(trie, attr, np.asarray(state[name], np.float64).tolist())
    trie._last = np.asarray(state["last_seen"]).tolist()
    trie._children = {(p, s): n for n, (p, s) in enumerate(zip(trie._parent, trie._symbol))
                      if n != ROOT}
    return trie

"""Routing paths as symbols, and what they encode.

    paths_BTHS = encode(trace.path, num_leaves, layer=0)        # from any form's RouteTrace
    stats = path_statistics(keys_N, tokens_N, previous_N, sequence_N)

A head's path is its descent to its top leaf (`RouteTrace.path`: the node held after each
routing step, level-major flat indices). As symbols: the layer and head (`layer * heads + head`),
the level the descent started at (the Fenwick node it entered), then one child choice (0 left,
1 right) per level below it, down to the leaf. Two queries share a path when they enter the same
level and make the same choices: the same place *relative to the tree's blocks*, wherever the
query is.

`path_statistics` measures, over a set of queries' paths: the entropy of the paths, how much of
it the query token's identity explains against the previous token's (mutual information, less
the same measured with the tokens shuffled, which removes the plug-in estimate's bias), how often a
path recurs at other positions of the same sequence and in other sequences, and how often a
crystallized path proposed before routing would be right (`proposals`: the acceptance rate that
bounds what speculative routing could save).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

SHUFFLES = 4     # Permutations the mutual information's bias is estimated from.


def node_levels(flat: np.ndarray, num_leaves: int) -> tuple[np.ndarray, np.ndarray]:
  """(level, index within level) of level-major flat node indices (`routing.flat_index`)."""
  flat = np.asarray(flat, np.int64)
  levels = num_leaves.bit_length()                        # log2(N) + 1 levels
  starts = 2 * num_leaves - ((2 * num_leaves) >> np.arange(levels + 1))
  level = np.searchsorted(starts, flat, side="right") - 1
  return level, flat - starts[np.clip(level, 0, levels)]


def encode(path_BTHS: Any, num_leaves: int, *, layer: int = 0) -> np.ndarray:
  """int64 [B, T, H, 2 + log2(N)] path symbols (see the module doc), -1 padded; all -1 where the
  head read nothing."""
  path = np.asarray(path_BTHS, np.int64)
  b, t, h, steps = path.shape
  width = 2 + max(num_leaves.bit_length() - 1, 0)
  out = np.full((b, t, h, width), -1, np.int64)
  valid = path >= 0
  level, index = node_levels(np.where(valid, path, 0), num_leaves)
  has = valid[..., 0]
  out[..., 0] = np.where(has, layer * h + np.arange(h), -1)
  out[..., 1] = np.where(has, level[..., 0], -1)
  for s in range(1, steps):
    out[..., 1 + s] = np.where(valid[..., s], index[..., s] & 1, -1)
  return out


def keys_of(paths_NS: np.ndarray) -> np.ndarray:
  """An int64 id per distinct row of `paths_NS` (equal rows, equal ids)."""
  if not len(paths_NS):
    return np.zeros((0,), np.int64)
  return np.unique(paths_NS, axis=0, return_inverse=True)[1].reshape(-1).astype(np.int64)


def entropy_bits(ids: np.ndarray) -> float:
  """Plug-in entropy in bits of a sample of ids."""
  if not len(ids):
    return 0.0
  p = np.bincount(np.unique(ids, return_inverse=True)[1].reshape(-1)) / len(ids)
  return float(-np.sum(p * np.log2(p)))


def mutual_information_bits(a: np.ndarray, b: np.ndarray) -> float:
  """Plug-in I(a; b) = H(a) + H(b) - H(a, b) in bits."""
  joint = np.unique(np.stack([a, b], 1), axis=0, return_inverse=True)[1].reshape(-1)
  return entropy_bits(a) + entropy_bits(b) - entropy_bits(joint)


def explained(paths: np.ndarray, feature: np.ndarray, seed: int = 0) -> dict[str, float]:
  """How much of the paths' entropy `feature` explains: I(path; feature) in bits, the same with
  the feature shuffled (the estimate's bias: a feature with many values 'explains' a small
  sample by chance), and their difference as a fraction of H(path)."""
  h = entropy_bits(paths)
  mi = mutual_information_bits(paths, feature)
  rng = np.random.default_rng(seed)
  shuffled = float(np.mean([mutual_information_bits(paths, rng.permutation(feature))
                            for _ in range(SHUFFLES)]))
  return {"mutual_information_bits": mi, "shuffled_bits": shuffled,
          "fraction": (mi - shuffled) / h if h > 0 else 0.0}


def recurrence(paths: np.ndarray, sequence: np.ndarray) -> dict[str, float]:
  """The fraction of queries whose path another query of the same sequence also took, and the
  fraction whose path a query of another sequence took."""
  if not len(paths):
    return {"within_sequence": 0.0, "across_sequences": 0.0}
  pair = np.unique(np.stack([paths, sequence], 1), axis=0, return_inverse=True,
                   return_counts=True)
  in_sequence = pair[2][pair[1].reshape(-1)]                # queries sharing (path, sequence)
  distinct = pair[0]                                        # (path, sequence) pairs
  sequences_per_path = np.bincount(distinct[:, 0])
  return {"within_sequence": float(np.mean(in_sequence > 1)),
          "across_sequences": float(np.mean(sequences_per_path[paths] > 1))}


def proposals(paths_NS: np.ndarray, keys: np.ndarray, sequence: np.ndarray) -> dict[str, float]:
  """Crystallized paths as proposals, measured before anything is built: the queries of the even
  sequences crystallize, per key (the query's token, say), their most frequent path; each query
  of the odd sequences is proposed the path of its key (nothing if its key was not seen).
  `accepted` is the fraction whose whole path equals the proposal, `prefix` the mean fraction of
  their path's symbols the proposal gets right before its first wrong one (the levels a verifier
  would confirm: the sequential beam steps speculation could skip), `covered` the fraction that
  got a proposal."""
  fit = sequence % 2 == 0
  test = ~fit
  if not fit.any() or not test.any():
    return {"accepted": 0.0, "prefix": 0.0, "covered": 0.0}
  ids = keys_of(paths_NS)
  best: dict[Any, int] = {}
  pair, counts = np.unique(np.stack([keys[fit], ids[fit]], 1), axis=0, return_counts=True)
  for (key, path), count in sorted(zip(map(tuple, pair), counts), key=lambda x: x[1]):
    best[key] = path                                   # The most frequent path last wins.
  first_row = {int(i): r for r, i in reversed(list(enumerate(ids)))}
  accepted, prefix, covered = [], [], []
  for key, path_id, row in zip(keys[test], ids[test], paths_NS[test]):
    proposal = best.get(key)
    covered.append(proposal is not None)
    if proposal is None:
      accepted.append(False)
      prefix.append(0.0)
      continue
    accepted.append(proposal == path_id)
    want = row[row >= 0]
    got = paths_NS[first_row[proposal]]
    same = np.cumprod(got[:len(want)] == want)
    prefix.append(float(np.sum(same)) / len(want))
  return {"accepted": float(np.mean(accepted)), "prefix": float(np.mean(prefix)),
          "covered": float(np.mean(covered))}


def path_statistics(paths_NS: np.ndarray, tokens: np.ndarray, previous: np.ndarray,
                    sequence: np.ndarray) -> dict[str, Any]:
  """Statistics of one group of queries (one layer's head, say): `paths_NS` their paths'
  symbols, the query's token, the token before it, and the sequence it is in."""
  paths = keys_of(paths_NS)
  n = len(paths)
  counts = np.sort(np.bincount(np.unique(paths, return_inverse=True)[1].reshape(-1)))[::-1] \
      if n else np.zeros((0,), np.int64)
  return {"queries": int(n), "distinct_paths": int(len(counts)),
          "entropy_bits": entropy_bits(paths),
          "top16_share": float(np.sum(counts[:16]) / n) if n else 0.0,
          "token": explained(paths, tokens), "previous_token": explained(paths, previous),
          "recurs": recurrence(paths, sequence),
          "proposals": {"by_token": proposals(paths_NS, tokens, sequence),
                        "by_previous_token": proposals(paths_NS, previous, sequence),
                        "most_frequent": proposals(paths_NS, np.zeros_like(tokens), sequence)},
          "max_entropy_bits": math.log2(n) if n else 0.0}

"""The Merkle tree hash of RFC 9162 (Certificate Transparency v2) over a store's anchors.

Leaves hash as SHA-256(0x00 || anchor), interior nodes as SHA-256(0x01 || left || right); a tree
of n leaves splits at the largest power of two below n. Computed bottom-up (an unpaired last node
moves up a level unchanged, which gives the same root as the RFC's recursive split), so a million
leaves need no recursion.
"""

from __future__ import annotations

import hashlib
from typing import Iterable

EMPTY_ROOT = hashlib.sha256(b"").digest()


def leaf_hash(data: bytes) -> bytes:
  return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
  return hashlib.sha256(b"\x01" + left + right).digest()


class MerkleFrontier:
  """An append-only Merkle tree kept as its frontier: O(log n) hashes of state.

  `append` adds a leaf; `root()` is RFC 9162's MTH of every leaf so far, at any time.
  """

  def __init__(self):
    self._stack: list[tuple[int, bytes]] = []   # (height, hash) of full subtrees, left to right
    self.count = 0

  def append(self, data: bytes) -> None:
    node, height = leaf_hash(data), 0
    while self._stack and self._stack[-1][0] == height:
      _, left = self._stack.pop()
      node, height = node_hash(left, node), height + 1
    self._stack.append((height, node))
    self.count += 1

  def extend(self, items: Iterable[bytes]) -> None:
    for item in items:
      self.append(item)

  def root(self) -> bytes:
    if not self._stack:
      return EMPTY_ROOT
    node = self._stack[-1][1]
    for _, left in reversed(self._stack[:-1]):
      node = node_hash(left, node)
    return node


def merkle_root(items: Iterable[bytes]) -> bytes:
  """RFC 9162's Merkle tree hash of `items`, iteratively."""
  frontier = MerkleFrontier()
  frontier.extend(items)
  return frontier.root()

"""Typed outputs of a forward pass: what a model returns beside its logits.

`Outputs` replaces the untyped `aux` dicts: every family fills the fields it has and leaves the
others `None`. `RouteTrace` is what a routing layer selected and read, per query and head,
including the path its beam took down the tree (the routing-path study reads it).

Shape key in `memkernel.shapes`.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.struct
import jax


@flax.struct.dataclass
class RouteTrace:
  """One routing layer's choices for every query.

  Attributes:
    leaves: int32 [B, T, H, K], the leaves read (-1: none).
    weights: float32 [B, T, H, K], their selection weights.
    runner_up: int32 [B, T, H, K], the best pruned leaves at leaf depth (-1: none).
    entropy: float32 [B, T, H], mean candidate entropy over the descent.
    start_level: int32 [B, T, H], level of the best first-step candidate (-1: nothing visible).
    read_probs: float32 [B, T, H, K, L], the exact read's attention over the leaves' tokens.
    read_active: bool [B, T, H], whether the head read anything.
    path: int32 [B, T, H, steps], the router's descent to its top leaf: the node that beam slot
      held after each routing step (flat level-major index; -1 past leaf depth or when the router
      selected nothing). An intervention or oracle that replaces `leaves` leaves it as routed.
  """

  leaves: jax.Array
  weights: jax.Array
  runner_up: jax.Array
  entropy: jax.Array
  start_level: jax.Array
  read_probs: jax.Array
  read_active: jax.Array
  path: Optional[jax.Array] = None


@flax.struct.dataclass
class Outputs:
  """Everything a forward returns beside its logits.

  Attributes:
    losses: weighted auxiliary training losses by name (added to the task loss when training).
    metrics: scalar diagnostics by name.
    routes: per layer, the layer's `RouteTrace` (None for a layer or family that does not route).
    gates: per layer, the fusion gates [B, T, S] in the order of the family's `sources`.
    roots: per layer, the trunk's per-root outputs [B, T, R, D] (families with roots).
    memory: the memory after the forward, where the form carries one.
  """

  losses: dict[str, jax.Array] = flax.struct.field(default_factory=dict)
  metrics: dict[str, jax.Array] = flax.struct.field(default_factory=dict)
  routes: Optional[tuple[Optional[RouteTrace], ...]] = None
  gates: Optional[tuple[jax.Array, ...]] = None
  roots: Optional[tuple[jax.Array, ...]] = None
  memory: Any = None

"""The one typed model configuration at the library boundary.

`configs/*.py` return `ml_collections.ConfigDict`s; `KernelConfig.from_dict` converts the `model`
section once into a frozen, validated dataclass. Every invalid value raises `ValueError` naming the
field and the value, before anything is traced or compiled.

Parameter shapes never depend on `max_seq_len`: a trained model is evaluated on longer inputs with
`dataclasses.replace(config, max_seq_len=...)`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from memkernel import fields

_SCAN_IMPLS = ("associative", "linear")
_TEACHER_POSITIONS = ("scored", "all")
_TREE_MERGES = ("pooled", "mean")
_TRUNK_BOUNDARIES = ("reset", "carry", "decay")
_TREE_BOUNDARIES = ("reset", "carry")


def _is_power_of_two(n: int) -> bool:
  return n >= 1 and (n & (n - 1)) == 0


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Hyper-parameters of `KernelModel` (one memory-kernel layer per `num_layers`).

  Attributes:
    vocab_size: number of token ids.
    d_model: width of the residual stream (D).
    num_layers: memory-kernel layers, each followed by an MLP.
    num_roots: trunk roots (R), 1-4; each is a gated diagonal affine recurrence.
    leaf_size: tokens per leaf (L); a power of two.
    num_route_heads: routing / exact-read heads (H).
    beam_width: leaves each head selects at evaluation (K).
    train_beam_width: beam used while training (a wide beam breaks the find/read deadlock);
      0 means `beam_width`. Evaluation always uses `beam_width`.
    search_width: nodes each head's beam keeps at every routing step (S); 0 means the beam
      width. S > K searches wider for the same read: the leaf re-rank (required) picks the K
      leaves read among the S the beam ends with and the S best it pruned.
    node_reps: representative keys per tree node (M); 0 scores a node by its pooled summary key.
      M > 0: every node also keeps the routing keys of its M most salient tokens (largest
      pooling logit) and the router scores it by the best of them, max_m q . rk_m, which does
      not shrink as the node grows (`tree.leaf_reps`). Costs M times the routing dot products
      and M times the tree's key state; the parameters do not change, so a trained run can be
      evaluated with any M (`experiments.evaluate --node_reps`).
    max_seq_len: capacity of the memory in tokens; a power-of-two number of leaves.
    use_tree_read: fuse the routed summary value into the residual stream.
    use_exact_read: fuse the token-level read of the routed leaves into the residual stream.
    head_dim: per-head width of the exact read (E); 0 means d_model // num_route_heads.
    route_dim: per-head width of routing keys (Dr); 0 means 2 * head_dim.
    conv_width: taps of the causal convolution in the trunk.
    memory_lags: how many of the last tokens (lags 0..memory_lags-1 of the normed stream) the
      memory projections see separately, besides the trunk; 0 means conv_width. Most of a
      token's FLOPs are these projections ((memory_lags + 1) d inputs each), so fewer lags make
      every form cheaper; `shift_init` needs at least 2 (a key is the previous token). Measured
      (BUILD_NOTES, issue 7): 2 instead of 4 cuts the d-256 kernel from 27.4 to 20.0 M FLOPs
      per token, moves MQAR, induction and noisy retrieval by under 0.3 points (copy 98.8 ->
      97.6%) and makes far_compare learn faster.
    mlp_ratio: hidden width of each MLP relative to d_model.
    mlp_dim: hidden width of each MLP; 0 means mlp_ratio * d_model (the ablations use it to give
      every configuration the same parameter budget).
    scan_impl: 'associative' (lax.associative_scan) or 'linear' (lax.scan) for the trunk in the
      parallel form.
    teacher_weight: weight of the dense-teacher routing loss (training only; 0 disables it).
    teacher_positions: which query positions the teacher trains the router at: 'scored' (the
      positions the task loss scores, the `loss_mask` the training step passes; without one, as
      'all') or 'all' (positions spread over the sequence, whatever its read attends to; every
      position when the sequence is at most `teacher_queries` long).
    teacher_queries: query positions per sequence the teacher trains at (S): the scored ones when
      the training step passes a loss mask (a probe scores at most a few hundred), else S spread
      over the sequence. Its dense attention then costs O(S T) per layer instead of O(T^2), so
      a long training sequence has no quadratic part (BUILD_NOTES, issue 7).
    salience_weight: weight of the salience loss (training only, with the teacher; 0 disables
      it): the pooling logits' softmax over a sequence's sealed tokens is trained towards the
      teacher's attention on them (`routing.salience_loss`), so a node's pooled key is the key of
      what queries look for in it, however large the node. Measured on induction (BUILD_NOTES):
      it collapses routing beyond the training length, so it is off.
    teacher_cross_level: each level's teacher softmax also holds the query's lower-level Fenwick
      nodes, so the router learns the mixed-level comparisons its beam makes
      (`routing.teacher_loss`); False trains same-size comparisons only (measured in
      BUILD_NOTES: noisy retrieval 88.1% -> 99.6%, MQAR at 16x with uniform distances 89.9% ->
      99.1%).
    route_descend: False reads summaries only (the checklist's "summaries only" ablation): the
      tree value is a softmax over every Fenwick node the query sees, nothing is descended and
      no leaf is selected, so it needs use_exact_read=False.
    tree_merge: 'pooled' (a node's summary is the attention pooling of every token under it, so
      salient leaves are not diluted as nodes grow) or 'mean' (the plain mean of the children).
    leaf_rerank: choose the final K leaves among the beam's 2K candidate leaves by their tokens
      (`routing.exact_leaf_scores`) instead of their summaries.
    read_sink: give every exact-read head a learned "read nothing" slot (zero value), so a head
      whose routed leaves hold no match need not average unrelated tokens into the stream.
    remat: recompute the routing and the exact read in the backward pass (`jax.checkpoint`)
      instead of keeping their per-token gathers. Changes no value. Measured on XLA:CPU (d 256,
      4 layers, BUILD_NOTES): it does not lower the train step's buffer assignment at 8k or 32k,
      so it is off by default.
    query_block: route and read the parallel form's queries in blocks of this many positions,
      each recomputed in the backward pass, so the per-query gathered tokens of routing, the
      re-rank and the read exist for one block at a time (0: all positions at once). Changes no
      value. Measured (BUILD_NOTES, issue 7; d 256, 4 layers): 512 cuts the 32k forward's peak
      memory from 3.3 to 1.6 GiB at the same speed, and the 8k train step's from 10.0 to 2.3 GiB
      for 13% more time (the blocks are recomputed). Sequences of at most one block are not
      blocked.
    shift_init: start the memory projections as an associative-recall prior (keys = previous
      token, queries = current token; see `model.memory_proj_init`); False = all random.
    min_timescale, max_timescale: range of the roots' initial decay timescales (tokens).
    trunk_boundary: what a document boundary of a stream (`segments`) does to the trunk:
      'reset' (the recurrences restart from zero at a document's first token, and convolution and
      projection lags before it read zeros), 'carry' (the trunk runs on as if there were no
      boundary) or 'decay' (the recurrences' carried state is scaled by `boundary_decay` at the
      first token; lags before it read zeros).
    tree_boundary: what a document boundary does to the tree and the token cache: 'reset' (a
      query sees no node or token of an earlier document, and a node summarises only the leaves
      of the document of its last leaf) or 'carry' (the whole stream is one memory). A summary
      tree has no meaningful partial decay, so 'decay' is rejected.
    boundary_decay: the factor of trunk_boundary='decay', in (0, 1).
  """

  vocab_size: int = 256
  d_model: int = 64
  num_layers: int = 2
  num_roots: int = 2
  leaf_size: int = 16
  num_route_heads: int = 4
  beam_width: int = 2
  train_beam_width: int = 0
  search_width: int = 0
  node_reps: int = 0
  max_seq_len: int = 512
  use_tree_read: bool = True
  use_exact_read: bool = True
  head_dim: int = 0
  route_dim: int = 0
  conv_width: int = 4
  memory_lags: int = 2
  mlp_ratio: int = 4
  mlp_dim: int = 0
  scan_impl: str = "associative"
  teacher_weight: float = 1.0
  teacher_positions: str = "scored"
  teacher_queries: int = 256
  teacher_cross_level: bool = True
  salience_weight: float = 0.0
  route_descend: bool = True
  tree_merge: str = "pooled"
  leaf_rerank: bool = False
  read_sink: bool = False
  shift_init: bool = True
  remat: bool = False
  query_block: int = 512
  min_timescale: float = 1.0
  max_timescale: float = 256.0
  trunk_boundary: str = "reset"
  tree_boundary: str = "reset"
  boundary_decay: float = 0.5

  def __post_init__(self):
    for name in ("vocab_size", "d_model", "num_layers", "leaf_size", "num_route_heads",
                 "beam_width", "max_seq_len", "conv_width", "mlp_ratio", "teacher_queries"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"KernelConfig.{name} must be a positive integer, got {value!r}")
    for name in ("head_dim", "route_dim", "train_beam_width", "search_width", "node_reps",
                 "mlp_dim",
                 "query_block", "memory_lags"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"KernelConfig.{name} must be a non-negative integer, got {value!r}")
    if not isinstance(self.num_roots, int) or not 1 <= self.num_roots <= 4:
      raise ValueError(f"KernelConfig.num_roots must be between 1 and 4, got {self.num_roots!r}")
    if not _is_power_of_two(self.leaf_size):
      raise ValueError(f"KernelConfig.leaf_size must be a power of two, got {self.leaf_size!r}")
    if self.max_seq_len % self.leaf_size:
      raise ValueError(
          f"KernelConfig.max_seq_len must be a multiple of leaf_size={self.leaf_size}, "
          f"got {self.max_seq_len!r}")
    if not _is_power_of_two(self.max_seq_len // self.leaf_size):
      raise ValueError(
          "KernelConfig.max_seq_len must hold a power-of-two number of leaves, got "
          f"{self.max_seq_len!r} ({self.max_seq_len // self.leaf_size} leaves of {self.leaf_size})")
    if self.num_route_heads > self.d_model:
      raise ValueError(f"KernelConfig.num_route_heads must be <= d_model={self.d_model}, "
                       f"got {self.num_route_heads!r}")
    if self.head_dim == 0 and self.d_model % self.num_route_heads:
      raise ValueError(f"KernelConfig.d_model={self.d_model} must be divisible by "
                       f"num_route_heads={self.num_route_heads} when head_dim is 0")
    if self.memory_lags > self.conv_width:
      raise ValueError(f"KernelConfig.memory_lags must be <= conv_width={self.conv_width} (the "
                       f"convolution keeps that many tokens), got {self.memory_lags!r}")
    if self.shift_init and self.proj_lags < 2:
      raise ValueError("KernelConfig.shift_init starts keys as the previous token, so it needs "
                       f"memory_lags >= 2 (or 0), got memory_lags={self.memory_lags!r}")
    if self.scan_impl not in _SCAN_IMPLS:
      raise ValueError(f"KernelConfig.scan_impl must be one of {_SCAN_IMPLS}, got {self.scan_impl!r}")
    if self.tree_merge not in _TREE_MERGES:
      raise ValueError(f"KernelConfig.tree_merge must be one of {_TREE_MERGES}, "
                       f"got {self.tree_merge!r}")
    for name in ("use_tree_read", "use_exact_read", "shift_init", "leaf_rerank",
                 "read_sink", "route_descend", "remat", "teacher_cross_level"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"KernelConfig.{name} must be a bool, got {getattr(self, name)!r}")
    if self.search_width and not self.leaf_rerank:
      raise ValueError("KernelConfig.search_width chooses the leaves read by the leaf re-rank, "
                       f"so it needs leaf_rerank=True, got search_width={self.search_width!r}")
    if not self.route_descend and self.use_exact_read:
      raise ValueError("KernelConfig.route_descend=False selects no leaves, so it needs "
                       "use_exact_read=False")
    if self.teacher_positions not in _TEACHER_POSITIONS:
      raise ValueError(f"KernelConfig.teacher_positions must be one of {_TEACHER_POSITIONS}, "
                       f"got {self.teacher_positions!r}")
    if not (isinstance(self.salience_weight, (int, float)) and self.salience_weight >= 0):
      raise ValueError(f"KernelConfig.salience_weight must be >= 0, got {self.salience_weight!r}")
    if not self.teacher_weight >= 0:
      raise ValueError(f"KernelConfig.teacher_weight must be >= 0, got {self.teacher_weight!r}")
    if self.trunk_boundary not in _TRUNK_BOUNDARIES:
      raise ValueError(f"KernelConfig.trunk_boundary must be one of {_TRUNK_BOUNDARIES}, "
                       f"got {self.trunk_boundary!r}")
    if self.tree_boundary == "decay":
      raise ValueError("KernelConfig.tree_boundary='decay' is not supported: a summary tree "
                       "cannot partly forget a document; use 'reset' or 'carry'")
    if self.tree_boundary not in _TREE_BOUNDARIES:
      raise ValueError(f"KernelConfig.tree_boundary must be one of {_TREE_BOUNDARIES}, "
                       f"got {self.tree_boundary!r}")
    if (not isinstance(self.boundary_decay, (int, float)) or isinstance(self.boundary_decay, bool)
        or not 0 < self.boundary_decay < 1):
      raise ValueError(f"KernelConfig.boundary_decay must be in (0, 1), "
                       f"got {self.boundary_decay!r}")
    if not 0 < self.min_timescale <= self.max_timescale:
      raise ValueError("KernelConfig.min_timescale/max_timescale must satisfy "
                       f"0 < min <= max, got {self.min_timescale!r}, {self.max_timescale!r}")

  @property
  def family(self) -> str:
    """The registry name of the family this config belongs to (`memkernel.family`)."""
    return "kernel"

  # Derived sizes.
  @property
  def num_leaves(self) -> int:
    """N: leaf capacity of the memory."""
    return self.max_seq_len // self.leaf_size

  @property
  def num_levels(self) -> int:
    """Tree levels 0..log2(N), leaves at level 0."""
    return int(math.log2(self.num_leaves)) + 1

  @property
  def num_nodes(self) -> int:
    """S: nodes over all levels, stored level-major (2N - 1)."""
    return 2 * self.num_leaves - 1

  @property
  def read_dim(self) -> int:
    return self.head_dim or self.d_model // self.num_route_heads

  @property
  def key_dim(self) -> int:
    return self.route_dim or 2 * self.read_dim

  @property
  def proj_lags(self) -> int:
    """Lags of the normed stream the memory projections read (`memory_lags` or conv_width)."""
    return self.memory_lags or self.conv_width

  @property
  def mlp_hidden(self) -> int:
    return self.mlp_dim or self.mlp_ratio * self.d_model

  def search(self, beam: int) -> int:
    """The nodes the beam keeps per routing step when `beam` leaves are read."""
    return max(self.search_width, beam)

  @property
  def effective_train_beam(self) -> int:
    return self.train_beam_width or self.beam_width

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> "KernelConfig":
    """Builds a config from a mapping (e.g. a `ConfigDict`), rejecting unknown fields."""
    return fields.from_mapping(cls, values)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

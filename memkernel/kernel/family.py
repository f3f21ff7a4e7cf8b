"""The memory kernel as a model family (`memkernel.family`)."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from memkernel import family as family_lib
from memkernel.kernel import costs
from memkernel.kernel.config import KernelConfig
from memkernel.kernel.fusion import source_names
from memkernel.kernel.model import KernelModel
from memkernel.kernel.state import init_memory


def capacity(seq_len: int, leaf_size: int) -> int:
  """The smallest memory capacity >= seq_len holding a power-of-two number of leaves."""
  leaves = -(-seq_len // leaf_size)
  return leaf_size * (1 << max(leaves - 1, 0).bit_length())


def _from_dict(values: Mapping[str, Any], name: str) -> KernelConfig:
  del name
  return KernelConfig.from_dict(values)


def _with_capacity(config: KernelConfig, seq_len: int) -> KernelConfig:
  needed = capacity(seq_len, config.leaf_size)
  return dataclasses.replace(config, max_seq_len=max(config.max_seq_len, needed))


FAMILY = family_lib.Family(
    name="kernel",
    section="model",
    config_from_dict=_from_dict,
    build=KernelModel,
    init_memory=init_memory,
    sources=source_names,
    with_capacity=_with_capacity,
    routes=True,
    flops_by_part=costs.flops_by_part,
    state_bytes_read=costs.state_bytes_read,
    segment_align=lambda config: config.leaf_size,
    boundaries=lambda c: {"trunk": family_lib.Boundary(c.trunk_boundary),
                          "tree": family_lib.Boundary(c.tree_boundary)},
    memory_fields=("trunk_boundary", "tree_boundary", "boundary_decay"),
    resumable_fields=("beam_width", "train_beam_width", "search_width", "teacher_weight",
                      "teacher_positions", "teacher_cross_level", "teacher_queries", "salience_weight",
                      "max_seq_len", "scan_impl", "remat", "query_block", "min_timescale",
                      "max_timescale"),
)

"""The brain-core as a model family (`memkernel.family`)."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from memkernel import family as family_lib
from memkernel.braincore import costs
from memkernel.braincore.config import BrainCoreConfig
from memkernel.braincore.model import build, sources
from memkernel.braincore.state import init_memory


def _from_dict(values: Mapping[str, Any], name: str) -> BrainCoreConfig:
  del name
  return BrainCoreConfig.from_dict(values, "braincore")


def _with_capacity(config: BrainCoreConfig, seq_len: int) -> BrainCoreConfig:
  return dataclasses.replace(config, max_seq_len=max(config.max_seq_len, seq_len))


def _boundaries(c: BrainCoreConfig) -> dict[str, family_lib.Boundary]:
  rules = {"core": c.core_boundary}
  if c.has_working:
    rules["working"] = c.wm_boundary
  if c.has_episodic:
    rules["episodic"] = c.em_boundary
  if c.has_procedural:
    rules["procedural"] = c.pm_boundary
  return {name: family_lib.Boundary(rule) for name, rule in rules.items()}


FAMILY = family_lib.Family(
    name="braincore",
    section="braincore",
    config_from_dict=_from_dict,
    build=build,
    init_memory=init_memory,
    sources=sources,
    with_capacity=_with_capacity,
    segment_align=lambda config: config.span,
    resumable_fields=("max_seq_len", "scan_impl"),
    memory_fields=("em_items", "em_k", "em_decay", "em_threshold", "em_write_gate",
                   "boundary_decay",
                   "core_boundary", "wm_boundary", "em_boundary", "pm_boundary"),
    boundaries=_boundaries,
    flops_by_part=costs.flops_by_part,
)

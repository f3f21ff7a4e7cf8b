"""The attention peers as model families (`memkernel.family`): dense and sliding window."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from memkernel import family as family_lib
from memkernel.peers import costs
from memkernel.peers.config import PeerConfig
from memkernel.peers.memory import init_memory
from memkernel.peers.model import build_peer


def _from_dict(values: Mapping[str, Any], name: str) -> PeerConfig:
  if "kind" in values:
    raise ValueError("config.peer.kind is not a field: set config.model_type instead")
  return PeerConfig.from_dict({**dict(values), "kind": name})


def _with_capacity(config: PeerConfig, seq_len: int) -> PeerConfig:
  return dataclasses.replace(config, max_seq_len=max(config.max_seq_len, seq_len))


def _family(name: str) -> family_lib.Family:
  return family_lib.Family(
      name=name,
      section="peer",
      config_from_dict=_from_dict,
      build=build_peer,
      init_memory=init_memory,
      sources=lambda config: (),
      with_capacity=_with_capacity,
      resumable_fields=("max_seq_len", "query_block"),
      memory_fields=("boundary",),
      boundaries=lambda config: {"attention": family_lib.Boundary(config.boundary)},
      flops_by_part=costs.flops_by_part,
      activation_bytes=costs.attention_bytes,
  )


DENSE = _family("dense")
SLIDING_WINDOW = _family("sliding_window")

"""Model families: the one protocol every memory model meets, and the name -> family registry.

A family is a memory model the harness (train, evaluate, audit, ablate, bench, diagnose, the
sampler) can run without knowing what it is. It provides a frozen, validated config, an empty
memory, a Flax module with three agreeing execution forms, the names of its memory sources and
what a document boundary does to each memory:

    module(tokens, segments=None, *, train=False, interventions=None, oracle_leaves=None,
           loss_mask=None) -> (logits, Outputs)                 # parallel, from an empty memory
    module.scan(tokens, memory, segments=None, *, interventions=None, return_aux=False)
        -> (logits, memory')                                    # recurrent, over chunks
    module.step(token, memory, segment=None, *, interventions=None, return_aux=False)
        -> (logits, memory')                                    # one token

`segments` is an int32 [B, T] document index per token (non-decreasing along a row; a document
starts on a leaf boundary, `Family.segment_align` tokens). Families are loaded by name
(`importlib`), so the harness never imports a family it does not run and adding one is its own
package plus one line in `FAMILIES`.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
from typing import Any, Callable, Mapping, Optional, Sequence


class Boundary(str, enum.Enum):
  """What a document boundary does to one memory."""

  RESET = "reset"   # nothing before the boundary is visible or carried
  CARRY = "carry"   # the memory runs on across the boundary as if there were none
  DECAY = "decay"   # carried, scaled by a configurable decay


@dataclasses.dataclass(frozen=True)
class Family:
  """What the harness needs to know of one model family.

  Attributes:
    name: the registry name (`config.model_type`).
    section: the experiment-config section holding its model config.
    config_from_dict: (section values, name) -> the frozen, validated config (rejects unknown
      fields, raises `ValueError` naming the field).
    build: config -> the Flax module.
    init_memory: (config, batch_size) -> the empty memory pytree (a routing family also takes
      `presence=True`: a memory its recurrent forms' routing hints can read).
    sources: config -> the names of the sources its fusion combines under that config (only
      those it enables), in gate order: `Outputs.gates` and the gate diagnostics follow it, the
      auditor and the sweep enumerate it, an intervention drops sources by these names.
    with_capacity: (config, seq_len) -> the config with room for `seq_len` tokens (same
      parameters).
    routes: whether the family routes over leaves (beam width, oracle routes, routing recall,
      the routing diagnostic).
    segment_align: documents of a stream start at multiples of this many tokens.
    resumable_fields: model-config fields that may change when a run resumes (curricula,
      capacity, implementation); every other field is architecture.
    memory_fields: model-config fields an evaluation of a trained run may change: sizes and
      rules of its memory that no parameter depends on (the brain-core's episodic items, for
      the capacity study).
    boundaries: config -> {memory name: Boundary} the config sets.
    flops_by_part: (config, num_tokens, *, form='parallel'|'recurrent', train=False) ->
      {part: matmul FLOPs} of one sequence (`memkernel.costs`).
    state_bytes_read: (config, memory shapes, kept source names) -> the bytes of the memory a
      configuration reads; None: all of it.
    activation_bytes: (config, num_tokens, batch_size, *, train=False) -> an estimate of the
      largest buffers a parallel call holds, for families where they grow faster than the
      memory (dense attention's scores); None: no such buffer.
  """

  name: str
  section: str
  config_from_dict: Callable[[Mapping[str, Any], str], Any]
  build: Callable[[Any], Any]
  init_memory: Callable[..., Any]
  sources: Callable[[Any], tuple[str, ...]]
  with_capacity: Callable[[Any, int], Any]
  routes: bool = False
  segment_align: Callable[[Any], int] = lambda config: 1
  resumable_fields: tuple[str, ...] = ("max_seq_len",)
  memory_fields: tuple[str, ...] = ()
  boundaries: Callable[[Any], Mapping[str, Boundary]] = lambda config: {}
  flops_by_part: Optional[Callable[..., Mapping[str, int]]] = None
  state_bytes_read: Optional[Callable[[Any, Any, Sequence[str]], int]] = None
  activation_bytes: Optional[Callable[..., int]] = None


# name -> "module:attribute" of its `Family`. Adding a family is one line here.
FAMILIES: dict[str, str] = {
    "kernel": "memkernel.kernel.family:FAMILY",
    "dense": "memkernel.peers.family:DENSE",
    "sliding_window": "memkernel.peers.family:SLIDING_WINDOW",
    "braincore": "memkernel.braincore.family:FAMILY",
}


def names() -> tuple[str, ...]:
  """The registered family names."""
  return tuple(FAMILIES)


def get(name: str) -> Family:
  """The family registered as `name`; a clear `ValueError` for an unknown one."""
  if name not in FAMILIES:
    raise ValueError(f"config.model_type must be one of the registered families "
                     f"{sorted(FAMILIES)}, got {name!r}")
  module, _, attribute = FAMILIES[name].partition(":")
  family = getattr(importlib.import_module(module), attribute)
  if family.name != name:
    raise RuntimeError(f"FAMILIES[{name!r}] points at family {family.name!r}")
  return family


def of_config(config: Any) -> Family:
  """The family a model config belongs to (its `family` property)."""
  return get(config.family)


def build(config: Any):
  """The Flax module a model config describes."""
  return of_config(config).build(config)


def init_memory(config: Any, batch_size: int):
  """The empty memory of the model `config` describes."""
  return of_config(config).init_memory(config, batch_size)


def check_segments(segments: Any, shape: tuple[int, ...], align: int,
                   what: str = "segments") -> None:
  """Validates a concrete document-index array (skipped under tracing).

  Raises:
    ValueError: wrong shape or dtype, a decreasing document index, or a document that does not
      start at a multiple of `align` tokens.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  if segments is None:
    return
  if tuple(getattr(segments, "shape", ())) != tuple(shape):
    raise ValueError(f"{what} must have the tokens' shape {tuple(shape)}, got "
                     f"{getattr(segments, 'shape', type(segments))}")
  if not np.issubdtype(np.dtype(segments.dtype), np.integer):
    raise ValueError(f"{what} must be an integer document index, got dtype {segments.dtype}")
  if isinstance(segments, jax.core.Tracer):
    return
  seg = np.asarray(segments)
  if seg.ndim < 2 or seg.shape[1] < 2:
    return
  step = np.diff(seg, axis=1)
  if np.any(step < 0):
    raise ValueError(f"{what} must be non-decreasing along each row (a document index)")
  starts = np.nonzero(step > 0)[1] + 1
  bad = starts[starts % align != 0]
  if bad.size:
    raise ValueError(f"{what}: a document starts at position {int(bad[0])}; documents must start "
                     f"at multiples of {align} tokens (pad the stream)")


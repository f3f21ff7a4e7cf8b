"""A family from outside the library: a running-mean memory, registered by one line.

The smallest model the family protocol (`memkernel.family`) admits beside the kernel and the
peers: each token's logits read its own embedding and the mean embedding of its document so far
(the memory: a sum and a count per row). `tests/test_family.py` registers it with one entry in
`FAMILIES` and runs it through the harness unchanged, which is what "a new family is its own
package plus one registry line" means.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from memkernel import family as family_lib
from memkernel import fields
from memkernel.outputs import Outputs


@dataclasses.dataclass(frozen=True)
class ToyConfig:
  vocab_size: int = 32
  d_model: int = 16
  max_seq_len: int = 64
  boundary: str = "reset"

  def __post_init__(self):
    if self.boundary not in ("reset", "carry"):
      raise ValueError(f"ToyConfig.boundary must be 'reset' or 'carry', got {self.boundary!r}")

  @property
  def family(self) -> str:
    return "toy"

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


@flax.struct.dataclass
class ToyMemory:
  sum_BD: jax.Array
  count_B: jax.Array
  segment_B: jax.Array


def init_memory(config: ToyConfig, batch_size: int) -> ToyMemory:
  return ToyMemory(sum_BD=jnp.zeros((batch_size, config.d_model)),
                   count_B=jnp.zeros((batch_size,)),
                   segment_B=jnp.zeros((batch_size,), jnp.int32))


class ToyModel(nn.Module):
  config: ToyConfig

  def setup(self):
    self.embed = nn.Embed(self.config.vocab_size, self.config.d_model)
    self.head = nn.Dense(self.config.vocab_size)

  def _logits(self, e, mean):
    return self.head(jnp.concatenate([e, mean], axis=-1))

  def __call__(self, tokens, segments=None, *, oracle_leaves=None, train=False, loss_mask=None,
               interventions=None):
    del oracle_leaves, train, loss_mask, interventions
    t = tokens.shape[1]
    e = self.embed(tokens)
    visible = jnp.tril(jnp.ones((t, t), bool))[None]
    if segments is not None and self.config.boundary == "reset":
      visible = visible & (segments[:, :, None] == segments[:, None, :])
    weights = visible.astype(jnp.float32)
    mean = jnp.einsum("bts,bsd->btd", weights, e) / weights.sum(-1, keepdims=True)
    return self._logits(e, mean), Outputs()

  def _advance(self, e_BD, segment_B, memory: ToyMemory):
    keep = jnp.ones_like(memory.count_B)
    if self.config.boundary == "reset":
      keep = (segment_B == memory.segment_B).astype(jnp.float32)
    total = memory.sum_BD * keep[:, None] + e_BD
    count = memory.count_B * keep + 1.0
    return ToyMemory(total, count, segment_B), total / count[:, None]

  def step(self, token, memory, segment=None, *, interventions=None, return_aux=False):
    del interventions
    segment = memory.segment_B if segment is None else segment
    e = self.embed(token)
    memory, mean = self._advance(e, segment, memory)
    logits = self._logits(e, mean)
    return (logits, memory, Outputs()) if return_aux else (logits, memory)

  def scan(self, tokens, memory, segments=None, *, interventions=None, return_aux=False):
    del interventions
    if segments is None:
      segments = jnp.broadcast_to(memory.segment_B[:, None], tokens.shape)
    e = self.embed(tokens)

    def body(mem, xs):
      mem, mean = self._advance(xs[0], xs[1], mem)
      return mem, mean

    memory, means = jax.lax.scan(body, memory, (jnp.swapaxes(e, 0, 1), segments.T))
    logits = self._logits(e, jnp.swapaxes(means, 0, 1))
    return (logits, memory, Outputs()) if return_aux else (logits, memory)


def _from_dict(values: Mapping[str, Any], name: str) -> ToyConfig:
  del name
  return fields.from_mapping(ToyConfig, values)


FAMILY = family_lib.Family(
    name="toy",
    section="toy",
    config_from_dict=_from_dict,
    build=ToyModel,
    init_memory=init_memory,
    sources=lambda config: (),
    with_capacity=lambda config, n: dataclasses.replace(config,
                                                        max_seq_len=max(config.max_seq_len, n)),
    boundaries=lambda config: {"mean": family_lib.Boundary(config.boundary)},
)

"""What a model costs, for any registered family: FLOPs, parameters and memory-state bytes.

    costs.flops(config, 8192)                     # matmul FLOPs of one sequence, parallel form
    costs.flops(config, 1, form="recurrent")      # one decoded token at config's capacity
    costs.num_params(config)                      # shapes only, nothing compiled
    costs.state_bytes(config)                     # the recurrent form's memory of one sequence

FLOP counts are the families' own analytic counts (`Family.flops_by_part`); parameters and state
come from `jax.eval_shape` of the family's `init` and `init_memory`, so they are exact and cost
no compile. The benchmark and the ablation sweep read every cost here.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp

from memkernel import family as family_lib
from memkernel import optim


def _family(config: Any) -> family_lib.Family:
  family = family_lib.of_config(config)
  if family.flops_by_part is None:
    raise ValueError(f"the {family.name!r} family declares no FLOP count (Family.flops_by_part)")
  return family


def flops_by_part(config: Any, num_tokens: int, *, form: str = "parallel",
                  train: bool = False) -> Mapping[str, int]:
  """{part: matmul FLOPs} of one pass over one sequence of `num_tokens` tokens.

  Args:
    config: a family's model config (its capacity sets what a recurrent call scores).
    num_tokens: T.
    form: 'parallel' or 'recurrent' (`scan` over T tokens, or `step` for T = 1, from an empty
      memory at the config's capacity).
    train: forward and backward of a training step.
  """
  return _family(config).flops_by_part(config, num_tokens, form=form, train=train)


def flops(config: Any, num_tokens: int, *, form: str = "parallel", train: bool = False) -> int:
  """Total of `flops_by_part` (one sequence; multiply by the batch size)."""
  return sum(flops_by_part(config, num_tokens, form=form, train=train).values())


@functools.lru_cache(maxsize=256)
def num_params(config: Any) -> int:
  """Parameters of the family's model under `config` (`jax.eval_shape`: nothing compiled)."""
  model = family_lib.build(config)
  align = family_lib.of_config(config).segment_align(config)
  tokens = jax.ShapeDtypeStruct((1, min(align, config.max_seq_len)), jnp.int32)
  return optim.count_params(jax.eval_shape(model.init, jax.random.key(0), tokens)["params"])


def memory_shapes(config: Any, batch_size: int = 1) -> Any:
  """The family's empty memory as `jax.ShapeDtypeStruct`s (nothing allocated)."""
  return jax.eval_shape(functools.partial(family_lib.init_memory, config, batch_size))


def tree_bytes(tree: Any) -> int:
  """Bytes held by a pytree of arrays or shapes."""
  return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))


def state_bytes(config: Any) -> int:
  """Bytes of one sequence's recurrent-form memory at the config's capacity."""
  return tree_bytes(memory_shapes(config))


def state_bytes_read(config: Any, dropped: Sequence[str] = ()) -> int:
  """Bytes of that memory a model reads when the sources `dropped` are switched off (the
  family's `state_bytes_read`; all of it for a family that declares none)."""
  family = family_lib.of_config(config)
  memory = memory_shapes(config)
  if family.state_bytes_read is None:
    return tree_bytes(memory)
  kept = [s for s in family.sources(config) if s not in dropped]
  return family.state_bytes_read(config, memory, kept)


def activation_bytes(config: Any, num_tokens: int, batch_size: int, *,
                     train: bool = False) -> Optional[int]:
  """The family's estimate of a parallel call's largest buffers (e.g. dense attention's
  O(T^2) scores), or None where it declares none (they grow no faster than the memory)."""
  family = family_lib.of_config(config)
  if family.activation_bytes is None:
    return None
  return family.activation_bytes(config, num_tokens, batch_size, train=train)

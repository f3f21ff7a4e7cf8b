"""The optimiser, its schedule and the train state (parameters + optimiser state + step)."""

from __future__ import annotations

from typing import Any, Optional

import flax.struct
import jax
import jax.numpy as jnp
import optax

from memkernel import family as family_lib
from memkernel import experiment as experiment_lib
from memkernel.experiment import Experiment, TrainConfig

# Final learning rate of the cosine schedule, relative to `lr`.
_COSINE_END_RATIO = 0.1


@flax.struct.dataclass
class TrainState:
  """Everything a step changes. The data-iterator state is `step` (with the seed)."""

  step: jax.Array
  params: Any
  opt_state: Any


def make_schedule(train: TrainConfig) -> optax.Schedule:
  warmup = optax.linear_schedule(train.lr / (train.warmup_steps + 1), train.lr, train.warmup_steps)
  if train.schedule == "constant":
    after = optax.constant_schedule(train.lr)
  else:
    decay = train.decay_steps or train.steps
    after = optax.cosine_decay_schedule(train.lr, max(decay - train.warmup_steps, 1),
                                        alpha=_COSINE_END_RATIO)
  return optax.join_schedules([warmup, after], [train.warmup_steps])


def make_optimizer(train: TrainConfig) -> optax.GradientTransformation:
  """AdamW with global-norm clipping; non-finite updates are skipped (`apply_if_finite`)."""
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  tx = optax.chain(
      optax.clip_by_global_norm(train.clip_norm) if train.clip_norm > 0 else optax.identity(),
      optax.adamw(make_schedule(train), weight_decay=train.weight_decay, mask=decay_mask))
  # The loop stops after max_nonfinite consecutive skips, before apply_if_finite would give up.
  return optax.apply_if_finite(tx, max_consecutive_errors=train.max_nonfinite)



def schedule_count(opt_state) -> jax.Array:
  """Updates applied so far, as the learning-rate schedule counts them (skips excluded)."""
  is_schedule = lambda x: isinstance(x, optax.ScaleByScheduleState)
  (found,) = [x for x in jax.tree.leaves(opt_state, is_leaf=is_schedule) if is_schedule(x)]
  return found.count


def init_state(experiment: Experiment, key: Optional[jax.Array] = None) -> TrainState:
  """A fresh train state (call under `jax.jit`; un-jitted init is slow). `key` defaults to the
  init stream of `experiment.train.seed`."""
  model = family_lib.build(experiment.model)
  leaf = getattr(experiment.model, "leaf_size", 16)
  tokens = jnp.zeros((1, min(leaf, experiment.model.max_seq_len)), jnp.int32)
  if key is None:
    key = experiment_lib.root_key(experiment.train.seed, experiment_lib.INIT_STREAM)
  params = model.init(key, tokens)["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=make_optimizer(experiment.train).init(params))


def count_params(params: Any) -> int:
  """Number of scalars in a parameter pytree."""
  return sum(int(x.size) for x in jax.tree.leaves(params))

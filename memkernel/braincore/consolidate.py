"""Consolidation (seed 002 §7): a "sleep" that distils what one stream's episodic and procedural
memory hold into the slow weights.

    new_params = sleep(model, params, memory, SleepConfig(), key)

The teacher is the model with the stream's memory; the student is the same model with its
memory wiped (episodic and procedural memory empty, a fresh document), whose slow weights are
trained to give the teacher's next-token distributions (KL(teacher || student)). Both read
*replay* sequences: tokens drawn uniformly from the whole vocabulary, so every token is a cue for
whatever the memory associates with it, and nothing about the questions a probe will later ask
enters. A replay sequence is at most one plasticity span long and starts where a span starts, as
a new document (the boundary rules apply, as for the next real document): the teacher's memory
is read, never written (writes happen at span ends, after the span's reads), so every replay
step distils the same memory.

Where the teacher and the wiped student already agree (everything the memory does not change)
the KL and its gradient are zero, so the loss itself keeps the slow weights' other behaviour,
provided the step follows the gradient's size: the default optimizer is SGD with momentum
(`optimizer='sgd'`). Adam divides each gradient by its running scale, so a parameter whose
gradient is round-off moves by the full learning rate (from an empty memory, which teaches
nothing, Adam moves the student away from the teacher and SGD does not: tested); it is kept as
`optimizer='adam'` for comparison. `trainable` limits which top-level modules move (all by
default). `memkernel.analysis.consolidation` measures a sleep: the facts answered after the
memory is wiped, and what it costs fresh documents.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from memkernel.braincore.state import BrainCoreMemory, init_memory

OPTIMIZERS = ("sgd", "adam")


@dataclasses.dataclass(frozen=True)
class SleepConfig:
  """One sleep: `steps` steps of `optimizer` ('sgd': momentum 0.9; or 'adam') at
  `learning_rate` on `replay_batch` fresh replay sequences of `replay_len` tokens each (at most
  the model's span); `trainable`: the top-level parameter modules that move (e.g.
  ('lm_head',); empty: all)."""
  steps: int = 100
  learning_rate: float = 0.03
  replay_batch: int = 8
  replay_len: int = 64
  trainable: tuple[str, ...] = ()
  optimizer: str = "sgd"

  def __post_init__(self):
    for name in ("steps", "replay_batch", "replay_len"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"SleepConfig.{name} must be a positive integer, got {value!r}")
    if not isinstance(self.learning_rate, (int, float)) or not self.learning_rate > 0:
      raise ValueError(f"SleepConfig.learning_rate must be positive, got {self.learning_rate!r}")
    if self.optimizer not in OPTIMIZERS:
      raise ValueError(f"SleepConfig.optimizer must be one of {OPTIMIZERS}, got "
                       f"{self.optimizer!r}")
    if isinstance(self.trainable, str) or not all(isinstance(n, str) for n in self.trainable):
      raise ValueError(f"SleepConfig.trainable must be a tuple of module names, got "
                       f"{self.trainable!r}")

  def check(self, model: Any, params: Any):
    """A clear error for a replay longer than a span or an unknown module, before compiling."""
    span = model.config.span
    if self.replay_len > span:
      raise ValueError(f"SleepConfig.replay_len ({self.replay_len}) must be at most the model's "
                       f"plasticity span ({span}): a longer replay would write the memory it "
                       "distils")
    unknown = sorted(set(self.trainable) - set(params))
    if unknown:
      raise ValueError(f"SleepConfig.trainable names {unknown}, not modules of the parameters "
                       f"({sorted(params)})")
    if not model.config.has_episodic and not model.config.has_procedural:
      raise ValueError("sleep distils episodic and procedural memory; this model has neither")


def replay_tokens(key: jax.Array, config: SleepConfig, vocab_size: int) -> jax.Array:
  """int32 [replay_batch, replay_len] tokens uniform over the vocabulary."""
  return jax.random.randint(key, (config.replay_batch, config.replay_len), 0, vocab_size,
                            jnp.int32)


def _rows(memory: BrainCoreMemory, rows: int) -> BrainCoreMemory:
  """The one-stream `memory` repeated for `rows` streams (the shared position stays a scalar)."""
  def repeat(x):
    return x if x.ndim == 0 else jnp.broadcast_to(x, (rows,) + x.shape[1:])
  return jax.tree_util.tree_map(repeat, memory)


def replay_kl(model: Any, params: Any, student: Any, memory: BrainCoreMemory,
              tokens: jax.Array) -> jax.Array:
  """The sleep's loss: KL(teacher || student) per token, averaged over replay `tokens` [R, L]
  read as a new document, the teacher being `params` with the one-stream `memory`, the student
  `student` with every memory wiped. The teacher is outside the gradient."""
  rows, length = tokens.shape
  teacher_memory = _rows(memory, rows)
  segments = jnp.broadcast_to(teacher_memory.segment_B[:, None] + 1, (rows, length))
  wiped = init_memory(model.config, rows).replace(segment_B=teacher_memory.segment_B,
                                                  position=jnp.zeros_like(memory.position))
  teacher, _ = model.apply({"params": params}, tokens, teacher_memory, segments,
                           method=model.scan)
  target_logp = jax.lax.stop_gradient(jax.nn.log_softmax(teacher.astype(jnp.float32)))
  logits, _ = model.apply({"params": student}, tokens, wiped, segments, method=model.scan)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32))
  return jnp.mean(jnp.sum(jnp.exp(target_logp) * (target_logp - logp), axis=-1))


def _optimizer(config: SleepConfig, params: Any) -> optax.GradientTransformation:
  if config.optimizer == "adam":
    step = optax.adam(config.learning_rate)
  else:
    step = optax.sgd(config.learning_rate, momentum=0.9)
  if not config.trainable:
    return step
  labels = {name: ("train" if name in config.trainable else "freeze") for name in params}
  return optax.multi_transform({"train": step, "freeze": optax.set_to_zero()}, labels)


def sleep(model: Any, params: Any, memory: BrainCoreMemory, config: SleepConfig,
          key: jax.Array) -> tuple[Any, jax.Array]:
  """Distils one stream's memory into a copy of the slow weights.

  Args:
    model: a `BrainCoreModel`.
    params: its parameters (the teacher's, and the student's start).
    memory: the stream's memory (batch 1), at the start of a plasticity span.
    config: the sleep.
    key: the replay sequences' key.

  Returns:
    (the student's parameters, the KL per step float32 [steps]). Jittable, and vmappable over
    streams with the memory and the key batched (`per_stream`).
  """
  config.check(model, params)
  if memory.segment_B.shape != (1,):
    raise ValueError(f"sleep distils one stream's memory (batch 1), got batch "
                     f"{memory.segment_B.shape}")
  position = memory.position % model.config.span
  # A traced position cannot be checked here; a concrete one is (the usual call, before jit).
  if not isinstance(position, jax.core.Tracer) and int(position) != 0:
    raise ValueError(f"sleep starts a replay at a span start; the memory stands "
                     f"{int(position)} tokens into its span")
  optimizer = _optimizer(config, params)

  def step(carry, step_key):
    student, opt_state = carry
    tokens = replay_tokens(step_key, config, model.config.vocab_size)
    kl, grads = jax.value_and_grad(
        lambda p: replay_kl(model, params, p, memory, tokens))(student)
    updates, opt_state = optimizer.update(grads, opt_state, student)
    return (optax.apply_updates(student, updates), opt_state), kl

  (student, _), kls = jax.lax.scan(step, (params, optimizer.init(params)),
                                   jax.random.split(key, config.steps))
  return student, kls


def per_stream(memory: BrainCoreMemory) -> BrainCoreMemory:
  """A memory of B streams as B one-stream memories stacked on a leading axis (for
  `jax.vmap(sleep)`): every batch leaf [B, ...] becomes [B, 1, ...], the shared position [B]."""
  b = memory.segment_B.shape[0]
  def split(x):
    return jnp.broadcast_to(x, (b,)) if x.ndim == 0 else x[:, None]
  return jax.tree_util.tree_map(split, memory)

"""The brain-core's memory: one typed pytree threaded through every form.

Shapes: B batch, D d_model, W window, N heads, H head width, M episodic items, K episodic key
width, R procedural rank.

    memory = init_memory(config, batch_size)
    logits, memory = model.apply(variables, tokens, memory, method=model.scan)

Per layer: the core's state [B, D], the working memory's ring of the last W tokens, and with
plasticity the episodic items, the procedural fast weights with the current span's eligibility
trace, and the current span's pooled features (`SpanPool`, from which the span's episodic
candidate and procedural modulator come at its end). Nothing in it grows with the stream.
"""

from __future__ import annotations

from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp

from memkernel.braincore import episodic
from memkernel.braincore import procedural
from memkernel.braincore.config import BrainCoreConfig
from memkernel.braincore.working import WindowCache, init_window

# The running maximum of an empty pool: finite, so exp(max - new max) never meets inf - inf.
EMPTY_MAX = -1e30


@flax.struct.dataclass
class SpanPool:
  """Online softmax pooling of one span's features by a learned salience, one pool per part of
  the span (C = `em_writes`): the running maximum salience [B, C], the sum of
  exp(salience - maximum) [B, C] and the weighted feature sum [B, C, D]. Chunks of a span add up
  to the same pool as the span at once."""
  max_BC: jax.Array
  sum_BC: jax.Array
  acc_BCD: jax.Array

  def pooled(self) -> jax.Array:
    """The salience-weighted mean feature of each part [B, C, D] (0 for an empty part)."""
    return self.acc_BCD / jnp.maximum(self.sum_BC, 1e-30)[..., None]


def init_pool(batch_size: int, parts: int, width: int) -> SpanPool:
  return SpanPool(jnp.full((batch_size, parts), EMPTY_MAX, jnp.float32),
                  jnp.zeros((batch_size, parts), jnp.float32),
                  jnp.zeros((batch_size, parts, width), jnp.float32))


def pool_add(pool: SpanPool, salience_BQ: jax.Array, features_BQD: jax.Array,
             mask_QC: jax.Array) -> SpanPool:
  """The pool with each token added to the parts where `mask_QC` [Q, C] is true."""
  z_BQC = jnp.where(mask_QC[None], salience_BQ.astype(jnp.float32)[..., None], EMPTY_MAX)
  new_max_BC = jnp.maximum(pool.max_BC, jnp.max(z_BQC, axis=1))
  keep_BC = jnp.exp(pool.max_BC - new_max_BC)
  w_BQC = jnp.exp(z_BQC - new_max_BC[:, None, :]) * mask_QC[None]
  return SpanPool(new_max_BC, pool.sum_BC * keep_BC + jnp.sum(w_BQC, axis=1),
                  pool.acc_BCD * keep_BC[..., None]
                  + jnp.einsum("bqc,bqd->bcd", w_BQC, features_BQD.astype(jnp.float32)))


@flax.struct.dataclass
class LayerMemory:
  """One layer's state; a memory the model is built without is None (`window` without working
  memory; `episodic`, `procedural` without plasticity or when left out; `pool`, the span's
  pooled features, without both), the last token's working-memory and episodic inputs [B, D]
  (the token shift's) None without it or without their memory."""
  core_BD: jax.Array
  window: Optional[WindowCache] = None
  episodic: Optional[episodic.EpisodicMemory] = None
  procedural: Optional[procedural.ProceduralMemory] = None
  pool: Optional[SpanPool] = None
  wm_previous_BD: Optional[jax.Array] = None
  em_previous_BD: Optional[jax.Array] = None


@flax.struct.dataclass
class BrainCoreMemory:
  """Every layer's state, the document of the last token [B] and the tokens seen (shared by
  the batch; where the stream stands inside its plasticity span)."""
  layers: tuple[LayerMemory, ...]
  segment_B: jax.Array
  position: jax.Array


def pool_width(config: BrainCoreConfig) -> int:
  """Width of the pooled span features: the token's, and its predecessor's with the shift."""
  return 2 * config.d_model if config.token_shift else config.d_model


def init_memory(config: BrainCoreConfig, batch_size: int) -> BrainCoreMemory:
  """The empty memory of `batch_size` streams."""
  if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
    raise ValueError(f"init_memory: batch_size must be a positive integer, got {batch_size!r}")
  c = config
  layers = []
  for _ in range(c.num_layers):
    layer = LayerMemory(core_BD=jnp.zeros((batch_size, c.d_model), jnp.float32))
    if c.has_working:
      layer = layer.replace(window=init_window(batch_size, c.window, c.num_heads, c.head_dim))
    if c.has_episodic:
      layer = layer.replace(
          episodic=episodic.init_episodic(batch_size, c.em_items, c.em_key_dim, c.em_key_dim))
    if c.has_procedural:
      layer = layer.replace(procedural=procedural.init_procedural(batch_size, c.d_model,
                                                                  c.pm_rank))
    if c.has_pool:
      layer = layer.replace(pool=init_pool(batch_size, c.em_writes, pool_width(c)))
    if c.token_shift:  # Separate buffers: a donated memory may not hold one buffer twice.
      if c.has_working:
        layer = layer.replace(wm_previous_BD=jnp.zeros((batch_size, c.d_model), jnp.float32))
      if c.has_pool:
        layer = layer.replace(em_previous_BD=jnp.zeros((batch_size, c.d_model), jnp.float32))
    layers.append(layer)
  return BrainCoreMemory(tuple(layers), jnp.zeros((batch_size,), jnp.int32),
                         jnp.zeros((), jnp.int32))

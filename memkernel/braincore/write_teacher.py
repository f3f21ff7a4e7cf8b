"""The episodic write gate's hindsight teacher (training only): which candidates later reads use.

Shapes: B batch, T tokens, N spans, C candidates per span, K key width.

A write gate sees a candidate when its span ends and has to guess whether a later read will want
it. Through the read it learns only about candidates it stored (their strength scales their
score); a candidate it turned away, or one that evicted a fact, leaves it no gradient, so it
never learns to keep filler out. The teacher supplies that signal from hindsight over the whole
training sequence. For every position the task scores, a dense read over every candidate offered
before that position's span (the ones it could have read had all of them been stored, and had
nothing been evicted), scored q . k / sqrt(K) as the read scores them. A candidate's target is
1 if it is some scored position's first choice, else 0 (`target='first'`). Its gate is trained
towards the target by binary cross entropy, stored or not, so a gate above 1/2 says "a later
read will want this first, more likely than not". Candidates no scored position could read
carry no weight. Targets are outside the gradient: the teacher moves the gate, not the read.

`target='near'` softens it: exp(score - that position's best score) at the scored position
where the candidate comes nearest (1 for a first choice, e^-gap for a runner-up). Where a
layer's reads barely discriminate, 'near' marks most candidates and the gate opens for them
(a third of a second layer's candidates, docs/results/braincore/). (Before both, the target
was the candidate's softmax share of a scored read: it shrinks as the candidates grow in
number, and the facts' gates stayed below 1/2.)

    targets_BNC, weights_BNC = write_targets(queries_BTK, keys_BNCK, mask_BT, span)
    loss = gate_loss(logits_BNC, targets_BNC, weights_BNC)
    loss, mean_targets = teach(traces, mask_BT, span)      # every layer's write trace

Like the kernel's dense teacher for its router, it costs O(T N C) and exists only in training;
the gate it trains decides alone, causally, in every form.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp


TARGETS = ("first", "near")


def write_targets(queries_BTK: jax.Array, keys_BNCK: jax.Array, mask_BT: jax.Array, span: int,
                  segments_BT: Optional[jax.Array] = None,
                  target: str = "first") -> tuple[jax.Array, jax.Array]:
  """Each candidate's target in [0, 1] (1: a scored read's first choice) and its weight (1 where
  a scored position can read it).

  Args:
    queries_BTK: the episodic query of every position.
    keys_BNCK: the C candidates' keys offered at the end of each of the N spans (N * span <= T).
    mask_BT: the positions the task scores (> 0).
    span: the plasticity span P: a position in span j reads the candidates of spans < j.
    segments_BT: document index per position, or None; given, a position reads only candidates
      of its own document (episodic memory that resets at a document boundary).
    target: 'first', 1 for a scored position's first choice and 0 for the rest, or 'near',
      exp(score - the best score) at the scored position that wants the candidate most.

  Returns:
    (targets [B, N, C], weights [B, N, C]), both outside the gradient.
  """
  b, t, k = queries_BTK.shape
  n, c = keys_BNCK.shape[1:3]
  if keys_BNCK.shape != (b, n, c, k) or mask_BT.shape != (b, t) or n * span > t:
    raise ValueError(f"write_targets: queries [B, T, K], keys [B, N, C, K] with N * span <= T and "
                     f"a mask [B, T] expected, got {queries_BTK.shape}, {keys_BNCK.shape}, "
                     f"{mask_BT.shape} (span {span})")
  span_of_X = jnp.repeat(jnp.arange(n), c)
  visible_BTX = (span_of_X[None, :] < (jnp.arange(t) // span)[:, None])[None]
  if segments_BT is not None:
    document_BX = segments_BT[:, span_of_X * span]
    visible_BTX = visible_BTX & (segments_BT[:, :, None] == document_BX[:, None, :])
  keys_BXK = keys_BNCK.reshape(b, n * c, k).astype(jnp.float32)
  scores_BTX = jnp.einsum("btk,bxk->btx", queries_BTK.astype(jnp.float32), keys_BXK) / jnp.sqrt(k)
  scores_BTX = jnp.where(visible_BTX, scores_BTX, -jnp.inf)
  best_BT1 = jnp.max(scores_BTX, axis=-1, keepdims=True)
  if target == "near":
    wanted_BTX = jnp.where(visible_BTX, jnp.exp(scores_BTX - jnp.where(jnp.isfinite(best_BT1),
                                                                      best_BT1, 0.0)), 0.0)
  elif target == "first":
    first_BT = jnp.argmax(scores_BTX, axis=-1)
    wanted_BTX = (jax.nn.one_hot(first_BT, n * c, dtype=jnp.float32)
                * jnp.isfinite(best_BT1)) * visible_BTX
  else:
    raise ValueError(f"write_targets: target must be one of {TARGETS}, got {target!r}")
  scored_BT1 = (mask_BT > 0)[..., None]
  targets_BX = jnp.max(jnp.where(scored_BT1, wanted_BTX, 0.0), axis=1)
  weights_BX = jnp.any(scored_BT1 & visible_BTX, axis=1).astype(jnp.float32)
  return (jax.lax.stop_gradient(targets_BX.reshape(b, n, c)),
          jax.lax.stop_gradient(weights_BX.reshape(b, n, c)))


def gate_loss(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> jax.Array:
  """Weighted mean binary cross entropy of gates sigmoid(`logits`) against soft `targets`
  (0 when every weight is 0)."""
  bce = jax.nn.softplus(logits) - targets * logits
  return jnp.sum(bce * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def teach(traces, mask_BT: jax.Array, span: int, segments_BT: Optional[jax.Array] = None,
          target: str = "first") -> tuple[jax.Array, tuple[jax.Array, ...]]:
  """The gate loss averaged over layers, and each layer's mean target over its weighted
  candidates, from the layers' write traces ({'logits' [B, N, C], 'keys' [B, N, C, K],
  'queries' [B, T, K]}, `BrainCoreModel._run`)."""
  losses, means = [], []
  for layer in traces:
    targets, weights = write_targets(layer["queries"], layer["keys"], mask_BT, span, segments_BT,
                                     target)
    losses.append(gate_loss(layer["logits"], targets, weights))
    means.append(jnp.sum(targets * weights) / jnp.maximum(jnp.sum(weights), 1.0))
  return sum(losses) / len(losses), tuple(means)

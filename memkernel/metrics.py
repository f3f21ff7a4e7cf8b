"""Metrics and diagnostics of a forward pass, for every family: one home.

`forward_metrics` is the task loss and accuracy on the scored positions plus the model's own
diagnostics; `routing_metrics` reads the typed `RouteTrace`s of a routing family; `diagnostics`
summarises roots, fusion gates and routing of one forward.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from memkernel.outputs import RouteTrace


def routing_hits(leaves_BTHK: jax.Array, answer_leaves_BTA: jax.Array,
                 mask_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(hits, pairs): the (scored position, answer leaf) pairs whose leaf some head selected, and
  all such pairs. Sums, so chunks of a sequence add up (`evaluate.evaluate(chunk=)`)."""
  sel = leaves_BTHK.reshape(leaves_BTHK.shape[:2] + (-1,))
  hit = jnp.any(sel[..., None, :] == answer_leaves_BTA[..., :, None], axis=-1)  # [B, T, A]
  want = (answer_leaves_BTA >= 0) & (mask_BT[..., None] > 0)
  return jnp.sum(hit & want), jnp.sum(want)


def routing_recall(leaves_BTHK: jax.Array, answer_leaves_BTA: jax.Array,
                   mask_BT: jax.Array) -> jax.Array:
  """Fraction of (scored position, answer leaf) pairs whose leaf some head selected."""
  hits, pairs = routing_hits(leaves_BTHK, answer_leaves_BTA, mask_BT)
  return hits / jnp.maximum(pairs, 1)


def query_blind_recall(answer_leaves_BTA: jax.Array, mask_BT: jax.Array, slots: int,
                       num_leaves: int) -> jax.Array:
  """The routing recall of the best router that ignores the query: one fixed set of `slots`
  leaves for every scored position, the `slots` most frequent answer leaves of this batch.

  An upper bound for any query-blind router with that many slots (it knows the batch's answers'
  distribution), so recall above it is finding. On Zoology's MQAR layout, whose answers sit in
  the first leaves, it is ~1; where the answer moves it falls with the number of leaves.
  """
  want = (answer_leaves_BTA >= 0) & (mask_BT[..., None] > 0)
  ids = jnp.where(want, answer_leaves_BTA, num_leaves).reshape(-1)
  counts = jnp.zeros((num_leaves + 1,), jnp.float32).at[ids].add(1.0)[:num_leaves]
  best = jax.lax.top_k(counts, min(slots, num_leaves))[0]
  return jnp.sum(best) / jnp.maximum(jnp.sum(want), 1)


def routing_metrics(routes: Optional[Sequence[Optional[RouteTrace]]], batch: Mapping[str, jax.Array], leaf_size: int) -> dict:
  """Per-layer routing recall (all heads, each head), its query-blind baseline, distinct leaves
  read per token and routing sparsity.

  `routing_recall/head_h` counts head h's own K slots; `routing_recall_blind` is
  `query_blind_recall` with the layer's H * K slots and `routing_recall_blind/head` with K, the
  baselines of the two. Sparsity is (distinct leaves read) / (leaves sealed) per token, averaged
  over tokens that see at least one sealed leaf.
  """
  metrics = {}
  t = batch["tokens"].shape[1]
  sealed_T = jnp.arange(t) // leaf_size
  sees = jnp.broadcast_to(sealed_T > 0, batch["tokens"].shape).astype(jnp.float32)
  count = jnp.maximum(jnp.sum(sees), 1.0)
  for i, layer in enumerate(routes or ()):
    if layer is None:
      continue
    leaves = layer.leaves
    answers, mask = batch["answer_leaves"], batch["mask"]
    metrics[f"layer_{i}/routing_recall"] = routing_recall(leaves, answers, mask)
    heads, slots = leaves.shape[2], leaves.shape[3]
    for h in range(heads):
      metrics[f"layer_{i}/routing_recall/head_{h}"] = routing_recall(
          leaves[:, :, h:h + 1], answers, mask)
    num_leaves = -(-t // leaf_size)
    metrics[f"layer_{i}/routing_recall_blind"] = query_blind_recall(
        answers, mask, heads * slots, num_leaves)
    metrics[f"layer_{i}/routing_recall_blind/head"] = query_blind_recall(
        answers, mask, slots, num_leaves)
    flat = jnp.sort(leaves.reshape(leaves.shape[:2] + (-1,)), axis=-1)
    new = jnp.concatenate([jnp.ones_like(flat[..., :1], bool), flat[..., 1:] != flat[..., :-1]],
                          axis=-1)
    read_BT = jnp.sum(new & (flat >= 0), axis=-1).astype(jnp.float32)
    metrics[f"layer_{i}/leaves_read"] = jnp.sum(read_BT * sees) / count
    metrics[f"layer_{i}/routing_sparsity"] = jnp.sum(
        read_BT / jnp.maximum(sealed_T, 1) * sees) / count
  return metrics



def forward_metrics(model: nn.Module, params, batch: Mapping[str, jax.Array], *, train: bool,
                    oracle: bool, interventions: Any = None,
                    route_hints: Any = None) -> tuple[jax.Array, dict]:
  """(objective, metrics) of one batch: masked cross entropy + the model's auxiliary losses.

  `interventions` (a family's, e.g. `memkernel.Interventions`; None: none) go to the model, and
  `route_hints` (token, weight [B, T, layers, H]; the kernel's parallel form) too.

  Returns:
    objective: scalar, the task loss plus the model's `Outputs.losses` when training.
    metrics: loss (task cross entropy over masked positions), accuracy, each auxiliary loss as
      `loss/<name>`, the model's diagnostics and `routing_metrics` (of the leaves actually read:
      with `oracle` those are the answer leaves wherever they are visible).
  """
  extra = {} if route_hints is None else {"route_hints": route_hints}
  logits, out = model.apply({"params": params}, batch["tokens"], batch.get("segments"),
                            oracle_leaves=batch["answer_leaves"] if oracle else None, train=train,
                            loss_mask=batch["mask"] if train else None,
                            interventions=interventions, **extra)
  mask = batch["mask"]
  denom = jnp.maximum(jnp.sum(mask), 1.0)
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
  loss = jnp.sum(nll * mask) / denom
  accuracy = jnp.sum((jnp.argmax(logits, -1) == batch["targets"]) * mask) / denom
  losses = out.losses if train else {}
  objective = loss + sum(losses.values())
  metrics = {"loss": loss, "accuracy": accuracy, "queries": jnp.sum(mask)}
  metrics.update({f"loss/{k}": v for k, v in losses.items()})
  metrics.update(out.metrics)
  if out.routes is not None and "answer_leaves" in batch:  # Text has no answers to find.
    metrics.update(routing_metrics(out.routes, batch, model.config.leaf_size))
  return objective, metrics


def root_similarity(roots_BTRD: jax.Array) -> jax.Array:
  """Mean pairwise cosine similarity between root outputs (1.0 means collapsed); 0 for one root."""
  r = roots_BTRD.shape[2]
  if r < 2:
    return jnp.zeros(())
  unit = roots_BTRD / (jnp.linalg.norm(roots_BTRD, axis=-1, keepdims=True) + 1e-6)
  cos = jnp.einsum("btrd,btsd->btrs", unit, unit)
  off = 1.0 - jnp.eye(r)
  return jnp.sum(jnp.mean(cos, axis=(0, 1)) * off) / (r * (r - 1))


def diagnostics(routes: Sequence[Optional[RouteTrace]], roots: Sequence[jax.Array],
                gates: Sequence[jax.Array], sources: Sequence[str]) -> dict[str, jax.Array]:
  """Scalar diagnostics of one forward: roots, fusion gates (named by `sources`), routing and
  the exact read."""
  m: dict[str, Any] = {}
  for i, (ra, rt, g) in enumerate(zip(routes, roots, gates)):
    m[f"layer_{i}/root_similarity"] = root_similarity(rt)
    for r in range(rt.shape[2]):
      m[f"layer_{i}/root_{r}_norm"] = jnp.mean(jnp.linalg.norm(rt[:, :, r], axis=-1))
      m[f"layer_{i}/root_{r}_std"] = jnp.std(rt[:, :, r])
    for s, name in enumerate(sources):
      m[f"layer_{i}/gate_{name}"] = jnp.mean(g[..., s])
    if ra is None:
      continue
    leaves, probs, active = ra.leaves, ra.read_probs, ra.read_active
    m[f"layer_{i}/route_entropy"] = jnp.mean(ra.entropy)
    m[f"layer_{i}/exact_read_usage"] = jnp.mean(active)
    p_tok = probs.reshape(probs.shape[:3] + (-1,))
    ent = -jnp.sum(jnp.where(p_tok > 0, p_tok * jnp.log(jnp.maximum(p_tok, 1e-30)), 0.0), -1)
    m[f"layer_{i}/read_entropy"] = jnp.sum(jnp.where(active, ent, 0.0)) / jnp.maximum(
        jnp.sum(active), 1)
    m[f"layer_{i}/read_max_prob"] = jnp.sum(jnp.where(active, p_tok.max(-1), 0.0)) / jnp.maximum(
        jnp.sum(active), 1)
    top1 = leaves[..., 0]
    visible = top1[..., 0] >= 0
    disagree = jnp.any(top1 != top1[..., :1], axis=-1) & visible
    m[f"layer_{i}/head_disagreement"] = jnp.sum(disagree) / jnp.maximum(jnp.sum(visible), 1)
  return m

"""Which node score ranks the answer's ancestor first, level by level.

The routing diagnostic's `level_first/l` asks whether the answer's level-l ancestor has the best
*pooled* summary score among the complete level-l nodes a query sees. This asks the same of other
ways to score a node, each computed here from the tokens under the node, so any trained run can
be compared on them without retraining (q is the query's routing query rq; a node's tokens have
routing keys rk and pooling logits):

  pooled   q . the node's pooled key (the tree the model built, `tree.merge_nodes`).
  reps_M   the best q . rk over the node's M most salient tokens (largest pooling logit; what
           `KernelConfig.node_reps = M` routes by, `tree.leaf_reps` / `merge_reps`).
  bound    sum_p max(q_p hi_p, q_p lo_p), hi / lo the per-dimension max / min of rk over the
           node's tokens: an upper bound of every token's q . rk (Quest's page bounds, the
           branch-and-bound key).
  exact    the best q . rk over all the node's tokens: what reps_M tends to as M grows; O(node
           size) keys per node, the ceiling of any rule that scores a node by its best token.

Pairs are counted as in `diagnose.layer_trace`: the answer leaf sealed before the query's leaf,
the ancestor complete and visible, at least two complete level-l nodes visible; "any head".
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp

from memkernel import ops
from memkernel.kernel.state import level_offset

NEG_INF = ops.NEG_INF


def rule_names(reps: Sequence[int]) -> tuple[str, ...]:
  """The rules compared, in report order."""
  return ("pooled", *(f"reps_{m}" for m in reps), "bound", "exact")


def node_score_trace(inputs: Mapping[str, jax.Array], pos_BQ: jax.Array, answers_BQA: jax.Array,
                     *, leaf_size: int, reps: Sequence[int] = (4, 16)) -> dict[str, jax.Array]:
  """Hits and counts of "the answer's level-l ancestor scores best" under every rule.

  Args:
    inputs: the layer's sown route inputs: rq [B, T, H, P], rk [B, T, H, P], pool [B, T, H],
      node_keys [B, S, H, P].
    pos_BQ: scored query positions.
    answers_BQA: answer leaves of those queries (-1: none).
    leaf_size: L.
    reps: the M of every reps_M rule.
  Returns:
    {f"{rule}/{level}": float32 hits, f"{rule}/{level}/n": float32 pairs counted}.
  """
  rq, rk, pool, node_keys = inputs["rq"], inputs["rk"], inputs["pool"], inputs["node_keys"]
  b, t, h, p = rq.shape
  num_leaves = (node_keys.shape[1] + 1) // 2
  n_full = t // leaf_size
  c_BQ = pos_BQ // leaf_size
  a = answers_BQA
  pair = (a >= 0) & (a < c_BQ[..., None])
  rq_q = jax.vmap(lambda x, i: x[i])(rq, pos_BQ)                      # [B, Q, H, P]
  out: dict[str, jax.Array] = {}
  level = 0
  while (n_full >> level) >= 2:
    n_l, size = n_full >> level, leaf_size << level
    under = lambda x: x[:, :n_l * size].reshape((b, n_l, size) + x.shape[2:])
    rk_l = under(rk)                                                   # [B, N, Z, H, P]
    pool_l = jnp.swapaxes(under(pool), 2, 3).astype(jnp.float32)       # [B, N, H, Z]
    tok = jnp.einsum("bnzhp,bqhp->bqhnz", rk_l, rq_q)                  # every token's q . rk
    scores = {"pooled": jnp.einsum(
        "bnhp,bqhp->bqhn", node_keys[:, level_offset(num_leaves, level):][:, :n_l], rq_q)}
    for m in reps:
      if m >= size:
        scores[f"reps_{m}"] = jnp.max(tok, axis=-1)
      else:
        kth = jax.lax.top_k(pool_l, m)[0][..., -1:]                   # [B, N, H, 1]
        keep = jnp.swapaxes(pool_l >= kth, 1, 2)[:, None]              # [B, 1, H, N, Z]
        scores[f"reps_{m}"] = jnp.max(jnp.where(keep, tok, NEG_INF), axis=-1)
    hi, lo = jnp.max(rk_l, axis=2), jnp.min(rk_l, axis=2)              # [B, N, H, P]
    scores["bound"] = jnp.sum(jnp.maximum(jnp.einsum("bnhp,bqhp->bqhnp", hi, rq_q),
                                          jnp.einsum("bnhp,bqhp->bqhnp", lo, rq_q)), axis=-1)
    scores["exact"] = jnp.max(tok, axis=-1)
    seen = c_BQ >> level                                               # complete nodes visible
    visible = jnp.arange(n_l)[None, None, None, :] < seen[..., None, None]
    anc = a >> level
    valid = pair & (anc < seen[..., None]) & (seen[..., None] >= 2)
    for rule, s in scores.items():
      best = jnp.argmax(jnp.where(visible, s, NEG_INF), axis=-1)       # [B, Q, H]
      hit = jnp.any(best[..., None, :] == anc[..., None], axis=-1) & valid
      out[f"{rule}/{level}"] = jnp.sum(hit).astype(jnp.float32)
      out[f"{rule}/{level}/n"] = jnp.sum(valid).astype(jnp.float32)
    level += 1
  return out

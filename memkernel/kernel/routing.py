"""FractalRouterHead's pure functions: top-down beam routing over the sealed tree, and its teacher.

For a query in leaf c the visible memory is the Fenwick decomposition of c: the maximal complete
nodes that tile leaves [0, c), one per set bit of c. The router scores them, keeps the best K, replaces
each kept node by its two children (a leaf stays itself), and repeats until only leaves remain.
Weights are a softmax over the K survivors only. Ties break towards the lower candidate slot
(as `lax.top_k` does), and candidates are laid out in the same order in every execution form.

Finding the right leaf is the hard part of this model (reading works once the leaf is found), so two
training signals reach the router: the selected leaves' weights enter the exact-read logits (as
`log w`), and `teacher_loss` trains every level's scores towards the attention mass of a dense,
stop-gradient exact attention over all visible tokens (training only; inference never uses it).

Shape key in `memkernel.shapes`.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from memkernel.kernel import tree as tree_lib
from memkernel.kernel.tree import level_offset
from memkernel.ops import NEG_INF, matvec, vecmat

class RouteResult(NamedTuple):
  """What the router selected, per query and head.

  Attributes:
    leaves: int32 [B, T, H, K], selected leaf indices, -1 where fewer than K leaves are visible.
    weights: float32 [B, T, H, K], softmax over the surviving leaves (0 where leaves is -1).
    runner_up: int32 [B, T, H, K], the best leaves the beam scored and pruned, i.e. the best
      unselected candidates at leaf depth (-1 if none).
    tree_value: float32 [B, T, H, E], summary values of the beam, weighted per step and averaged
      over the descent (the "routed tree value").
    entropy: float32 [B, T, H], mean candidate entropy over the descent.
    start_level: int32 [B, T, H], level of the best first-step candidate (-1 when nothing visible).
    path: int32 [B, T, H, steps] (steps = `num_expansions(N) + 1`), the descent that reached
      leaves[..., 0]: the node its beam slot held after each step, flat level-major, -1 past leaf
      depth or when nothing is selected (see `descent_path`). Summaries only: the best Fenwick
      node, then -1.
  """

  leaves: jax.Array
  weights: jax.Array
  runner_up: jax.Array
  tree_value: jax.Array
  entropy: jax.Array
  start_level: jax.Array
  path: jax.Array


def num_expansions(num_leaves: int) -> int:
  """Beam steps after the first: the deepest visible Fenwick node has level log2(N) - 1."""
  return max(num_leaves.bit_length() - 2, 0)


def fenwick_candidates(query_leaf_T: jax.Array, num_leaves: int):
  """The maximal complete nodes covering leaves [0, c), highest level first.

  Args:
    query_leaf_T: int32 [...], the leaf index c of each query.
    num_leaves: N (a power of two).
  Returns:
    level, index (within level), valid: each int32/bool [..., F] with F = log2(N) + 1.
  """
  levels = jnp.arange(num_leaves.bit_length() - 1, -1, -1, dtype=jnp.int32)
  c = jnp.asarray(query_leaf_T, jnp.int32)[..., None]
  valid = ((c >> levels) & 1) == 1
  index = (c >> (levels + 1)) << 1
  level = jnp.broadcast_to(levels, valid.shape)
  return level, index, valid


def flat_index(level: jax.Array, index: jax.Array, num_leaves: int) -> jax.Array:
  """Level-major flat node index of (level, index)."""
  return 2 * num_leaves - ((2 * num_leaves) >> level) + index


def descent_path(leaf_BTH: jax.Array, query_leaf_T: jax.Array, num_leaves: int) -> jax.Array:
  """The nodes a beam slot held on its way down to `leaf`, one per routing step.

  A query in leaf c starts from the Fenwick nodes tiling leaves [0, c), which are disjoint, and each
  expansion replaces a node by its children: a slot that ends at leaf a < c held a's ancestor at
  level l - s after step s, where l = bit_length(c ^ a) - 1 is the level of the Fenwick node over
  a. The path is therefore read off the leaf instead of being carried through the beam.

  Args:
    leaf_BTH: int32 [B, T, H], the leaf reached (-1: none).
    query_leaf_T: int32 [T], the leaf c of each query.
    num_leaves: N.
  Returns:
    int32 [B, T, H, num_expansions(N) + 1], flat level-major node indices, -1 after the step that
    reached leaf depth and everywhere for leaf -1.
  """
  steps = num_expansions(num_leaves) + 1
  c = jnp.asarray(query_leaf_T, jnp.int32)[None, :, None]
  has = leaf_BTH >= 0
  leaf = jnp.where(has, leaf_BTH, 0).astype(jnp.int32)
  start = 31 - jax.lax.clz(jnp.where(has, c ^ leaf, 1))      # bit_length(c ^ a) - 1
  level = start[..., None] - jnp.arange(steps, dtype=jnp.int32)
  valid = has[..., None] & (level >= 0)
  level = jnp.maximum(level, 0)
  path = flat_index(level, leaf[..., None] >> level, num_leaves)
  return jnp.where(valid, path, -1).astype(jnp.int32)


def gather_nodes(store_BSHX: jax.Array, flat_BTHC: jax.Array) -> jax.Array:
  """store[b, flat[b, t, h, c], h] -> [B, T, H, C, X...] (any trailing axes X)."""
  heads = jnp.arange(store_BSHX.shape[2])[None, :, None]
  return jax.vmap(lambda s, i: s[i, heads])(store_BSHX, flat_BTHC)


def gather_leaves(cache_BNLHX: jax.Array, leaves_BTHK: jax.Array) -> jax.Array:
  """cache[b, leaves[b, t, h, k], :, h] -> [B, T, H, K, L, X] (index -1 reads leaf 0, masked later)."""
  heads = jnp.arange(cache_BNLHX.shape[3])[None, :, None]
  safe = jnp.maximum(leaves_BTHK, 0)
  return jax.vmap(lambda c, i: c[i, heads])(jnp.swapaxes(cache_BNLHX, 2, 3), safe)


def exact_leaf_scores(q_BTHE: jax.Array, cache_k_BNLHE: jax.Array,
                      leaves_BTHC: jax.Array) -> jax.Array:
  """Scores leaves by their tokens: logsumexp over the leaf of the exact read's logits q . k.

  This is the log of the (unnormalised) attention mass the exact read would give the leaf, so a
  leaf holding one matching key outranks a leaf whose *summary* happens to lie closer to the
  query. Returns float32 [B, T, H, C].
  """
  e = q_BTHE.shape[-1]
  keys = gather_leaves(cache_k_BNLHE, leaves_BTHC)   # [B, T, H, C, L, E]
  b, t, h, c, l, _ = keys.shape
  logits = matvec(keys.reshape(b, t, h, c * l, e), q_BTHE).reshape(b, t, h, c, l) * e ** -0.5
  return jax.nn.logsumexp(logits, axis=-1)


def rep_scores(rq_BTHP: jax.Array, rep_keys_BSHMP: jax.Array, rep_sal_BSHM: jax.Array,
               flat_BTHC: jax.Array) -> jax.Array:
  """Scores nodes by their representatives: max_m q . rk_m / sqrt(P) over each node's filled
  slots (`tree.leaf_reps`). Returns float32 [B, T, H, C]."""
  keys = gather_nodes(rep_keys_BSHMP, flat_BTHC)                  # [B, T, H, C, M, P]
  b, t, h, c, m, p = keys.shape
  s = matvec(keys.reshape(b, t, h, c * m, p), rq_BTHP).reshape(b, t, h, c, m) * p ** -0.5
  filled = gather_nodes(rep_sal_BSHM, flat_BTHC) > NEG_INF / 2
  return jnp.max(jnp.where(filled, s, NEG_INF), axis=-1)


def top_k(scores: jax.Array, width: int) -> tuple[jax.Array, jax.Array]:
  """`lax.top_k` over the last axis as `width` rounds of argmax: same values, slots and tie rule
  (the lower slot first). Routing keeps at most 2K of a handful of candidates, and XLA:CPU lowers
  `lax.top_k` to a full sort, which measured at half of all routing time."""
  if width == 0:
    return scores[..., :0], jnp.zeros(scores.shape[:-1] + (0,), jnp.int32)
  iota = jnp.arange(scores.shape[-1])
  values, slots = [], []
  for _ in range(width):
    slot = jnp.argmax(scores, axis=-1)
    values.append(jnp.take_along_axis(scores, slot[..., None], axis=-1)[..., 0])
    slots.append(slot)
    scores = jnp.where(iota == slot[..., None], -jnp.inf, scores)
  return jnp.stack(values, axis=-1), jnp.stack(slots, axis=-1).astype(jnp.int32)


def _masked_softmax(scores, valid):
  w = jax.nn.softmax(jnp.where(valid, scores, NEG_INF), axis=-1)
  return jnp.where(valid, w, 0.0)


def _entropy(scores, valid):
  logp = jax.nn.log_softmax(jnp.where(valid, scores, NEG_INF), axis=-1)
  p = jnp.where(valid, jnp.exp(logp), 0.0)
  return -jnp.sum(jnp.where(valid, p * logp, 0.0), axis=-1)


def route_beam(rq_BTHP: jax.Array, node_keys_BSHP: jax.Array, node_vals_BSHE: jax.Array,
               query_leaf_T: jax.Array, beam_width: int,
               rerank: Optional[tuple[jax.Array, jax.Array]] = None,
               descend: bool = True, first_leaf: Optional[jax.Array] = None,
               search_width: int = 0,
               node_reps: Optional[tuple[jax.Array, jax.Array]] = None,
               hint: Optional[tuple[jax.Array, jax.Array, jax.Array]] = None) -> RouteResult:
  """Beam-routes every query down the tree to `beam_width` sealed leaves before its own leaf.

  Args:
    rq_BTHP: routing queries.
    node_keys_BSHP, node_vals_BSHE: the level-major store (nodes outside a query's Fenwick
      decomposition may hold anything: they are never candidates of that query).
    query_leaf_T: int32 [T], the leaf each query sits in (it sees leaves < that index).
    beam_width: K.
    rerank: optional (q_BTHE, cache_k_BNLHE). The K leaves the beam ends with and the K best
      leaves it pruned on the way (by summary score) are re-scored by `exact_leaf_scores`; the
      best K are selected, weighted by a softmax over those exact scores, and the other K are
      the runner-ups. The summaries only have to bring the answer leaf into these 2K.
    descend: False reads summaries only: the tree value is a softmax over *all* the query's
      Fenwick nodes (its whole visible past at the coarsest exact tiling), nothing is descended
      and no leaf is selected (`leaves` is -1). The "summaries only" ablation.
    first_leaf: optional int32 [B, T], the first leaf of each query's document (document streams
      with a reset boundary): a node is a candidate only if it ends after that leaf, so nothing
      of an earlier document is scored, kept, re-ranked or read (a node straddling the start
      summarises the current document only, `tree.build_tree`). None: everything is visible.
    search_width: S, the nodes the beam keeps at every step (0 or <= K: K). With S > K the
      descent searches S paths and the re-rank (required) picks the K leaves read among its S
      leaves and S runner-ups: a wider search for the same read. With S at least the number of
      visible leaves it is the brute-force choice (the best K leaves by their tokens).
    node_reps: optional (rep_keys [B, S, H, M, P], rep_sal [B, S, H, M]), every node's
      representative keys (`tree.build_reps`): a node then scores by the best of them,
      max_m q . rk_m (slots of salience NEG_INF are empty), instead of q . its pooled key.
    hint: optional (presence uint32 [B, S, W] of `tree.build_presence`, token [B, T, H] int32
      (-1: none), weight [B, T, H]): every score of a node (and, in the re-rank, of a leaf) that
      holds a token following the query head's hint token gains `weight` (read traces'
      routing bias, evaluation only).
  Returns:
    A `RouteResult`.
  """
  b, t, h, p = rq_BTHP.shape
  num_leaves = (node_keys_BSHP.shape[1] + 1) // 2
  scale = p ** -0.5
  if search_width > beam_width and rerank is None:
    raise ValueError(f"search_width {search_width} > beam_width {beam_width} needs the leaf "
                     "re-rank to choose the leaves read")
  read_k = beam_width
  k = max(search_width, beam_width)

  def in_document(level, index, valid):
    if first_leaf is None:
      return valid
    return valid & (((index + 1) << level) > first_leaf[:, :, None, None])

  def hint_bias(flat):
    presence, token, weight = hint
    return weight[..., None] * tree_lib.holds(presence, flat, token[..., None])

  def score(level, index, valid):
    flat = jnp.where(valid, flat_index(level, index, num_leaves), 0)
    if node_reps is None:
      s = matvec(gather_nodes(node_keys_BSHP, flat), rq_BTHP) * scale
    else:
      s = rep_scores(rq_BTHP, *node_reps, flat)
    if hint is not None:
      s = s + hint_bias(flat)
    return jnp.where(valid, s, NEG_INF), flat

  def keep(scores, valid, *fields, width):
    width = min(width, scores.shape[-1])
    top, slot = top_k(scores, width)
    kept_valid = jnp.take_along_axis(valid, slot, axis=-1) & (top > NEG_INF / 2)
    return (top, kept_valid) + tuple(jnp.take_along_axis(f, slot, axis=-1) for f in fields)

  def pad_to(x, width, fill):
    missing = width - x.shape[-1]
    return x if missing <= 0 else jnp.concatenate(
        [x, jnp.full(x.shape[:-1] + (missing,), fill, x.dtype)], axis=-1)

  def weighted_value(weights, flat):
    vals = gather_nodes(node_vals_BSHE, flat)
    return vecmat(weights, vals)

  def drop_to_pool(pool, top, kv, level, index):
    """Keeps the best K leaves ever pruned from the beam (the runner-ups at leaf depth)."""
    dropped = jnp.where(kv[..., k:] & (level[..., k:] == 0), top[..., k:], NEG_INF)
    scores = jnp.concatenate([pool[0], dropped], axis=-1)
    leaves = jnp.concatenate([pool[1], index[..., k:]], axis=-1)
    width = min(k, scores.shape[-1])
    best, slot = top_k(scores, width)
    return best, jnp.where(best > NEG_INF / 2, jnp.take_along_axis(leaves, slot, axis=-1), -1)

  level, index, valid = fenwick_candidates(query_leaf_T, num_leaves)
  level, index, valid = (jnp.broadcast_to(x[None, :, None, :], (b, t, h, x.shape[-1]))
                         for x in (level, index, valid))
  valid = in_document(level, index, valid)
  scores, flat = score(level, index, valid)
  entropy = _entropy(scores, valid)
  if not descend:
    best = jnp.argmax(scores, axis=-1)[..., None]
    none = jnp.full((b, t, h, read_k), -1, jnp.int32)
    seen = jnp.any(valid, -1)
    path = jnp.full((b, t, h, num_expansions(num_leaves) + 1), -1, jnp.int32)
    path = path.at[..., 0].set(jnp.where(seen, jnp.take_along_axis(flat, best, -1)[..., 0], -1))
    return RouteResult(
        leaves=none, weights=jnp.zeros((b, t, h, read_k)), runner_up=none,
        tree_value=weighted_value(_masked_softmax(scores, valid), flat), entropy=entropy,
        start_level=jnp.where(seen, jnp.take_along_axis(level, best, -1)[..., 0],
                              -1).astype(jnp.int32),
        path=path)
  top, kv, level, index, flat = keep(scores, valid, level, index, flat, width=2 * k)
  start_level = jnp.where(kv[..., 0], level[..., 0], -1)
  pool = (jnp.full((b, t, h, 0), NEG_INF), jnp.full((b, t, h, 0), -1, jnp.int32))
  pool = drop_to_pool(pool, top, kv, level, index)
  top, kv, level, index, flat = (x[..., :k] for x in (top, kv, level, index, flat))
  w = _masked_softmax(top, kv)
  tree_value = weighted_value(w, flat)

  n_exp = num_expansions(num_leaves)
  for _ in range(n_exp):
    is_leaf = level == 0
    child_level = jnp.where(is_leaf, 0, level - 1)
    left = jnp.where(is_leaf, index, 2 * index)
    c_level = jnp.concatenate([child_level, child_level], axis=-1)
    c_index = jnp.concatenate([left, 2 * index + 1], axis=-1)
    c_valid = in_document(c_level, c_index, jnp.concatenate([kv, kv & ~is_leaf], axis=-1))
    c_scores, c_flat = score(c_level, c_index, c_valid)
    # A leaf that stays in the beam keeps the score it was kept with.
    kw = top.shape[-1]
    c_scores = c_scores.at[..., :kw].set(jnp.where(is_leaf & kv, top, c_scores[..., :kw]))
    entropy = entropy + _entropy(c_scores, c_valid)
    top, kv, level, index, flat = keep(c_scores, c_valid, c_level, c_index, c_flat, width=2 * k)
    pool = drop_to_pool(pool, top, kv, level, index)
    top, kv, level, index, flat = (x[..., :k] for x in (top, kv, level, index, flat))
    w = _masked_softmax(top, kv)
    tree_value = tree_value + weighted_value(w, flat)

  tree_value = tree_value / (n_exp + 1)
  leaves = pad_to(jnp.where(kv, index, -1), k, -1)
  weights = pad_to(w, k, 0.0)
  runner_up = pad_to(pool[1], k, -1)
  if rerank is not None:
    # The S leaves the beam ended with and the S best leaves it pruned, chosen by their tokens:
    # the best K are read, the next K are the runner-ups.
    cand = jnp.concatenate([leaves, runner_up], axis=-1)
    exact = exact_leaf_scores(*rerank, cand)
    if hint is not None:
      exact = exact + hint_bias(jnp.maximum(cand, 0))                 # Leaves: flat = index.
    exact = jnp.where(cand >= 0, exact, NEG_INF)
    top, kept, cand = keep(exact, cand >= 0, cand, width=2 * read_k)
    leaves = jnp.where(kept[..., :read_k], cand[..., :read_k], -1)
    weights = _masked_softmax(top[..., :read_k], kept[..., :read_k])
    runner_up = jnp.where(kept[..., read_k:], cand[..., read_k:], -1)
  return RouteResult(
      leaves=leaves.astype(jnp.int32),
      weights=weights,
      runner_up=runner_up.astype(jnp.int32),
      tree_value=tree_value,
      entropy=entropy / (n_exp + 1),
      start_level=start_level.astype(jnp.int32),
      path=descent_path(leaves[..., 0], query_leaf_T, num_leaves),
  )


def leaf_attention_mass(q_BSHE: jax.Array, k_BTHE: jax.Array, leaf_size: int,
                        num_leaves: int, query_pos_BS: Optional[jax.Array] = None,
                        return_token_mass: bool = False,
                        first_leaf_BS: Optional[jax.Array] = None):
  """Dense causal teacher: the attention mass each visible sealed leaf gets, per query and head.

  A query in leaf c attends over every token of leaves < c. The result is stop-gradient.

  Args:
    q_BSHE: the queries: every position of the sequence (S = T), or those at `query_pos_BS`.
    k_BTHE: the keys of every position.
    query_pos_BS: int32 [B, S] positions of the queries; None means 0..T-1. With S fixed the cost
      is O(S T) rather than O(T^2).
    return_token_mass: also return the per-token attention [B, S, H, T'] (T' = [T / L] L).
    first_leaf_BS: optional int32 [B, S], the first leaf of each query's document: tokens of
      earlier leaves are not visible (document streams with a reset boundary).
  Returns:
    float32 [B, S, H, N] (zeros for leaves a query cannot see; rows of leaf-0 queries are zero),
    and with `return_token_mass` the per-token attention as well.
  """
  b, s, h, e = q_BSHE.shape
  t = k_BTHE.shape[1]
  if query_pos_BS is None:
    query_pos_BS = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
  n_full = t // leaf_size
  keys = k_BTHE[:, :n_full * leaf_size]
  logits = jnp.einsum("bshe,bthe->bsht", q_BSHE, keys) * e ** -0.5
  q_leaf = query_pos_BS // leaf_size
  k_leaf = jnp.arange(n_full * leaf_size) // leaf_size
  visible = k_leaf[None, None, :] < q_leaf[:, :, None]
  if first_leaf_BS is not None:
    visible = visible & (k_leaf[None, None, :] >= first_leaf_BS[:, :, None])
  visible = visible[:, :, None, :]
  probs = jax.nn.softmax(jnp.where(visible, logits, NEG_INF), axis=-1)
  probs = jnp.where(visible, probs, 0.0)
  mass = probs.reshape(b, s, h, n_full, leaf_size).sum(-1)
  mass = jnp.pad(mass, ((0, 0), (0, 0), (0, 0), (0, num_leaves - n_full)))
  if return_token_mass:
    return jax.lax.stop_gradient(mass), jax.lax.stop_gradient(probs)
  return jax.lax.stop_gradient(mass)


def salience_loss(pool_BTH: jax.Array, token_mass_BSHT: jax.Array,
                  weight_BS: Optional[jax.Array] = None) -> jax.Array:
  """Cross-entropy from the pooling logits' softmax over the sealed tokens to the teacher's mass.

  The pooled merge weighs every token of a node by exp(pooling logit), so a node's routing key is
  its answer's key only if the tokens queries attend to carry most of the pooling mass. Target,
  per sequence and head: the teacher's attention over the tokens (`leaf_attention_mass(...,
  return_token_mass=True)`), summed over its query positions (weighted) and normalised.

  Args:
    pool_BTH: pooling logits of every position.
    token_mass_BSHT: per query, the teacher's attention over the first T' = [T / L] L positions.
    weight_BS: optional query weights.
  Returns:
    scalar mean cross-entropy over (sequence, head) pairs whose queries attend anywhere.
  """
  t_full = token_mass_BSHT.shape[-1]
  w = 1.0 if weight_BS is None else weight_BS.astype(jnp.float32)[:, :, None, None]
  target = jnp.sum(w * token_mass_BSHT, axis=1)                               # [B, H, T']
  total = target.sum(-1, keepdims=True)
  target = target / jnp.maximum(total, 1e-9)
  logp = jax.nn.log_softmax(jnp.swapaxes(pool_BTH[:, :t_full].astype(jnp.float32), 1, 2), -1)
  ce = -jnp.sum(target * logp, axis=-1)                                       # [B, H]
  active = (total[..., 0] > 0).astype(jnp.float32)
  return jnp.sum(active * ce) / jnp.maximum(jnp.sum(active), 1.0)


def teacher_positions(num_queries: int, seq_len: int, batch_size: int,
                      mask_BT: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
  """The query positions the teacher trains at, and their weights, so its cost is O(S T).

  With a mask (the task's scored positions), each row's S = min(num_queries, T) positions of
  largest mask weight, earliest first among equals (all of a probe's scored positions when it
  has at most S), weighted by the mask. Without, S positions spread over the sequence (one per
  stride, at an offset that cycles through the stride, so they do not all sit at one offset in
  their leaf), weight 1; S >= T gives every position.

  Returns:
    (positions int32 [B, S], weights float32 [B, S]).
  """
  s = min(num_queries, seq_len)
  if mask_BT is not None:
    pos = jnp.argsort(-mask_BT.astype(jnp.float32), axis=-1, stable=True)[:, :s]
    pos = jnp.sort(pos, axis=-1).astype(jnp.int32)
    return pos, jnp.take_along_axis(mask_BT.astype(jnp.float32), pos, axis=-1)
  stride = seq_len // s
  i = jnp.arange(s, dtype=jnp.int32)
  pos = i * stride + (i * 5) % stride
  return (jnp.broadcast_to(pos, (batch_size, s)),
          jnp.ones((batch_size, s), jnp.float32))


def teacher_loss(rq_BTHP: jax.Array, node_keys_BSHP: jax.Array, query_leaf: jax.Array,
                 leaf_mass_BTHN: jax.Array, weight_BT: Optional[jax.Array] = None,
                 cross_level: bool = False,
                 first_leaf: Optional[jax.Array] = None) -> jax.Array:
  """Cross-entropy from each level's node-score softmax to the teacher's mass on those nodes.

  At every level the candidates are all complete nodes inside the query's visible prefix, so the
  signal reaches nodes the beam did not pick (an in-beam loss only confirms what was picked).

  With `cross_level`, level l's candidates also include the query's Fenwick nodes of lower levels
  (the tail [(c >> l) << l, c) that no complete level-l node covers), so each level's softmax is
  over a partition of the whole visible prefix that mixes levels, as the beam's comparisons do:
  the first routing step compares the Fenwick nodes (every level at once), and a descent compares
  a large node's children with the smaller nodes kept beside it. Without it the router is only
  trained to rank nodes of one size against each other. Level l contributes when the query sees
  at least one complete level-l node and two candidates in all.

  Without `cross_level`, levels where a query sees fewer than two level-l nodes contribute nothing.

  Args:
    rq_BTHP: routing queries (every position, or those `teacher_positions` picked).
    query_leaf: int32 [T] or [B, T], the leaf each query sits in.
    leaf_mass_BTHN: `leaf_attention_mass` of the same queries.
    weight_BT: optional weight of each query position (e.g. the task's loss mask, so the router
      learns where the loss needs it rather than wherever unscored positions happen to attend);
      None weighs every position 1.
    cross_level: add the lower-level Fenwick tail to every level's candidates (see above).
    first_leaf: optional int32 [B, T], the first leaf of each query's document: nodes ending at
      or before it are not candidates (as in `route_beam`).
  Returns:
    scalar weighted mean cross-entropy over (query, head, level) terms that have >= 2 candidates.
  """
  b, t, h, p = rq_BTHP.shape
  num_leaves = leaf_mass_BTHN.shape[-1]
  scale = p ** -0.5
  c = jnp.broadcast_to(jnp.asarray(query_leaf, jnp.int32), (b, t))
  if cross_level:
    f_level, f_index, f_valid = fenwick_candidates(c, num_leaves)             # [B, T, F]
    if first_leaf is not None:
      f_valid = f_valid & (((f_index + 1) << f_level) > first_leaf[..., None])
    flat = jnp.where(f_valid, flat_index(f_level, f_index, num_leaves), 0)
    f_keys = jax.vmap(lambda nk, i: nk[i])(node_keys_BSHP, flat)              # [B, T, F, H, P]
    f_scores = jnp.einsum("btfhp,bthp->bthf", f_keys, rq_BTHP) * scale
    cum = jnp.pad(jnp.cumsum(leaf_mass_BTHN, axis=-1), ((0, 0),) * 3 + ((1, 0),))
    span = lambda x: jnp.broadcast_to(x[:, :, None, :], (b, t, h, x.shape[-1]))
    f_mass = (jnp.take_along_axis(cum, span((f_index + 1) << f_level), axis=-1)
              - jnp.take_along_axis(cum, span(f_index << f_level), axis=-1))
  total, count = 0.0, 0.0
  level = 0
  while (num_leaves >> level) >= 2:
    n_l = num_leaves >> level
    off = level_offset(num_leaves, level)
    keys = node_keys_BSHP[:, off:off + n_l]
    scores = jnp.einsum("bnhp,bthp->bthn", keys, rq_BTHP) * scale
    visible_BTN = jnp.arange(n_l)[None, None, :] < (c[..., None] >> level)
    if first_leaf is not None:
      visible_BTN = visible_BTN & (((jnp.arange(n_l) + 1) << level)[None, None, :]
                                   > first_leaf[..., None])
    visible = jnp.broadcast_to(visible_BTN[:, :, None, :], scores.shape)
    same_level = jnp.sum(visible_BTN, axis=-1)                                # [B, T]
    target = leaf_mass_BTHN.reshape(b, t, h, n_l, 1 << level).sum(-1)
    active = same_level >= 2
    if cross_level:
      tail = jnp.broadcast_to((f_valid & (f_level < level))[:, :, None, :], f_scores.shape)
      scores = jnp.concatenate([scores, f_scores], axis=-1)
      visible = jnp.concatenate([visible, tail], axis=-1)
      target = jnp.concatenate([target, f_mass], axis=-1)
      active = (same_level >= 1) & (same_level + jnp.sum(tail[:, :, 0], axis=-1) >= 2)
    target = jnp.where(visible, target, 0.0)
    target = target / jnp.maximum(target.sum(-1, keepdims=True), 1e-9)
    logp = jax.nn.log_softmax(jnp.where(visible, scores, NEG_INF), axis=-1)
    ce = -jnp.sum(jnp.where(visible, target * logp, 0.0), axis=-1)  # [B, T, H]
    active = jnp.broadcast_to(active[:, :, None], ce.shape).astype(jnp.float32)
    if weight_BT is not None:
      active = active * weight_BT.astype(jnp.float32)[:, :, None]
    total = total + jnp.sum(active * ce)
    count = count + jnp.sum(active)
    level += 1
  return total / jnp.maximum(count, 1.0)

"""The sealed dyadic summary tree: leaf summaries, parent merge, batched build and incremental insert.

Pure functions over arrays (shape key in `memkernel.shapes`). The tree is regular: level 0 holds one
summary per sealed leaf, node i of level l is `merge_nodes(node 2i, node 2i + 1)` of level l - 1, and a
node exists only once all its leaves are sealed. Every node carries a routing key, a value and a
salience (the log of its total pooling mass). The batched build and the incremental insert apply
the same merge to the same operands; with the mean merge they agree bitwise, with the pooled merge
to float32 rounding (XLA may vectorise the sigmoid differently for the two shapes). Nothing here
is learned except through its inputs, so the batched build of the parallel form and the incremental
insert of the recurrent forms produce the same store (the same float operations on the same
operands). Optionally every node also keeps its M most salient tokens' routing keys
(`leaf_reps`, `merge_reps`, `build_reps`), which the router can score instead of the pooled key;
`build_levels` and `insert_levels` build and insert any such fields with their merge rule.

Document streams: given the document of every leaf, a node summarises only the leaves of the
document of its last leaf. The merge rule says it: when the left child's last leaf belongs to
another document than the right child's, the parent is the right child alone. A node that straddles
a document start therefore holds only the new document's leaves, and the router hides the nodes
that end before it (`routing.route_beam(first_leaf=...)`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from memkernel.ops import NEG_INF


def level_offset(num_leaves: int, level: int) -> int:
  """Flat index of the first node of `level` in the level-major store."""
  return 2 * num_leaves - 2 * num_leaves // (1 << level)


def summarize_leaf(rk_LHP: jax.Array, v_LHE: jax.Array, pool_LH: jax.Array):
  """LeafSummarizer: attention-pools a leaf's tokens into one routing key and one value per head.

  Works on any leading batch axes: rk [..., L, H, P], v [..., L, H, E], pool [..., L, H].
  Returns:
    key [..., H, P], value [..., H, E] and salience [..., H] (the logsumexp of the pooling
    logits: the leaf's total pooling mass, which `merge_nodes` uses to weigh it against its
    sibling).
  """
  pool = pool_LH.astype(jnp.float32)
  alpha = jax.nn.softmax(pool, axis=-2)[..., None]
  key = jnp.sum(alpha * rk_LHP, axis=-3)
  val = jnp.sum(alpha * v_LHE, axis=-3)
  return key, val, jax.nn.logsumexp(pool, axis=-2)


def merge_nodes(left, right, pooled: bool):
  """TreeMergeCell: the parent of two complete siblings. Fixed rule, nothing learned.

  Args:
    left, right: (key [..., H, P], value [..., H, E], salience [..., H]) of the two children.
    pooled: True: weigh each child by its pooling mass, w = sigmoid(s_left - s_right), so a node's
      key and value are exactly the attention pooling of every token under it (with the tokens'
      own pooling logits) and a salient leaf is not diluted by its filler neighbours as the node
      grows. False: the plain mean (w = 1/2).
  Returns:
    (key, value, salience) of the parent; salience = logaddexp(s_left, s_right).
  A parent's routing score q . key is the same convex combination of its children's scores, so
  nodes of every level are compared on one scale.
  """
  (k_l, v_l, s_l), (k_r, v_r, s_r) = left, right
  w = jax.nn.sigmoid(s_l - s_r) if pooled else jnp.full_like(s_l, 0.5)
  w = w[..., None]
  return w * k_l + (1 - w) * k_r, w * v_l + (1 - w) * v_r, jnp.logaddexp(s_l, s_r)


def merge_in_document(left, right, same_doc, merge):
  """`merge(left, right)`, except that the parent is `right` alone where `same_doc` is False.

  Args:
    left, right: the children (tuples of arrays, as `merge` takes them), with a leading batch
      axis B.
    same_doc: bool [B, ...] broadcastable to the children's leading axes (without H): whether the
      left child's last leaf belongs to the document of the right child's last leaf.
    merge: the merge rule, e.g. `functools.partial(merge_nodes, pooled=True)` or `merge_reps`.
  """
  merged = merge(left, right)
  def pick(m, r):
    cond = same_doc.reshape(same_doc.shape + (1,) * (m.ndim - same_doc.ndim))
    return jnp.where(cond, m, r)
  return tuple(pick(m, r) for m, r in zip(merged, right))


def leaf_reps(rk_LHP: jax.Array, pool_LH: jax.Array, num_reps: int):
  """Representative keys of a leaf: the routing keys of its M most salient tokens.

  A pooled key of 2^l leaves holds the one that matters with weight ~2^-l (the diluted summary of
  `docs/results/mqar_scattered/`); a node that keeps the keys of its M most salient tokens
  (largest pooling logit) instead, scored by the best of them (`routing.route_beam(node_reps=
  ...)`), is not diluted as it grows: a parent keeps the M most salient of its children's 2M
  (`merge_reps`), so a node's representatives are the M most salient tokens under it.

  Works on any leading batch axes: rk [..., L, H, P], pool [..., L, H].
  Returns:
    rep_key [..., H, M, P] and rep_sal [..., H, M] (the tokens' pooling logits), most salient
    first, the earlier token first among equals; with M > L the slots past L hold key 0 and
    salience NEG_INF (never the best).
  """
  pool = jnp.swapaxes(pool_LH.astype(jnp.float32), -1, -2)          # [..., H, L]
  rk = jnp.swapaxes(rk_LHP, -2, -3)                                 # [..., H, L, P]
  width = min(num_reps, pool.shape[-1])
  sal, idx = jax.lax.top_k(pool, width)
  key = jnp.take_along_axis(rk, idx[..., None], axis=-2)
  missing = num_reps - width
  if missing:
    key = jnp.concatenate([key, jnp.zeros(key.shape[:-2] + (missing, key.shape[-1]),
                                          key.dtype)], axis=-2)
    sal = jnp.concatenate([sal, jnp.full(sal.shape[:-1] + (missing,), NEG_INF, sal.dtype)],
                          axis=-1)
  return key, sal


def merge_reps(left, right):
  """The parent's representatives: the M most salient of its children's 2M (left first among
  equals). Fixed rule, nothing learned.

  Args:
    left, right: (rep_key [..., H, M, P], rep_sal [..., H, M]) of the two children.
  Returns:
    (rep_key, rep_sal) of the parent.
  """
  key = jnp.concatenate([left[0], right[0]], axis=-2)
  sal = jnp.concatenate([left[1], right[1]], axis=-1)
  sal, idx = jax.lax.top_k(sal, left[1].shape[-1])
  return jnp.take_along_axis(key, idx[..., None], axis=-2), sal


def merge_nodes_and_reps(left, right, pooled: bool):
  """`merge_nodes` on the first three fields (key, value, salience) and `merge_reps` on the last
  two (representatives' keys and saliences): one merge, so one carry chain inserts them all."""
  return merge_nodes(left[:3], right[:3], pooled) + merge_reps(left[3:], right[3:])


def node_spans(num_leaves: int, num_sealed: int) -> np.ndarray:
  """Reference span metadata: int32 [S, 2] of [start, end) leaves, (-1, -1) for absent nodes."""
  spans = []
  level = 0
  while (1 << level) <= num_leaves:
    size = 1 << level
    for i in range(num_leaves >> level):
      spans.append((i * size, (i + 1) * size) if (i + 1) * size <= num_sealed else (-1, -1))
    level += 1
  return np.asarray(spans, np.int32)


def build_levels(leaf_nodes, num_sealed: int, merge, leaf_doc_BN: jax.Array | None = None):
  """Builds a level-major store of any node fields in one batched pass.

  Args:
    leaf_nodes: tuple of arrays [B, N, ...], one field each, for all N leaf slots (slots >=
      num_sealed are ignored).
    num_sealed: static number of sealed leaves.
    merge: the parent of two children, `merge(left, right)` on tuples of fields.
    leaf_doc_BN: optional int32 [B, N], the document of every leaf: a node then summarises only
      the leaves of its last leaf's document (`merge_in_document`). None: one document.
  Returns:
    the fields' stores [B, S, ...], zeros at absent nodes.
  """
  num_leaves = leaf_nodes[0].shape[1]
  stores = tuple([] for _ in leaf_nodes)
  level_nodes = tuple(leaf_nodes)
  level = 0
  while True:
    present = np.arange(num_leaves >> level) < (num_sealed >> level)
    for store, x in zip(stores, level_nodes):
      store.append(jnp.where(present.reshape((1, -1) + (1,) * (x.ndim - 2)), x,
                             jnp.zeros((), x.dtype)))
    if level_nodes[0].shape[1] == 1:
      break
    left, right = (tuple(x[:, 0::2] for x in level_nodes),
                   tuple(x[:, 1::2] for x in level_nodes))
    if leaf_doc_BN is None:
      level_nodes = merge(left, right)
    else:  # Docs of each node's last leaf.
      level_nodes = merge_in_document(left, right, leaf_doc_BN[:, 0::2] == leaf_doc_BN[:, 1::2],
                                      merge)
      leaf_doc_BN = leaf_doc_BN[:, 1::2]
    level += 1
  return tuple(jnp.concatenate(store, axis=1) for store in stores)


def presence_words(vocab_size: int) -> int:
  """The 32-bit words a presence set over `vocab_size` tokens takes."""
  return -(-vocab_size // 32)


def token_bits(tokens: jax.Array, num_words: int) -> jax.Array:
  """Each token as a one-bit set: uint32 [..., W], bit v % 32 of word v // 32 (-1: none)."""
  tokens = tokens.astype(jnp.int32)
  bit = jnp.left_shift(jnp.uint32(1), (tokens & 31).astype(jnp.uint32))
  word = jnp.arange(num_words, dtype=jnp.int32)
  hit = (tokens[..., None] >= 0) & ((tokens[..., None] >> 5) == word)
  return jnp.where(hit, bit[..., None], jnp.uint32(0))


def union(bits: jax.Array, axis: int) -> jax.Array:
  """The union (bitwise or) of packed sets along `axis`."""
  return jax.lax.reduce(bits, jnp.uint32(0), jax.lax.bitwise_or, (axis % bits.ndim,))


def merge_presence(left, right):
  """The parent of two presence nodes: the union of their sets."""
  return (jnp.bitwise_or(left[0], right[0]),)


def holds(presence_BSW: jax.Array, flat: jax.Array, token: jax.Array) -> jax.Array:
  """Whether node `flat` [B, ...] holds `token` (broadcast to `flat`; -1: never): float32."""
  b, _, w = presence_BSW.shape
  token = jnp.broadcast_to(token, flat.shape)
  idx = flat * w + (jnp.maximum(token, 0) >> 5)
  words = jnp.take_along_axis(presence_BSW.reshape(b, -1), idx.reshape(b, -1), axis=1)
  bit = (words.reshape(idx.shape) >> (jnp.maximum(token, 0) & 31).astype(jnp.uint32)) & 1
  return jnp.where(token >= 0, bit.astype(jnp.float32), 0.0)


def build_presence(tokens_BT: jax.Array, num_leaves: int, leaf_size: int, vocab_size: int,
                   leaf_doc_BN: jax.Array | None = None) -> jax.Array:
  """Which tokens every node's tokens *follow*, as packed sets: uint32 [B, S, W]
  (`presence_words`), bit v set where some token of the node comes right after token v (the
  token before position 0 is none; `holds` reads a bit). A routing hint "favour what follows
  token v" (`routing.route_beam(hint=...)`) reads it. The recurrent forms keep the same store
  in their memory (`state.TokenPresence`). Sealed leaves only, by `build_levels`' rules."""
  b, t = tokens_BT.shape
  num_sealed = t // leaf_size
  before = jnp.concatenate([jnp.full((b, 1), -1, jnp.int32), tokens_BT[:, :-1].astype(jnp.int32)],
                           axis=1)[:, :num_sealed * leaf_size]
  bits = union(token_bits(before.reshape(b, num_sealed, leaf_size), presence_words(vocab_size)),
               axis=2)                                                   # [B, sealed, W]
  leaves = jnp.pad(bits, ((0, 0), (0, num_leaves - num_sealed), (0, 0)))
  return build_levels((leaves,), num_sealed, merge_presence, leaf_doc_BN)[0]


def build_tree(leaf_keys_BNHP: jax.Array, leaf_vals_BNHE: jax.Array, leaf_sal_BNH: jax.Array,
               num_sealed: int, pooled: bool = True, leaf_doc_BN: jax.Array | None = None):
  """Builds the whole level-major store in one batched pass (the parallel form).

  Args:
    leaf_keys_BNHP: leaf routing keys for all N leaf slots (slots >= num_sealed are ignored).
    leaf_vals_BNHE: leaf values for all N leaf slots.
    leaf_sal_BNH: leaf saliences for all N leaf slots.
    num_sealed: static number of sealed leaves.
    pooled: the merge rule (`merge_nodes`).
    leaf_doc_BN: optional int32 [B, N], the document of every leaf (`build_levels`).
  Returns:
    node_keys [B, S, H, P], node_vals [B, S, H, E], node_sal [B, S, H], node_span [S, 2].
  """
  stores = build_levels((leaf_keys_BNHP, leaf_vals_BNHE, leaf_sal_BNH), num_sealed,
                        functools.partial(merge_nodes, pooled=pooled), leaf_doc_BN)
  span = jnp.asarray(node_spans(leaf_keys_BNHP.shape[1], num_sealed))
  return stores + (span,)


def build_reps(leaf_rep_key_BNHMP: jax.Array, leaf_rep_sal_BNHM: jax.Array, num_sealed: int,
               leaf_doc_BN: jax.Array | None = None):
  """The representatives of every node (`leaf_reps`, `merge_reps`) in one batched pass.

  Returns:
    rep_keys [B, S, H, M, P], rep_sal [B, S, H, M] (zeros at absent nodes).
  """
  return build_levels((leaf_rep_key_BNHMP, leaf_rep_sal_BNHM), num_sealed, merge_reps,
                      leaf_doc_BN)


def insert_levels(stores, node_span_S2: jax.Array, leaf_nodes, leaf_index: jax.Array,
                  do_insert: jax.Array, merge, leaf_doc_BN: jax.Array | None = None):
  """Seals one leaf into level-major stores of any node fields: writes level 0 and every
  ancestor it completes (a carry chain).

  Touches O(log N) nodes. `leaf_index` and `do_insert` may be traced; when `do_insert` is False the
  stores come back unchanged. `leaf_doc_BN` (int32 [B, N], the document of every sealed leaf,
  this one included) applies `build_levels`' document rule.

  Args:
    stores: tuple of stores [B, S, ...], one per field.
    node_span_S2: the spans of the existing nodes.
    leaf_nodes: the new leaf's fields, each [B, ...].
    merge: as in `build_levels`.
  Returns:
    (stores, node_span_S2).
  """
  num_nodes = stores[0].shape[1]
  num_leaves = (num_nodes + 1) // 2
  leaf_index = jnp.asarray(leaf_index, jnp.int32)
  stores = list(stores)

  def read(store, flat):
    return jax.lax.dynamic_index_in_dim(store, flat, axis=1, keepdims=False)

  def write(store, flat, value):
    return jax.lax.dynamic_update_index_in_dim(store, value.astype(store.dtype), flat, axis=1)

  def write_span(span, flat, level, index):
    value = jnp.stack([index << level, (index + 1) << level]).astype(jnp.int32)
    return jax.lax.dynamic_update_index_in_dim(span, value, flat, axis=0)

  safe_leaf = jnp.minimum(leaf_index, num_leaves - 1)

  def seal(carry):
    stores, span = carry
    stores = [write(st, safe_leaf, x) for st, x in zip(stores, leaf_nodes)]
    span = write_span(span, safe_leaf, 0, safe_leaf)

    # The carry chain: level `level` completes while the sealed count is a multiple of 2^level.
    # A while loop over only those levels keeps the stores in place; an unrolled loop over every
    # level measured as a copy of each store per level, half of a decode step at 32k tokens.
    def completes(c):
      level = c[0]
      return ((1 << level) <= num_leaves) & (((safe_leaf + 1) & ((1 << level) - 1)) == 0)

    def merge_up(c):
      level, stores, span = c
      index = safe_leaf >> level
      child = level_offset(num_leaves, level - 1) + 2 * index
      parent = level_offset(num_leaves, level) + index
      left = tuple(read(st, child) for st in stores)
      right = tuple(read(st, child + 1) for st in stores)
      if leaf_doc_BN is None:
        merged = merge(left, right)
      else:  # The left child's last leaf against this (the right child's last) leaf.
        left_last = ((2 * index + 1) << (level - 1)) - 1
        left_doc = jax.lax.dynamic_index_in_dim(leaf_doc_BN, left_last, axis=1, keepdims=False)
        right_doc = jax.lax.dynamic_index_in_dim(leaf_doc_BN, safe_leaf, axis=1, keepdims=False)
        merged = merge_in_document(left, right, left_doc == right_doc, merge)
      stores = [write(st, parent, x) for st, x in zip(stores, merged)]
      return level + 1, stores, write_span(span, parent, level, index)

    _, stores, span = jax.lax.while_loop(completes, merge_up, (jnp.int32(1), stores, span))
    return stores, span

  stores, node_span_S2 = jax.lax.cond(do_insert & (leaf_index < num_leaves), seal,
                                      lambda carry: carry, (stores, node_span_S2))
  return tuple(stores), node_span_S2


def insert_leaf(node_keys_BSHP: jax.Array, node_vals_BSHE: jax.Array, node_sal_BSH: jax.Array,
                node_span_S2: jax.Array, leaf_key_BHP: jax.Array, leaf_val_BHE: jax.Array,
                leaf_sal_BH: jax.Array, leaf_index: jax.Array, do_insert: jax.Array,
                pooled: bool = True, leaf_doc_BN: jax.Array | None = None):
  """Seals one leaf summary into the store (`insert_levels` with `merge_nodes`).

  Returns:
    node_keys, node_vals, node_sal, node_span.
  """
  stores, span = insert_levels((node_keys_BSHP, node_vals_BSHE, node_sal_BSH), node_span_S2,
                               (leaf_key_BHP, leaf_val_BHE, leaf_sal_BH), leaf_index, do_insert,
                               functools.partial(merge_nodes, pooled=pooled), leaf_doc_BN)
  return (*stores, span)


def tree_diagnostics(node_keys_BSHP: jax.Array, node_span_S2: jax.Array, num_leaves: int,
                     dead_norm: float = 1e-6) -> dict[str, jax.Array]:
  """Nodes per level, depth reached, and dead nodes (present but with a ~zero routing key)."""
  present = node_span_S2[:, 0] >= 0
  norms = jnp.sqrt(jnp.sum(node_keys_BSHP.astype(jnp.float32) ** 2, axis=-1))  # [B, S, H]
  dead = present & jnp.all(norms < dead_norm, axis=(0, 2))
  per_level, dead_per_level = [], []
  level = 0
  while (1 << level) <= num_leaves:
    lo, hi = level_offset(num_leaves, level), level_offset(num_leaves, level) + (num_leaves >> level)
    per_level.append(jnp.sum(present[lo:hi]))
    dead_per_level.append(jnp.sum(dead[lo:hi]))
    level += 1
  per_level = jnp.stack(per_level)
  depth = jnp.max(jnp.where(per_level > 0, jnp.arange(per_level.shape[0]) + 1, 0))
  return {"nodes_per_level": per_level, "depth_reached": depth,
          "dead_nodes_per_level": jnp.stack(dead_per_level)}

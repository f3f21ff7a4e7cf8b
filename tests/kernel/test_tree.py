"""The dyadic summary tree: incremental insert == batched build, spans, levels, causality."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from memkernel.kernel import tree as tree_lib
from memkernel.kernel.state import level_offset

B, N, H, P, E, L = 2, 16, 2, 3, 4, 16


def _leaves(seed=0):
  """Leaf keys, values and saliences."""
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
  return (jax.random.normal(k1, (B, N, H, P)), jax.random.normal(k2, (B, N, H, E)),
          2.0 * jax.random.normal(k3, (B, N, H)))


_insert = jax.jit(tree_lib.insert_leaf, static_argnames="pooled")


class TreeTest(parameterized.TestCase):

  @parameterized.parameters(True, False)
  def test_incremental_equals_batched_for_every_count(self, pooled):
    keys, vals, sal = _leaves()
    s = 2 * N - 1
    store = (jnp.zeros((B, s, H, P)), jnp.zeros((B, s, H, E)), jnp.zeros((B, s, H)))
    span = jnp.full((s, 2), -1, jnp.int32)
    for n in range(N + 1):
      *ref, ref_span = tree_lib.build_tree(keys, vals, sal, n, pooled=pooled)
      # Both forms apply the same merge to the same operands: bitwise for the mean; the pooled
      # merge's sigmoid may be vectorised differently for the two shapes (an ulp).
      if pooled:
        chex.assert_trees_all_close(store, tuple(ref), rtol=1e-6, atol=1e-6)
      else:
        chex.assert_trees_all_equal(store, tuple(ref))
      np.testing.assert_array_equal(span, ref_span)
      np.testing.assert_array_equal(span, tree_lib.node_spans(N, n))
      if n < N:
        *store, span = _insert(*store, span, keys[:, n], vals[:, n], sal[:, n], jnp.int32(n),
                               jnp.bool_(True), pooled=pooled)
        store = tuple(store)

  @parameterized.parameters(0, 1, 5, 8, 11, 16)
  def test_spans_levels_and_parents_over_sealed_children(self, n):
    spans = tree_lib.node_spans(N, n)
    present = spans[:, 0] >= 0
    # Every present node covers only sealed leaves, and is exactly its dyadic span.
    assert np.all(spans[present, 1] <= n)
    for level in range(5):
      off = level_offset(N, level)
      for i in range(N >> level):
        start, end = spans[off + i]
        if (i + 1) << level <= n:
          assert (start, end) == (i << level, (i + 1) << level)
        else:
          assert (start, end) == (-1, -1)
    node_k, _, _, span = tree_lib.build_tree(*_leaves(), n)
    diag = tree_lib.tree_diagnostics(node_k, span, N)
    np.testing.assert_array_equal(diag["nodes_per_level"], [n >> l for l in range(5)])
    assert int(diag["depth_reached"]) == (n.bit_length() if n else 0)
    assert int(diag["dead_nodes_per_level"].sum()) == 0
    # Absent nodes hold nothing.
    assert np.all(np.asarray(node_k)[:, ~present] == 0)

  def test_mean_merge_parent_is_mean_of_children(self):
    keys, vals, sal = _leaves(1)
    node_k, _, _, _ = tree_lib.build_tree(keys, vals, sal, N, pooled=False)
    off1 = level_offset(N, 1)
    np.testing.assert_allclose(node_k[:, off1 + 3], 0.5 * (keys[:, 6] + keys[:, 7]), rtol=1e-6)
    np.testing.assert_allclose(node_k[:, -1], keys.mean(axis=1), rtol=1e-5, atol=1e-6)

  def test_pooled_merge_is_attention_pooling_over_the_span(self):
    """A pooled node's key/value are the softmax(pool)-weighted mean of all tokens under it."""
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(5), 3)
    rk = jax.random.normal(k1, (B, N, L, H, P))
    v = jax.random.normal(k2, (B, N, L, H, E))
    pool = 3.0 * jax.random.normal(k3, (B, N, L, H))
    node_k, node_v, node_s, _ = tree_lib.build_tree(*tree_lib.summarize_leaf(rk, v, pool), N)
    for level, index in ((1, 3), (2, 1), (4, 0)):
      lo, hi = index << level, (index + 1) << level
      tok_pool = pool[:, lo:hi].reshape(B, -1, H)
      alpha = jax.nn.softmax(tok_pool, axis=1)
      flat = level_offset(N, level) + index
      np.testing.assert_allclose(
          node_k[:, flat], jnp.einsum("bth,bthp->bhp", alpha, rk[:, lo:hi].reshape(B, -1, H, P)),
          rtol=1e-4, atol=1e-5)
      np.testing.assert_allclose(
          node_v[:, flat], jnp.einsum("bth,bthe->bhe", alpha, v[:, lo:hi].reshape(B, -1, H, E)),
          rtol=1e-4, atol=1e-5)
      np.testing.assert_allclose(node_s[:, flat], jax.nn.logsumexp(tok_pool, axis=1), rtol=1e-5)

  def test_insert_disabled_is_identity_and_overflow_is_ignored(self):
    keys, vals, sal = _leaves(2)
    *store, span = tree_lib.build_tree(keys, vals, sal, 5)
    out = _insert(*store, span, keys[:, 5] + 1, vals[:, 5], sal[:, 5], jnp.int32(5),
                  jnp.bool_(False))
    chex.assert_trees_all_equal(out, (*store, span))
    full = tree_lib.build_tree(keys, vals, sal, N)
    out = _insert(*full, keys[:, 0], vals[:, 0], sal[:, 0], jnp.int32(N), jnp.bool_(True))
    chex.assert_trees_all_equal(out, full)

  def test_future_leaves_do_not_change_existing_nodes(self):
    keys, vals, sal = _leaves(3)
    n = 6
    a = tree_lib.build_tree(keys, vals, sal, n)
    b = tree_lib.build_tree(keys.at[:, n:].set(100.0), vals, sal.at[:, n:].set(50.0), n)
    chex.assert_trees_all_equal(a, b)

  def test_leaf_summary_is_deterministic_attention_pool(self):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(4), 3)
    rk = jax.random.normal(k1, (L, H, P))
    v = jax.random.normal(k2, (L, H, E))
    pool = jax.random.normal(k3, (L, H))
    key, val, sal = tree_lib.summarize_leaf(rk, v, pool)
    alpha = np.exp(pool) / np.exp(pool).sum(0)
    np.testing.assert_allclose(key, np.einsum("lh,lhp->hp", alpha, rk), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(val, np.einsum("lh,lhe->he", alpha, v), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sal, np.log(np.exp(pool).sum(0)), rtol=1e-5)
    chex.assert_trees_all_equal((key, val, sal), tree_lib.summarize_leaf(rk, v, pool))


class RepresentativesTest(parameterized.TestCase):
  """Every node keeps its M most salient tokens' routing keys (`leaf_reps`, `merge_reps`)."""

  def _tokens(self, seed=3, leaf=4):
    """Token routing keys [B, N, l, H, P] and distinct pooling logits [B, N, l, H]."""
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    rk = jax.random.normal(k1, (B, N, leaf, H, P))
    pool = jax.random.permutation(k2, B * N * leaf * H).reshape(B, N, leaf, H) / 7.0
    return rk, pool

  @parameterized.parameters(1, 3, 6)   # fewer, and more, representatives than a leaf's 4 tokens
  def test_reps_are_the_most_salient_tokens_under_each_node(self, m):
    rk, pool = self._tokens()
    n = 11  # sealed leaves: absent nodes too
    reps_k, reps_s = tree_lib.build_reps(*tree_lib.leaf_reps(rk, pool, m), n)
    chex.assert_shape(reps_k, (B, 2 * N - 1, H, m, P))
    spans = tree_lib.node_spans(N, n)
    for node, (start, end) in enumerate(spans):
      if start < 0:
        np.testing.assert_array_equal(reps_k[:, node], 0.0)
        continue
      for b in range(B):
        for h in range(H):
          sal = np.asarray(pool[b, start:end, :, h]).reshape(-1)
          keys = np.asarray(rk[b, start:end, :, h]).reshape(-1, P)
          order = np.argsort(-sal, kind="stable")[:m]
          filled = min(m, sal.size)
          np.testing.assert_array_equal(reps_s[b, node, h, :filled], sal[order])
          np.testing.assert_array_equal(reps_k[b, node, h, :filled], keys[order])
          # A leaf has 4 tokens: slots past them are empty (never the best).
          assert np.all(np.asarray(reps_s[b, node, h, filled:]) < -1e29)

  def test_insert_equals_build_with_documents(self):
    rk, pool = self._tokens(4)
    docs = jnp.asarray([[0] * 5 + [1] * 6 + [2] * 5, [0] * 16], jnp.int32)
    leaf_k, leaf_s = tree_lib.leaf_reps(rk, pool, 3)
    s = 2 * N - 1
    stores = (jnp.zeros((B, s, H, 3, P)), jnp.zeros((B, s, H, 3)))
    span = jnp.full((s, 2), -1, jnp.int32)
    insert = jax.jit(lambda st, sp, leaf, i: tree_lib.insert_levels(
        st, sp, leaf, i, jnp.bool_(True), tree_lib.merge_reps, docs))
    for i in range(N):
      stores, span = insert(stores, span, (leaf_k[:, i], leaf_s[:, i]), jnp.int32(i))
      built = tree_lib.build_reps(leaf_k, leaf_s, i + 1, docs)
      chex.assert_trees_all_equal(stores, built)
    # The root of row 0 holds only its last document's tokens (leaves 11-15).
    root = level_offset(N, 4)
    last_doc = np.asarray(pool[0, 11:, :, 0]).reshape(-1)
    np.testing.assert_array_equal(built[1][0, root, 0], np.sort(last_doc)[::-1][:3])

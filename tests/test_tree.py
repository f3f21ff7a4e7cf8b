"""The dyadic summary tree: incremental insert == batched build, spans, levels, causality."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from memkernel import tree as tree_lib
from memkernel.state import level_offset

B, N, H, P, E, L = 2, 16, 2, 3, 4, 16


def _leaves(seed=0):
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  return (jax.random.normal(k1, (B, N, H, P)), jax.random.normal(k2, (B, N, H, E)))


_insert = jax.jit(tree_lib.insert_leaf)


class TreeTest(parameterized.TestCase):

  def test_incremental_equals_batched_for_every_count(self):
    keys, vals = _leaves()
    s = 2 * N - 1
    store_k, store_v = jnp.zeros((B, s, H, P)), jnp.zeros((B, s, H, E))
    span = jnp.full((s, 2), -1, jnp.int32)
    for n in range(N + 1):
      ref_k, ref_v, ref_span = tree_lib.build_tree(keys, vals, n)
      # Bitwise: both forms apply the same merge to the same operands.
      np.testing.assert_array_equal(store_k, ref_k)
      np.testing.assert_array_equal(store_v, ref_v)
      np.testing.assert_array_equal(span, ref_span)
      np.testing.assert_array_equal(span, tree_lib.node_spans(N, n))
      if n < N:
        store_k, store_v, span = _insert(store_k, store_v, span, keys[:, n], vals[:, n],
                                         jnp.int32(n), jnp.bool_(True))

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
    keys, vals = _leaves()
    node_k, _, span = tree_lib.build_tree(keys, vals, n)
    diag = tree_lib.tree_diagnostics(node_k, span, N)
    np.testing.assert_array_equal(diag["nodes_per_level"], [n >> l for l in range(5)])
    assert int(diag["depth_reached"]) == (n.bit_length() if n else 0)
    assert int(diag["dead_nodes_per_level"].sum()) == 0
    # Absent nodes hold nothing.
    assert np.all(np.asarray(node_k)[:, ~present] == 0)

  def test_parent_is_mean_of_children(self):
    keys, vals = _leaves(1)
    node_k, _, _ = tree_lib.build_tree(keys, vals, N)
    off1 = level_offset(N, 1)
    np.testing.assert_allclose(node_k[:, off1 + 3], 0.5 * (keys[:, 6] + keys[:, 7]), rtol=1e-6)
    root = node_k[:, -1]
    np.testing.assert_allclose(root, keys.mean(axis=1), rtol=1e-5, atol=1e-6)

  def test_insert_disabled_is_identity_and_overflow_is_ignored(self):
    keys, vals = _leaves(2)
    node_k, node_v, span = tree_lib.build_tree(keys, vals, 5)
    out = _insert(node_k, node_v, span, keys[:, 5] + 1, vals[:, 5], jnp.int32(5), jnp.bool_(False))
    chex.assert_trees_all_equal(out, (node_k, node_v, span))
    full = tree_lib.build_tree(keys, vals, N)
    out = _insert(*full, keys[:, 0], vals[:, 0], jnp.int32(N), jnp.bool_(True))
    chex.assert_trees_all_equal(out, full)

  def test_future_leaves_do_not_change_existing_nodes(self):
    keys, vals = _leaves(3)
    n = 6
    a = tree_lib.build_tree(keys, vals, n)
    keys2 = keys.at[:, n:].set(100.0)
    b = tree_lib.build_tree(keys2, vals, n)
    chex.assert_trees_all_equal(a, b)

  def test_leaf_summary_is_deterministic_attention_pool(self):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(4), 3)
    rk = jax.random.normal(k1, (L, H, P))
    v = jax.random.normal(k2, (L, H, E))
    pool = jax.random.normal(k3, (L, H))
    key, val = tree_lib.summarize_leaf(rk, v, pool)
    alpha = np.exp(pool) / np.exp(pool).sum(0)
    np.testing.assert_allclose(key, np.einsum("lh,lhp->hp", alpha, rk), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(val, np.einsum("lh,lhe->he", alpha, v), rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_equal((key, val), tree_lib.summarize_leaf(rk, v, pool))

"""Beam routing, its teacher, and the exact read, against plain-numpy references."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from memkernel import metrics as metrics_lib
from memkernel.kernel import read as read_lib
from memkernel.kernel import routing
from memkernel.kernel import tree as tree_lib
from memkernel.kernel.state import level_offset

B, N, H, P, E, L = 2, 16, 3, 5, 4, 16


def _tree(seed=0, n=N):
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  keys = jax.random.normal(k1, (B, N, H, P))
  vals = jax.random.normal(k2, (B, N, H, E))
  node_k, node_v, _, span = tree_lib.build_tree(keys, vals, jnp.zeros((B, N, H)), n)
  return node_k, node_v, span


def _rerank_inputs(t, seed=9):
  """Routing queries, read queries and a token key cache for re-rank tests: (rq, q, cache_k)."""
  kq, kk, kr = jax.random.split(jax.random.PRNGKey(seed), 3)
  return (jax.random.normal(kr, (B, t, H, P)), jax.random.normal(kq, (B, t, H, E)),
          jax.random.normal(kk, (B, N, L, H, E)))


def _reference_route(rq, node_keys, c, k, leaf_score=None, read_k=None, node_score=None):
  """Numpy beam search for one (batch, query, head): returns (leaves, weights).

  With `leaf_score` (leaf index -> exact score), the last candidates are re-ranked by it and the
  best `read_k` (default k) of them are returned. `node_score` ((level, index) -> score)
  replaces q . node key / sqrt(P).
  """
  scale = len(rq) ** -0.5

  def score(level, i):
    if node_score is not None:
      return node_score(level, i)
    return float(node_keys[level_offset(N, level) + i] @ rq) * scale

  pruned = []   # leaves ranked k..2k-1 at some step (the runner-up pool)

  def prune(cands):
    ranked = sorted(cands, key=lambda li: -score(*li))  # stable: earlier slot wins ties
    pruned.extend(li for li in ranked[k:2 * k] if li[0] == 0)
    return ranked[:k]

  beam = prune([(l, (c >> (l + 1)) << 1) for l in range(N.bit_length() - 1, -1, -1)
                if (c >> l) & 1])
  while any(l > 0 for l, _ in beam):
    lefts = [(l, i) if l == 0 else (l - 1, 2 * i) for l, i in beam]
    rights = [(l - 1, 2 * i + 1) for l, i in beam if l > 0]
    beam = prune(lefts + rights)
  final_score = lambda i: score(0, i)
  if leaf_score is not None:
    final_score = leaf_score
    pool = sorted(set(pruned), key=lambda li: -score(*li))[:k]
    beam = sorted(beam + pool, key=lambda li: -leaf_score(li[1]))[:read_k or k]
  leaves = [i for _, i in beam]
  s = np.array([final_score(i) for i in leaves])
  w = np.exp(s - s.max()) / np.exp(s - s.max()).sum() if len(s) else s
  return leaves, w


def _reference_path(rq, node_keys, c, k):
  """Numpy beam search for one (batch, query, head) whose slots carry the flat nodes they took:
  the nodes of the first slot at the end (one per step until it reached a leaf)."""
  score = lambda level, i: float(node_keys[level_offset(N, level) + i] @ rq)
  prune = lambda cands: sorted(cands, key=lambda c: -score(c[0], c[1]))[:k]
  flat = lambda level, i: level_offset(N, level) + i
  beam = prune([(l, (c >> (l + 1)) << 1, [flat(l, (c >> (l + 1)) << 1)])
                for l in range(N.bit_length() - 1, -1, -1) if (c >> l) & 1])
  while any(l > 0 for l, _, _ in beam):
    lefts = [(l, i, h) if l == 0 else (l - 1, 2 * i, h + [flat(l - 1, 2 * i)])
             for l, i, h in beam]
    rights = [(l - 1, 2 * i + 1, h + [flat(l - 1, 2 * i + 1)]) for l, i, h in beam if l > 0]
    beam = prune(lefts + rights)
  return beam[0][2] if beam else []


_route = jax.jit(routing.route_beam, static_argnums=4)


class RouteTest(parameterized.TestCase):

  @parameterized.parameters(1, 2, 4)
  def test_matches_reference_beam_search(self, k):
    node_k, node_v, _ = _tree(0)
    t = 3 * L
    rq = jax.random.normal(jax.random.PRNGKey(1), (B, t, H, P))
    qleaf = jnp.arange(t) // L * 5 % (N + 1)  # spread query leaves over 0..N
    res = _route(rq, node_k, node_v, qleaf, k)
    chex.assert_shape(res.leaves, (B, t, H, k))
    for b in range(B):
      for q in range(0, t, 7):
        for h in range(H):
          leaves, w = _reference_route(np.asarray(rq[b, q, h]), np.asarray(node_k[b, :, h]),
                                       int(qleaf[q]), k)
          got = np.asarray(res.leaves[b, q, h])
          np.testing.assert_array_equal(got[:len(leaves)], leaves)
          assert np.all(got[len(leaves):] == -1)
          np.testing.assert_allclose(res.weights[b, q, h, :len(leaves)], w, rtol=1e-5)

  @parameterized.parameters(1, 2, 4)
  def test_path_is_the_top_slots_descent(self, k):
    """Against a numpy beam search whose slots carry the nodes they held: the path is the
    history of the slot that ends first, -1 after it reaches leaf depth."""
    node_k, node_v, _ = _tree(6)
    t = N * L
    rq = jax.random.normal(jax.random.PRNGKey(7), (B, t, H, P))
    qleaf = jnp.arange(t) // L
    res = _route(rq, node_k, node_v, qleaf, k)
    steps = routing.num_expansions(N) + 1
    chex.assert_shape(res.path, (B, t, H, steps))
    for b in range(B):
      for q in range(0, t, 5):
        for h in range(H):
          want = _reference_path(np.asarray(rq[b, q, h]), np.asarray(node_k[b, :, h]),
                                 int(qleaf[q]), k)
          np.testing.assert_array_equal(res.path[b, q, h], want + [-1] * (steps - len(want)),
                                        err_msg=f"row {b}, position {q}, head {h}")

  def test_sealed_only_beam_enforced_deterministic(self):
    node_k, node_v, _ = _tree(2)
    t = (N + 1) * L
    rq = jax.random.normal(jax.random.PRNGKey(3), (B, t, H, P))
    qleaf = jnp.minimum(jnp.arange(t) // L, N)
    res = _route(rq, node_k, node_v, qleaf, 2)
    leaves = np.asarray(res.leaves)
    c = np.asarray(qleaf)[None, :, None, None]
    valid = leaves >= 0
    assert np.all(leaves[valid] < np.broadcast_to(c, leaves.shape)[valid])  # sealed, < own leaf
    np.testing.assert_array_equal(valid.sum(-1), np.minimum(np.broadcast_to(c[..., 0], valid.shape[:-1]), 2))
    # Two different leaves per head once two are visible.
    both = valid.all(-1)
    assert np.all(leaves[both][:, 0] != leaves[both][:, 1])
    np.testing.assert_allclose(res.weights.sum(-1), np.minimum(c[..., 0], 1) + 0 * res.weights.sum(-1), rtol=1e-6)
    chex.assert_trees_all_equal(res, _route(rq, node_k, node_v, qleaf, 2))
    # Query-dependent and head-dependent.
    late = leaves[:, -L:]
    assert len(np.unique(late[..., 0])) > 3
    assert np.mean(late[..., 0, 0] != late[..., 1, 0]) > 0.2

  def test_runner_up_is_unselected_leaf_at_same_depth(self):
    node_k, node_v, _ = _tree(4)
    t = N * L
    rq = jax.random.normal(jax.random.PRNGKey(5), (B, t, H, P))
    qleaf = jnp.arange(t) // L
    res = _route(rq, node_k, node_v, qleaf, 2)
    alt, sel = np.asarray(res.runner_up), np.asarray(res.leaves)
    ok = alt >= 0
    assert ok.mean() > 0.5
    c = np.broadcast_to(np.asarray(qleaf)[None, :, None, None], alt.shape)
    assert np.all(alt[ok] < c[ok])
    assert not np.any((alt[..., :, None] == sel[..., None, :]) & ok[..., :, None])

  def test_rerank_chooses_among_last_candidates_by_tokens(self):
    """With a re-rank, the beam's final leaves and its best pruned ones are ordered by logsumexp of
    their tokens' read logits (against a numpy beam search); never an unsealed leaf."""
    node_k, node_v, _ = _tree(8)
    t, k = N * L, 2
    rq, q, cache_k = _rerank_inputs(t)
    qleaf = jnp.arange(t) // L
    res = jax.jit(routing.route_beam, static_argnums=4)(rq, node_k, node_v, qleaf, k,
                                                       (q, cache_k))
    every_leaf = jnp.broadcast_to(jnp.arange(N), (B, t, H, N))
    exact = np.asarray(routing.exact_leaf_scores(q, cache_k, every_leaf))
    for b in range(B):
      for tq in range(L, t, 5):
        for h in range(H):
          leaves, w = _reference_route(np.asarray(rq[b, tq, h]), np.asarray(node_k[b, :, h]),
                                       tq // L, k, leaf_score=lambda i: exact[b, tq, h, i])
          got = np.asarray(res.leaves[b, tq, h])
          np.testing.assert_array_equal(got[:len(leaves)], leaves)
          np.testing.assert_allclose(res.weights[b, tq, h, :len(leaves)], w, rtol=1e-5)
          assert np.all(got < tq // L)

  @parameterized.parameters(4, N)
  def test_wider_search_reads_the_best_of_its_leaves(self, search):
    """search_width S > K: the beam keeps S nodes per step and the re-rank reads the best K of the
    S leaves it ends with and the S it pruned (numpy beam search); with S >= the leaves there
    are, that is the best K visible leaves by their tokens (brute force)."""
    node_k, node_v, _ = _tree(8)
    t, k = N * L, 2
    rq, q, cache_k = _rerank_inputs(t)
    qleaf = jnp.arange(t) // L
    route = jax.jit(routing.route_beam, static_argnums=4, static_argnames="search_width")
    res = route(rq, node_k, node_v, qleaf, k, (q, cache_k), search_width=search)
    narrow = route(rq, node_k, node_v, qleaf, k, (q, cache_k))
    self.assertEqual(res.leaves.shape, narrow.leaves.shape)
    every_leaf = jnp.broadcast_to(jnp.arange(N), (B, t, H, N))
    exact = np.asarray(routing.exact_leaf_scores(q, cache_k, every_leaf))
    differs = 0
    for b in range(B):
      for tq in range(L, t, 5):
        c = tq // L
        for h in range(H):
          leaves, w = _reference_route(np.asarray(rq[b, tq, h]), np.asarray(node_k[b, :, h]),
                                       c, search, leaf_score=lambda i: exact[b, tq, h, i],
                                       read_k=k)
          got = np.asarray(res.leaves[b, tq, h])
          np.testing.assert_array_equal(got[:len(leaves)], leaves)
          np.testing.assert_allclose(res.weights[b, tq, h, :len(leaves)], w, rtol=1e-5)
          if search >= N:
            best = np.argsort(-exact[b, tq, h, :c], kind="stable")[:k]
            np.testing.assert_array_equal(got[:len(best)], best)
          differs += not np.array_equal(got, np.asarray(narrow.leaves[b, tq, h]))
    self.assertGreater(differs, 0)   # The wider search finds leaves the narrow one missed.
    with self.assertRaisesRegex(ValueError, "search_width 4 > beam_width 2 needs the leaf"):
      routing.route_beam(rq, node_k, node_v, qleaf, k, None, search_width=4)

  def test_representatives_score_a_node_by_its_best_token(self):
    """node_reps holding every token under every node: a node scores max over its tokens of
    q . rk / sqrt(P), whatever its size, and the beam searches by that (numpy beam search)."""
    leaf = 4
    k1, k2 = jax.random.split(jax.random.PRNGKey(12))
    rk = jax.random.normal(k1, (B, N, leaf, H, P))
    pool = jax.random.normal(k2, (B, N, leaf, H))
    reps = tree_lib.build_reps(*tree_lib.leaf_reps(rk, pool, N * leaf), N)
    node_k, node_v, _ = _tree(8)
    t, k = N * L, 2
    rq, q, cache_k = _rerank_inputs(t)
    qleaf = jnp.arange(t) // L
    route = jax.jit(routing.route_beam, static_argnums=4)
    res = route(rq, node_k, node_v, qleaf, k, (q, cache_k), node_reps=reps)
    pooled = route(rq, node_k, node_v, qleaf, k, (q, cache_k))
    every_leaf = jnp.broadcast_to(jnp.arange(N), (B, t, H, N))
    exact = np.asarray(routing.exact_leaf_scores(q, cache_k, every_leaf))
    token_scores = np.einsum("bnlhp,bthp->bthnl", rk, rq) * P ** -0.5
    differs = 0
    for b in range(B):
      for tq in range(L, t, 5):
        c = tq // L
        for h in range(H):
          best = token_scores[b, tq, h].max(-1)           # each leaf's best token
          node_score = lambda lv, i: best[i << lv:(i + 1) << lv].max()
          leaves, w = _reference_route(np.asarray(rq[b, tq, h]), None, c, k,
                                       leaf_score=lambda i: exact[b, tq, h, i],
                                       node_score=node_score)
          got = np.asarray(res.leaves[b, tq, h])
          np.testing.assert_array_equal(got[:len(leaves)], leaves)
          np.testing.assert_allclose(res.weights[b, tq, h, :len(leaves)], w, rtol=1e-5)
          differs += not np.array_equal(got, np.asarray(pooled.leaves[b, tq, h]))
    self.assertGreater(differs, 0)   # Not the pooled keys' choice.
    flat = jnp.broadcast_to(jnp.arange(2 * N - 1), (B, 1, H, 2 * N - 1))
    got = routing.rep_scores(rq[:, :1], *reps, flat)
    root = level_offset(N, 4)
    np.testing.assert_allclose(got[..., root], token_scores[:, :1].max((-1, -2)), rtol=1e-5)

  def test_summaries_only_reads_every_fenwick_node_and_no_leaf(self):
    node_k, node_v, _ = _tree(10)
    t = N * L
    rq = jax.random.normal(jax.random.PRNGKey(11), (B, t, H, P))
    qleaf = jnp.arange(t) // L
    res = jax.jit(routing.route_beam, static_argnums=(4, 6))(rq, node_k, node_v, qleaf, 2, None,
                                                            False)
    assert np.all(np.asarray(res.leaves) == -1) and np.all(np.asarray(res.weights) == 0)
    # One step: the path holds the best Fenwick node, nothing below it.
    path = np.asarray(res.path)
    np.testing.assert_array_equal(path[..., 1:], -1)
    np.testing.assert_array_equal(path[:, :L, :, 0], -1)
    for tq in (L, 5 * L + 3, 11 * L, t - 1):
      c = tq // L
      nodes = [(lv, (c >> (lv + 1)) << 1) for lv in range(4, -1, -1) if (c >> lv) & 1]
      flat = [level_offset(N, lv) + i for lv, i in nodes]
      for b, h in ((0, 0), (1, H - 1)):
        s = np.asarray(node_k[b, flat, h]) @ np.asarray(rq[b, tq, h]) / np.sqrt(P)
        w = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
        np.testing.assert_allclose(res.tree_value[b, tq, h], w @ np.asarray(node_v[b, flat, h]),
                                   rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(res.tree_value[:, :L], 0.0)  # nothing visible in leaf 0

  def test_teacher_mass_and_loss(self):
    t = 4 * L
    kq, kk, kr = jax.random.split(jax.random.PRNGKey(6), 3)
    q = jax.random.normal(kq, (B, t, H, E))
    k = jax.random.normal(kk, (B, t, H, E))
    mass = routing.leaf_attention_mass(q, k, L, N)
    chex.assert_shape(mass, (B, t, H, N))
    c = np.arange(t) // L
    np.testing.assert_allclose(mass.sum(-1), (c > 0)[None, :, None] * np.ones((B, t, H)), rtol=1e-5)
    for ci in range(4):
      assert np.all(np.asarray(mass)[:, c == ci, :, ci:] == 0)  # nothing from its own or later leaves
    node_k, _, _ = _tree(7, n=t // L)
    rq = jax.random.normal(kr, (B, t, H, P))
    loss_fn = lambda rq, nk: routing.teacher_loss(rq, nk, jnp.arange(t) // L, mass)
    loss, grads = jax.value_and_grad(loss_fn, argnums=(0, 1))(rq, node_k)
    assert np.isfinite(loss) and loss > 0
    assert float(jnp.abs(grads[0]).sum()) > 0 and float(jnp.abs(grads[1]).sum()) > 0

    # Position weights: all ones is the unweighted loss; a 0/1 mask is the loss of the kept
    # positions alone (their terms averaged), and masked positions get no gradient.
    ones = jnp.ones((B, t))
    np.testing.assert_allclose(routing.teacher_loss(rq, node_k, jnp.arange(t) // L, mass, ones),
                               loss, rtol=1e-6)
    keep = np.zeros((B, t), np.float32)
    keep[:, 2 * L + 3] = 1.0
    keep[1, 3 * L + 1] = 1.0
    masked_fn = lambda rq: routing.teacher_loss(rq, node_k, jnp.arange(t) // L, mass,
                                                jnp.asarray(keep))
    masked, grad_rq = jax.value_and_grad(masked_fn)(rq)
    terms = []
    for b, i in zip(*np.nonzero(keep)):
      sub = lambda x: x[b:b + 1, i:i + 1]
      terms.append(routing.teacher_loss(sub(rq), node_k[b:b + 1], jnp.asarray([i // L]),
                                        sub(mass)))
    # Both kept positions (leaf 2 and leaf 3) have terms at level 0 only (level 1 needs 4 visible
    # leaves), so the weighted mean is the plain mean of their two losses.
    np.testing.assert_allclose(masked, np.mean(terms), rtol=1e-5)
    assert float(jnp.abs(grad_rq * (1 - keep)[:, :, None, None]).sum()) == 0
    assert float(jnp.abs(grad_rq).sum()) > 0

  def test_teacher_positions(self):
    mask = np.zeros((2, 64), np.float32)
    mask[0, [40, 7, 50]] = 1.0
    mask[1, [63, 20]] = 0.5
    pos, w = routing.teacher_positions(4, 64, 2, jnp.asarray(mask))
    np.testing.assert_array_equal(pos, [[0, 7, 40, 50], [0, 1, 20, 63]])  # scored, then weight 0
    np.testing.assert_array_equal(w, [[0, 1, 1, 1], [0, 0, 0.5, 0.5]])
    pos, w = routing.teacher_positions(8, 256, 3)
    pos = np.asarray(pos)
    assert pos.shape == (3, 8) and np.all(w == 1) and np.all(pos[0] == pos[2])
    assert len(set(pos[0])) == 8 and pos.min() >= 0 and pos.max() < 256
    assert len(set(pos[0] % L)) > 4                 # not all at one offset in their leaf
    np.testing.assert_array_equal(routing.teacher_positions(300, 64, 1)[0], [np.arange(64)])

  def test_teacher_at_chosen_positions_is_the_full_teacher_there(self):
    t = 8 * L
    kq, kk, kr = jax.random.split(jax.random.PRNGKey(10), 3)
    q = jax.random.normal(kq, (B, t, H, E))
    k = jax.random.normal(kk, (B, t, H, E))
    rq = jax.random.normal(kr, (B, t, H, P))
    node_k = _tree(11, n=8)[0]
    mass = routing.leaf_attention_mass(q, k, L, N)
    keep = np.zeros((B, t), np.float32)
    keep[0, [20, 70, 127]] = 1.0
    keep[1, [33, 100]] = 1.0
    pos, w = routing.teacher_positions(5, t, B, jnp.asarray(keep))
    take = lambda y: jnp.take_along_axis(y, pos[:, :, None, None], axis=1)
    mass_at = routing.leaf_attention_mass(take(q), k, L, N, pos)
    np.testing.assert_allclose(mass_at, take(mass), rtol=1e-5, atol=1e-7)
    for cross in (False, True):
      full = routing.teacher_loss(rq, node_k, jnp.arange(t) // L, mass, jnp.asarray(keep),
                                  cross_level=cross)
      at = routing.teacher_loss(take(rq), node_k, pos // L, mass_at, w, cross_level=cross)
      np.testing.assert_allclose(at, full, rtol=1e-5)

  def test_salience_loss_is_cross_entropy_to_the_teachers_token_mass(self):
    t = 4 * L
    kq, kk, kp = jax.random.split(jax.random.PRNGKey(12), 3)
    q = jax.random.normal(kq, (B, t, H, E))
    k = jax.random.normal(kk, (B, t, H, E))
    pos, w = routing.teacher_positions(8, t, B)
    take = lambda y: jnp.take_along_axis(y, pos[:, :, None, None], axis=1)
    mass, token_mass = routing.leaf_attention_mass(take(q), k, L, N, pos, return_token_mass=True)
    np.testing.assert_allclose(token_mass.reshape(B, 8, H, -1, L).sum(-1), mass[..., :t // L],
                               rtol=1e-5, atol=1e-7)
    target = np.asarray(token_mass).sum(1)
    target = target / target.sum(-1, keepdims=True)                         # [B, H, T]
    entropy = -np.sum(target * np.log(np.maximum(target, 1e-30)), -1).mean()
    best = jnp.asarray(np.swapaxes(np.log(np.maximum(target, 1e-30)), 1, 2))  # pool = log target
    loss, grad = jax.value_and_grad(routing.salience_loss)(best, token_mass, w)
    np.testing.assert_allclose(loss, entropy, rtol=1e-4)
    assert float(jnp.abs(grad).max()) < 1e-5
    other = routing.salience_loss(jax.random.normal(kp, (B, t, H)), token_mass, w)
    assert float(other) > entropy + 0.1
    assert float(routing.salience_loss(best, token_mass, jnp.zeros_like(w))) == 0.0

  def test_cross_level_teacher_matches_reference(self):
    # Level l's candidates: the complete level-l nodes before the query's leaf c, plus the
    # query's Fenwick nodes of lower levels covering the rest of [0, c): a partition of the
    # visible prefix, so the teacher's masses over it sum to one without renormalising.
    t = N * L
    kq, kk, kr = jax.random.split(jax.random.PRNGKey(8), 3)
    mass = routing.leaf_attention_mass(jax.random.normal(kq, (1, t, H, E)),
                                       jax.random.normal(kk, (1, t, H, E)), L, N)
    node_k = np.asarray(_tree(9)[0][:1])
    rq = jax.random.normal(kr, (1, t, H, P))
    scale = P ** -0.5
    for c in (1, 2, 3, 5, 7, 11, 13, 15):
      i = c * L + 4
      m = np.asarray(mass)[0, i]                                   # [H, N]
      terms = []
      for level in range(N.bit_length() - 1):
        whole = c >> level
        if whole < 1:
          continue
        cands = [(level, j) for j in range(whole)]
        start = whole << level
        for lv in range(level - 1, -1, -1):                         # the Fenwick tail
          if start + (1 << lv) <= c:
            cands.append((lv, start >> lv))
            start += 1 << lv
        assert start == c
        if len(cands) < 2:
          continue
        for h in range(H):
          target = np.array([m[h, j << lv:(j + 1) << lv].sum() for lv, j in cands])
          np.testing.assert_allclose(target.sum(), 1.0, rtol=1e-5)
          scores = np.array([node_k[0, level_offset(N, lv) + j, h] @ np.asarray(rq)[0, i, h]
                             for lv, j in cands]) * scale
          logp = scores - np.log(np.sum(np.exp(scores - scores.max()))) - scores.max()
          terms.append(-(target * logp).sum())
      got = routing.teacher_loss(rq[:, i:i + 1], jnp.asarray(node_k), jnp.asarray([c]),
                                 mass[:, i:i + 1], cross_level=True)
      want = np.mean(terms) if terms else 0.0   # leaf 1 sees one leaf: nothing to rank
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7, err_msg=f"leaf {c}")
      plain = routing.teacher_loss(rq[:, i:i + 1], jnp.asarray(node_k), jnp.asarray([c]),
                                   mass[:, i:i + 1])
      if c in (3, 5, 7, 11, 13):  # a Fenwick tail exists below some level: the losses differ
        assert abs(float(got) - float(plain)) > 1e-4, c

  def test_routing_recall(self):
    leaves = jnp.array([[[[0, 1], [2, -1]], [[3, 4], [5, 6]]]])  # [1, 2, 2, 2]
    answers = jnp.array([[[2, -1], [7, 3]]])
    mask = jnp.array([[1.0, 1.0]])
    np.testing.assert_allclose(metrics_lib.routing_recall(leaves, answers, mask), 2 / 3, rtol=1e-6)


class ExactReadTest(parameterized.TestCase):

  def test_reads_exactly_the_routed_leaves(self):
    t, k = 5, 2
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(8), 3)
    q = jax.random.normal(kq, (B, t, H, E))
    cache_k = jax.random.normal(kk, (B, N, L, H, E))
    cache_v = jax.random.normal(kv, (B, N, L, H, E))
    leaves = jax.random.randint(jax.random.PRNGKey(9), (B, t, H, k), 0, N).at[0, 0, 0, 1].set(-1)
    w = jax.nn.softmax(jax.random.normal(jax.random.PRNGKey(10), (B, t, H, k)), -1)
    w = jnp.where(leaves >= 0, w, 0.0)
    res = read_lib.exact_read(q, cache_k, cache_v, leaves, w)
    # gather: local token indices are correct.
    g = read_lib.gather_leaves(cache_k, leaves)
    np.testing.assert_array_equal(g[1, 2, 1, 0, 7], cache_k[1, leaves[1, 2, 1, 0], 7, 1])
    for b in range(B):
      for i in range(t):
        for h in range(H):
          sel = [j for j in np.asarray(leaves[b, i, h]) if j >= 0]
          ks = np.concatenate([cache_k[b, j, :, h] for j in sel])
          vs = np.concatenate([cache_v[b, j, :, h] for j in sel])
          logw = np.repeat([np.log(w[b, i, h, s]) for s in range(k) if leaves[b, i, h, s] >= 0], L)
          logit = ks @ np.asarray(q[b, i, h]) / np.sqrt(E) + logw
          p = np.exp(logit - logit.max()); p /= p.sum()
          np.testing.assert_allclose(res.value[b, i, h], p @ vs, rtol=1e-4, atol=1e-5)
    # Changing any leaf that is not selected changes nothing.
    unselected = np.setdiff1d(np.arange(N), np.asarray(leaves))
    if len(unselected):
      res2 = read_lib.exact_read(q, cache_k.at[:, unselected].set(9.0),
                                 cache_v.at[:, unselected].set(9.0), leaves, w)
      np.testing.assert_array_equal(res.value, res2.value)
    assert np.all(res.active)

  def test_nothing_selected_reads_zero(self):
    q = jnp.ones((1, 1, H, E))
    cache = jnp.ones((1, N, L, H, E))
    res = read_lib.exact_read(q, cache, cache, -jnp.ones((1, 1, H, 2), jnp.int32),
                              jnp.zeros((1, 1, H, 2)))
    np.testing.assert_array_equal(res.value, 0.0)
    assert not np.any(res.active)

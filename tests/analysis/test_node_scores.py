"""Node scoring rules of the routing diagnostic against plain-numpy loops."""

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

from memkernel.analysis import node_scores
from memkernel.kernel import tree as tree_lib
from memkernel.kernel.state import level_offset

B, N, L, H, P = 2, 8, 4, 2, 3


def _reference(inputs, pos, answers, reps):
  """Hits and counts per f"{rule}/{level}" by loops over (row, query, answer, head, node)."""
  rq, rk, pool, node_keys = (np.asarray(inputs[n]) for n in ("rq", "rk", "pool", "node_keys"))
  hits, counts = {}, {}
  for b in range(pos.shape[0]):
    for j, t in enumerate(pos[b]):
      c = t // L
      for a in answers[b, j]:
        if not 0 <= a < c:
          continue
        for level in range(N.bit_length() - 1):
          seen, size = c >> level, L << level
          if seen < 2 or (a >> level) >= seen:
            continue
          any_head = {}
          for h in range(H):
            q = rq[b, t, h]
            scores = {}
            for i in range(seen):
              keys = rk[b, i * size:(i + 1) * size, h]
              sal = pool[b, i * size:(i + 1) * size, h]
              s = {"pooled": node_keys[b, level_offset(N, level) + i, h] @ q,
                   "bound": sum(max(q[d] * keys[:, d].max(), q[d] * keys[:, d].min())
                                for d in range(P)),
                   "exact": max(keys @ q)}
              for m in reps:
                top = np.argsort(-sal, kind="stable")[:m]
                s[f"reps_{m}"] = max(keys[top] @ q)
              for rule, v in s.items():
                scores.setdefault(rule, []).append(v)
            for rule, v in scores.items():
              any_head[rule] = any_head.get(rule, False) or int(np.argmax(v)) == a >> level
          for rule, hit in any_head.items():
            name = f"{rule}/{level}"
            hits[name] = hits.get(name, 0) + int(hit)
            counts[name] = counts.get(name, 0) + 1
  return hits, counts


class NodeScoresTest(absltest.TestCase):

  def test_matches_reference_loops(self):
    t = N * L
    keys = jax.random.split(jax.random.key(0), 5)
    rk = jax.random.normal(keys[0], (B, t, H, P))
    pool = jax.random.normal(keys[1], (B, t, H))
    node_keys, _, _, _ = tree_lib.build_tree(*tree_lib.summarize_leaf(
        rk.reshape(B, N, L, H, P), jnp.zeros((B, N, L, H, 1)), pool.reshape(B, N, L, H)), N)
    inputs = {"rq": jax.random.normal(keys[2], (B, t, H, P)), "rk": rk, "pool": pool,
              "node_keys": node_keys}
    pos = jnp.asarray([[9, 17, 25, 31, 30], [12, 22, 28, 16, 5]], jnp.int32)
    answers = jnp.asarray([[[0, -1], [3, 1], [5, 2], [7, 6], [4, 0]],
                           [[1, 0], [4, 5], [6, -1], [3, 2], [2, 1]]], jnp.int32)
    reps = (2, 8)  # 8 is as many keys as a level-1 node has tokens: exact there and below.
    got = jax.jit(lambda *a: node_scores.node_score_trace(*a, leaf_size=L, reps=reps))(
        inputs, pos, answers)
    hits, counts = _reference(inputs, np.asarray(pos), np.asarray(answers), reps)
    names = {n for n in got if not n.endswith("/n")}
    self.assertEqual(names - set(hits), {f"{r}/2" for r in node_scores.rule_names(reps)})
    self.assertEqual({n.split("/")[0] for n in hits}, set(node_scores.rule_names(reps)))
    for name in names:  # No query sees two level-2 nodes: counted 0 there.
      self.assertEqual(float(got[name + "/n"]), counts.get(name, 0), name)
      self.assertEqual(float(got[name]), hits.get(name, 0), name)
    # The rules disagree somewhere (the comparison can tell them apart).
    self.assertGreater(len({tuple(hits[f"{r}/{lv}"] for lv in range(2)) for r in
                            node_scores.rule_names(reps)}), 1)


if __name__ == "__main__":
  absltest.main()

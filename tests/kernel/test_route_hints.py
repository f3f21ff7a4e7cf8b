"""Routing hints (`KernelModel(route_hints=...)`, `tree.build_presence`): the bias a read trace
suggests, every head favouring the nodes holding a token that follows its hint token.

Checked: the presence store says exactly which tokens each sealed node's tokens follow (a brute
force over positions); a zero weight, or no hint token, changes nothing; a large weight makes
every head read the one leaf whose token follows the hint wherever that leaf is visible; the
hinted forward stays causal and gives the same result with and without query blocks; the
recurrent forms (scan, step, prefill) keep the same presence in their memory (across calls and
document resets) and route and predict as the parallel form does; wrong shapes, and hints for a memory without
presence, fail with a message.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

from memkernel import KernelConfig, KernelModel, init_memory
from memkernel import evaluate as evaluate_lib
from memkernel.kernel import tree as tree_lib

V = 23
BASE = KernelConfig(vocab_size=V, d_model=16, num_layers=2, num_roots=2, num_route_heads=2,
                    beam_width=2, max_seq_len=256, scan_impl="linear", query_block=0)
MARK, FOLLOW = 21, 22      # Tokens the random filler (0 ... 20) never uses.


@functools.lru_cache(maxsize=None)
def _compiled(config: KernelConfig):
  model = KernelModel(config)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 32), jnp.int32))
  forward = jax.jit(lambda p, t, h: model.apply(p, t, route_hints=h))
  plain = jax.jit(lambda p, t: model.apply(p, t))
  return model, params, forward, plain


def _hints(b, t, token, weight, config=BASE):
  shape = (b, t, config.num_layers, config.num_route_heads)
  return (jnp.full(shape, token, jnp.int32), jnp.full(shape, weight, jnp.float32))


def _filler(seed, b, t):
  return np.array(jax.random.randint(jax.random.PRNGKey(seed), (b, t), 0, MARK))


def _unpack(presence_BSW, vocab=V):
  """The packed sets as 0/1 [B, S, vocab]."""
  bits = (np.asarray(presence_BSW)[..., None] >> np.arange(32, dtype=np.uint32)) & 1
  return bits.reshape(presence_BSW.shape[:2] + (-1,))[..., :vocab]


class PresenceTest(absltest.TestCase):

  def test_presence_is_the_tokens_each_node_follows(self):
    tokens = _filler(0, 2, 100)                         # 6 sealed leaves of 16, 8 slots.
    presence = tree_lib.build_presence(jnp.asarray(tokens), 8, 16, V)
    self.assertEqual((presence.shape, presence.dtype), ((2, 15, 1), jnp.uint32))
    presence = _unpack(presence)
    for level in range(4):
      for index in range(8 >> level):
        flat = tree_lib.level_offset(8, level) + index
        lo, hi = index << level, (index + 1) << level
        want = np.zeros((2, V))
        if hi <= 6:                                       # Only nodes whose leaves are sealed.
          for b in range(2):
            for p in range(lo * 16, hi * 16):
              if p > 0:
                want[b, tokens[b, p - 1]] = 1
        np.testing.assert_array_equal(presence[:, flat], want, err_msg=f"{level}/{index}")


class HintTest(absltest.TestCase):

  def test_zero_weight_or_no_token_changes_nothing(self):
    _, params, forward, plain = _compiled(BASE)
    tokens = jnp.asarray(_filler(1, 2, 128))
    logits, aux = plain(params, tokens)
    for hints in (_hints(2, 128, 5, 0.0), _hints(2, 128, -1, 100.0)):
      hinted, haux = forward(params, tokens, hints)
      np.testing.assert_array_equal(np.asarray(hinted), np.asarray(logits))
      for a, h in zip(aux.routes, haux.routes):
        np.testing.assert_array_equal(np.asarray(a.leaves), np.asarray(h.leaves))

  def test_a_strong_hint_reads_the_leaf_that_follows_it(self):
    _, params, forward, _ = _compiled(BASE)
    tokens = _filler(2, 2, 128)
    where = [(3, 5), (1, 6)]                              # (leaf of MARK, leaf of the query)
    for b, (leaf, _) in enumerate(where):
      tokens[b, leaf * 16 + 7], tokens[b, leaf * 16 + 8] = MARK, FOLLOW
    _, aux = forward(params, jnp.asarray(tokens), _hints(2, 128, MARK, 1e4))
    for b, (leaf, _) in enumerate(where):
      for route in aux.routes:
        leaves = np.asarray(route.leaves)[b]                  # [T, H, K]
        later = leaves[(leaf + 1) * 16:]                      # Queries that see the leaf.
        self.assertTrue(np.all(later[..., 0] == leaf), (b, later[..., 0]))
        earlier = leaves[:(leaf + 1) * 16]
        self.assertFalse(np.any(earlier == leaf))             # Never before it is sealed.

  def test_causal_and_blocked_alike(self):
    _, params, forward, _ = _compiled(BASE)
    tokens = _filler(3, 2, 128)
    tokens[:, 40] = MARK
    hints = _hints(2, 128, MARK, 3.0)
    logits, _ = forward(params, jnp.asarray(tokens), hints)
    changed = tokens.copy()
    changed[:, 80:] = _filler(4, 2, 48)
    changed[:, 90] = MARK                                     # A later mark moves nothing earlier.
    later, _ = forward(params, jnp.asarray(changed), hints)
    np.testing.assert_allclose(np.asarray(later)[:, :80], np.asarray(logits)[:, :80], atol=1e-5)
    blocked = KernelModel(dataclasses.replace(BASE, query_block=32))   # Same parameters.
    blogits, _ = jax.jit(lambda p, t, h: blocked.apply(p, t, route_hints=h))(
        params, jnp.asarray(tokens), hints)
    np.testing.assert_allclose(np.asarray(blogits), np.asarray(logits), atol=1e-5)

  def test_wrong_shapes_fail_with_a_message(self):
    model, params, _, _ = _compiled(BASE)
    tokens = jnp.zeros((2, 64), jnp.int32)
    with self.assertRaisesRegex(ValueError, "route_hints must be"):
      model.apply(params, tokens, route_hints=_hints(2, 32, 1, 1.0))
    with self.assertRaisesRegex(ValueError, "route_hints must be"):
      model.apply(params, tokens, route_hints=(jnp.zeros((2, 64, 2, 2), jnp.int32),))


class RecurrentHintTest(absltest.TestCase):
  """`scan` and `step` with hints: the memory's presence, and the parallel form's routes."""

  CONFIG = dataclasses.replace(BASE, vocab_size=40)       # Two words per set.

  def _case(self):
    config = self.CONFIG
    model, params, forward, _ = _compiled(config)
    tokens = _filler(5, 2, 100)
    tokens[0, 37:39], tokens[1, 20:22] = (MARK, FOLLOW), (MARK, FOLLOW)
    tokens[1, 70:72] = (MARK, 39)                         # In the second document of row 1.
    segments = np.zeros((2, 100), np.int32)
    segments[1, 64:] = 1                                  # Row 1: a new document at leaf 4.
    weights = np.random.default_rng(0).uniform(0.0, 8.0, (2, 100, 2, 2)).astype(np.float32)
    hints = (jnp.full((2, 100, 2, 2), MARK, jnp.int32), jnp.asarray(weights))
    return config, model, params, jnp.asarray(tokens), jnp.asarray(segments), hints

  def test_recurrent_forms_keep_the_presence_and_route_alike(self):
    config, model, params, tokens, segments, hints = self._case()
    parallel = jax.jit(lambda p, t, s, h: model.apply(p, t, s, route_hints=h))
    logits, aux = parallel(params, tokens, segments, hints)
    _, plain = parallel(params, tokens, segments, (hints[0], 0.0 * hints[1]))
    self.assertTrue(any(np.any(np.asarray(a.leaves) != np.asarray(b.leaves))
                        for a, b in zip(aux.routes, plain.routes)))   # The hints matter here.
    scan = jax.jit(lambda p, t, s, m, h: model.apply(p, t, m, s, route_hints=h, return_aux=True,
                                                     method=model.scan))
    memory = init_memory(config, 2, presence=True)
    parts = []
    for lo, hi in ((0, 50), (50, 100)):                   # Two calls, the first ends mid-leaf.
      part = (tokens[:, lo:hi], segments[:, lo:hi], tuple(h[:, lo:hi] for h in hints))
      out, memory, part_aux = scan(params, part[0], part[1], memory, part[2])
      parts.append((out, part_aux))
    scan_logits = np.concatenate([np.asarray(p[0]) for p in parts], axis=1)
    np.testing.assert_allclose(scan_logits, np.asarray(logits), atol=1e-5)
    for layer, route in enumerate(aux.routes):
      scanned = np.concatenate([np.asarray(p[1].routes[layer].leaves) for p in parts], axis=1)
      np.testing.assert_array_equal(scanned, np.asarray(route.leaves))
    leaf_doc = jnp.asarray(np.asarray(segments)[:, 15::16][:, :6])
    want = tree_lib.build_presence(tokens, config.num_leaves, 16, config.vocab_size,
                                   jnp.pad(leaf_doc, ((0, 0), (0, config.num_leaves - 6)),
                                           constant_values=-1))
    np.testing.assert_array_equal(np.asarray(memory.presence.nodes_BSW), np.asarray(want))
    np.testing.assert_array_equal(np.asarray(memory.presence.last_B), np.asarray(tokens[:, -1]))
    prefill = jax.jit(lambda p, t, s, m, h: model.apply(p, t, m, s, route_hints=h, block=32,
                                                        return_aux=True, method=model.prefill))
    out, blocked, blocked_aux = prefill(params, tokens, segments,
                                        init_memory(config, 2, presence=True), hints)
    np.testing.assert_allclose(np.asarray(out), np.asarray(logits), atol=1e-5)
    for layer, route in enumerate(aux.routes):
      np.testing.assert_array_equal(np.asarray(blocked_aux.routes[layer].leaves),
                                    np.asarray(route.leaves))
    np.testing.assert_array_equal(np.asarray(blocked.presence.nodes_BSW), np.asarray(want))
    step = jax.jit(lambda p, t, s, m, h: model.apply(p, t, m, s, route_hints=h,
                                                     return_aux=True, method=model.step))
    memory = init_memory(config, 2, presence=True)
    for i in range(100):
      out, memory, step_aux = step(params, tokens[:, i], segments[:, i], memory,
                                   tuple(h[:, i] for h in hints))
      np.testing.assert_allclose(np.asarray(out), np.asarray(logits)[:, i], atol=1e-5)
      for layer, route in enumerate(aux.routes):
        np.testing.assert_array_equal(np.asarray(step_aux.routes[layer].leaves)[:, 0],
                                      np.asarray(route.leaves)[:, i])
    np.testing.assert_array_equal(np.asarray(memory.presence.nodes_BSW), np.asarray(want))

  def test_hints_need_a_memory_with_presence(self):
    config, model, params, tokens, _, hints = self._case()
    with self.assertRaisesRegex(ValueError, "presence=True"):
      model.apply(params, tokens, init_memory(config, 2), route_hints=hints, method=model.scan)
    with self.assertRaisesRegex(ValueError, "presence=True"):
      model.apply(params, tokens[:, 0], init_memory(config, 2),
                  route_hints=tuple(h[:, 0] for h in hints), method=model.step)
    with self.assertRaisesRegex(ValueError, r"route_hints must be .*\(2, 100, 2, 2\)"):
      model.apply(params, tokens, init_memory(config, 2, presence=True),
                  route_hints=tuple(h[:, :50] for h in hints), method=model.scan)
    other = init_memory(dataclasses.replace(config, vocab_size=V), 2, presence=True)
    with self.assertRaisesRegex(ValueError, "another vocabulary size"):
      model.apply(params, tokens, other, method=model.scan)


class EvaluateHintsTest(absltest.TestCase):

  def test_hint_tables_are_looked_up_by_the_query_token(self):
    table = (np.arange(4 * V, dtype=np.int32).reshape(4, V), np.ones((4, V), np.float32))
    tokens = jnp.asarray([[0, 5, 7]])
    token, weight = evaluate_lib.hints_for(tokens, table, num_layers=2)
    self.assertEqual(token.shape, (1, 3, 2, 2))
    np.testing.assert_array_equal(np.asarray(token)[0, 1].reshape(-1), table[0][:, 5])
    self.assertEqual(float(weight.sum()), 12.0)


if __name__ == "__main__":
  absltest.main()

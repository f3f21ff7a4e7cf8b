"""Document streams: the three forms agree on a stream, boundaries reset / carry / decay, causality,
a reset hides every earlier document, the tree's document rule, and bad segment indices."""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from memkernel import KernelConfig, KernelModel, init_memory
from memkernel import family as family_lib
from memkernel.kernel import routing
from memkernel.kernel import tree as tree_lib

V = 23
L = 4
T = 48
# Leaves of 4 tokens so a short stream spans several tree levels; one layer, one root (compiles).
BASE = KernelConfig(vocab_size=V, d_model=16, num_layers=1, num_roots=1, num_route_heads=2,
                    leaf_size=L, beam_width=2, max_seq_len=64, scan_impl="linear")
RESET = BASE
CARRY = dataclasses.replace(BASE, trunk_boundary="carry", tree_boundary="carry")
DECAY = dataclasses.replace(BASE, trunk_boundary="decay", boundary_decay=0.5)
TRUNK_CARRY = dataclasses.replace(BASE, trunk_boundary="carry")
# Per row: documents of different lengths (multiples of L), starting at different positions.
DOC_LENGTHS = ((8, 20, 12, 8), (16, 4, 28))


def _segments():
  rows = [np.repeat(np.arange(len(lengths)) * 2 + 1, lengths) for lengths in DOC_LENGTHS]
  return jnp.asarray(np.stack(rows), jnp.int32)


def _doc_starts(row):
  return np.cumsum((0,) + DOC_LENGTHS[row])[:-1]


def _tokens(seed, length=T):
  return jax.random.randint(jax.random.PRNGKey(seed), (len(DOC_LENGTHS), length), 0, V)


@functools.lru_cache(maxsize=None)
def _params():
  model = KernelModel(BASE)
  return jax.jit(model.init)(jax.random.PRNGKey(0), _tokens(0))


@functools.lru_cache(maxsize=None)
def _forms(config: KernelConfig):
  """(parallel, scan, step), jitted per config; the boundaries change no parameter."""
  model = KernelModel(config)
  parallel = jax.jit(lambda v, t, s: model.apply(v, t, s)[0])
  scan = jax.jit(lambda v, t, s, m: model.apply(v, t, m, method=model.scan, segments=s))
  step = jax.jit(lambda v, t, s, m: model.apply(v, t, m, method=model.step, segment=s))
  return parallel, scan, step


class FormsOnStreamsTest(parameterized.TestCase):

  @parameterized.named_parameters(("reset", RESET, True), ("carry", CARRY, True),
                                  ("decay", DECAY, False),
                                  ("reset_reps", dataclasses.replace(RESET, node_reps=3), False))
  def test_parallel_scan_step_agree(self, config, check_step):
    parallel, scan, step = _forms(config)
    params, tokens, segments = _params(), _tokens(1), _segments()
    b = tokens.shape[0]
    logits_p = parallel(params, tokens, segments)
    logits_s, mem_s = scan(params, tokens, segments, init_memory(config, b))
    np.testing.assert_allclose(logits_s, logits_p, atol=1e-4, rtol=0)
    np.testing.assert_array_equal(mem_s.segment_B, segments[:, -1])
    np.testing.assert_array_equal(mem_s.doc_start_B, [_doc_starts(r)[-1] for r in range(b)])
    np.testing.assert_array_equal(mem_s.leaf_doc_BN[:, :T // L], segments[:, ::L])
    if check_step:
      memory, logits_t = init_memory(config, b), []
      for i in range(T):
        out, memory = step(params, tokens[:, i], segments[:, i], memory)
        logits_t.append(out)
      np.testing.assert_allclose(jnp.stack(logits_t, 1), logits_p, atol=1e-4, rtol=0)
      chex.assert_trees_all_close(memory, mem_s, atol=1e-4)

  def test_stream_prefill_then_continue_the_document(self):
    """A scan that ends mid-document, then one without segments: the document goes on."""
    parallel, scan, _ = _forms(RESET)
    params, tokens, segments = _params(), _tokens(2), _segments()
    logits_p = parallel(params, tokens, segments)
    # Both rows are inside their last document from position 40 on; 42 is mid-leaf.
    _, memory = scan(params, tokens[:, :42], segments[:, :42], init_memory(RESET, 2))
    logits_s, _ = scan(params, tokens[:, 42:], segments[:, 42:], memory)
    np.testing.assert_allclose(logits_s, logits_p[:, 42:], atol=1e-4, rtol=0)
    model = KernelModel(RESET)
    logits_n, _ = model.apply(params, tokens[:, 42:], memory, method=model.scan)
    np.testing.assert_allclose(logits_n, logits_p[:, 42:], atol=1e-4, rtol=0)


class BoundaryTest(parameterized.TestCase):

  @parameterized.named_parameters(("reset", RESET), ("carry", CARRY))
  def test_future_tokens_never_change_the_past(self, config):
    parallel, _, _ = _forms(config)
    params, tokens, segments = _params(), _tokens(3), _segments()
    base = parallel(params, tokens, segments)
    for t in (7, 21, 30):  # inside documents and at a document's last token
      noise = jax.random.randint(jax.random.PRNGKey(t), tokens.shape, 0, V)
      perturbed = tokens.at[:, t + 1:].set(noise[:, t + 1:])
      out = parallel(params, perturbed, segments)
      np.testing.assert_allclose(out[:, :t + 1], base[:, :t + 1], atol=1e-5, rtol=0)
      assert float(jnp.max(jnp.abs(out[:, t + 1:] - base[:, t + 1:]))) > 1e-3

  def test_reset_hides_earlier_documents_and_carry_does_not(self):
    """Replacing every token before document k changes nothing in k under reset (trunk, tree and
    cache), and changes k under carry."""
    params, tokens, segments = _params(), _tokens(4), _segments()
    for row in range(len(DOC_LENGTHS)):
      for k, start in enumerate(_doc_starts(row)):
        if k == 0:
          continue
        noise = jax.random.randint(jax.random.PRNGKey(100 + k), tokens.shape, 0, V)
        replaced = tokens.at[row, :start].set(noise[row, :start])
        end = start + DOC_LENGTHS[row][k]
        for config, hidden in ((RESET, True), (CARRY, False)):
          parallel = _forms(config)[0]
          base = parallel(params, tokens, segments)[row, start:end]
          out = parallel(params, replaced, segments)[row, start:end]
          diff = float(jnp.max(jnp.abs(out - base)))
          where = f"row {row}, document {k}, {config.trunk_boundary}/{config.tree_boundary}"
          if hidden:
            assert diff <= 1e-5, f"{where}: an earlier document leaked ({diff})"
          else:
            assert diff > 1e-3, f"{where}: carry should see the earlier documents ({diff})"

  def test_decay_differs_from_reset_and_carry(self):
    params, tokens, segments = _params(), _tokens(5), _segments()
    decay = _forms(DECAY)[0](params, tokens, segments)
    for other in (RESET, TRUNK_CARRY):
      out = _forms(other)[0](params, tokens, segments)
      # The first document has no boundary before it: identical there.
      np.testing.assert_allclose(out[:, :8], decay[:, :8], atol=1e-5, rtol=0)
      assert float(jnp.max(jnp.abs(out[:, 8:] - decay[:, 8:]))) > 1e-4, other.trunk_boundary

  def test_training_on_a_stream(self):
    """The teacher and the router train on a stream: finite losses, a gradient to the router."""
    model, params, tokens, segments = KernelModel(RESET), _params(), _tokens(8), _segments()

    def loss(p):
      _, out = model.apply(p, tokens, segments, train=True)
      return out.losses["teacher"]

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    assert np.isfinite(float(value)) and float(value) > 0
    chex.assert_tree_all_finite(grads)
    proj = grads["params"]["layer_0"]["memory_proj"]["kernel"]
    assert float(jnp.max(jnp.abs(proj))) > 0

  def test_one_document_equals_no_segments(self):
    params, tokens = _params(), _tokens(6)
    parallel = _forms(RESET)[0]
    model = KernelModel(RESET)
    none, _ = jax.jit(model.apply)(params, tokens)
    one = parallel(params, tokens, jnp.zeros_like(tokens))
    np.testing.assert_allclose(one, none, atol=1e-6, rtol=0)


class DocumentTreeTest(parameterized.TestCase):
  """Pure functions, no model: the tree's document rule and the router's document mask."""

  def _leaves(self, n=8, b=2, h=2, p=3, e=3):
    keys = jax.random.normal(jax.random.PRNGKey(0), (b, n, h, p))
    vals = jax.random.normal(jax.random.PRNGKey(1), (b, n, h, e))
    sal = jax.random.normal(jax.random.PRNGKey(2), (b, n, h))
    docs = jnp.asarray([[0, 0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 2, 2, 3]], jnp.int32)
    return keys, vals, sal, docs

  def test_nodes_summarise_their_last_leafs_document_batched_equals_incremental(self):
    keys, vals, sal, docs = self._leaves()
    n = keys.shape[1]
    built = tree_lib.build_tree(keys, vals, sal, n, pooled=True, leaf_doc_BN=docs)
    s = 2 * n - 1
    store = (jnp.zeros((2, s) + keys.shape[2:]), jnp.zeros((2, s) + vals.shape[2:]),
             jnp.zeros((2, s) + sal.shape[2:]), jnp.full((s, 2), -1, jnp.int32))
    insert = jax.jit(functools.partial(tree_lib.insert_leaf, pooled=True))
    for i in range(n):
      store = insert(*store, keys[:, i], vals[:, i], sal[:, i], i, True, leaf_doc_BN=docs)
    for a, b in zip(built, store):
      np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
    # The root summarises only the last document: the pooling of its leaves' keys.
    root = tree_lib.level_offset(n, 3)
    for row in range(2):
      mine = np.asarray(docs[row] == docs[row, -1])
      w = jax.nn.softmax(jnp.where(mine[:, None], sal[row], -jnp.inf), axis=0)
      np.testing.assert_allclose(built[0][row, root], jnp.einsum("nh,nhp->hp", w, keys[row]),
                                 atol=1e-5)
    # Without documents the root pools every leaf.
    plain = tree_lib.build_tree(keys, vals, sal, n, pooled=True)
    w = jax.nn.softmax(sal[0], axis=0)
    np.testing.assert_allclose(plain[0][0, root], jnp.einsum("nh,nhp->hp", w, keys[0]), atol=1e-5)

  def test_router_and_teacher_see_only_the_current_document(self):
    keys, vals, sal, docs = self._leaves()
    n = keys.shape[1]
    node_keys, node_vals, _, _ = tree_lib.build_tree(keys, vals, sal, n, leaf_doc_BN=docs)
    t = 4
    query_leaf = jnp.full((t,), 7, jnp.int32)
    first_leaf = jnp.asarray([[0, 2, 3, 5]] * 2, jnp.int32)
    rq = jax.random.normal(jax.random.PRNGKey(3), (2, t, 2, 3))
    cache_k = jax.random.normal(jax.random.PRNGKey(4), (2, n, L, 2, 3))
    q = jax.random.normal(jax.random.PRNGKey(5), (2, t, 2, 3))
    route_beam = jax.jit(routing.route_beam, static_argnames=("beam_width", "descend"))
    for rerank in (None, (q, cache_k)):
      route = route_beam(rq, node_keys, node_vals, query_leaf, beam_width=2, rerank=rerank,
                         first_leaf=first_leaf)
      for picked in (route.leaves, route.runner_up):
        fl = np.broadcast_to(np.asarray(first_leaf)[:, :, None, None], picked.shape)
        picked = np.asarray(picked)
        assert np.all((picked < 0) | ((picked >= fl) & (picked < 7)))
      assert np.all(np.asarray(route.leaves[:, 3, :, 0]) >= 5)   # two leaves to choose from
    k_tokens = jax.random.normal(jax.random.PRNGKey(6), (2, n * L, 2, 3))
    pos = jnp.full((2, t), 7 * L, jnp.int32)
    mass = routing.leaf_attention_mass(q, k_tokens, L, n, pos, first_leaf_BS=first_leaf)
    leaf = np.arange(n)
    fl = np.asarray(first_leaf)[:, :, None, None]
    assert np.all(np.where((leaf < fl) | (leaf >= 7), np.asarray(mass), 0) == 0)
    np.testing.assert_allclose(np.asarray(mass).sum(-1), 1.0, atol=1e-5)
    loss = routing.teacher_loss(rq, node_keys, query_leaf, mass, cross_level=True,
                                first_leaf=first_leaf)
    assert np.isfinite(float(loss))


class SegmentValidationTest(parameterized.TestCase):

  def test_bad_segments_raise_clear_errors(self):
    model, params, tokens = KernelModel(RESET), _params(), _tokens(7, 16)
    mid_leaf = jnp.asarray([[0] * 6 + [1] * 10, [0] * 16], jnp.int32)
    decreasing = jnp.asarray([[0] * 8 + [1] * 4 + [0] * 4, [0] * 16], jnp.int32)
    with pytest.raises(ValueError, match="starts at position 6"):
      family_lib.check_segments(mid_leaf, tokens.shape, L)
    with pytest.raises(ValueError, match="non-decreasing"):
      family_lib.check_segments(decreasing, tokens.shape, L)
    with pytest.raises(ValueError, match="starts at position 6"):
      model.apply(params, tokens, mid_leaf)
    with pytest.raises(ValueError, match="non-decreasing"):
      model.apply(params, tokens, decreasing)
    with pytest.raises(ValueError, match="starts at position 6"):
      model.apply(params, tokens, init_memory(RESET, 2), method=model.scan, segments=mid_leaf)
    # Across calls: the memory ends at position 6 inside document 0.
    memory = init_memory(RESET, 2)
    memory = dataclasses.replace(memory, num_tokens=jnp.asarray(6, jnp.int32),
                                 segment_B=jnp.zeros((2,), jnp.int32))
    with pytest.raises(ValueError, match="starts at position 6"):
      model.apply(params, tokens[:, 0], memory, method=model.step,
                  segment=jnp.asarray([1, 0], jnp.int32))
    with pytest.raises(ValueError, match="must not decrease"):
      model.apply(params, tokens[:, 0],
                  dataclasses.replace(memory, num_tokens=jnp.asarray(8, jnp.int32),
                                      segment_B=jnp.asarray([2, 2], jnp.int32)),
                  method=model.step, segment=jnp.asarray([1, 2], jnp.int32))

  @parameterized.parameters(
      dict(tree_boundary="decay", match="tree_boundary='decay' is not supported"),
      dict(trunk_boundary="forget", match="trunk_boundary must be one of"),
      dict(boundary_decay=1.0, match="boundary_decay must be in"),
      dict(boundary_decay=0.0, match="boundary_decay must be in"))
  def test_config_rejects_bad_boundaries(self, match, **overrides):
    with pytest.raises(ValueError, match=match):
      dataclasses.replace(BASE, **overrides)

  def test_family_reports_the_boundaries(self):
    family = family_lib.get("kernel")
    assert family.boundaries(DECAY) == {"trunk": family_lib.Boundary.DECAY,
                                        "tree": family_lib.Boundary.RESET}

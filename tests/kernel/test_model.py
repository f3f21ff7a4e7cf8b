"""The full model: parallel == scan == step, causality, sealing, interventions, gradients, oracle."""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from absl.testing import parameterized
from hypothesis import given, settings, strategies as st

from memkernel import KernelModel, Interventions, KernelConfig, init_memory

V = 19
BASE = KernelConfig(vocab_size=V, d_model=16, num_layers=2, num_roots=2, num_route_heads=2,
                   beam_width=2, max_seq_len=128, scan_impl="linear")


@functools.lru_cache(maxsize=None)
def _compiled(config: KernelConfig):
  """(model, params, parallel, scan, step) with jitted functions cached per config."""
  model = KernelModel(config)
  tokens = jnp.zeros((2, config.leaf_size * 2), jnp.int32)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), tokens)
  parallel = jax.jit(lambda v, t, **kw: model.apply(v, t, **kw),
                     static_argnames=("train", "interventions"))
  scan = jax.jit(lambda v, t, m: model.apply(v, t, m, method=model.scan, return_aux=True))
  step = jax.jit(lambda v, t, m: model.apply(v, t, m, method=model.step, return_aux=True))
  return model, params, parallel, scan, step


@functools.lru_cache(maxsize=None)
def _prefill(config: KernelConfig, block: int = 32):
  model = KernelModel(config)
  return jax.jit(lambda v, t, m: model.apply(v, t, m, method=model.prefill, block=block,
                                             return_aux=True))


def _tokens(seed, batch, length):
  return jax.random.randint(jax.random.PRNGKey(seed), (batch, length), 0, V)


def _run_steps(step, params, tokens, memory):
  """(logits, top leaves, memory, paths) of decoding `tokens` one step at a time."""
  logits, leaves, paths = [], [], []
  for i in range(tokens.shape[1]):
    out, memory, aux = step(params, tokens[:, i], memory)
    logits.append(out)
    leaves.append(jnp.stack([a.leaves[:, 0] for a in aux.routes]))
    paths.append(jnp.stack([a.path[:, 0] for a in aux.routes]))
  return jnp.stack(logits, 1), jnp.stack(leaves, 2), memory, jnp.stack(paths, 2)


def _leaves_of(aux):
  return jnp.stack([a.leaves for a in aux.routes])


def _paths_of(aux):
  return jnp.stack([a.path for a in aux.routes])


def _assert_forms_agree(config, tokens, check_step=True, check_prefill=False):
  model, params, parallel, scan, step = _compiled(config)
  b = tokens.shape[0]
  logits_p, aux_p = parallel(params, tokens)
  logits_s, mem_s, aux_s = scan(params, tokens, init_memory(config, b))
  # Selection mismatches are reported on their own: a flipped near-tie is not a logit bug.
  mismatch = int(jnp.sum(_leaves_of(aux_p) != _leaves_of(aux_s)))
  assert mismatch == 0, f"scan selected {mismatch} different leaves than parallel"
  np.testing.assert_array_equal(_paths_of(aux_s), _paths_of(aux_p))
  np.testing.assert_allclose(logits_s, logits_p, atol=1e-4, rtol=0)
  if check_prefill:  # Blocks of 2 leaves, the rest by scan.
    logits_b, mem_b, aux_b = _prefill(config)(params, tokens, init_memory(config, b))
    mismatch = int(jnp.sum(_leaves_of(aux_b) != _leaves_of(aux_p)))
    assert mismatch == 0, f"prefill selected {mismatch} different leaves than parallel"
    np.testing.assert_array_equal(_paths_of(aux_b), _paths_of(aux_p))
    np.testing.assert_allclose(logits_b, logits_p, atol=1e-4, rtol=0)
    chex.assert_trees_all_close(mem_b, mem_s, atol=1e-4)
  if check_step:
    logits_t, leaves_t, mem_t, paths_t = _run_steps(step, params, tokens, init_memory(config, b))
    mismatch = int(jnp.sum(leaves_t != _leaves_of(aux_p)))
    assert mismatch == 0, f"step selected {mismatch} different leaves than parallel"
    np.testing.assert_array_equal(paths_t, _paths_of(aux_p))
    np.testing.assert_allclose(logits_t, logits_p, atol=1e-4, rtol=0)
    chex.assert_trees_all_close(mem_t, mem_s, atol=1e-4)
  return mem_s


class FormsTest(parameterized.TestCase):

  @parameterized.parameters(
      dict(num_roots=1, length=37), dict(num_roots=2, length=64), dict(num_roots=4, length=23))
  def test_parallel_scan_step_agree(self, num_roots, length):
    # Two layers in the base config (stacking); one for the other root counts (compile time).
    config = dataclasses.replace(BASE, num_roots=num_roots,
                                 num_layers=BASE.num_layers if num_roots == 2 else 1)
    mem = _assert_forms_agree(config, _tokens(num_roots, 2, length), check_prefill=True)
    assert int(mem.num_tokens) == length
    assert int(mem.num_sealed) == length // 16 and int(mem.fill) == length % 16

  @parameterized.named_parameters(
      ("rerank_and_sink", dict(leaf_rerank=True, read_sink=True, tree_merge="mean")),
      ("wide_search", dict(leaf_rerank=True, search_width=4)),
      # More representatives than a leaf has tokens: empty slots at the leaves.
      ("node_reps", dict(leaf_rerank=True, node_reps=24)),
      ("summaries_only", dict(route_descend=False, use_exact_read=False)),
      ("all_conv_lags", dict(memory_lags=0)))  # The default reads two lags.
  def test_routing_modes_agree(self, overrides):
    config = dataclasses.replace(BASE, num_layers=1, **overrides)
    _assert_forms_agree(config, _tokens(3, 2, 53), check_prefill="node_reps" in overrides)

  def test_associative_trunk_agrees_with_scan_forms(self):
    config = dataclasses.replace(BASE, scan_impl="associative", num_layers=1)
    _assert_forms_agree(config, _tokens(5, 2, 40), check_step=False)

  @settings(max_examples=4, deadline=None)
  @given(seed=st.integers(0, 10_000))
  def test_forms_agree_on_random_inputs(self, seed):
    _assert_forms_agree(BASE, _tokens(seed, 2, 64), check_step=False)  # Compiled once (T 64).

  def test_prefill_then_step_then_scan_from_mid_leaf(self):
    """Scan continues from any live-leaf fill, and step continues from a scan."""
    model, params, parallel, scan, step = _compiled(BASE)
    tokens = _tokens(7, 2, 64)
    logits_p, _ = parallel(params, tokens)
    memory = init_memory(BASE, 2)
    a, memory, _ = scan(params, tokens[:, :21], memory)          # ends mid-leaf (fill 5)
    b, _, memory, _ = _run_steps(step, params, tokens[:, 21:30], memory)  # crosses into fill 14
    c, memory, _ = scan(params, tokens[:, 30:], memory)          # chunks straddle leaf edges
    np.testing.assert_allclose(jnp.concatenate([a, b, c], 1), logits_p, atol=1e-4, rtol=0)

  def test_prefill_continues_a_memory_at_a_leaf_boundary(self):
    """Prefill picks up where scan left a memory at a leaf boundary, step continues after it;
    a memory mid-leaf or a block that is no multiple of the leaf is refused, and a traced
    mid-leaf memory gives NaN logits."""
    model, params, parallel, scan, step = _compiled(BASE)
    tokens = _tokens(8, 2, 64)
    logits_p, _ = parallel(params, tokens)
    a, memory, _ = scan(params, tokens[:, :16], init_memory(BASE, 2))
    b, memory, _ = _prefill(BASE)(params, tokens[:, 16:56], memory)   # 1 block + 8 by scan
    c, _, _, _ = _run_steps(step, params, tokens[:, 56:], memory)
    np.testing.assert_allclose(jnp.concatenate([a, b, c], 1), logits_p, atol=1e-4, rtol=0)
    _, mid, _ = scan(params, tokens[:, :20], init_memory(BASE, 2))
    with self.assertRaisesRegex(ValueError, "prefill starts at a leaf boundary.*20 tokens"):
      model.apply(params, tokens[:, 20:52], mid, method=model.prefill, block=32)
    for bad in (0, 24, 2.0, True):
      with self.assertRaisesRegex(ValueError, "block must be a positive multiple of leaf_size"):
        model.apply(params, tokens, init_memory(BASE, 2), method=model.prefill, block=bad)
    traced, _, _ = _prefill(BASE)(params, tokens[:, 20:60], mid)       # Compiled above.
    self.assertTrue(np.all(np.isnan(np.asarray(traced)[:, :32])))

  def test_step_does_not_recompile(self):
    model, params, *_ = _compiled(BASE)
    step = jax.jit(chex.assert_max_traces(
        lambda v, t, m: model.apply(v, t, m, method=model.step), n=1))
    memory = init_memory(BASE, 2)
    for i in range(20):  # crosses a seal
      _, memory = step(params, jnp.full((2,), i % V, jnp.int32), memory)


def _node(flat, num_leaves):
  """(level, index) of a flat level-major node index."""
  level = 0
  while flat >= (num_leaves >> level):
    flat -= num_leaves >> level
    level += 1
  return level, flat


class RoutePathTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("beam", dict()), ("rerank_beam4", dict(leaf_rerank=True, beam_width=4)),
      ("summaries_only", dict(route_descend=False, use_exact_read=False)),
      ("documents", dict(), True))
  def test_path_descends_to_the_selected_leaf(self, overrides, documents=False):
    """Each layer's path starts at a Fenwick node of the query's leaf c, then steps to a child of
    the node before, and its last node is an ancestor-or-self of the selected top leaf (also in
    a stream whose second document starts at leaf 3, where the router hides the first)."""
    config = dataclasses.replace(BASE, **overrides)
    _, params, parallel, _, _ = _compiled(config)
    segments = None
    if documents:
      segments = jnp.broadcast_to((jnp.arange(128) >= 48).astype(jnp.int32), (2, 128))
    _, aux = parallel(params, _tokens(24, 2, 128), segments=segments)
    paths, top = np.asarray(_paths_of(aux)), np.asarray(_leaves_of(aux))[..., 0]
    n = config.num_leaves
    steps = paths.shape[-1]
    qleaf = np.arange(128) // 16
    for index in np.ndindex(*top.shape):
      path, leaf, c = paths[index], top[index], qleaf[index[2]]
      where = f"layer, row, position, head {index}: path {path}, leaf {leaf}"
      length = int(np.sum(path >= 0))
      np.testing.assert_array_equal(path[length:], -1, err_msg=where)
      # Nothing visible (the first leaf of the stream or of a document): no path, no leaf.
      first = 3 if documents and c >= 3 else 0
      assert (length == 0) == (c == first), where
      if config.route_descend:
        assert (leaf >= 0) == (length > 0), where
      else:
        assert length <= 1 and leaf == -1, where
      if length == 0:
        continue
      nodes = [_node(f, n) for f in path[:length]]
      level, i = nodes[0]
      assert (c >> level) & 1 and i == (c >> (level + 1)) << 1, where  # a Fenwick node of c
      for (parent_level, parent), (child_level, child) in zip(nodes, nodes[1:]):
        assert child_level == parent_level - 1 and child >> 1 == parent, where
      if config.route_descend:
        last_level, last = nodes[-1]
        assert last_level == 0 and last == leaf, where  # the top leaf itself
        assert first <= leaf < c, where
    assert steps == max(n.bit_length() - 2, 0) + 1


class CausalityTest(parameterized.TestCase):

  @parameterized.parameters(3, 15, 16, 17, 31, 47)
  def test_future_tokens_never_change_the_past(self, t):
    _, params, parallel, _, _ = _compiled(BASE)
    tokens = _tokens(11, 2, 64)
    future = tokens.at[:, t + 1:].set((tokens[:, t + 1:] + 5) % V)
    a, aux_a = parallel(params, tokens)
    b, aux_b = parallel(params, future)
    np.testing.assert_allclose(a[:, :t + 1], b[:, :t + 1], atol=1e-6, rtol=0)
    np.testing.assert_array_equal(_leaves_of(aux_a)[:, :, :t + 1], _leaves_of(aux_b)[:, :, :t + 1])
    assert float(jnp.max(jnp.abs(a[:, t + 1:] - b[:, t + 1:]))) > 1e-3

  def test_memory_reads_only_sealed_leaves(self):
    _, params, parallel, _, _ = _compiled(BASE)
    _, aux = parallel(params, _tokens(12, 2, 64))
    leaves = np.asarray(_leaves_of(aux))  # [layers, B, T, H, K]
    qleaf = (np.arange(64) // 16)[None, None, :, None, None]
    valid = leaves >= 0
    assert np.all(np.broadcast_to(qleaf, leaves.shape)[valid] > leaves[valid])
    assert not np.any(valid[:, :, :16])  # nothing is sealed while the first leaf fills


class SealingTest(parameterized.TestCase):

  @parameterized.parameters(16, 17, 33)
  def test_leaf_boundaries_and_token_cache(self, n):
    """After n tokens (a scan over n - 1, then one step) against the memory before the step."""
    _, params, _, scan, step = _compiled(BASE)
    tokens = _tokens(13, 2, n)
    _, before, _ = scan(params, tokens[:, :n - 1], init_memory(BASE, 2))
    _, memory, _ = step(params, tokens[:, n - 1], before)
    sealed = n // 16
    assert int(memory.num_sealed) == sealed and int(memory.fill) == n % 16
    for layer, prev in zip(memory.layers, before.layers):
      cache = np.asarray(layer.cache.k_BNLHE)
      assert np.all(cache[:, sealed:] == 0)          # nothing beyond the sealed leaves
      assert np.all(np.abs(cache[:, :sealed]).sum((2, 3, 4)) > 0)
      live = np.asarray(layer.live.k_BLHE)
      assert np.all(live[:, n % 16:] == 0) and np.all(np.abs(live[:, :n % 16]).sum((2, 3)) > 0)
      if n % 16 == 0:   # the token that completes a leaf moves the live buffer into the cache
        np.testing.assert_array_equal(cache[:, sealed - 1, :15], np.asarray(prev.live.k_BLHE)[:, :15])
      else:             # keys of sealed leaves never change afterwards
        np.testing.assert_array_equal(layer.cache.k_BNLHE, prev.cache.k_BNLHE)
    spans = np.asarray(memory.node_span_S2)
    assert (spans[:, 0] >= 0).sum() == sum(sealed >> l for l in range(8))

  def test_too_long_raises(self):
    model, params, parallel, scan, step = _compiled(BASE)
    with pytest.raises(ValueError, match="max_seq_len"):
      model.apply(params, _tokens(0, 1, 129))
    memory = init_memory(BASE, 1)
    _, memory = model.apply(params, _tokens(0, 1, 128), memory, method=model.scan)
    with pytest.raises(ValueError, match="max_seq_len"):
      model.apply(params, jnp.zeros((1,), jnp.int32), memory, method=model.step)
    with pytest.raises(ValueError, match="rank 2"):
      model.apply(params, jnp.zeros((4,), jnp.int32))

  def test_memory_round_trips_through_orbax(self, tmp_path=None):
    import tempfile
    _, params, _, scan, _ = _compiled(BASE)
    _, memory, _ = scan(params, _tokens(3, 2, 40), init_memory(BASE, 2))
    with tempfile.TemporaryDirectory() as d:
      ckpt = ocp.StandardCheckpointer()
      ckpt.save(f"{d}/mem", memory)
      ckpt.wait_until_finished()
      restored = ckpt.restore(f"{d}/mem", jax.eval_shape(lambda: memory))
    chex.assert_trees_all_equal(restored, memory)
    assert restored.leaf_size == memory.leaf_size


class SourcesTest(parameterized.TestCase):

  def test_each_source_changes_logits_and_only_what_it_should(self):
    config = dataclasses.replace(BASE, num_roots=3)
    _, params, parallel, _, _ = _compiled(config)
    tokens = _tokens(21, 2, 64)
    full, aux = parallel(params, tokens)
    for iv in (Interventions(drop=("tree",)), Interventions(drop=("exact",))):
      out, aux_i = parallel(params, tokens, interventions=iv)
      # Memory is empty in the first leaf: nothing changes there; later, logits change.
      np.testing.assert_array_equal(out[:, :16], full[:, :16])
      assert float(jnp.max(jnp.abs(out[:, 16:] - full[:, 16:]))) > 1e-4
      # The first layer routes before fusing, so its selection is untouched.
      np.testing.assert_array_equal(aux_i.routes[0].leaves, aux.routes[0].leaves)
    out, aux_r = parallel(params, tokens, interventions=Interventions(root_drop=(2,)))
    assert float(jnp.max(jnp.abs(out[:, :16] - full[:, :16]))) > 1e-4
    np.testing.assert_array_equal(aux_r.roots[0][:, :, :2], aux.roots[0][:, :, :2])

  def test_config_switch_equals_intervention(self):
    config = dataclasses.replace(BASE, use_exact_read=False)
    _, params, parallel, _, _ = _compiled(BASE)
    _, _, parallel_off, _, _ = _compiled(config)
    tokens = _tokens(22, 2, 64)
    a, _ = parallel(params, tokens, interventions=Interventions(drop=("exact",)))
    b, aux_off = parallel_off(params, tokens)
    np.testing.assert_allclose(a, b, atol=1e-6)
    # A switched-off source is no source of the model: no gate, no diagnostic, nothing to drop.
    assert aux_off.gates[0].shape[-1] == 2
    assert "layer_0/gate_exact" not in aux_off.metrics and "layer_0/gate_tree" in aux_off.metrics
    with pytest.raises(ValueError, match="names source 'exact'"):
      parallel_off(params, tokens, interventions=Interventions(drop=("exact",)))
    with pytest.raises(ValueError, match="names source 'exakt'"):
      parallel(params, tokens, interventions=Interventions(drop=("exakt",)))

  def test_no_memory_config_has_no_routing(self):
    config = dataclasses.replace(BASE, use_tree_read=False, use_exact_read=False)
    _, params, parallel, _, _ = _compiled(config)
    _, aux = parallel(params, _tokens(1, 1, 40))
    assert all(r is None for r in aux.routes)

  def test_heads_differ_at_init(self):
    _, params, parallel, _, _ = _compiled(BASE)
    _, aux = parallel(params, _tokens(23, 2, 64))
    assert float(aux.metrics["layer_0/head_disagreement"]) > 0.1
    assert float(aux.metrics["layer_0/root_similarity"]) < 0.9


class TrainingSignalTest(parameterized.TestCase):

  def test_router_gets_gradient_through_selection_weights(self):
    config = dataclasses.replace(BASE, teacher_weight=0.0, use_tree_read=False, num_layers=1)
    model, params, _, _, _ = _compiled(config)
    tokens = _tokens(31, 2, 64)

    def loss(p):
      logits, _ = model.apply(p, tokens)
      return -jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    grads = jax.jit(jax.grad(loss))(params)["params"]["layer_0"]["memory_proj"]["kernel"]
    h, e, p = config.num_route_heads, config.read_dim, config.key_dim
    rq, rk = grads[:, 3 * h * e:3 * h * e + h * p], grads[:, 3 * h * e + h * p:3 * h * e + 2 * h * p]
    assert float(jnp.abs(rq).sum()) > 0, "no gradient reaches the routing queries"
    assert float(jnp.abs(rk).sum()) > 0, "no gradient reaches the routing keys"

  def test_remat_and_query_blocks_change_no_value_or_gradient(self):
    # One layer: the blocks are per layer, and each variant compiles a full train step.
    config = dataclasses.replace(BASE, num_layers=1, train_beam_width=4, leaf_rerank=True)
    tokens = _tokens(35, 2, 64)
    mask = jnp.zeros((2, 64)).at[:, 40:].set(1.0)
    params = KernelModel(config).init(jax.random.PRNGKey(0), tokens)

    def objective(p, model):
      logits, aux = model.apply(p, tokens, train=True, loss_mask=mask)
      loss = -jnp.mean(jax.nn.log_softmax(logits)[..., 1]) + aux.losses["teacher"]
      return loss, aux.routes

    # Blocks of 24 queries over 64 positions: three blocks, the last one padded.
    variants = [dict(query_block=0), dict(remat=True, query_block=0), dict(query_block=24)]
    results = [jax.jit(jax.value_and_grad(functools.partial(objective, model=KernelModel(
        dataclasses.replace(config, **v))), has_aux=True))(params) for v in variants]
    (v0, r0), g0 = results[0]
    for (v1, r1), g1 in results[1:]:
      np.testing.assert_allclose(v1, v0, rtol=1e-6)
      chex.assert_trees_all_close(g1, g0, rtol=1e-4, atol=1e-6)
      for a1, a0 in zip(r1, r0):
        np.testing.assert_array_equal(a1.leaves, a0.leaves)
        np.testing.assert_allclose(a1.read_probs, a0.read_probs, rtol=1e-5, atol=1e-6)
      proj = g1["params"]["layer_0"]["memory_proj"]["kernel"]
      assert float(jnp.abs(proj).sum()) > 0

  def test_training_mode_adds_teacher_and_wide_beam(self):
    config = dataclasses.replace(BASE, train_beam_width=4)
    _, params, parallel, _, _ = _compiled(config)
    tokens = _tokens(32, 2, 64)
    _, aux_eval = parallel(params, tokens)
    _, aux_train = parallel(params, tokens, train=True)
    assert aux_eval.routes[0].leaves.shape[-1] == 2
    assert aux_train.routes[0].leaves.shape[-1] == 4
    assert "teacher" in aux_train.losses and float(aux_train.losses["teacher"]) > 0
    assert not aux_eval.losses

  def test_teacher_trains_at_the_scored_positions(self):
    config = dataclasses.replace(BASE, train_beam_width=4)
    model = KernelModel(config)
    tokens = _tokens(34, 2, 64)
    params = model.init(jax.random.PRNGKey(0), tokens)
    mask = jnp.zeros((2, 64)).at[:, 50].set(1.0)

    def teacher(params, loss_mask, model=model):
      _, aux = model.apply(params, tokens, train=True, loss_mask=loss_mask)
      return aux.losses["teacher"]

    every = teacher(params, None)
    np.testing.assert_allclose(teacher(params, jnp.ones((2, 64))), every, rtol=1e-6)
    scored = teacher(params, mask)
    assert abs(float(scored) - float(every)) > 1e-4
    # 'all' ignores the mask.
    model_all = KernelModel(dataclasses.replace(config, teacher_positions="all"))
    np.testing.assert_allclose(teacher(params, mask, model_all), every, rtol=1e-6)
    # A teacher at S < T positions: with a mask it still holds every scored position (same
    # loss); without one it trains at S spread positions (another loss, same scale).
    few = KernelModel(dataclasses.replace(config, teacher_queries=8))
    np.testing.assert_allclose(teacher(params, mask, few), scored, rtol=1e-6)
    spread = teacher(params, None, few)
    assert abs(float(spread) - float(every)) > 1e-4 and 0.2 < float(spread / every) < 5
    # The salience loss rides on the same teacher positions, and only when weighted.
    sal = KernelModel(dataclasses.replace(config, salience_weight=0.5))
    _, aux = sal.apply(params, tokens, train=True, loss_mask=mask)
    assert set(aux.losses) == {"teacher", "salience"} and float(aux.losses["salience"]) > 0
    _, aux = model.apply(params, tokens, train=True, loss_mask=mask)
    assert set(aux.losses) == {"teacher"}

  def test_oracle_routes_are_read(self):
    _, params, parallel, _, _ = _compiled(BASE)
    tokens = _tokens(33, 2, 64)
    oracle = jnp.full((2, 64, 2), -1, jnp.int32)
    oracle = oracle.at[:, 40:, 0].set(1).at[:, 50, 1].set(0).at[:, 20, 0].set(3)  # 3 is unsealed at t=20
    out, aux = parallel(params, tokens, oracle_leaves=oracle)
    base, aux_base = parallel(params, tokens)
    for a, ab in zip(aux.routes, aux_base.routes):
      leaves = np.asarray(a.leaves)
      assert np.all(leaves[:, 40:, :, 0] == 1)
      others = np.r_[40:50, 51:64]
      assert np.all(leaves[:, others, :, 1] == -1) and np.all(leaves[:, 50, :, 1] == 0)
      np.testing.assert_allclose(a.weights[:, 50], 0.5)
      np.testing.assert_array_equal(leaves[:, :40], np.asarray(ab.leaves)[:, :40])
    np.testing.assert_array_equal(out[:, :40], base[:, :40])
    assert float(jnp.max(jnp.abs(out[:, 40:] - base[:, 40:]))) > 1e-5

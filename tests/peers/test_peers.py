"""Tests for the dense and sliding-window peer models."""

import dataclasses

from absl.testing import absltest
from absl.testing import parameterized
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from memkernel.peers import model as peers

_T = 37  # not a multiple of the window
_WINDOW = 8


def _config(kind: str, **overrides) -> peers.PeerConfig:
  values = dict(kind=kind, vocab_size=32, d_model=32, num_layers=2, num_heads=4, mlp_ratio=2,
                window=_WINDOW, max_seq_len=64)
  values.update(overrides)
  return peers.PeerConfig(**values)


def _tokens(seed: int, batch: int = 2, seq_len: int = _T, vocab: int = 32) -> jax.Array:
  return jax.random.randint(jax.random.PRNGKey(seed), (batch, seq_len), 0, vocab, dtype=jnp.int32)


def _init(model: nn.Module, tokens: jax.Array):
  return model.init(jax.random.PRNGKey(0), tokens)["params"]


def _logits(model: nn.Module, params, tokens: jax.Array) -> jax.Array:
  return model.apply({"params": params}, tokens)[0]


def _param_shapes(model: nn.Module, tokens: jax.Array):
  return jax.eval_shape(lambda t: _init(model, t), tokens)


class AttentionFunctionTest(parameterized.TestCase):

  @parameterized.parameters((37, 8), (32, 8), (5, 8), (20, 3))
  def test_blockwise_matches_band_mask(self, seq_len, window):
    q, k, v = jax.random.normal(jax.random.PRNGKey(seq_len * 100 + window), (3, 2, seq_len, 2, 4))
    blockwise = jax.jit(peers.blockwise_sliding_window_attention, static_argnums=3)
    banded = jax.jit(peers.banded_attention, static_argnums=3)
    out = blockwise(q, k, v, window)
    chex.assert_shape(out, (2, seq_len, 2, 4))
    chex.assert_trees_all_close(out, banded(q, k, v, window), atol=1e-5)

  def test_band_mask_with_large_window_is_causal_attention(self):
    q, k, v = jax.random.normal(jax.random.PRNGKey(1), (3, 1, 11, 2, 4))
    banded = jax.jit(peers.banded_attention, static_argnums=3)
    chex.assert_trees_all_close(banded(q, k, v, 11), jax.jit(peers.causal_attention)(q, k, v),
                                atol=1e-5)

  @parameterized.parameters((37, 8), (32, 8), (5, 8))
  def test_blocked_causal_attention_matches_causal_attention(self, seq_len, block):
    q, k, v = jax.random.normal(jax.random.PRNGKey(seq_len + block), (3, 2, seq_len, 2, 4))
    blocked = jax.jit(peers.blocked_causal_attention, static_argnums=3)
    expected = jax.jit(peers.causal_attention)(q, k, v)
    chex.assert_trees_all_close(blocked(q, k, v, block), expected, atol=1e-5)
    # And its gradient, which the blocks recompute.
    loss = lambda fn: lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))
    grads = jax.jit(jax.grad(loss(lambda *a: peers.blocked_causal_attention(*a, block)),
                             argnums=(0, 1, 2)))(q, k, v)
    chex.assert_trees_all_close(
        grads, jax.grad(loss(peers.causal_attention), argnums=(0, 1, 2))(q, k, v), atol=1e-5)

  def test_blocking(self):
    self.assertEqual(peers.sliding_window_blocking(37, 8), (8, 5, 16))
    self.assertEqual(peers.sliding_window_blocking(32, 8), (8, 4, 16))
    self.assertEqual(peers.sliding_window_blocking(6, 8), (6, 1, 6))


class PeerModelTest(parameterized.TestCase):

  @parameterized.parameters("dense", "sliding_window")
  def test_shapes_and_aux(self, kind):
    config = _config(kind)
    model = peers.build_peer(config)
    tokens = _tokens(0)
    params = _init(model, tokens)
    logits, aux = model.apply({"params": params}, tokens, oracle_leaves=None, train=True)
    chex.assert_shape(logits, (2, _T, config.vocab_size))
    self.assertEqual(logits.dtype, jnp.float32)
    chex.assert_tree_all_finite(logits)
    self.assertEqual(aux, {"losses": {}, "metrics": {}})

  def test_build_peer_kinds_share_parameter_layout(self):
    dense = peers.build_peer(_config("dense"))
    sliding = peers.build_peer(_config("sliding_window"))
    self.assertIsInstance(dense, peers.DenseTransformer)
    self.assertIsInstance(sliding, peers.SlidingWindowTransformer)
    tokens = _tokens(0)
    shapes = lambda m: jax.tree.map(lambda x: x.shape, _param_shapes(m, tokens))
    self.assertEqual(shapes(dense), shapes(sliding))
    # Parameter shapes do not depend on max_seq_len.
    longer = peers.build_peer(_config("dense", max_seq_len=4096))
    self.assertEqual(shapes(dense), shapes(longer))

  @parameterized.parameters("dense", "sliding_window")
  def test_causality(self, kind):
    model = peers.build_peer(_config(kind))
    tokens = _tokens(0)
    params = _init(model, tokens)
    cut = 20
    perturbed = tokens.at[:, cut + 1:].set(_tokens(1)[:, cut + 1:])
    logits, perturbed_logits = _logits(model, params, tokens), _logits(model, params, perturbed)
    chex.assert_trees_all_close(logits[:, :cut + 1], perturbed_logits[:, :cut + 1], atol=1e-5)
    self.assertGreater(float(jnp.max(jnp.abs(logits[:, cut + 1:] - perturbed_logits[:, cut + 1:]))),
                       1e-3)

  def test_dense_query_blocks_change_no_logit(self):
    tokens = _tokens(3)
    model = peers.build_peer(_config("dense"))
    params = _init(model, tokens)
    blocked = peers.build_peer(_config("dense", query_block=16))
    chex.assert_trees_all_close(_logits(blocked, params, tokens), _logits(model, params, tokens),
                                atol=1e-5)
    with self.assertRaisesRegex(ValueError, "query_block"):
      _config("dense", query_block=-1)

  def test_sliding_window_matches_dense_band_mask(self):
    config = _config("sliding_window")
    tokens = _tokens(2)
    sliding = peers.SlidingWindowTransformer(config)
    params = _init(sliding, tokens)
    reference = _logits(peers.DenseTransformer(config), params, tokens)
    logits = _logits(sliding, params, tokens)
    chex.assert_trees_all_close(logits, reference, atol=1e-5)
    # The window really limits the view: full causal attention gives different logits.
    dense = _logits(peers.DenseTransformer(_config("dense")), params, tokens)
    self.assertGreater(float(jnp.max(jnp.abs(dense - logits))), 1e-3)

  @parameterized.parameters(_T, 64)
  def test_window_covering_sequence_equals_dense(self, window):
    tokens = _tokens(3)
    dense = peers.DenseTransformer(_config("dense"))
    params = _init(dense, tokens)
    sliding = peers.SlidingWindowTransformer(_config("sliding_window", window=window))
    chex.assert_trees_all_close(_logits(sliding, params, tokens), _logits(dense, params, tokens),
                                atol=1e-5)

  def test_sliding_window_rejects_dense_config(self):
    model = peers.SlidingWindowTransformer(_config("dense"))
    with self.assertRaisesRegex(ValueError, "kind"):
      _init(model, _tokens(0))

  def test_rejects_sequence_longer_than_max_seq_len(self):
    model = peers.build_peer(_config("dense", max_seq_len=16))
    with self.assertRaisesRegex(ValueError, "max_seq_len"):
      _init(model, _tokens(0))

  @parameterized.parameters("dense", "sliding_window")
  def test_adam_reduces_loss(self, kind):
    # Trivial task: the next token is the current token + 1 (mod V).
    config = _config(kind, num_layers=1)
    model = peers.build_peer(config)
    start = jax.random.randint(jax.random.PRNGKey(4), (8, 1), 0, config.vocab_size)
    sequence = (start + jnp.arange(17)[None, :]) % config.vocab_size
    inputs, targets = sequence[:, :-1], sequence[:, 1:]
    params = _init(model, inputs)
    optimizer = optax.adam(1e-2)

    def loss_fn(p):
      logits, aux = model.apply({"params": p}, inputs, train=True)
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
      return loss + sum(aux.losses.values())

    @jax.jit
    def step(p, opt_state):
      loss, grads = jax.value_and_grad(loss_fn)(p)
      updates, opt_state = optimizer.update(grads, opt_state, p)
      return optax.apply_updates(p, updates), opt_state, loss

    opt_state = optimizer.init(params)
    losses = []
    for _ in range(20):
      params, opt_state, loss = step(params, opt_state)
      losses.append(float(loss))
    self.assertTrue(np.all(np.isfinite(losses)))
    self.assertLess(losses[-1], 0.3 * losses[0])


class PeerConfigTest(parameterized.TestCase):

  @parameterized.parameters(
      ("kind", "mamba"), ("vocab_size", 0), ("d_model", -4), ("num_layers", 0), ("num_heads", 0),
      ("num_heads", 3), ("num_heads", 32), ("mlp_ratio", 1.5), ("window", 0), ("max_seq_len", 0),
      ("window", True))
  def test_invalid_field_raises(self, field, value):
    base = dict(kind="dense", d_model=32)
    base[field] = value
    with self.assertRaisesRegex(ValueError, rf"PeerConfig\.{field}.*{value!r}"):
      peers.PeerConfig(**base)

  def test_from_dict(self):
    config = peers.PeerConfig.from_dict({"kind": "sliding_window", "window": 16})
    self.assertEqual(config, peers.PeerConfig(kind="sliding_window", window=16))
    self.assertEqual(peers.PeerConfig.from_dict(config.to_dict()), config)
    with self.assertRaisesRegex(ValueError, "windw"):
      peers.PeerConfig.from_dict({"kind": "dense", "windw": 16})

  def test_config_is_frozen(self):
    with self.assertRaises(dataclasses.FrozenInstanceError):
      peers.PeerConfig(kind="dense").window = 3  # type: ignore[misc]


class CountTest(parameterized.TestCase):

  def test_count_params_known_pytree(self):
    params = nn.Dense(3).init(jax.random.PRNGKey(0), jnp.ones((1, 2)))["params"]
    self.assertEqual(peers.count_params(params), 2 * 3 + 3)
    self.assertEqual(peers.count_params({"a": jnp.ones((2, 5)), "b": [jnp.ones(7), 1.0]}), 18)

  def test_count_params_of_peer(self):
    config = _config("dense")
    d, v, r = config.d_model, config.vocab_size, config.mlp_ratio
    per_layer = 4 * d * d + 2 * r * d * d + 2 * d  # q, k, v, out; mlp in/out; two norm scales
    expected = v * d + config.num_layers * per_layer + d + d * v
    params = _param_shapes(peers.build_peer(config), _tokens(0))
    self.assertEqual(peers.count_params(params), expected)

  def test_peer_flops(self):
    d, v, t = 32, 32, 40
    dense = _config("dense", num_layers=1, mlp_ratio=2)
    base = 8 * t * d * d + 8 * t * d * d + 2 * t * d * v  # projections, mlp, head
    self.assertEqual(peers.peer_flops(dense, t), base + 4 * t * t * d)
    sliding = _config("sliding_window", num_layers=1, mlp_ratio=2, window=8)
    self.assertEqual(peers.peer_flops(sliding, t), base + 4 * t * 16 * d)
    # T = 37 is padded to 5 blocks of 8: 40 queries, 16 keys each.
    dense_37 = _config("dense", num_layers=1, mlp_ratio=2)
    self.assertEqual(peers.peer_flops(sliding, 37) - peers.peer_flops(dense_37, 37),
                     4 * 40 * 16 * d - 4 * 37 * 37 * d)
    # A window covering the sequence computes one causal block, like dense.
    self.assertEqual(peers.peer_flops(_config("sliding_window", num_layers=1, mlp_ratio=2,
                                              window=64), 37), peers.peer_flops(dense_37, 37))
    # Linear in T for the sliding window: doubling T doubles the cost.
    self.assertEqual(peers.peer_flops(sliding, 2 * t), 2 * peers.peer_flops(sliding, t))


if __name__ == "__main__":
  absltest.main()

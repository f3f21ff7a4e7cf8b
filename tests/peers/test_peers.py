"""Tests for the dense and sliding-window peer models (parallel form), their config and size."""

import dataclasses

from absl.testing import absltest
from absl.testing import parameterized
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from memkernel import peers
from memkernel.optim import count_params
from memkernel.outputs import Outputs

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
  return jax.jit(lambda p, t: model.apply({"params": p}, t)[0])(params, tokens)


def _param_shapes(model: nn.Module, tokens: jax.Array):
  return jax.eval_shape(lambda t: _init(model, t), tokens)


def _max_change(a: jax.Array, b: jax.Array) -> float:
  return float(jnp.max(jnp.abs(a - b)))


class PeerModelTest(parameterized.TestCase):

  @parameterized.parameters("dense", "sliding_window")
  def test_outputs_are_typed_and_empty(self, kind):
    config = _config(kind)
    model = peers.build_peer(config)
    tokens = _tokens(0)
    params = _init(model, tokens)
    logits, out = model.apply({"params": params}, tokens, oracle_leaves=None, train=True)
    chex.assert_shape(logits, (2, _T, config.vocab_size))
    self.assertEqual(logits.dtype, jnp.float32)
    chex.assert_tree_all_finite(logits)
    self.assertIsInstance(out, Outputs)
    self.assertEqual((out.losses, out.metrics, out.routes, out.gates, out.memory),
                     ({}, {}, None, None, None))

  def test_build_peer_kinds_share_parameter_layout(self):
    dense = peers.build_peer(_config("dense"))
    sliding = peers.build_peer(_config("sliding_window"))
    self.assertIsInstance(dense, peers.DenseTransformer)
    self.assertIsInstance(sliding, peers.SlidingWindowTransformer)
    tokens = _tokens(0)
    shapes = lambda m: jax.tree.map(lambda x: x.shape, _param_shapes(m, tokens))
    self.assertEqual(shapes(dense), shapes(sliding))
    # The layout checkpoints hold: named blocks of named projections.
    self.assertEqual(sorted(shapes(dense)), ["block_0", "block_1", "embed", "final_norm",
                                             "lm_head"])
    self.assertEqual(sorted(shapes(dense)["block_0"]),
                     ["attention_norm", "attention_out", "key", "mlp_in", "mlp_norm", "mlp_out",
                      "query", "value"])
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
    self.assertGreater(_max_change(logits[:, cut + 1:], perturbed_logits[:, cut + 1:]), 1e-3)

  def test_sliding_window_forgets_tokens_out_of_reach(self):
    # One layer sees window tokens (itself included); L layers reach back L * (window - 1).
    config = _config("sliding_window")
    model = peers.build_peer(config)
    tokens = _tokens(0)
    params = _init(model, tokens)
    cut = 5
    perturbed = tokens.at[:, :cut + 1].set((tokens[:, :cut + 1] + 1) % config.vocab_size)
    logits, perturbed_logits = _logits(model, params, tokens), _logits(model, params, perturbed)
    reach = cut + config.num_layers * (config.window - 1)
    chex.assert_trees_all_close(logits[:, reach + 1:], perturbed_logits[:, reach + 1:], atol=1e-5)
    self.assertGreater(_max_change(logits[:, reach], perturbed_logits[:, reach]), 1e-3)
    # Dense attention never forgets.
    dense = peers.build_peer(_config("dense"))
    self.assertGreater(_max_change(_logits(dense, params, tokens)[:, -1],
                                   _logits(dense, params, perturbed)[:, -1]), 1e-3)

  def test_dense_query_blocks_change_no_logit(self):
    tokens = _tokens(3)
    model = peers.build_peer(_config("dense"))
    params = _init(model, tokens)
    blocked = peers.build_peer(_config("dense", query_block=16))
    chex.assert_trees_all_close(_logits(blocked, params, tokens), _logits(model, params, tokens),
                                atol=1e-5)

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
    self.assertGreater(_max_change(dense, logits), 1e-3)

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
      logits, out = model.apply({"params": p}, inputs, train=True)
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
      return loss + sum(out.losses.values())

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
      ("window", True), ("query_block", -1), ("boundary", "decay"), ("boundary", "Reset"))
  def test_invalid_field_raises(self, field, value):
    base = dict(kind="dense", d_model=32)
    base[field] = value
    with self.assertRaisesRegex(ValueError, rf"PeerConfig\.{field}.*{value!r}"):
      peers.PeerConfig(**base)

  def test_decay_boundary_says_why(self):
    with self.assertRaisesRegex(ValueError, "nothing to decay.*'reset' or 'carry'"):
      peers.PeerConfig(kind="sliding_window", boundary="decay")

  def test_from_dict(self):
    config = peers.PeerConfig.from_dict({"kind": "sliding_window", "window": 16,
                                         "boundary": "carry"})
    self.assertEqual(config, peers.PeerConfig(kind="sliding_window", window=16, boundary="carry"))
    self.assertEqual(peers.PeerConfig.from_dict(config.to_dict()), config)
    with self.assertRaisesRegex(ValueError, "windw"):
      peers.PeerConfig.from_dict({"kind": "dense", "windw": 16})

  def test_config_is_frozen(self):
    with self.assertRaises(dataclasses.FrozenInstanceError):
      peers.PeerConfig(kind="dense").window = 3  # type: ignore[misc]


class CountTest(parameterized.TestCase):

  def test_count_params_of_peer(self):
    config = _config("dense")
    d, v, r = config.d_model, config.vocab_size, config.mlp_ratio
    per_layer = 4 * d * d + 2 * r * d * d + 2 * d  # q, k, v, out; mlp in/out; two norm scales
    expected = v * d + config.num_layers * per_layer + d + d * v
    params = _param_shapes(peers.build_peer(config), _tokens(0))
    self.assertEqual(count_params(params), expected)


if __name__ == "__main__":
  absltest.main()

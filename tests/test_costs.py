"""`memkernel.costs` for every registered family: parameters and state bytes are exact."""

import dataclasses

import jax
import jax.numpy as jnp
from absl.testing import absltest
from absl.testing import parameterized

from memkernel import costs
from memkernel import family
from memkernel import optim
from memkernel.kernel import KernelConfig
from memkernel.peers import PeerConfig

_CONFIGS = {
    "kernel": KernelConfig(vocab_size=32, d_model=32, num_layers=1, num_roots=2, max_seq_len=64,
                           teacher_weight=0.0),
    "dense": PeerConfig(kind="dense", vocab_size=32, d_model=32, num_layers=2, max_seq_len=64),
    "sliding_window": PeerConfig(kind="sliding_window", vocab_size=32, d_model=32, num_layers=2,
                                 window=16, max_seq_len=64),
}


class CostsTest(parameterized.TestCase):

  @parameterized.named_parameters(*((name, name) for name in _CONFIGS))
  def test_params_and_state_equal_the_built_model(self, name):
    config = _CONFIGS[name]
    model = family.build(config)
    params = model.init(jax.random.key(0), jnp.zeros((1, 16), jnp.int32))["params"]
    self.assertEqual(costs.num_params(config), optim.count_params(params))
    memory = family.init_memory(config, 1)
    self.assertEqual(costs.state_bytes(config),
                     sum(x.nbytes for x in jax.tree_util.tree_leaves(memory)))
    self.assertLessEqual(costs.state_bytes_read(config), costs.state_bytes(config))
    self.assertGreater(costs.flops(config, 64), 0)
    self.assertGreater(costs.flops(config, 1, form="recurrent"), 0)

  def test_state_grows_with_the_capacity_except_the_ring(self):
    grow = lambda c: costs.state_bytes(dataclasses.replace(c, max_seq_len=1024)) / \
        costs.state_bytes(c)
    self.assertGreater(grow(_CONFIGS["kernel"]), 8)
    self.assertGreater(grow(_CONFIGS["dense"]), 15)
    self.assertEqual(grow(_CONFIGS["sliding_window"]), 1.0)

  def test_the_kernel_reads_less_state_without_its_reads(self):
    config = _CONFIGS["kernel"]
    full = costs.state_bytes_read(config)
    self.assertEqual(full, costs.state_bytes(config))
    no_exact = costs.state_bytes_read(config, ("exact",))
    trunk_only = costs.state_bytes_read(config, ("exact", "tree"))
    self.assertLess(trunk_only, no_exact)
    self.assertLess(no_exact, full)

  def test_only_attention_declares_activation_bytes(self):
    self.assertIsNone(costs.activation_bytes(_CONFIGS["kernel"], 64, 1))
    self.assertGreater(costs.activation_bytes(_CONFIGS["dense"], 64, 1), 0)


if __name__ == "__main__":
  absltest.main()

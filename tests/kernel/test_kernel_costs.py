"""The kernel's analytic costs (`memkernel.kernel.costs`, through `memkernel.costs`)."""

import dataclasses

import jax
import jax.numpy as jnp
from absl.testing import absltest

from memkernel import costs
from memkernel import peers
from memkernel.kernel import KernelConfig, KernelModel
from memkernel.kernel import costs as kernel_costs
from memkernel.kernel import routing
from memkernel.kernel import state as state_lib


class FlopsTest(absltest.TestCase):
  """The kernel's analytic FLOP count: a + b log2(T) per token, not O(T)."""

  def _config(self, length, **overrides):
    values = dict(vocab_size=256, d_model=256, num_layers=4, teacher_weight=0.0,
                  max_seq_len=length)
    values.update(overrides)
    return KernelConfig(**values)

  def test_per_token_flops_are_affine_in_log_length(self):
    lengths = [2 ** k for k in range(8, 17)]
    for form in ("parallel", "recurrent"):
      for train in (False, True):
        per_token = [costs.flops(self._config(t), t, form=form, train=train) / t
                     for t in lengths]
        steps = [b - a for a, b in zip(per_token, per_token[1:])]
        self.assertGreater(steps[0], 0)
        for step in steps:
          self.assertAlmostEqual(step, steps[0], delta=1e-9 * per_token[-1])
    big, small = (costs.flops(self._config(t), t) for t in (65536, 8192))
    self.assertLess(big / small, 8 * 1.5)  # O(T^2) would be 64.

  def test_decode_step_is_logarithmic(self):
    per_token = [costs.flops(self._config(t), 1, form="recurrent")
                 for t in (1024, 32768)]
    self.assertLess(per_token[1] / per_token[0], 1.5)
    self.assertGreater(per_token[1], per_token[0])

  def test_teacher_is_quadratic_and_counted(self):
    config = lambda t: self._config(t, teacher_weight=1.0)
    ratio = (costs.flops(config(65536), 65536, train=True)
             / costs.flops(config(8192), 8192, train=True))
    self.assertGreater(ratio, 16)  # O(T log T) would be ~9.

  def test_memory_proj_flops_are_twice_its_parameters_per_token(self):
    for lags in (0, 1, 2):
      config = self._config(1024, memory_lags=lags, shift_init=lags != 1)
      shapes = jax.eval_shape(KernelModel(config).init, jax.random.PRNGKey(0),
                              jnp.zeros((1, 32), jnp.int32))["params"]
      weights = sum(shapes[f"layer_{i}"]["memory_proj"]["kernel"].size
                    for i in range(config.num_layers))
      self.assertEqual(shapes["layer_0"]["memory_proj"]["kernel"].shape[0],
                       (lags or config.conv_width) * config.d_model + config.d_model)
      self.assertEqual(costs.flops_by_part(config, 1024)["memory_proj"],
                       2 * 1024 * weights)

  def test_parts_follow_the_config(self):
    config = self._config(1024)
    parts = costs.flops_by_part(config, 1024)
    self.assertContainsSubset(("trunk", "memory_proj", "summarize", "route", "exact_read", "mlp",
                               "fusion", "head"), parts)
    trunk_only = costs.flops_by_part(
        dataclasses.replace(config, use_tree_read=False, use_exact_read=False), 1024)
    self.assertNotIn("route", trunk_only)
    summaries_only = costs.flops_by_part(
        dataclasses.replace(config, use_exact_read=False, route_descend=False), 1024)
    self.assertNotIn("exact_read", summaries_only)
    self.assertLess(summaries_only["route"], parts["route"])
    self.assertEqual(costs.flops(config, 1024, train=True),
                     3 * costs.flops(config, 1024))
    # Per token, the kernel at 8k costs less than dense attention of the same size.
    dense = peers.PeerConfig(kind="dense", vocab_size=256, d_model=256, num_layers=4,
                             max_seq_len=8192)
    self.assertLess(costs.flops(self._config(8192), 8192), costs.flops(dense, 8192))


  def test_representatives_cost_m_keys_per_candidate_and_their_state(self):
    config = self._config(4096)
    reps = dataclasses.replace(config, node_reps=8)
    c, t = config, 4096
    n = c.num_leaves
    scored = n.bit_length() + routing.num_expansions(n) * 2 * c.beam_width  # candidates per query
    extra = c.num_layers * t * 2 * c.num_route_heads * c.key_dim * 7 * scored
    self.assertEqual(costs.flops_by_part(reps, t)["route"] - costs.flops_by_part(config, t)["route"],
                     extra)
    memory = state_lib.init_memory(reps, 2)
    plain = state_lib.init_memory(config, 2)
    rep_bytes = sum(x.size * 4 for layer in memory.layers
                    for x in (layer.tree.rep_keys_BSHMP, layer.tree.rep_sal_BSHM))
    self.assertEqual(rep_bytes, 2 * c.num_layers * c.num_nodes * c.num_route_heads * 8
                     * (c.key_dim + 1) * 4)
    self.assertEqual(kernel_costs.state_bytes_read(reps, memory, ("exact",))
                     - kernel_costs.state_bytes_read(config, plain, ("exact",)), rep_bytes)


if __name__ == "__main__":
  absltest.main()

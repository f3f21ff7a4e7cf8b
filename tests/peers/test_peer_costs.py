"""The peers' analytic costs (`memkernel.peers.costs`, through `memkernel.costs`)."""

from absl.testing import absltest

from memkernel import costs
from memkernel import peers


def _config(kind: str, **overrides) -> peers.PeerConfig:
  values = dict(kind=kind, vocab_size=32, d_model=32, num_layers=1, num_heads=4, mlp_ratio=2,
                window=8, max_seq_len=64)
  values.update(overrides)
  return peers.PeerConfig(**values)


class FlopsTest(absltest.TestCase):

  def test_parallel_form(self):
    d, v, t = 32, 32, 40
    dense = _config("dense")
    base = 8 * t * d * d + 8 * t * d * d + 2 * t * d * v  # projections, mlp, head
    self.assertEqual(costs.flops(dense, t), base + 4 * t * t * d)
    sliding = _config("sliding_window")
    self.assertEqual(costs.flops(sliding, t), base + 4 * t * 16 * d)
    # T = 37 is padded to 5 blocks of 8: 40 queries, 16 keys each.
    self.assertEqual(costs.flops(sliding, 37) - costs.flops(dense, 37),
                     4 * 40 * 16 * d - 4 * 37 * 37 * d)
    # A window covering the sequence computes one causal block, like dense.
    self.assertEqual(costs.flops(_config("sliding_window", window=64), 37), costs.flops(dense, 37))
    # Linear in T for the sliding window: doubling T doubles the cost.
    self.assertEqual(costs.flops(sliding, 2 * t), 2 * costs.flops(sliding, t))
    self.assertEqual(costs.flops(dense, t, train=True), 3 * costs.flops(dense, t))

  def test_recurrent_form(self):
    d = 32
    dense = _config("dense", max_seq_len=64)
    parts = costs.flops_by_part(dense, 1, form="recurrent")
    self.assertEqual(parts["attention"], 4 * 64 * d)  # one query against the 64-slot cache
    # The dense cache is scored whole: the cost of a step grows with the capacity.
    longer = costs.flops_by_part(_config("dense", max_seq_len=256), 1, form="recurrent")
    self.assertEqual(longer["attention"], 4 * parts["attention"])
    # The window's step scores its ring (8) and itself, at any capacity.
    ring = costs.flops_by_part(_config("sliding_window", max_seq_len=4096), 1, form="recurrent")
    self.assertEqual(ring["attention"], 4 * 9 * d)
    # A scan over 20 tokens: chunks of 8, 8, 4, each against the ring and the chunk.
    scan = costs.flops_by_part(_config("sliding_window"), 20, form="recurrent")
    self.assertEqual(scan["attention"], 4 * d * (8 * 16 + 8 * 16 + 4 * 12))
    self.assertEqual({k: v for k, v in scan.items() if k != "attention"},
                     {k: v for k, v in costs.flops_by_part(_config("sliding_window"), 20).items()
                      if k != "attention"})

  def test_bad_arguments(self):
    with self.assertRaisesRegex(ValueError, "num_tokens"):
      costs.flops(_config("dense"), 0)
    with self.assertRaisesRegex(ValueError, "form"):
      costs.flops(_config("dense"), 8, form="chunked")


class AttentionBytesTest(absltest.TestCase):

  def test_dense_scores_are_quadratic_and_blocking_bounds_them(self):
    dense = _config("dense", num_heads=4, num_layers=2)
    self.assertEqual(costs.activation_bytes(dense, 1024, 2), 2 * 4 * 1024 * 1024 * 4 * 3)
    self.assertEqual(costs.activation_bytes(dense, 1024, 2, train=True),
                     2 * 4 * 1024 * 1024 * 4 * 4 * 2)
    blocked = _config("dense", num_heads=4, query_block=128)
    self.assertEqual(costs.activation_bytes(blocked, 1024, 2), 2 * 4 * 128 * 1024 * 4 * 4)
    window = _config("sliding_window", num_heads=4)
    self.assertEqual(costs.activation_bytes(window, 2048, 1),
                     2 * costs.activation_bytes(window, 1024, 1))


if __name__ == "__main__":
  absltest.main()

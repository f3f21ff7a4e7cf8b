"""KernelConfig validation: every invalid value names its field before anything compiles."""

import dataclasses

import ml_collections
import pytest
from absl.testing import parameterized

from memkernel import KernelConfig


class ConfigTest(parameterized.TestCase):

  @parameterized.parameters(
      ("leaf_size", 12, "power of two"),
      ("num_roots", 0, "num_roots"),
      ("num_roots", 5, "num_roots"),
      ("max_seq_len", 100, "multiple of leaf_size"),
      ("max_seq_len", 48, "power-of-two number of leaves"),
      ("d_model", 0, "d_model"),
      ("vocab_size", -3, "vocab_size"),
      ("beam_width", 0, "beam_width"),
      ("num_route_heads", 3, "divisible"),
      ("scan_impl", "fft", "scan_impl"),
      ("use_tree_read", "yes", "use_tree_read"),
      ("teacher_weight", -1.0, "teacher_weight"),
      ("teacher_positions", "queries", "teacher_positions"),
      ("teacher_cross_level", 1, "teacher_cross_level"),
      ("teacher_queries", 0, "teacher_queries"),
      ("salience_weight", -1.0, "salience_weight"),
      ("memory_lags", 5, "conv_width"),
      ("memory_lags", -1, "non-negative"),
      ("memory_lags", 1, "previous token"),
      ("search_width", -1, "search_width"),
      ("node_reps", -1, "node_reps"),
      ("search_width", 4, "needs leaf_rerank=True"),
  )
  def test_invalid_value_names_field(self, field, value, message):
    with pytest.raises(ValueError, match=message) as err:
      KernelConfig(**{field: value})
    assert field in str(err.value)

  def test_unknown_field(self):
    with pytest.raises(ValueError, match="unknown field.*bogus"):
      KernelConfig.from_dict({"d_model": 32, "bogus": 1})

  def test_from_config_dict_and_replace(self):
    cd = ml_collections.ConfigDict({"d_model": 32, "num_roots": 3, "max_seq_len": 256})
    config = KernelConfig.from_dict(cd)
    assert (config.d_model, config.num_roots, config.num_leaves) == (32, 3, 16)
    longer = dataclasses.replace(config, max_seq_len=4096)
    assert longer.num_leaves == 256 and longer.num_levels == 9 and longer.num_nodes == 511
    with pytest.raises(ValueError, match="max_seq_len"):
      dataclasses.replace(config, max_seq_len=4000)

  def test_frozen(self):
    with pytest.raises(dataclasses.FrozenInstanceError):
      KernelConfig().d_model = 3

"""The brain-core config: the seed's defaults, and every bad value named before anything runs."""

import pytest

from memkernel.braincore.config import BrainCoreConfig


def test_the_defaults_are_the_seeds():
  c = BrainCoreConfig()
  assert (c.window, c.em_items, c.em_k, c.pm_rank, c.span) == (256, 256, 4, 8, 64)
  assert (c.wm_boundary, c.em_boundary, c.pm_boundary) == ("reset", "decay", "decay")
  assert BrainCoreConfig.from_dict({"d_model": 32, "num_heads": 2}).d_model == 32


@pytest.mark.parametrize("values, message", [
    ({"em_k": 300}, "em_k must be <= em_items"),
    ({"d_model": 30, "num_heads": 4}, "must be an even integer"),
    ({"span": 0}, "span must be >= 1"),
    ({"em_decay": 1.5}, "em_decay must be <= 1"),
    ({"pm_budget": 0.0}, "pm_budget must be > 0"),
    ({"wm_boundary": "decay"}, "cannot decay"),
    ({"em_boundary": "forget"}, "em_boundary must be one of"),
    ({"scan_impl": "fast"}, "scan_impl must be one of"),
    ({"em_features": "output"}, "em_features must be one of"),
    ({"em_threshold": 1.0}, "em_threshold must be < 1"),
    ({"em_write_gate": "ajar"}, "em_write_gate must be one of"),
    ({"em_threshold": -0.1}, "em_threshold must be >= 0"),
    ({"em_teacher": -1.0}, "em_teacher must be >= 0"),
    ({"em_novelty_init": -4.0}, "em_novelty_init must be >= 0"),
    ({"em_target": "best"}, "em_target must be one of"),
    ({"plasticity": 1}, "plasticity must be a bool"),
    ({"without": "episodic,tree"}, "without must be a comma-separated subset"),
    ({"without": "working,working"}, "without must be a comma-separated subset"),
    ({"without": ["working"]}, "without must be a comma-separated string"),
    ({"mlp_dim": -1}, "mlp_dim"),
    ({"windw": 8}, "unknown field"),
])
def test_bad_values_are_named(values, message):
  with pytest.raises(ValueError, match=message):
    BrainCoreConfig.from_dict(values)

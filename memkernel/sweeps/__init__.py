"""Sweeps over tasks x models x seeds through the one training harness (the ablation sweep)."""

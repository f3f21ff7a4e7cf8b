"""Induction heads: "A B ... A" must predict B, with 16 trigger bigrams in the first half.

Run (add `:smoke` for a seconds-long check, `:dense` / `:sliding_window` for the peers):

  python -m experiments.train --config=configs/induction.py --workdir=/tmp/induction
"""

from configs import common


def get_config(arg=None):
  return common.get_config(
      dict(name="induction", vocab_size=256, seq_len=512, num_pairs=16),
      arg,
      smoke_task=dict(vocab_size=64, seq_len=64, num_pairs=4))

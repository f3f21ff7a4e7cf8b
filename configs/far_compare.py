"""Far-token comparison: key k names a number a_k in the first quarter and b_k in the second; the
last quarter asks for max(a_k, b_k).

Run (add `:smoke` for a seconds-long check, `:dense` / `:sliding_window` for the peers):

  python -m experiments.train --config=configs/far_compare.py --workdir=/tmp/far_compare
"""

from configs import common


def get_config(arg=None):
  return common.get_config(
      dict(name="far_compare", vocab_size=256, seq_len=512, num_compares=16),
      arg,
      smoke_task=dict(vocab_size=64, seq_len=64, num_compares=4))

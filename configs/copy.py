"""Copy: a random segment, a separator, then the segment again; every copied token is scored.

Run (add `:smoke` for a seconds-long check, `:dense` / `:sliding_window` for the peers):

  python -m experiments.train --config=configs/copy.py --workdir=/tmp/copy
"""

from configs import common


def get_config(arg=None):
  return common.get_config(
      dict(name="copy", vocab_size=256, seq_len=256, copy_len=0),
      arg,
      smoke_task=dict(vocab_size=64, seq_len=64, copy_len=0))

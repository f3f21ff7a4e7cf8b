"""Noisy retrieval: MARKER k v triples hidden in noise, queried as MARKER k in the last quarter.

Run (add `:smoke` for a seconds-long check, `:dense` / `:sliding_window` for the peers):

  python -m experiments.train --config=configs/noisy_retrieval.py --workdir=/tmp/noisy_retrieval
"""

from configs import common


def get_config(arg=None):
  return common.get_config(
      dict(name="noisy_retrieval", vocab_size=256, seq_len=512, num_pairs=16),
      arg,
      smoke_task=dict(vocab_size=64, seq_len=64, num_pairs=4))

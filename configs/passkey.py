"""Passkey: one fact `MARKER v` at a random place in long filler, asked for by the last token.

The answer can sit in any leaf, so a router that does not search by the query scores
~1 / (leaves before the query) of it. Run (add `:smoke` for a seconds-long check):

  python -m experiments.train --config=configs/passkey.py --workdir=/tmp/passkey
  python -m experiments.evaluate --workdir=/tmp/passkey --lengths=2048,8192,32768
"""

from configs import common


def get_config(arg=None):
  return common.get_config(
      dict(name="passkey", vocab_size=256, seq_len=512),
      arg,
      smoke_task=dict(vocab_size=64, seq_len=64))

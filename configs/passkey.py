"""Passkey: one fact `MARKER v` at a random place in long filler, asked for by the last token.

The answer can sit in any leaf, so a router that does not search by the query scores
~1 / (leaves before the query) of it. Run (add `:smoke` for a seconds-long check):

  python -m experiments.train --config=configs/passkey.py --workdir=/tmp/passkey
  python -m experiments.evaluate --workdir=/tmp/passkey --lengths=512,2048 --batch_size=64 --batches=16

1200 steps instead of the other probes' 400: a sequence scores one token, so 400 steps of 8
sequences are 3,200 answers; the router finds the fact from the start (recall 1.00), and the
read of its value is what needs the steps (92% at 512 after 400 steps, still learning;
docs/results/passkey/README.md). Evaluate with large batches: one query per
sequence, so 1,024 queries are 1,024 sequences, and the query-blind baseline (the batch's most
frequent answer leaves) is only informative when a batch holds more answers than the router has
slots.
"""

from configs import common


def get_config(arg=None):
  config = common.get_config(
      dict(name="passkey", vocab_size=256, seq_len=512),
      arg,
      smoke_task=dict(vocab_size=64, seq_len=64))
  if "smoke" not in common.parse_arg(arg):
    config.train.update(dict(steps=1200))
  return config

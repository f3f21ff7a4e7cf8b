"""Far-token comparison: key k names a number a_k in the first quarter and b_k in the second; the
last quarter asks for max(a_k, b_k).

Run (add `:smoke` for a seconds-long check, `:dense` / `:sliding_window` for the peers, `:oracle`
for the true answer leaves):

  python -m experiments.train --config=configs/far_compare.py --workdir=/tmp/far_compare

2000 steps instead of the other probes' 400: besides finding two leaves, the model learns an order
over the 224 number tokens from their embeddings, and accuracy keeps rising long after step 400
(accuracy by steps and wall times: docs/results/far_compare/README.md).
"""

from configs import common


def get_config(arg=None):
  config = common.get_config(
      dict(name="far_compare", vocab_size=256, seq_len=512, num_compares=16),
      arg,
      smoke_task=dict(vocab_size=64, seq_len=64, num_compares=4))
  if "smoke" not in common.parse_arg(arg):
    config.train.update(dict(steps=2000, eval_every=500))
  return config

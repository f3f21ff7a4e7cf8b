"""Multi-query associative recall (Zoology MQAR): 32 key-value pairs, queries at power-law gaps.

Run (minutes on a 2-core CPU, docs/results/mqar_main/; add `:smoke` for a seconds-long check):

  python -m experiments.train --config=configs/mqar.py --workdir=/tmp/mqar
  python -m experiments.train --config=configs/mqar.py:dense --workdir=/tmp/mqar_dense
  python -m experiments.train --config=configs/mqar.py:oracle --workdir=/tmp/mqar_oracle
  python -m experiments.train --config=configs/mqar.py \\
      --config.eval.lengths='(512, 2048, 8192)' --workdir=/tmp/mqar_long

`--config.task.layout=scattered` puts the pairs at random places of the first half and the
queries in the second, so the answer leaf moves (`memkernel.probes`); the Zoology layout keeps
every answer in the first 2 * 32 / 16 = 4 leaves.
"""

from configs import common


def get_config(arg=None):
  return common.get_config(
      dict(name="mqar", vocab_size=256, seq_len=512, num_pairs=32, distance="power_law",
           power_a=0.01, layout="zoology"),
      arg,
      smoke_task=dict(vocab_size=64, seq_len=64, num_pairs=4))

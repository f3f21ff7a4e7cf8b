"""MQAR where the answer moves: the README's main job.

32 key-value pairs at random non-overlapping places of the first half, each key appearing only in
its pair and at its query; the queries at random places of the second half (keys from [1, V/2),
values and filler from [V/2, V), as in Zoology). A router that ignores the query scores at most
`routing_recall_blind` (the evaluation reports both). Zoology's own layout, whose answers sit in
the first four leaves, is `configs/mqar.py`. Results and their commands:
docs/results/mqar_scattered/. Run (add `:smoke` for a seconds-long check):

  python -m experiments.train --config=configs/mqar_scattered.py --workdir=/tmp/mqar_scattered
  python -m experiments.evaluate --workdir=/tmp/mqar_scattered --lengths=2048,8192
  python -m experiments.evaluate --workdir=/tmp/mqar_scattered --stream=validation
"""

from configs import mqar


def get_config(arg=None):
  config = mqar.get_config(arg)
  config.task.layout = "scattered"
  return config

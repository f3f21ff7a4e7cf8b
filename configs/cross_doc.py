"""Cross-document recall: the scattered MQAR's pairs in one document, its queries in the next.

32 key-value pairs at random places of document 0 (the first half), the queries at random
places of document 1 (the rest); the batch carries `segments`. Every family runs in lifelong
mode here: what it carries across a document boundary is what can answer, and with `reset`
everywhere it is at chance (1 / 128 among the values). Results and their commands:
docs/results/braincore/. Run (add `:smoke` for a seconds-long check):

  python -m experiments.train --config=configs/cross_doc.py:braincore --workdir=/tmp/cross_doc_bc
  python -m experiments.train --config=configs/cross_doc.py:braincore \\
      --config.braincore.em_boundary=reset --config.braincore.pm_boundary=reset \\
      --workdir=/tmp/cross_doc_bc_reset
  python -m experiments.train --config=configs/cross_doc.py:sliding_window --workdir=/tmp/cross_doc_sw
  python -m experiments.train --config=configs/cross_doc.py --workdir=/tmp/cross_doc_kernel

Lifelong settings: the kernel carries its trunk and its tree across the boundary, the attention
peers carry their keys (`peer.boundary='carry'`), the brain-core keeps its seed defaults
(working memory and core reset, episodic and procedural memory decay by `boundary_decay`). The
brain-core offers every token as an episodic candidate and its write gate learns from hindsight
which to keep (`configs/common.py`; measured in docs/results/braincore/).
"""

from configs import common


def get_config(arg=None):
  config = common.get_config(
      dict(name="cross_doc", vocab_size=256, seq_len=512, num_pairs=32),
      arg,
      smoke_task=dict(vocab_size=64, seq_len=64, num_pairs=4))
  config.model.trunk_boundary = "carry"
  config.model.tree_boundary = "carry"
  config.peer.boundary = "carry"
  return config

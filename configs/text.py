"""Real text: byte-level language modelling on the installed Python's standard-library sources.

Every machine has the corpus, so a result can be remade anywhere; its checksum and file list go
into `eval.json` (`memkernel/text_task.py`). Files are split by a hash of their path into train
/ validation / test; each file is a document (the document streams of every family), starting
on a leaf boundary. Evaluation reports bits per byte overall and by context position, on the
same test bytes for every run. Run (add `:smoke` for a seconds-long check):

  python -m experiments.train --config=configs/text.py --workdir=/tmp/text_kernel
  python -m experiments.train --config=configs/text.py:sliding_window --workdir=/tmp/text_sw
  python -m experiments.train --config=configs/text.py:braincore --workdir=/tmp/text_bc
  python -m experiments.train --config=configs/text.py --config.task.corpus=/data/my_texts \
      --config.task.patterns='*.txt,*.md' --workdir=/tmp/text_mine

The brain-core's documents start on its plasticity span, so its variant starts files on
multiples of the span (64) rather than of the leaf (16).
"""

from configs import common


def get_config(arg=None):
  config = common.get_config(
      dict(name="bytes_lm", corpus="stdlib", patterns="*", vocab_size=256, seq_len=1024),
      arg,
      smoke_task=dict(seq_len=128))
  config.eval.update(dict(audit_batches=0, batches=16))   # No answer leaves to audit.
  if "braincore" in common.parse_arg(arg):
    config.task.leaf_size = config.braincore.span          # Files start on a span boundary.
  if "smoke" in common.parse_arg(arg):
    config.eval.batches = 1
  return config

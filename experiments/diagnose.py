r"""Where a trained kernel's routing loses the answer; everything it does is `memkernel.analysis.diagnose`.

  python -m experiments.diagnose --workdir=runs/exp/induction
  python -m experiments.diagnose --workdir=runs/exp/induction --lengths=512,2048,8192 --batches=8

For every layer and length: how often the exact read's own attention, the re-rank's token scores,
each level's summaries, the first routing step and the beam keep the answer leaf first or in the
beam, down to the routing recall (the funnel is described in `memkernel/analysis/diagnose.py`). Uses fresh
batches from the auditor's seed stream and the run's evaluation beam. Prints a table per length
and writes it with the command to --out (default WORKDIR/diagnose.json; never overwritten). Safe
beside a live training run (only committed checkpoints are read).
"""

import logging as std_logging
import os
import shlex
import sys

from absl import app
from absl import flags
from absl import logging

from memkernel.analysis import diagnose as diagnose_lib
from memkernel import runs

_WORKDIR = flags.DEFINE_string("workdir", None, "A kernel training run's --workdir.")
_LENGTHS = flags.DEFINE_list("lengths", None, "Sequence lengths (default: the training length).")
_TASK = flags.DEFINE_multi_string("task", [], "A task field to change, FIELD=VALUE (repeatable), "
                                  "e.g. distance=uniform.")
_BATCHES = flags.DEFINE_integer("batches", 4, "Fresh batches per length.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "Sequences per batch (default: the "
                                   "run's eval.batch_size).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
_SEED = flags.DEFINE_integer("seed", None, "Seed of the batches (default: train.seed).")
_OUT = flags.DEFINE_string("out", None, "Result JSON (default: WORKDIR/diagnose.json).")
flags.mark_flags_as_required(["workdir"])


def _fail(message):
  sys.exit(f"FATAL diagnose: {message}")


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected arguments: {argv[1:]}")
  try:
    task = runs.parse_task_overrides(_TASK.value)
  except ValueError as e:
    _fail(e)
  try:
    lengths = [int(v) for v in _LENGTHS.value or ()]
  except ValueError:
    _fail(f"--lengths must be comma-separated integers, got {_LENGTHS.value}")
  out = _OUT.value or os.path.join(_WORKDIR.value, "diagnose.json")
  if os.path.exists(out):
    _fail(f"{out} exists; pass another --out")
  logging.get_absl_logger().addFilter(  # orbax reports every read-only restore.
      lambda r: r.levelno >= std_logging.ERROR or "/orbax/" not in r.pathname)
  logging.set_verbosity(logging.WARNING)
  try:
    report = diagnose_lib.diagnose_run(
        _WORKDIR.value, lengths=lengths or None, task=task, batches=_BATCHES.value,
        batch_size=_BATCH_SIZE.value, step=_STEP.value, seed=_SEED.value)
  except (FileNotFoundError, ValueError) as e:
    _fail(e)
  print(diagnose_lib.format_report(report))
  report["command"] = "python -m experiments.diagnose " + " ".join(
      shlex.quote(a) for a in sys.argv[1:])
  runs.write_json(out, report)
  print(f"wrote {out}")


if __name__ == "__main__":
  app.run(main)

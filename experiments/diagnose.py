r"""Where a trained kernel's routing loses the answer; everything it does is `memkernel.analysis.diagnose`.

  python -m experiments.diagnose --workdir=runs/exp/induction
  python -m experiments.diagnose --workdir=runs/exp/induction --lengths=512,2048,8192 --batches=8
  python -m experiments.diagnose --workdir=runs/mqar_scattered --lengths=8192 --node_scores=4,16

For every layer and length: how often the exact read's own attention, the re-rank's token scores,
each level's summaries, the first routing step and the beam keep the answer leaf first or in the
beam, down to the routing recall (the funnel is described in `memkernel/analysis/diagnose.py`). Uses fresh
batches from the auditor's seed stream and the run's evaluation beam. Prints a table per length
and writes it with the command to --out (default WORKDIR/diagnose.json; never overwritten). Safe
beside a live training run (only committed checkpoints are read). --node_scores=M,... adds a
table of how often each level's answer ancestor scores best under other node scores (pooled,
the best of the M most salient tokens' keys, per-dimension bounds, the best of all tokens),
computed from the tokens under each node (`memkernel/analysis/node_scores.py`).
"""

import logging as std_logging

from absl import flags
from absl import logging

from experiments import _cli
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
_NODE_SCORES = flags.DEFINE_list("node_scores", None, "Also compare node scoring rules; the M "
                                  "of each reps_M rule, e.g. 4,16.")
_OUT = flags.DEFINE_string("out", None, "Result JSON (default: WORKDIR/diagnose.json).")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  del argv  # Checked by _cli.run.
  _cli.check_directory("workdir", _WORKDIR.value)
  task = runs.parse_task_overrides(_TASK.value)
  lengths = _cli.parse_lengths(_LENGTHS.value)
  for flag, value in (("batches", _BATCHES.value), ("batch_size", _BATCH_SIZE.value)):
    _cli.check_positive(flag, value)  # 0 must not read as "the default".
  node_scores = None
  if _NODE_SCORES.value is not None:
    try:
      node_scores = [int(m) for m in _NODE_SCORES.value]
    except ValueError:
      raise ValueError(f"--node_scores must be positive integers, got "
                       f"{','.join(_NODE_SCORES.value)!r}") from None
  out = _cli.new_result(_OUT.value, _WORKDIR.value, "diagnose.json")
  _cli.quiet_orbax(std_logging.ERROR)  # orbax reports every read-only restore.
  logging.set_verbosity(logging.WARNING)
  report = diagnose_lib.diagnose_run(
      _WORKDIR.value, lengths=lengths, task=task, batches=_BATCHES.value,
      batch_size=_BATCH_SIZE.value, step=_STEP.value, seed=_SEED.value,
      node_scores=node_scores)
  print(diagnose_lib.format_report(report))
  report["command"] = _cli.command("diagnose")
  runs.write_json(out, report)
  print(f"wrote {out}")


if __name__ == "__main__":
  _cli.run(main, name="diagnose")

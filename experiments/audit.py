r"""Audits a trained run's memory; everything it does is `memkernel.analysis.audit.audit_run`.

  python -m experiments.audit --workdir=/tmp/mqar
  python -m experiments.audit --workdir=/tmp/mqar --batches=16 --length=2048

Runs the reference forward and every intervention (no tree read, no exact read, both, next-best
span, each root dropped) on fresh evaluation batches (the auditor's own seed stream), prints the
table, and writes `WORKDIR/audit.json` and a plot of utility by depth and distance,
`WORKDIR/audit.png`. Safe beside a live training run (only committed checkpoints are read).
"""

import logging as std_logging

from absl import flags
from absl import logging

from experiments import _cli
from memkernel.analysis import audit as audit_lib

_WORKDIR = flags.DEFINE_string("workdir", None, "A training run's --workdir.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to audit (default: the newest).")
_BATCHES = flags.DEFINE_integer("batches", 8, "Evaluation batches to audit.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "Sequences per batch (default: the "
                                   "run's eval.batch_size).")
_LENGTH = flags.DEFINE_integer("length", None, "Sequence length (default: the training length).")
_SEED = flags.DEFINE_integer("seed", None, "Seed of the audit batches (default: train.seed).")
_DEAD_WEIGHT = flags.DEFINE_float(
    "dead_weight_threshold", audit_lib.DEAD_WEIGHT_THRESHOLD,
    "An active source whose removal changes the loss by less than this (nats per scored "
    "token) is flagged as dead weight.")
_ACTIVE_GATE = flags.DEFINE_float(
    "active_gate_threshold", audit_lib.ACTIVE_GATE_THRESHOLD,
    "A source whose fusion gate mean exceeds this counts as active.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  del argv  # Checked by _cli.run.
  _cli.check_directory("workdir", _WORKDIR.value)
  for flag, value in (("batches", _BATCHES.value), ("batch_size", _BATCH_SIZE.value),
                      ("length", _LENGTH.value)):
    _cli.check_positive(flag, value)  # 0 must not read as "the default".
  # Keep the table readable: orbax warns that a read-only checkpoint directory is read only.
  _cli.quiet_orbax(std_logging.ERROR)
  logging.set_verbosity(logging.WARNING)
  report = audit_lib.audit_run(
      _WORKDIR.value, step=_STEP.value, num_batches=_BATCHES.value, length=_LENGTH.value,
      batch_size=_BATCH_SIZE.value, seed=_SEED.value,
      dead_weight_threshold=_DEAD_WEIGHT.value, active_gate_threshold=_ACTIVE_GATE.value)
  print(audit_lib.format_report(report))
  print(f"wrote {audit_lib.AUDIT_FILE} and {audit_lib.PLOT_FILE} in {_WORKDIR.value}")


if __name__ == "__main__":
  _cli.run(main, name="audit")

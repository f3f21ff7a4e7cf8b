r"""Which candidates a trained brain-core's write gate lets in; everything it does is
`memkernel.analysis.write_audit`.

  python -m experiments.write_audit --workdir=runs/cross_doc_bc
  python -m experiments.write_audit --workdir=runs/cross_doc_bc --batches=32 --stream=validation

Per layer: the share of the answers' source tokens (what the questions must recall) whose write
gate is above the run's `em_threshold`, and the share of every other candidate (the write
density the gate chose), each with its standard error and mean gate. Needs every token a
candidate (`em_writes` = `span`). Batches come from the run's evaluation stream. Prints a table
and writes it with the command to --out (default WORKDIR/write_audit.json; never overwritten).
Safe beside a live training run (only committed checkpoints are read).
"""

import dataclasses
import logging as std_logging

from absl import flags
from absl import logging

from experiments import _cli
from memkernel import runs
from memkernel.analysis import write_audit

_WORKDIR = flags.DEFINE_string("workdir", None, "A brain-core training run's --workdir.")
_BATCHES = flags.DEFINE_integer("batches", None, "Batches (default: the run's eval.batches).")
_STREAM = flags.DEFINE_enum("stream", None, ["test", "validation"], "Evaluation stream (default: "
                            "the run's eval.stream).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
_OUT = flags.DEFINE_string("out", None, "Result JSON (default: WORKDIR/write_audit.json).")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  del argv  # Checked by _cli.run.
  _cli.check_directory("workdir", _WORKDIR.value)
  if _BATCHES.value is not None:
    _cli.check_positive("batches", _BATCHES.value)
  out = _cli.new_result(_OUT.value, _WORKDIR.value, "write_audit.json")
  _cli.quiet_orbax(std_logging.ERROR)
  logging.set_verbosity(logging.WARNING)
  experiment = runs.load_experiment(_WORKDIR.value, _STEP.value)
  if _STREAM.value:
    experiment = dataclasses.replace(
        experiment, eval=dataclasses.replace(experiment.eval, stream=_STREAM.value))
  _, params = runs.load_run(_WORKDIR.value, _STEP.value)
  report = write_audit.audit_writes(experiment, params, batches=_BATCHES.value)
  print(write_audit.format_report(report))
  report["command"] = _cli.command("write_audit")
  runs.write_json(out, report)
  print(f"wrote {out}")


if __name__ == "__main__":
  _cli.run(main, name="write_audit")

r"""Whether a trained brain-core's episodic reads find the answers' items, beside a query-blind
read; everything it does is `memkernel.analysis.read_audit`.

  python -m experiments.read_audit --workdir=runs/mqar_bc
  python -m experiments.read_audit --workdir=runs/mqar_bc --seq_len=2048 --batch_size=4
  python -m experiments.read_audit --workdir=runs/mqar_bc --model=em_items=32 --task=num_pairs=64 \
      --out=runs/mqar_bc/read_audit_items32_pairs64.json

Per layer, over the scored questions: the share whose answer's source tokens are stored as
live items when the question reads, found by its read (top k by key), read first, and held by
the k strongest items (what a read that ignores the question would return). Needs every token a
candidate (`em_writes` = `span`). Batches come from the run's evaluation stream. Prints a table
and writes it with the command to --out (default WORKDIR/read_audit_<seq_len>.json; never
overwritten). Safe beside a live training run (only committed checkpoints are read).
"""

import dataclasses
import logging as std_logging

from absl import flags
from absl import logging

from experiments import _cli
from memkernel import runs
from memkernel.analysis import read_audit

_WORKDIR = flags.DEFINE_string("workdir", None, "A brain-core training run's --workdir.")
_BATCHES = flags.DEFINE_integer("batches", None, "Batches (default: the run's eval.batches).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "Sequences per batch (default: the run's "
                                   "eval.batch_size).")
_SEQ_LEN = flags.DEFINE_integer("seq_len", None, "Sequence length (default: the run's task's).")
_STREAM = flags.DEFINE_enum("stream", None, ["test", "validation"], "Evaluation stream (default: "
                            "the run's eval.stream).")
_TASK = flags.DEFINE_multi_string("task", [], "A task field to change, FIELD=VALUE (repeatable), "
                                  "e.g. num_pairs=64.")
_MODEL = flags.DEFINE_multi_string("model", [], "A memory field of the model config to change, "
                                   "FIELD=VALUE (repeatable), e.g. em_items=32.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
_OUT = flags.DEFINE_string("out", None, "Result JSON (default: WORKDIR/read_audit_<seq_len>.json).")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  del argv  # Checked by _cli.run.
  _cli.check_directory("workdir", _WORKDIR.value)
  for name, flag in (("batches", _BATCHES), ("batch_size", _BATCH_SIZE), ("seq_len", _SEQ_LEN)):
    if flag.value is not None:
      _cli.check_positive(name, flag.value)
  _cli.quiet_orbax(std_logging.ERROR)
  logging.set_verbosity(logging.WARNING)
  experiment = runs.with_memory(
      runs.with_task(runs.load_experiment(_WORKDIR.value, _STEP.value),
                     runs.parse_task_overrides(_TASK.value)),
      runs.parse_task_overrides(_MODEL.value, flag="model"))
  seq_len = _SEQ_LEN.value or experiment.task.seq_len
  out = _cli.new_result(_OUT.value, _WORKDIR.value, f"read_audit_{seq_len}.json")
  if _STREAM.value:
    experiment = dataclasses.replace(
        experiment, eval=dataclasses.replace(experiment.eval, stream=_STREAM.value))
  _, params = runs.load_run(_WORKDIR.value, _STEP.value)
  report = read_audit.audit_reads(experiment, params, batches=_BATCHES.value,
                                  batch_size=_BATCH_SIZE.value, seq_len=seq_len)
  print(read_audit.format_report(report))
  report["command"] = _cli.command("read_audit")
  runs.write_json(out, report)
  print(f"wrote {out}")


if __name__ == "__main__":
  _cli.run(main, name="read_audit")

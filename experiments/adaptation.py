r"""Online adaptation of a trained text run: bits per byte on a document's second occurrence in
a stream (A, B, A) against its first; everything it does is `memkernel.analysis.adaptation`.

  python -m experiments.adaptation --workdir=runs/text/braincore_s0
  python -m experiments.adaptation --workdir=runs/text/braincore_s0 --model=em_boundary=reset \
      --model=pm_boundary=reset --out=runs/text/braincore_s0/adaptation_reset.json

--model changes a field of the model's memory that no parameter depends on (the family's
memory_fields), e.g. the brain-core's boundary rules, for the control in which nothing crosses a
document boundary. Documents are the first files of the test split (--split) holding --doc_len
bytes, the same for every run. Prints the result and writes it with the command to --out
(default WORKDIR/adaptation.json; never overwritten).
"""

import logging as std_logging

from absl import flags
from absl import logging

from experiments import _cli
from memkernel import runs
from memkernel.analysis import adaptation

_WORKDIR = flags.DEFINE_string("workdir", None, "A text training run's --workdir.")
_DOCUMENTS = flags.DEFINE_integer("documents", 64, "Streams (each A, B, A).")
_DOC_LEN = flags.DEFINE_integer("doc_len", 512, "Bytes per document (a multiple of the "
                                "family's document alignment).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Streams per forward.")
_SPLIT = flags.DEFINE_enum("split", "test", ["test", "validation"], "Corpus split.")
_MODEL = flags.DEFINE_multi_string("model", [], "A memory field of the model config to change, "
                                   "FIELD=VALUE (repeatable), e.g. em_boundary=reset.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
_OUT = flags.DEFINE_string("out", None, "Result JSON (default: WORKDIR/adaptation.json).")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  del argv  # Checked by _cli.run.
  _cli.check_directory("workdir", _WORKDIR.value)
  out = _cli.new_result(_OUT.value, _WORKDIR.value, "adaptation.json")
  memory = runs.parse_task_overrides(_MODEL.value, flag="model")
  _cli.quiet_orbax(std_logging.ERROR)
  logging.set_verbosity(logging.WARNING)
  experiment = runs.with_memory(runs.load_experiment(_WORKDIR.value, _STEP.value), memory)
  _, params = runs.load_run(_WORKDIR.value, _STEP.value)
  report = adaptation.measure(experiment, params, documents=_DOCUMENTS.value,
                              doc_len=_DOC_LEN.value, batch_size=_BATCH_SIZE.value,
                              split=_SPLIT.value)
  print(adaptation.format_report(report))
  report.update(memory=memory, command=_cli.command("adaptation"))
  runs.write_json(out, report)
  print(f"wrote {out}")


if __name__ == "__main__":
  _cli.run(main, name="adaptation")

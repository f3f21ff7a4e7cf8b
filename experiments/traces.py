r"""The read-trace study of a trained kernel run (`memkernel.paths.trace_study`).

  python -m experiments.traces --workdir=runs/mqar_scattered
  python -m experiments.traces --workdir=runs/mqar_scattered --batches=8 --lengths=2048,8192

writes WORKDIR/traces.json and WORKDIR/traces.md: per keying of the read edges (offset: leaves
back; content: query token -> read token; context: query token -> the token before the read
token; position: absolute positions), the share of the strongest edges that traces built on
disjoint sequences, disjoint queries, two checkpoints, or shuffled reads have in common; how
often a trace's best leaf is the leaf the model read most and, on recall probes, the answer's
leaf, beside the shuffled trace and chance; with --lengths, the same for the answer's leaf in
sequences that long (traces built at the training length; no forward at the longer length).
"""

import logging as std_logging

from absl import flags
from absl import logging

from experiments import _cli
from memkernel.paths import trace_study

_WORKDIR = flags.DEFINE_string("workdir", None, "A trained kernel run.")
_BATCHES = flags.DEFINE_integer("batches", 4, "Batches of the study (the auditor's stream; "
                                "text: the validation split).")
_STEPS = flags.DEFINE_list("steps", [], "Two checkpoint steps to compare (default: the oldest "
                           "and the newest kept); the traces describe the later one.")
_QUOTA = flags.DEFINE_integer("quota", 2048, "Edges each head's trace keeps.")
_TOP = flags.DEFINE_integer("top", 64, "Strongest edges compared between two traces.")
_MIN_READ = flags.DEFINE_float("min_read", 0.02, "Reads weaker than this are not captured.")
_LENGTHS = flags.DEFINE_list("lengths", [], "Longer lengths to score the traces at (recall "
                             "probes).")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  del argv  # Checked by _cli.run.
  for name, value in (("batches", _BATCHES.value), ("quota", _QUOTA.value), ("top", _TOP.value)):
    _cli.check_positive(name, value)
  steps = _cli.parse_lengths(_STEPS.value or None, "steps") or []
  if steps and len(steps) != 2:
    raise ValueError(f"--steps takes two checkpoint steps, got {','.join(_STEPS.value)}")
  lengths = _cli.parse_lengths(_LENGTHS.value or None) or []
  _cli.quiet_orbax(std_logging.ERROR)
  logging.set_verbosity(logging.WARNING)
  report = trace_study.traces_run(_WORKDIR.value, batches=_BATCHES.value, steps=steps or None,
                                  quota=_QUOTA.value, top=_TOP.value, min_read=_MIN_READ.value,
                                  lengths=lengths, command=_cli.command("traces"))
  print(trace_study.format_table(report))
  print(f"wrote {trace_study.TRACES_FILE} and {trace_study.TRACES_TABLE} in {_WORKDIR.value}")


if __name__ == "__main__":
  _cli.run(main, name="traces")

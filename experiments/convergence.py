r"""Compares how fast groups of training runs learn (`memkernel.analysis.convergence`).

  python -m experiments.convergence --out=docs/results/paths/hint_training \
      --group=off=runs/s0,runs/s1 --group=traces=runs/t0,runs/t1 \
      --thresholds=0.9,0.95 --evals=eval.json,eval_test_nohints.json

writes OUT/convergence.json, OUT/convergence.md and OUT/convergence.png: per group, the steps
each run took to reach each training-accuracy threshold (trailing mean over --window logged
rows), their mean ± standard error, the mean learning curve, and the accuracy of every named
evaluation file that all of the group's runs have, at each length.
"""

from absl import flags

from experiments import _cli
from memkernel.analysis import convergence

_GROUPS = flags.DEFINE_multi_string("group", [], "LABEL=RUN[,RUN...]: one group of runs.")
_OUT = flags.DEFINE_string("out", None, "Directory for the report, table and plot.")
_THRESHOLDS = flags.DEFINE_list("thresholds", ["0.9", "0.95"], "Training-accuracy thresholds.")
_WINDOW = flags.DEFINE_integer("window", 3, "Logged rows the training accuracy is averaged over.")
_EVALS = flags.DEFINE_list("evals", ["eval.json"], "Evaluation files (in each run) to tabulate.")
flags.mark_flags_as_required(["out"])


def main(argv):
  del argv  # Checked by _cli.run.
  _cli.check_positive("window", _WINDOW.value)
  if not _GROUPS.value:
    raise ValueError("--group: give at least one LABEL=RUN[,RUN...]")
  groups = {}
  for spec in _GROUPS.value:
    label, sep, runs = spec.partition("=")
    if not sep or not label or not runs:
      raise ValueError(f"--group must be LABEL=RUN[,RUN...], got {spec!r}")
    if label in groups:
      raise ValueError(f"--group: label {label!r} given twice")
    groups[label] = [r for r in runs.split(",") if r]
    for run in groups[label]:
      _cli.check_directory("group", run)
  thresholds = _cli.parse_numbers(_THRESHOLDS.value, "thresholds")
  report = convergence.compare(groups, thresholds=thresholds, window=_WINDOW.value,
                               evals=_EVALS.value)
  report["command"] = _cli.command("convergence")
  paths = convergence.write(report, _OUT.value)
  print(convergence.format_table(report))
  print("wrote " + ", ".join(paths))


if __name__ == "__main__":
  _cli.run(main, name="convergence")

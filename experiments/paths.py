r"""The routing-path study of a trained kernel run (`memkernel.paths.report`).

  python -m experiments.paths --workdir=runs/mqar_scattered
  python -m experiments.paths --workdir=runs/mqar_scattered --batches=8 \
      --task=scattered: --task=zoology:layout=zoology

writes WORKDIR/paths.json (per task: per layer and head the paths' entropy, how much of it the
query token's identity and the previous token explain, how often paths recur within and across
sequences; the most frequent motifs with their utility, the next-best-span loss delta, and the
entropy of their choices; with several tasks, how many of one task's paths the other took),
WORKDIR/paths.md (the tables) and WORKDIR/paths.png (motif frequency against utility).

--task=NAME:FIELD=VALUE,... names a setting of the run's task (fields as `experiments.evaluate
--task`); repeat it to compare settings. Without it, the run's own task.
"""

import logging as std_logging

from absl import flags
from absl import logging

from experiments import _cli
from memkernel import runs
from memkernel.paths import report as report_lib

_WORKDIR = flags.DEFINE_string("workdir", None, "A trained kernel run.")
_BATCHES = flags.DEFINE_integer("batches", 4, "Auditor batches per task setting.")
_BUDGET = flags.DEFINE_integer("budget", 1 << 14, "The path trie's node budget.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
_TASK = flags.DEFINE_multi_string("task", [], "NAME:FIELD=VALUE,... a task setting to study "
                                  "(repeatable; default: the run's task).")
flags.mark_flags_as_required(["workdir"])


def _tasks(items):
  tasks = {}
  for item in items:
    name, sep, fields = item.partition(":")
    if not sep or not name:
      raise ValueError(f"--task must be NAME:FIELD=VALUE,... (fields may be empty), got {item!r}")
    if name in tasks:
      raise ValueError(f"--task names {name!r} twice")
    tasks[name] = runs.parse_task_overrides([f for f in fields.split(",") if f])
  return tasks or None


def main(argv):
  del argv  # Checked by _cli.run.
  _cli.check_positive("batches", _BATCHES.value)
  if _BUDGET.value < 2:
    raise ValueError(f"--budget must be at least 2, got {_BUDGET.value}")
  tasks = _tasks(_TASK.value)
  _cli.quiet_orbax(std_logging.ERROR)
  logging.set_verbosity(logging.WARNING)
  report = report_lib.paths_run(_WORKDIR.value, batches=_BATCHES.value, tasks=tasks,
                                budget=_BUDGET.value, step=_STEP.value,
                                command=_cli.command("paths"))
  print(report_lib.format_table(report))
  print(f"wrote {report_lib.PATHS_FILE}, {report_lib.TABLE_FILE} and {report_lib.PLOT_FILE} "
        f"in {_WORKDIR.value}")


if __name__ == "__main__":
  _cli.run(main, name="paths")

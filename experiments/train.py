r"""Trains and evaluates a model on a probe task; everything it does is `memkernel.train`.

  python -m experiments.train --config=configs/mqar.py --workdir=/tmp/mqar
  python -m experiments.train --config=configs/mqar.py:smoke --config.train.steps=5 \
      --workdir=/tmp/mqar_smoke

Re-running with the same workdir resumes from its newest checkpoint (one trained with another
architecture, model type or task only with --force_resume). See configs/common.py for the
config layout and the `:arg` variants. On CPU, prefix the command with
`GLIBC_TUNABLES=glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736`
(fewer page faults on large fresh buffers; use the same setting for every model you compare).

On several hosts (one process each, a workdir they all see; `memkernel/distributed.py`):

  python -m experiments.train ... --coordinator_address=host0:1234 --num_processes=2 \
      --process_id=0                       # and --process_id=1 on the second host
  python -m experiments.train ... --distributed   # the platform's own discovery (TPU, SLURM)
"""

from absl import flags
from absl import logging
from ml_collections import config_flags

from experiments import _cli
from memkernel import distributed
from memkernel import train as train_lib
from memkernel import experiment as experiment_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and eval results go here.")
_FORCE_RESUME = flags.DEFINE_bool(
    "force_resume", False, "Resume a workdir whose checkpoint was trained with another "
    "architecture, model type or task (parameter shapes must still match).")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Start jax.distributed with the platform's own discovery (TPU "
    "slices, SLURM, Open MPI, GKE); implied by --coordinator_address.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for multi-process training.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0 to "
                                   "num_processes - 1.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv  # Checked by _cli.run.
  _cli.check_directory("workdir", _WORKDIR.value)
  try:
    experiment_lib.parse_config(_CONFIG.value)  # Fails fast, before anything is compiled.
  except ValueError as e:
    raise ValueError(f"invalid config: {e}") from e
  explicit = (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  if _DISTRIBUTED.value or any(v is not None for v in explicit):
    distributed.initialize(*explicit)  # Before any device is touched.
  _cli.quiet_orbax()  # Keep the progress lines readable: orbax reports every save at INFO.
  logging.info("Config:\n%s", _CONFIG.value)
  train_lib.train_and_evaluate(_CONFIG.value, _WORKDIR.value,  # Logs its evaluation summary.
                               force_resume=_FORCE_RESUME.value)


if __name__ == "__main__":
  _cli.run(main, name="train", fields="configs/common.py")

r"""The ablation sweep; everything it does is `memkernel.sweeps.ablate.run`.

  python -m experiments.ablate --config=configs/ablate.py --out=runs/ablate
  python -m experiments.ablate --config=configs/ablate.py:smoke --out=/tmp/ablate_smoke
  python -m experiments.ablate --config=configs/ablate.py --out=runs/ablate --config.tasks=mqar

Trains every task x model x seed cell in OUT/runs/<task>/<model>/seed<k> (resuming, and skipping
finished cells), evaluates each at every length, and writes OUT/results.jsonl, OUT/results.md,
OUT/accuracy_vs_length.png and OUT/learning_curves.png. Fields and variants: configs/ablate.py.
On CPU, prefix the command with
`GLIBC_TUNABLES=glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736`.
"""


from absl import flags
from ml_collections import config_flags

from experiments import _cli
from memkernel.sweeps import ablate as ablate_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Sweep config file.", lock_config=True)
_OUT = flags.DEFINE_string("out", None, "Cells, results.jsonl, results.md and the plots go here.")
flags.mark_flags_as_required(["config", "out"])


def main(argv):
  del argv  # Checked by _cli.run.
  _cli.check_directory("out", _OUT.value)
  try:
    sweep = ablate_lib.parse_config(_CONFIG.value)  # Fails fast, before anything is compiled.
  except ValueError as e:
    raise ValueError(f"invalid config: {e}") from e
  ablate_lib.pending_cells(sweep, _OUT.value)  # A finished cell made with another config fails.
  _cli.quiet_orbax()  # Keep the progress lines readable: orbax reports every save at INFO.
  command = _cli.command("ablate")
  ablate_lib.run(_CONFIG.value, _OUT.value, command=command)


if __name__ == "__main__":
  _cli.run(main, fields="configs/ablate.py")

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

import logging as std_logging
import shlex
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from memkernel.sweeps import ablate as ablate_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Sweep config file.", lock_config=True)
_OUT = flags.DEFINE_string("out", None, "Cells, results.jsonl, results.md and the plots go here.")
flags.mark_flags_as_required(["config", "out"])


def _parse_flags(argv):
  """absl flag parsing; a bad `--config` or override exits with one line instead of a traceback."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:  # config_flags: an override names no config field.
    while isinstance(e, BaseException) and e.args:
      e = e.args[0]
    sys.exit(f"FATAL Flags parsing error: the config has no field {str(e).splitlines()[0]} "
             "(fields: configs/ablate.py)")
  except (flags.Error, ValueError) as e:
    # config_flags puts the config file's whole traceback in the message: keep its first line
    # and the exception.
    lines = [line for line in str(e).splitlines() if line.strip()]
    message = lines[0] if len(lines) < 2 else f"{lines[0]} {lines[-1]}"
    sys.exit(f"FATAL Flags parsing error: {message}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    sweep = ablate_lib.parse_config(_CONFIG.value)  # Fails fast, before anything is compiled.
  except ValueError as e:
    sys.exit(f"FATAL invalid config: {e}")
  try:
    ablate_lib.pending_cells(sweep, _OUT.value)
  except ValueError as e:  # A finished cell made with another config.
    sys.exit(f"FATAL {e}")
  # Keep the progress lines readable: orbax reports every save at INFO.
  logging.get_absl_logger().addFilter(
      lambda r: r.levelno >= std_logging.WARNING or "/orbax/" not in r.pathname)
  command = "python -m experiments.ablate " + " ".join(shlex.quote(a) for a in sys.argv[1:])
  ablate_lib.run(_CONFIG.value, _OUT.value, command=command)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)

r"""Trains and evaluates a model on a probe task; everything it does is `memkernel.train`.

  python -m experiments.train --config=configs/mqar.py --workdir=/tmp/mqar
  python -m experiments.train --config=configs/mqar.py:smoke --config.train.steps=5 \
      --workdir=/tmp/mqar_smoke

Re-running with the same workdir resumes from its newest checkpoint. See configs/common.py for the
config layout and the `:arg` variants. On CPU, prefix the command with
`GLIBC_TUNABLES=glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736`
(fewer page faults on large fresh buffers; use the same setting for every model you compare).
"""

import logging as std_logging
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from memkernel import train as train_lib
from memkernel import experiment as experiment_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and eval results go here.")
flags.mark_flags_as_required(["config", "workdir"])


def _parse_flags(argv):
  """absl flag parsing; a bad `--config` or override exits with one line instead of a traceback."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:  # config_flags: an override names no config field.
    while isinstance(e, BaseException) and e.args:
      e = e.args[0]
    name, _, hint = str(e).partition("\n")
    name = name.strip("'\"")
    bad = [a.split("=")[0] for a in argv[1:] if a.split("=")[0].startswith("--config.")
           and f".{name}." in a.split("=")[0] + "."]
    sys.exit(f"FATAL Flags parsing error: {', '.join(bad) or '--config'}: the config has no "
             f"field {name!r}. {hint} (layout: configs/common.py)")
  except (flags.Error, ValueError) as e:
    sys.exit(f"FATAL Flags parsing error: {e}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    experiment_lib.parse_config(_CONFIG.value)  # Fails fast, before anything is compiled.
  except ValueError as e:
    raise app.UsageError(f"invalid config: {e}") from e
  # Keep the progress lines readable: orbax reports every save at INFO.
  logging.get_absl_logger().addFilter(
      lambda r: r.levelno >= std_logging.WARNING or "/orbax/" not in r.pathname)
  logging.info("Config:\n%s", _CONFIG.value)
  train_lib.train_and_evaluate(_CONFIG.value, _WORKDIR.value)  # Logs its evaluation summary.


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)

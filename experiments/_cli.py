"""What the binaries in `experiments/` share: flag parsing and errors that end in one line.

    if __name__ == "__main__":
      _cli.run(main, name="train", fields="configs/common.py")

`run` parses the flags (a bad `--config` or override exits with one `FATAL Flags parsing error`
line), then runs `main`; a `ValueError` (an invalid value, `CheckpointMismatchError`),
`FileNotFoundError` (no checkpoint) or `FloatingPointError` (`NonFiniteLossError`) from it exits
non-zero with one `FATAL ...` line instead of a traceback.
"""

import functools
import logging as std_logging
import math
import os
import shlex
import sys
from typing import Callable, NoReturn, Optional, Sequence

from absl import app
from absl import flags
from absl import logging

# CheckpointMismatchError is a ValueError, NonFiniteLossError a FloatingPointError.
FATAL_ERRORS = (ValueError, FileNotFoundError, FloatingPointError)


def one_line(message: object) -> str:
  """`message` with its lines joined by ' | ' (lists of mismatches stay readable)."""
  return " | ".join(line.strip() for line in str(message).splitlines() if line.strip())


def fatal(message: object, name: Optional[str] = None) -> NoReturn:
  """Exits with status 1 and one line, `FATAL [name: ]<message>`, on stderr."""
  sys.exit(f"FATAL {name + ': ' if name else ''}{one_line(message)}")


def parse_flags(argv: Sequence[str], *, fields: str = "the config file") -> list[str]:
  """absl flag parsing that exits with one line instead of a traceback.

  Args:
    argv: the command line.
    fields: where a config's fields are described, named when an override names no field.
  """
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:  # config_flags: an override names no config field.
    while isinstance(e, BaseException) and e.args:
      e = e.args[0]
    name, _, hint = str(e).partition("\n")
    name = name.strip("'\"")
    bad = [a.split("=")[0] for a in argv[1:] if a.split("=")[0].startswith("--config.")
           and f".{name}." in a.split("=")[0] + "."]
    message = f"{', '.join(bad) or '--config'}: the config has no field {name!r}"
    if one_line(hint):
      message += f". {one_line(hint)}"
    sys.exit(f"FATAL Flags parsing error: {message} (fields: {fields})")
  except (flags.Error, ValueError) as e:
    # config_flags puts the config file's whole traceback in the message: keep its first line
    # and the exception.
    lines = [line for line in str(e).splitlines() if line.strip()]
    message = lines[0] if len(lines) < 2 else f"{lines[0]} {lines[-1].strip()}"
    sys.exit(f"FATAL Flags parsing error: {message}")


def quiet_orbax(level: int = std_logging.WARNING) -> None:
  """Drops orbax's log records below `level` (it reports every save and restore at INFO, and
  warns that a read-only checkpoint directory is read only)."""
  logging.get_absl_logger().addFilter(
      lambda r: r.levelno >= level or "/orbax/" not in r.pathname)


def check_directory(flag: str, path: Optional[str]) -> None:
  """Raises ValueError if `path` (the value of `--flag`) exists and is not a directory."""
  if path and os.path.exists(path) and not os.path.isdir(path):
    raise ValueError(f"--{flag}={path} is a file; it must be a directory")


def new_result(out: Optional[str], workdir: str, name: str) -> str:
  """Where a binary writes its result: `--out`, or `name` in the run's workdir; a ValueError
  if that file exists (a result is never overwritten)."""
  path = out or os.path.join(workdir, name)
  if os.path.exists(path):
    raise ValueError(f"{path} exists; pass another --out")
  return path


def command(name: str) -> str:
  """The command line this process was started with, as `python -m experiments.<name> ...`
  (what a result file records so it can be remade)."""
  return " ".join(["python -m experiments." + name] + [shlex.quote(a) for a in sys.argv[1:]])


def check_positive(flag: str, value: Optional[int]) -> None:
  """Raises ValueError if `--flag` was given a value below 1 (None means the default)."""
  if value is not None and value < 1:
    raise ValueError(f"--{flag} must be a positive integer, got {value}")


def parse_lengths(values: Optional[Sequence[str]], flag: str = "lengths") -> Optional[list[int]]:
  """`--lengths` as positive integers; None when the flag was not given."""
  if values is None:
    return None
  try:
    lengths = [int(v) for v in values]
  except ValueError as e:
    raise ValueError(f"--{flag} must be comma-separated integers, got {','.join(values)}") from e
  if not lengths or any(n < 1 for n in lengths):
    raise ValueError(f"--{flag} must be positive integers, got {','.join(values) or 'nothing'}")
  return lengths


def parse_numbers(values: Optional[Sequence[str]], flag: str) -> list[float]:
  """A comma-separated list flag as finite numbers; ValueError naming `--flag` otherwise."""
  if not values:
    raise ValueError(f"--{flag} is required")
  try:
    numbers = [float(v) for v in values]
  except ValueError:
    raise ValueError(f"--{flag} must be comma-separated numbers, got {','.join(values)!r}") \
        from None
  if not all(math.isfinite(n) for n in numbers):
    raise ValueError(f"--{flag} must be finite numbers, got {','.join(values)!r}")
  return numbers


def run(main: Callable[[list[str]], None], *, name: Optional[str] = None,
        fields: str = "the config file", positional: int = 0) -> None:
  """`app.run(main)` with `parse_flags`, and one `FATAL [name: ]...` line for unexpected
  arguments and the errors in `FATAL_ERRORS`.

  Args:
    main: the binary's `main(argv)`.
    name: the command's name, put before the error messages of `main`.
    fields: where the config's fields are described (`parse_flags`).
    positional: how many arguments may follow the flags (a subcommand's name, say).
  """

  def guarded(argv):
    if len(argv) > 1 + positional:
      fatal(f"unexpected arguments: {argv[1:]}", name)
    try:
      main(argv)
    except FATAL_ERRORS as e:
      fatal(e, name)

  app.run(guarded, flags_parser=functools.partial(parse_flags, fields=fields))

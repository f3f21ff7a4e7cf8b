"""Validation of the frozen config dataclasses: typed fields and sections with no unknown names.

Low in the import graph (nothing of memkernel below it), so every config (the families', the
probes', the experiment's and the benchmark's) validates the same way and names what was wrong.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional


def check_int(section: str, name: str, value: Any, minimum: Optional[int]) -> None:
  """Raises ValueError unless `section.name` is an integer (not a bool) >= `minimum`."""
  if not isinstance(value, int) or isinstance(value, bool):
    raise ValueError(f"{section}.{name} must be an integer, got {value!r}")
  if minimum is not None and value < minimum:
    raise ValueError(f"{section}.{name} must be >= {minimum}, got {value!r}")


def check_number(section: str, name: str, value: Any, minimum: float, strict: bool) -> None:
  """Raises ValueError unless `section.name` is a finite number >= (or, `strict`, >) `minimum`."""
  if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
    raise ValueError(f"{section}.{name} must be a finite number, got {value!r}")
  if value < minimum or (strict and value == minimum):
    raise ValueError(f"{section}.{name} must be {'>' if strict else '>='} {minimum}, got {value!r}")


def from_mapping(cls, values: Mapping[str, Any], what: Optional[str] = None):
  """`cls(**values)` for a dataclass `cls`, from a mapping or a `ConfigDict`.

  Raises:
    ValueError: `values` is not a mapping, or names a field `cls` does not have (all of them are
      named, with the known ones); `what` names the section in the message (default: the class).
  """
  what = what or cls.__name__
  if hasattr(values, "to_dict"):
    values = values.to_dict()
  if not isinstance(values, Mapping):
    raise ValueError(f"{what} must be a mapping, got {type(values).__name__}")
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - known)
  if unknown:
    raise ValueError(f"{what} got unknown field(s) {unknown}; known fields: {sorted(known)}")
  return cls(**dict(values))

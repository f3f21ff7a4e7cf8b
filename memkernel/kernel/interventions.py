"""Interventions: run-time ablations of the kernel's memory sources, as static transforms.

Sources are dropped by name (`memkernel.kernel.fusion.source_names`); a dropped source adds
exactly zero. The auditor (`memkernel.analysis.audit`) runs each one against the unmodified
forward.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence


@dataclasses.dataclass(frozen=True)
class Interventions:
  """Run-time ablations of the memory's sources, applied as explicit, static transforms.

  Attributes:
    drop: names of the fused sources whose contribution is zeroed (each must be one of the
      model's sources; the model raises `ValueError` otherwise).
    next_best_span: read each head's best unselected leaves of the last routing step instead of
      its selected ones (same depth, sealed only).
    root_drop: roots whose output is zeroed everywhere.
  """

  drop: tuple[str, ...] = ()
  next_best_span: bool = False
  root_drop: tuple[int, ...] = ()

  def __post_init__(self):
    if isinstance(self.drop, str) or not all(isinstance(s, str) for s in self.drop):
      raise ValueError(f"Interventions.drop must be a tuple of source names, got {self.drop!r}")
    object.__setattr__(self, "drop", tuple(self.drop))  # Hashable: forwards are cached by it.

  def check(self, sources: Sequence[str]) -> None:
    """Raises `ValueError` naming a dropped source that is not among `sources`."""
    for name in self.drop:
      if name not in sources:
        raise ValueError(f"Interventions.drop names source {name!r}, but the model's sources "
                         f"are {tuple(sources)}")


NONE = Interventions()

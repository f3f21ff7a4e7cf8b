"""Interventions: run-time ablations of the kernel's memory sources, as static transforms.

A source switched off adds exactly zero; the auditor (`memkernel.analysis.audit`) runs each one
against the unmodified forward.
"""

from __future__ import annotations

import dataclasses

SOURCES = ("roots", "tree", "exact")


@dataclasses.dataclass(frozen=True)
class Interventions:
  """Run-time ablations of the memory's sources, applied as explicit, static transforms.

  Attributes:
    no_tree_read: zero the routed tree value's contribution.
    no_exact_read: zero the exact read's contribution.
    next_best_span: read each head's best unselected leaves of the last routing step instead of
      its selected ones (same depth, sealed only).
    root_drop: roots whose output is zeroed everywhere.
  """

  no_tree_read: bool = False
  no_exact_read: bool = False
  next_best_span: bool = False
  root_drop: tuple[int, ...] = ()


NONE = Interventions()

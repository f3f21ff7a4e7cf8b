"""Training on several processes (hosts): starting `jax.distributed` and who writes what.

One process per host, each seeing its own devices; `jax.devices()` is then every process's
devices and the training mesh spans them all. Nothing else changes in the loop: the batch is
generated inside the compiled step from the step's key and sharded along 'data' over the global
mesh, so each device computes its own rows and a run on P processes is the same computation as
one process with the same devices (`tests/test_multihost.py` checks it bit for bit).

    python -m experiments.train ... --coordinator_address=host0:1234 --num_processes=2 \
        --process_id=0          # on host 0; --process_id=1 on host 1
    python -m experiments.train ... --distributed   # TPU slices, SLURM, Open MPI, GKE: automatic

Files: every process calls the checkpointer (orbax coordinates a multi-process save: process 0
writes the replicated arrays and commits the step); only process 0 (`is_primary`) writes
`metrics.jsonl`, TensorBoard events, `eval.json` and the audit, and moves damaged checkpoints
aside. The workdir must be on a file system every process sees.

On the CPU, collectives between processes go through gloo (`jax_cpu_collectives_implementation`).
"""

from __future__ import annotations

from typing import Optional

import jax
from jax.experimental import multihost_utils


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None) -> None:
  """Starts `jax.distributed`: with all three arguments or none (the platform's own discovery).

  Must run before anything touches a device.

  Raises:
    ValueError: some but not all of the three arguments, or values out of range.
  """
  given = {"coordinator_address": coordinator_address, "num_processes": num_processes,
           "process_id": process_id}
  missing = sorted(k for k, v in given.items() if v is None)
  if missing and len(missing) < len(given):
    raise ValueError(f"multi-process training needs coordinator_address, num_processes and "
                     f"process_id together (or none of them, for automatic discovery); "
                     f"missing: {missing}")
  if not missing:
    if not isinstance(coordinator_address, str) or ":" not in coordinator_address:
      raise ValueError(f"coordinator_address must be host:port, got {coordinator_address!r}")
    if num_processes < 1:
      raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    if not 0 <= process_id < num_processes:
      raise ValueError(f"process_id must be in [0, num_processes={num_processes}), "
                       f"got {process_id}")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)


def is_primary() -> bool:
  """Whether this process writes the run's files (process 0; always true on one process)."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier `name` (nothing on one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)

"""All checkpointing, over one orbax `CheckpointManager`.

A checkpoint step holds two items:

* `state`: the train-state pytree (params, optimiser state, memory-state dataclasses...), written
  with `StandardSave` (tensorstore/OCDBT; every dtype and shape round-trips bit-exactly).
* `meta`: a JSON item `{"config": <full experiment config>, "data_state": <data-iterator state>}`,
  so a fresh process with no flags can rebuild the model (`restore_meta`) and resume the data
  stream where the model state left it. JSON turns tuples into lists and keys into strings.

Guarantees, delegated to orbax options rather than re-implemented:

* Atomic commit: each step is written into `<step>.orbax-checkpoint-tmp*` and renamed to
  `<step>` only after every item is on disk. A process killed mid-save leaves at most a temporary
  directory, which step discovery ignores; the previous complete step stays restorable. The next
  writer (not a `read_only` reader) removes such directories before its first save.
* Asynchronous saves: `save` returns once device arrays are copied to host; writing continues in a
  background thread. `wait()` / `close()` block until it is committed.
* Rotation: the newest `keep` steps are preserved (`preservation_policy=LatestN`). Older steps
  are first renamed into `checkpoints/_deleted/` (orbax `todelete_subdir`), then removed, so a
  kill during rotation cannot leave a half-deleted step that still looks committed.

Beyond atomicity, files can still be damaged after the commit (a full disk, a copy cut short):
`restore_latest`, which a resuming run uses, falls back to the newest older step that reads back
and moves the damaged ones aside.

`restore` compares the saved tree structure, shapes and dtypes (read from orbax's step metadata,
without touching array data) against the expected abstract state first, and raises
`CheckpointMismatchError` naming every mismatching path; orbax would otherwise silently cast dtypes.

Typical use::

  with Checkpointer(workdir) as ckpt:
    for step in range(start, num_steps):
      state = train_step(state, batch)
      ckpt.save(step, state, config=config.to_dict(), data_state={"step": step, "seed": seed})

  abstract = jax.eval_shape(init_state, rng)
  state, meta = Checkpointer(workdir).restore(abstract_state=abstract)  # Resume.
  config = Checkpointer(workdir, read_only=True).restore_meta()["config"]  # Beside a live run.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Callable, Mapping

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp

from memkernel import distributed

PyTree = Any

STATE_ITEM = "state"
META_ITEM = "meta"
# Rotated-out steps are renamed here (atomically) and removed from here by the writer. Deleting
# a step in place, as orbax does by default, is not atomic: a kill mid-delete leaves a listed
# step with some of its files gone.
_TRASH_SUBDIR = "_deleted"
# Steps that no longer read back are moved here when a writer resumes from an older one.
_DAMAGED_SUBDIR = "_damaged"


class CheckpointMismatchError(ValueError):
  """The saved state does not match the expected tree structure, shapes or dtypes."""


def _key_name(key: Any) -> str:
  """One path component as a plain string (dict key, attribute name or sequence index)."""
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _path_str(path: tuple[Any, ...]) -> str:
  """`params/layer_0/w` for a jax key path; dataclass fields and dict keys read the same."""
  return "/".join(_key_name(k) for k in path) or "<root>"


def _describe(shape: tuple[int, ...], dtype: Any) -> str:
  return f"{tuple(shape)} {np.dtype(dtype).name}"


def _flatten_by_path(tree: PyTree) -> dict[str, Any]:
  """Leaves keyed by path string; orbax saves tuples as lists and dataclasses as dicts, and
  comparing by path keeps those container changes from reading as mismatches."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {_path_str(path): leaf for path, leaf in leaves}


def _expected_shape_dtype(leaf: Any) -> tuple[tuple[int, ...], np.dtype]:
  if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
    return tuple(leaf.shape), np.dtype(leaf.dtype)
  value = np.asarray(leaf)  # A Python scalar in a concrete state.
  return value.shape, value.dtype


def _mismatches(saved_tree: PyTree, abstract_state: PyTree) -> list[str]:
  """Every path whose presence, shape or dtype differs between checkpoint and expectation."""
  saved = _flatten_by_path(saved_tree)
  expected = _flatten_by_path(abstract_state)
  problems = []
  for path in sorted(saved.keys() | expected.keys()):
    if path not in saved:
      shape, dtype = _expected_shape_dtype(expected[path])
      problems.append(f"{path}: missing from checkpoint, expected {_describe(shape, dtype)}")
      continue
    saved_shape, saved_dtype = tuple(saved[path].shape), np.dtype(saved[path].dtype)
    if path not in expected:
      problems.append(
          f"{path}: saved {_describe(saved_shape, saved_dtype)}, not in the expected state"
      )
      continue
    shape, dtype = _expected_shape_dtype(expected[path])
    if isinstance(saved[path], ocp.metadata.ScalarMetadata):
      # A Python scalar is recorded as int64/float64 whatever the expected width; only its kind
      # (integer, float, bool) is a real mismatch.
      dtype_ok = saved_dtype.kind == dtype.kind
    else:
      dtype_ok = saved_dtype == dtype
    if saved_shape != shape or not dtype_ok:
      problems.append(
          f"{path}: saved {_describe(saved_shape, saved_dtype)}, "
          f"expected {_describe(shape, dtype)}"
      )
  return problems


def _preservation_options(keep: int | None) -> dict[str, Any]:
  """Keep-latest-N through `preservation_policy` where this orbax has it, else `max_to_keep`."""
  policies = getattr(ocp, "checkpoint_managers", None)
  if policies is not None and hasattr(policies, "LatestN"):
    return {"preservation_policy": policies.LatestN(n=keep)}  # n=None preserves every step.
  return {"max_to_keep": keep}


class Checkpointer:
  """Saves and restores `(state, config, data_state)` under `directory/checkpoints`.

  Args:
    directory: the run's work directory; checkpoints go to `directory/checkpoints`.
    keep: how many of the newest steps to keep (older ones are deleted after each commit);
      None keeps every step.
    async_save: write in a background thread (`save` returns once arrays are on host).
    save_interval_steps: `save` is a no-op unless `step` is a multiple of this, `force=True`,
      or the directory holds no checkpoint yet (orbax always takes the first save).
    read_only: never save, delete or clean up; for readers (evaluation, `load_run`) that may run
      beside a training process. `latest_step` then re-scans the directory on every call.
  """

  def __init__(
      self,
      directory: str | os.PathLike[str],
      *,
      keep: int | None = 3,
      async_save: bool = True,
      save_interval_steps: int = 1,
      read_only: bool = False,
  ):
    if keep is not None and keep < 1:
      raise ValueError(f"keep must be >= 1 or None, got {keep!r}")
    if save_interval_steps < 1:
      raise ValueError(f"save_interval_steps must be >= 1, got {save_interval_steps!r}")
    if os.path.exists(directory) and not os.path.isdir(directory):
      raise ValueError(f"{os.fspath(directory)} is a file; a run's directory was expected")
    # orbax needs absolute paths; the README runs `--workdir=runs/mqar`.
    self.directory = os.path.join(os.path.abspath(os.fspath(directory)), "checkpoints")
    self.read_only = read_only
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=0 if read_only else save_interval_steps,
        enable_async_checkpointing=async_save,
        read_only=read_only,
        create=not read_only,
        # Temporary directories left by a killed writer are removed when the next writer starts;
        # a reader must not do it, since they may be a live writer's in-flight save.
        cleanup_tmp_directories=not read_only,
        todelete_subdir=None if read_only else _TRASH_SUBDIR,
        **_preservation_options(keep),
    )
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=options,
        # Registered up front so a fresh process can read item metadata before any restore.
        item_handlers={
            STATE_ITEM: ocp.StandardCheckpointHandler(),
            META_ITEM: ocp.JsonCheckpointHandler(),
        },
    )
    self._purge_deleted_steps()

  # -- saving ---------------------------------------------------------------------------------

  def save(
      self,
      step: int,
      state: PyTree,
      *,
      config: Mapping[str, Any],
      data_state: Mapping[str, Any],
      force: bool = False,
  ) -> bool:
    """Starts saving `state` and its metadata as `step`.

    Args:
      step: the train step; steps must increase.
      state: the train-state pytree (jax/numpy arrays, `flax.struct.dataclass` nodes).
      config: the full experiment config as a plain, JSON-serialisable dict.
      data_state: the data-iterator state, e.g. `{"step": n, "seed": s}`.
      force: save even if `step` is off the `save_interval_steps` grid.

    Returns:
      Whether a save was started (False when the interval policy skipped this step).
    """
    meta = {"config": dict(config), "data_state": dict(data_state)}
    for field, value in meta.items():
      try:  # Fail here, not later in the background writer.
        json.dumps(value)
      except (TypeError, ValueError) as e:
        raise TypeError(f"{field} must be JSON-serialisable: {e}") from e
    self._purge_deleted_steps()
    return self._manager.save(
        step,
        args=ocp.args.Composite(
            **{STATE_ITEM: ocp.args.StandardSave(state), META_ITEM: ocp.args.JsonSave(meta)}
        ),
        force=force,
    )

  def wait(self) -> None:
    """Blocks until every started save is committed (and old steps rotated out)."""
    self._manager.wait_until_finished()
    self._purge_deleted_steps()

  def close(self) -> None:
    """Waits for pending saves and releases the manager's threads."""
    self._manager.close()
    self._purge_deleted_steps()

  def _purge_deleted_steps(self) -> None:
    """Removes steps that rotation has already renamed out of sight. The trash directory itself
    stays, since orbax's background thread may be renaming the next step into it."""
    if self.read_only or not distributed.is_primary():
      return
    trash = os.path.join(self.directory, _TRASH_SUBDIR)
    if not os.path.isdir(trash):
      return
    for name in os.listdir(trash):
      shutil.rmtree(os.path.join(trash, name), ignore_errors=True)

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc_info: Any) -> None:
    self.close()

  # -- reading --------------------------------------------------------------------------------

  def all_steps(self) -> list[int]:
    """Committed steps, oldest first."""
    if self.read_only:
      self._manager.reload()
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """The newest committed step, or None if there is none. In-flight saves are not counted."""
    if self.read_only:
      self._manager.reload()
    return self._manager.latest_step()

  def _resolve_step(self, step: int | None) -> int:
    steps = self.all_steps()
    if step is None:
      if not steps:
        raise FileNotFoundError(f"no committed checkpoint in {self.directory}")
      return steps[-1]
    if step not in steps:
      raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; have {steps}")
    return step

  def saved_state_metadata(self, step: int | None = None) -> PyTree:
    """The saved state tree with orbax array metadata (shape, dtype, sharding) at the leaves."""
    step = self._resolve_step(step)
    metadata = self._manager.item_metadata(step)[STATE_ITEM]
    if metadata is None:
      raise FileNotFoundError(
          f"checkpoint step {step} in {self.directory} has no readable '{STATE_ITEM}' item"
      )
    return metadata.tree

  def restore(self, step: int | None = None, *, abstract_state: PyTree) -> tuple[PyTree, dict]:
    """Restores `(state, meta)` from `step` (default: the latest), checked against expectation.

    Args:
      step: the step to restore; None means the latest committed step.
      abstract_state: the expected state: a pytree of `jax.ShapeDtypeStruct` (from
        `jax.eval_shape`, optionally with shardings) or of concrete arrays. The result has its
        tree structure (dataclasses included) and shardings.

    Returns:
      `(state, meta)` with `meta = {"config": ..., "data_state": ...}`.

    Raises:
      CheckpointMismatchError: if any path is missing, extra, or has another shape or dtype;
        the message names every such path. Nothing is restored in that case.
      FileNotFoundError: if there is no such committed step.
    """
    step = self._resolve_step(step)
    problems = _mismatches(self.saved_state_metadata(step), abstract_state)
    if problems:
      raise CheckpointMismatchError(
          f"checkpoint step {step} in {self.directory} does not match the expected state "
          f"({len(problems)} mismatching path(s)):\n  " + "\n  ".join(problems)
      )
    restored = self._manager.restore(
        step,
        args=ocp.args.Composite(
            **{
                STATE_ITEM: ocp.args.StandardRestore(
                    abstract_state, fallback_sharding=_default_sharding()
                ),
                META_ITEM: ocp.args.JsonRestore(),
            }
        ),
    )
    return restored[STATE_ITEM], restored[META_ITEM]

  def restore_latest(
      self,
      *,
      abstract_state: PyTree,
      check_meta: Callable[[int, dict], None] | None = None,
  ) -> tuple[int, PyTree, dict]:
    """Restores the newest step that reads back whole, falling back past damaged ones.

    A step whose files are truncated or corrupted (a disk filled up, a copy cut short) fails to
    read; the next older kept step is tried instead, with a warning. Once one reads back, a
    writer moves the damaged newer steps into `checkpoints/_damaged/` (kept for inspection; the
    resumed run may save those step numbers again). When no step reads back nothing is moved.

    Args:
      abstract_state: as for `restore`.
      check_meta: called with `(step, meta)` before a step's arrays are read; what it raises
        propagates (e.g. a checkpoint of another run).

    Returns:
      `(step, state, meta)` of the restored step.

    Raises:
      CheckpointMismatchError: the newest readable step does not match `abstract_state`.
      FileNotFoundError: no committed step.
      ValueError: no step reads back (names the newest step's error).
    """
    steps = self.all_steps()
    if not steps:
      raise FileNotFoundError(f"no committed checkpoint in {self.directory}")
    damaged = {}
    for step in reversed(steps):
      try:
        meta = self.restore_meta(step)
      except Exception as e:  # pylint: disable=broad-except  # Whatever a damaged file raises.
        damaged[step] = e
        continue
      if check_meta is not None:
        check_meta(step, meta)
      try:
        state, meta = self.restore(step, abstract_state=abstract_state)
      except CheckpointMismatchError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        damaged[step] = e
        continue
      break
    else:
      newest = steps[-1]
      raise ValueError(f"no checkpoint in {self.directory} reads back; step {newest}: "
                       f"{_first_line(damaged[newest])}")
    for bad, error in sorted(damaged.items()):
      moved = self._set_aside(bad)
      logging.warning("Checkpoint step %d in %s is damaged (%s)%s; restored step %d instead.",
                      bad, self.directory, _first_line(error),
                      f"; moved it to {moved}" if moved else "", step)
    return step, state, meta

  def _set_aside(self, step: int) -> str | None:
    """Moves a damaged step out of step discovery (a writer only); returns where to."""
    if self.read_only:
      return None
    target = os.path.join(self.directory, _DAMAGED_SUBDIR, str(step))
    if distributed.is_primary():  # One process moves it; the others wait, then look again.
      os.makedirs(os.path.dirname(target), exist_ok=True)
      if os.path.exists(target):
        shutil.rmtree(target)
      os.replace(os.path.join(self.directory, str(step)), target)
    distributed.barrier(f"checkpoint_set_aside_{step}")
    self._manager.reload()
    return target

  def restore_meta(self, step: int | None = None) -> dict:
    """Only the JSON item `{"config": ..., "data_state": ...}`; reads no arrays."""
    step = self._resolve_step(step)
    restored = self._manager.restore(
        step, args=ocp.args.Composite(**{META_ITEM: ocp.args.JsonRestore()})
    )
    return restored[META_ITEM]

  def restore_raw(self, step: int | None = None) -> PyTree:
    """The state as saved, without a target: nested dicts/lists of arrays (dataclasses come
    back as dicts, tuples as lists). Arrays whose saved sharding does not exist on this host's
    devices are placed on the default device."""
    step = self._resolve_step(step)
    restored = self._manager.restore(
        step,
        args=ocp.args.Composite(
            **{STATE_ITEM: ocp.args.StandardRestore(fallback_sharding=_default_sharding())}
        ),
    )
    return restored[STATE_ITEM]


def _first_line(error: BaseException) -> str:
  """The error's type and first line, cut to 200 characters (tensorstore adds its whole spec)."""
  lines = str(error).strip().splitlines()
  line = lines[0] if lines else ""
  return f"{type(error).__name__}: {line[:200]}{'...' if len(line) > 200 else ''}"


def _default_sharding() -> jax.sharding.Sharding:
  return jax.sharding.SingleDeviceSharding(jax.devices()[0])

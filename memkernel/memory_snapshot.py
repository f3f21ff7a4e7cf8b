"""A model's memory as memory lines: saved by one process, restored by another, verified.

    seal = save_memory(store, memory, name="stream-7")          # then the process may end
    memory = restore_memory(store_dir, key, name="stream-7", like=family.init_memory(config, B))

Snapshots are lines like any other (with all-zero keys, which match no query above a
non-negative similarity floor); a store kept for snapshots alone keeps them out of a model's
logits bias. Any family's memory pytree (the kernel's tree, token cache and trunk state; a peer's KV cache)
is written as lines of a store: every array's bytes, split into 16-bit pieces (exact as float32),
`value_dim` pieces a line, with the array's path, dtype and shape in the line's context, then a
manifest line, then a seal. Restoring verifies the whole store first and refuses a damaged one or
a snapshot the newest seal does not cover, checks the memory's structure against `like`, and
rebuilds the arrays bit for bit, so a stream continues in a new process exactly where it stopped.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from memkernel.store import store as store_lib
from memkernel.store import verification


def _leaves(memory: Any):
  flat, treedef = jax.tree_util.tree_flatten_with_path(memory)
  return [(jax.tree_util.keystr(path), np.asarray(jax.device_get(leaf))) for path, leaf in flat], \
      treedef


def save_memory(store: store_lib.MemoryLineStore, memory: Any, *, name: str) -> store_lib.Seal:
  """Writes `memory` as lines of `store` under snapshot `name`, then seals the store.

  Raises:
    ValueError: `name` is empty or already used in this store (checked by reading every line's
      context: two processes saving one name at once are not told apart).
  """
  if not isinstance(name, str) or not name:
    raise ValueError(f"a snapshot needs a non-empty name, got {name!r}")
  if any(line.ctx.get("snapshot") == name for line in store.lines()):
    raise ValueError(f"the store already holds a snapshot named {name!r}")
  width = store.value_dim
  keys, values, ctxs, manifest = [], [], [], []
  for path, array in _leaves(memory)[0]:
    pieces = np.frombuffer(np.ascontiguousarray(array).tobytes() + b"\0" * (array.nbytes % 2),
                           "<u2").astype(np.float32)
    parts = max(1, -(-len(pieces) // width))
    manifest.append({"path": path, "dtype": array.dtype.name, "shape": list(array.shape),
                     "parts": parts})
    for part in range(parts):
      chunk = np.zeros(width, np.float32)
      piece = pieces[part * width:(part + 1) * width]
      chunk[:len(piece)] = piece
      keys.append(np.zeros(store.key_dim, np.float32))
      values.append(chunk)
      ctxs.append({"snapshot": name, "path": path, "part": part})
  keys.append(np.zeros(store.key_dim, np.float32))
  values.append(np.zeros(width, np.float32))
  ctxs.append({"snapshot": name, "manifest": manifest})
  store.put_many(keys, values, ctxs)
  return store.seal()


def restore_memory(directory: str, key: bytes, *, name: str, like: Any) -> Any:
  """The memory saved as snapshot `name`, with the structure of `like` (e.g. `init_memory` of
  the same config and batch size).

  Raises:
    ValueError: the store does not verify, the snapshot is missing, not covered by the newest
      seal, or its arrays do not match `like`'s paths, dtypes and shapes (each named).
  """
  report = verification.require_ok(directory, key)
  parts: dict[tuple[str, int], np.ndarray] = {}
  manifest, manifest_seq = None, None
  with store_lib.MemoryLineStore.open(directory, key) as store:
    for line in store.lines():
      if line.ctx.get("snapshot") != name:
        continue
      if "manifest" in line.ctx:
        manifest, manifest_seq = line.ctx["manifest"], line.seq
      else:
        parts[(line.ctx["path"], line.ctx["part"])] = line.value
  if manifest is None:
    raise ValueError(f"the store at {directory} holds no snapshot named {name!r}")
  if manifest_seq >= report.sealed:
    raise ValueError(f"snapshot {name!r} is not covered by the newest seal ({report.sealed} "
                     f"lines): it may be incomplete")
  expected, treedef = _leaves(like)
  saved = {entry["path"]: entry for entry in manifest}
  if [p for p, _ in expected] != [entry["path"] for entry in manifest]:
    raise ValueError(f"snapshot {name!r} holds {sorted(saved)}; the memory expects "
                     f"{[p for p, _ in expected]}")
  arrays = []
  for path, reference in expected:
    entry = saved[path]
    if entry["dtype"] != reference.dtype.name or tuple(entry["shape"]) != reference.shape:
      raise ValueError(f"{path}: the snapshot holds {entry['dtype']} {entry['shape']}, the "
                       f"memory expects {reference.dtype.name} {list(reference.shape)}")
    missing = [p for p in range(entry["parts"]) if (path, p) not in parts]
    if missing:
      raise ValueError(f"snapshot {name!r} lacks part(s) {missing} of {path}")
    pieces = np.concatenate([parts[(path, p)] for p in range(entry["parts"])])
    data = pieces.astype("<u2").tobytes()[:reference.nbytes]
    arrays.append(np.frombuffer(data, reference.dtype).reshape(reference.shape).copy())
  return jax.tree_util.tree_unflatten(treedef, arrays)

"""A fault-injecting file layer: a power cut that loses or garbles every write not yet synced.

SQLite's own crash tests run the library on a VFS that, at a simulated crash, keeps what was
synced and drops or corrupts the rest. `FaultVFS` does the same for the store, through apsw (the
standard library's sqlite3 cannot take a Python VFS): every file's content at its last `xSync` is
durable, every write or truncation after it is pending. At write number `crash_at` the disk
"fails" (that write and every later file operation raise), the writer's `put` raises and is not
acknowledged; `crash_image` then writes, for every file, its durable content with each pending
operation kept, dropped or (writes) garbled with random bytes, at random. The store opened on that
image with the ordinary library must verify and hold every acknowledged line.

    trial(directory, crash_at=120, rng=rng) -> {"acknowledged", "verifies", "kept", ...}
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Optional

import numpy as np

from memkernel.store import keys as keys_lib
from memkernel.store import log
from memkernel.store import store as store_lib
from memkernel.store import verification

KEY = keys_lib.STUDY_KEY


class DiskFailed(Exception):
  """Raised from the VFS once the simulated crash has happened."""


@dataclasses.dataclass
class _Track:
  durable: Optional[bytes] = None   # the content at the last sync (None: never synced)
  pending: list = dataclasses.field(default_factory=list)   # ("write", offset, data) / ("truncate", n)


def _vfs_classes():
  import apsw  # Only this study needs apsw.

  class FaultFile(apsw.VFSFile):

    def __init__(self, vfs, name, flags):
      super().__init__("", name, flags)
      self._vfs = vfs
      self._path = name.filename() if hasattr(name, "filename") else name
      self._track = vfs.tracks.setdefault(self._path, _Track()) if self._path else None

    # After the crash nothing reaches the tracked files: SQLite's clean-up (rollback, close)
    # writes into the void, as it would after a power cut.

    def xWrite(self, data, offset):
      if self._vfs.crashed:
        return
      self._vfs.writes += 1
      if self._vfs.writes == self._vfs.crash_at:
        self._vfs.crashed = True
        raise DiskFailed("the disk failed (simulated crash)")
      if self._track is not None:
        self._track.pending.append(("write", offset, bytes(data)))
      super().xWrite(data, offset)

    def xTruncate(self, size):
      if self._vfs.crashed:
        return
      if self._track is not None:
        self._track.pending.append(("truncate", size))
      super().xTruncate(size)

    def xSync(self, flags):
      if self._vfs.crashed:
        return
      super().xSync(flags)
      if self._track is not None:
        with open(self._path, "rb") as f:
          self._track.durable = f.read()
        self._track.pending = []

  class FaultVFS(apsw.VFS):
    """Registers as `name`; `crash_at` (1-based) is the write at which the disk fails."""

    def __init__(self, name: str, crash_at: int):
      self.tracks: dict[str, _Track] = {}
      self.writes = 0
      self.crash_at = crash_at
      self.crashed = False
      super().__init__(name, "")

    def xOpen(self, name, flags):
      return FaultFile(self, name, flags)

    def xDelete(self, name, syncdir):
      # Deleting a journal is how SQLite commits in rollback mode (it syncs the directory):
      # treated as durable at once.
      if self.crashed:
        return
      super().xDelete(name, syncdir)
      self.tracks.pop(name, None)

  return FaultVFS


def crash_image(tracks: dict, out_dir: str, rng: np.random.Generator) -> dict:
  """Writes each tracked file's post-crash content into `out_dir`: durable content, then every
  pending operation kept (p = 1/3), dropped (1/3) or garbled (1/3, writes only). The shared-memory
  index (-shm) is not durable storage and is left out, as after a reboot."""
  counts = {"kept": 0, "dropped": 0, "garbled": 0}
  os.makedirs(out_dir, exist_ok=True)
  for path, track in tracks.items():
    base = os.path.basename(path)
    if base.endswith("-shm"):
      continue
    content = bytearray(track.durable or b"")
    for op in track.pending:
      fate = rng.choice(["kept", "dropped", "garbled"])
      counts[fate] += 1
      if fate == "dropped":
        continue
      if op[0] == "truncate":
        del content[op[1]:]
        continue
      _, offset, data = op
      if fate == "garbled":
        data = rng.integers(0, 256, size=len(data), dtype=np.uint8).tobytes()
      if len(content) < offset:
        content.extend(b"\0" * (offset - len(content)))
      content[offset:offset + len(data)] = data
    if track.durable is not None or track.pending:
      with open(os.path.join(out_dir, base), "wb") as f:
        f.write(bytes(content))
  return counts


def trial(workdir: str, crash_at: int, rng: np.random.Generator, puts: int = 60,
          name: str = "memkernel-fault") -> dict:
  """Writes lines through a `FaultVFS` until the disk fails at write `crash_at`, builds a crash
  image, and checks it with the ordinary store: it verifies, and holds every acknowledged line."""
  live, image = os.path.join(workdir, "live"), os.path.join(workdir, "image")
  os.makedirs(live)
  vfs = _vfs_classes()(name, crash_at)
  acknowledged: list[str] = []
  store = None
  try:
    store = store_lib.MemoryLineStore.open(live, KEY, key_dim=8, value_dim=4, vfs=name)
    for i in range(puts):
      n = int(rng.integers(1, 6))
      acknowledged += store.put_many(rng.normal(size=(n, 8)), rng.normal(size=(n, 4)),
                                     [{"put": i}] * n)
      if rng.random() < 0.1:
        store.seal()
  except Exception:  # pylint: disable=broad-except
    if not vfs.crashed:
      raise
  finally:
    vfs.crashed = True   # nothing more reaches the disk, closing included
    if store is not None:
      try:
        store.close()
      except Exception:  # pylint: disable=broad-except
        pass
    vfs.unregister()
  counts = crash_image(vfs.tracks, image, rng)
  # seal.json is written by the store itself (temp file, fsync, rename, directory fsync), not
  # through SQLite: what the live directory holds is what a crash leaves.
  if os.path.exists(os.path.join(live, log.SEAL_NAME)):
    shutil.copy(os.path.join(live, log.SEAL_NAME), os.path.join(image, log.SEAL_NAME))
  result = {"crash_at": crash_at, "crashed": vfs.writes >= crash_at, "writes": vfs.writes,
            "acknowledged": len(acknowledged), **counts}
  if not os.path.exists(os.path.join(image, log.DB_NAME)):
    result.update(verifies=not acknowledged, records=0, lost_acknowledged=len(acknowledged),
                  damage=None)
    return result
  report = verification.verify(image, KEY)
  stored = set()
  if report.ok and report.records:
    with store_lib.MemoryLineStore.open(image, KEY) as reopened:
      stored = {line.anchor for line in reopened.lines()}
  result.update(verifies=report.ok, records=report.records, damage=report.damage,
                lost_acknowledged=sum(a not in stored for a in acknowledged))
  return result


def study(trials: int, workdir: str, seed: int = 0, max_writes: Optional[int] = None,
          progress=None) -> dict:
  """`trials` crashes at uniformly random write numbers over a whole run's writes."""
  rng = np.random.default_rng(seed)
  if max_writes is None:   # how many writes a run without a crash makes
    probe = trial(os.path.join(workdir, "probe"), 10**9, np.random.default_rng(seed))
    max_writes = probe["writes"]
  rows = []
  failures = []
  for t in range(trials):
    rows.append(trial(os.path.join(workdir, f"t{t}"), int(rng.integers(1, max_writes + 1)), rng))
    if not rows[-1]["verifies"] or rows[-1]["lost_acknowledged"]:
      failures.append(rows[-1])
    if progress and (t + 1) % 25 == 0:
      progress(f"faults: {t + 1}/{trials}")
  return {"trials": trials, "writes_per_run": max_writes,
          "crashed": sum(r["crashed"] for r in rows),
          "verified": sum(r["verifies"] for r in rows),
          "lost_acknowledged": sum(r["lost_acknowledged"] for r in rows),
          "acknowledged": sum(r["acknowledged"] for r in rows),
          "pending_ops": {k: sum(r[k] for r in rows) for k in ("kept", "dropped", "garbled")},
          "damage_named": sorted({r["damage"] for r in rows if r["damage"]}),
          "failures": failures[:10]}

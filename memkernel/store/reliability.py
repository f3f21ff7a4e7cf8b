"""The store's reliability study: crashes, concurrent writers, every damage, forgers, scale.

Each part returns a JSON-ready dict of figures; `experiments.store reliability` runs them all and
writes `reliability.json` (the figures in docs/results/store/ come from it).

  kills        SIGKILL a writer process at random instants, many times: every acknowledged line
               is present, in order, and the store verifies (no false alarm on a crash state).
  concurrent   P processes append N lines each at once: P*N contiguous lines, a valid chain.
  damage       every kind in `tamper` at random lines of a sealed store: the kind verify names
               and whether it names the exact line.
  forgers      re-chained stores made with guessed keys: how many verify (must be none).
  scale        a store of many lines verified (iteratively) and timed.
  faults       power cuts on a fault-injecting file layer that drops or garbles unsynced
               writes (`faults.py`): every crash image verifies and keeps every acknowledged line.
"""

from __future__ import annotations

import collections
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Callable, Optional

import numpy as np

from memkernel.store import faults as faults_lib
from memkernel.store import keys as keys_lib
from memkernel.store import log
from memkernel.store import store as store_lib
from memkernel.store import tamper
from memkernel.store import verification as verify_lib

KEY = keys_lib.STUDY_KEY
EXPECTED = {   # the tamper function -> the kind verify should name
    "flipped_byte": "flipped_byte", "raw_flipped_byte": "flipped_byte",
    "edited_field": "edited_field", "edited_tags": "edited_field",
    "edited_timestamp": "edited_timestamp",
    "deleted": "deleted", "deleted_renumbered": "deleted", "inserted": "inserted",
    "inserted_copy": "inserted", "swapped": "swapped", "reordered": "reordered",
    "truncated_tail": "truncated_tail", "forged_chain": "forged"}


def writer(directory: str, lines: int, batch: int, seed: int, ack_file: str,
           key: bytes = KEY) -> subprocess.Popen:
  """Starts a writer process (`memkernel.store.writer`) appending its acks to `ack_file`."""
  return subprocess.Popen(
      [sys.executable, "-m", "memkernel.store.writer", directory, key.hex(), str(lines),
       str(batch), str(seed), ack_file], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
      text=True)


def read_acks(ack_file: str) -> list[str]:
  """The anchors a writer acknowledged (a line cut by a kill is not an ack)."""
  if not os.path.exists(ack_file):
    return []
  with open(ack_file) as f:
    return [l.split()[1] for l in f.read().split("\n") if l.startswith("ack ") and
            len(l.split()) == 2 and len(l.split()[1]) == 64]


def wait_for_first_ack(proc: subprocess.Popen, ack_file: str, timeout_s: float = 60.0) -> None:
  deadline = time.monotonic() + timeout_s
  while not (os.path.exists(ack_file) and os.path.getsize(ack_file)):
    if proc.poll() is not None or time.monotonic() > deadline:
      raise RuntimeError(f"the writer acknowledged nothing: {proc.stderr.read()}")
    time.sleep(0.005)


def kills(trials: int, workdir: str, seed: int = 0, per_store: int = 50,
          progress: Optional[Callable[[str], None]] = None) -> dict:
  """Kills a writer `trials` times at a random instant after its first acknowledged line; a
  store takes `per_store` kills in a row (each writer appends to the last one's lines)."""
  rng = np.random.default_rng(seed)
  totals = collections.Counter()
  in_order = True
  for first_trial in range(0, trials, per_store):
    directory = os.path.join(workdir, f"store{first_trial}")
    acknowledged: list[str] = []
    for trial in range(first_trial, min(trials, first_trial + per_store)):
      ack_file = os.path.join(workdir, f"acks{trial}")
      proc = writer(directory, 10**7, int(rng.integers(1, 17)), trial, ack_file)
      wait_for_first_ack(proc, ack_file)
      time.sleep(rng.uniform(0.0, 0.3))   # a uniformly random instant in the next 0.3 s
      os.kill(proc.pid, signal.SIGKILL)
      proc.communicate()
      acknowledged += read_acks(ack_file)
      report = verify_lib.verify(directory, KEY)
      totals["false_tamper_alarms"] += not report.ok
      totals["unclean_shutdowns_seen"] += report.unclean_shutdown
      if progress and (trial + 1) % 25 == 0:
        progress(f"kills: {trial + 1}/{trials}")
    conn = log.connect(directory, create=False)
    try:
      stored = {row.anchor.hex(): row.fields.seq for row in log.iter_rows(conn)}
    finally:
      conn.close()
    places = [stored.get(a) for a in acknowledged]
    found = [p for p in places if p is not None]
    totals["acknowledged"] += len(acknowledged)
    totals["stored"] += len(stored)
    totals["lost_acknowledged"] += len(places) - len(found)
    in_order &= found == sorted(found)
    shutil.rmtree(directory)
  return {"trials": trials, "kills_per_store": per_store, **totals,
          "acknowledged_in_order": in_order}


def concurrent(processes: int, lines: int, directory: str) -> dict:
  """`processes` writers append `lines` each at once (batches of 1-4)."""
  start = time.perf_counter()
  procs = [writer(directory, lines, 1 + i % 4, 1000 + i,
                  os.path.join(os.path.dirname(directory), f"acks_concurrent{i}"))
           for i in range(processes)]
  failures = 0
  for proc in procs:
    proc.communicate()
    failures += proc.returncode != 0
  wall = time.perf_counter() - start
  report = verify_lib.verify(directory, KEY)
  conn = log.connect(directory, create=False)
  try:
    seqs = [row.fields.seq for row in log.iter_rows(conn)]
  finally:
    conn.close()
  return {"processes": processes, "lines_each": lines, "writer_failures": failures,
          "lines": len(seqs), "contiguous": seqs == list(range(len(seqs))),
          "verifies": report.ok, "wall_s": round(wall, 2),
          "lines_per_s": round(len(seqs) / wall, 1)}


def _sealed_store(directory: str, lines: int, seed: int) -> None:
  rng = np.random.default_rng(seed)
  with store_lib.MemoryLineStore.open(directory, KEY, key_dim=16, value_dim=8) as store:
    store.put_many(rng.normal(size=(lines, 16)), rng.normal(size=(lines, 8)),
                   [{"i": i, "note": "a line"} for i in range(lines)])
    store.seal()


def _apply(kind: str, directory: str, at: int, lines: int, rng) -> int:
  field = str(rng.choice(["key", "value", "ctx"]))
  if kind == "flipped_byte":
    return tamper.flip_byte(directory, at, field, int(rng.integers(0, 32)))
  if kind == "raw_flipped_byte":
    return tamper.raw_flip_byte(directory, at, str(rng.choice(["key", "value"])))
  if kind == "edited_field":
    return tamper.edit_field(directory, at, field)
  if kind == "edited_tags":
    return tamper.edit_field(directory, at, "tags", os.urandom(96))
  if kind == "edited_timestamp":
    return tamper.edit_timestamp(directory, at, float(rng.uniform(-1e5, 1e5)))
  if kind in ("deleted", "deleted_renumbered"):
    return tamper.delete(directory, at, renumber=kind == "deleted_renumbered")
  if kind == "inserted":
    return tamper.insert(directory, at)
  if kind == "inserted_copy":
    return tamper.insert(directory, at, copy_of=int(rng.integers(0, at)))
  if kind == "swapped":
    return tamper.swap(directory, at, int(rng.integers(at + 1, lines)))
  if kind == "reordered":
    rest = rng.choice(np.arange(at + 1, lines), size=2, replace=False)
    return tamper.reorder(directory, (at, *sorted(int(r) for r in rest)))
  if kind == "truncated_tail":
    return tamper.truncate_tail(directory, at)
  return tamper.forge_chain(directory, at)


def damage(trials_per_kind: int, workdir: str, lines: int = 200, seed: int = 0,
           progress: Optional[Callable[[str], None]] = None) -> dict:
  """Every kind of `tamper` at random lines of a sealed store; what verify names."""
  rng = np.random.default_rng(seed)
  base = os.path.join(workdir, "sealed")
  _sealed_store(base, lines, seed)
  table = {}
  for kind in tamper.KINDS:
    named = collections.Counter()
    exact_line = 0
    for _ in range(trials_per_kind):
      copy = os.path.join(workdir, "copy")
      shutil.rmtree(copy, ignore_errors=True)
      shutil.copytree(base, copy)
      at = int(rng.integers(1, lines - 3))
      first = _apply(kind, copy, at, lines, rng)
      report = verify_lib.verify(copy, KEY)
      named[report.damage if not report.ok else "none"] += 1
      exact_line += (not report.ok) and report.first_bad_record == first
    table[kind] = {"trials": trials_per_kind, "expected": EXPECTED[kind],
                   "named": dict(named), "detected": trials_per_kind - named["none"],
                   "exact_line": exact_line,
                   "named_as_expected": named[EXPECTED[kind]]}
    if progress:
      progress(f"damage: {kind}: {dict(named)}, exact line {exact_line}/{trials_per_kind}")
  return {"lines": lines, "kinds": table}


def forgers(trials: int, workdir: str, lines: int = 50, seed: int = 0) -> dict:
  """Stores re-chained and re-sealed with a guessed key: how many verify under the real key."""
  verified = 0
  for trial in range(trials):
    directory = os.path.join(workdir, f"forged{trial}")
    _sealed_store(directory, lines, seed + trial)
    tamper.forge_chain(directory, int(np.random.default_rng(trial).integers(0, lines)))
    verified += verify_lib.verify(directory, KEY).ok
    shutil.rmtree(directory)
  return {"trials": trials, "verified": verified}


def scale(lines: int, workdir: str, seed: int = 0) -> dict:
  """Writes `lines` lines in batches, seals, and times verification (with a low recursion
  limit, so any recursion in the walk would fail)."""
  rng = np.random.default_rng(seed)
  directory = os.path.join(workdir, "scale")
  start = time.perf_counter()
  with store_lib.MemoryLineStore.open(directory, KEY, key_dim=16, value_dim=8,
                                      config={"index": "flat"}) as store:
    for begin in range(0, lines, 50_000):
      n = min(50_000, lines - begin)
      store.put_many(rng.normal(size=(n, 16)).astype(np.float32),
                     rng.normal(size=(n, 8)).astype(np.float32))
    write_s = time.perf_counter() - start
    start = time.perf_counter()
    store.seal()
    seal_s = time.perf_counter() - start
  limit = sys.getrecursionlimit()
  sys.setrecursionlimit(200)
  try:
    start = time.perf_counter()
    report = verify_lib.verify(directory, KEY)
    verify_s = time.perf_counter() - start
  finally:
    sys.setrecursionlimit(limit)
  size = sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory))
  shutil.rmtree(directory)
  return {"lines": lines, "verifies": report.ok, "records": report.records,
          "write_s": round(write_s, 1), "seal_s": round(seal_s, 1),
          "verify_s": round(verify_s, 1), "verify_lines_per_s": round(lines / verify_s),
          "disk_mib": round(size / 2**20, 1), "recursion_limit": 200}


PARTS = ("kills", "concurrent", "damage", "forgers", "scale", "faults")


def run_all(*, parts=PARTS, kill_trials: int, processes: int, lines_each: int,
            damage_trials: int, forger_trials: int, scale_lines: int, fault_trials: int,
            progress: Callable[[str], None] = print) -> dict:
  """The chosen parts, in a temporary directory removed afterwards."""
  unknown = sorted(set(parts) - set(PARTS))
  if unknown:
    raise ValueError(f"unknown reliability part(s) {unknown}; known: {list(PARTS)}")
  work = tempfile.mkdtemp(prefix="memkernel-store-reliability-")
  runners = {
      "kills": lambda d: kills(kill_trials, d, progress=progress),
      "concurrent": lambda d: concurrent(processes, lines_each, d),
      "damage": lambda d: damage(damage_trials, d, progress=progress),
      "forgers": lambda d: forgers(forger_trials, d),
      "scale": lambda d: scale(scale_lines, d),
      "faults": lambda d: faults_lib.study(fault_trials, d, progress=progress)}
  try:
    out = {}
    for name in parts:
      directory = os.path.join(work, name)
      os.makedirs(directory)
      start = time.perf_counter()
      out[name] = runners[name](directory)
      out[name]["part_wall_s"] = round(time.perf_counter() - start, 1)
      progress(f"{name}: {out[name]}")
    return out
  finally:
    shutil.rmtree(work, ignore_errors=True)

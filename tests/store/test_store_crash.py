"""Crash safety and concurrency across processes: SIGKILL at random instants, many writers."""

import os
import signal
import subprocess
import sys
import time

import numpy as np

from memkernel.store import MemoryLineStore, log, verify

KEY = bytes(range(32))


def _writer(directory, lines, batch=1, seed=0):
  return subprocess.Popen(
      [sys.executable, "-m", "memkernel.store.writer", str(directory), KEY.hex(), str(lines),
       str(batch), str(seed)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_killed_writer_loses_no_acknowledged_line(tmp_path):
  rng = np.random.default_rng(0)
  acknowledged = []
  for trial in range(4):
    proc = _writer(tmp_path, 100000, batch=int(rng.integers(1, 8)), seed=trial)
    time.sleep(0.4 + rng.uniform(0.0, 0.5))
    os.kill(proc.pid, signal.SIGKILL)
    out, _ = proc.communicate()
    acknowledged += [line.split()[1] for line in out.splitlines() if line.startswith("ack ")]
    report = verify(str(tmp_path), KEY)
    assert report.ok, report   # a crash state is not damage
    assert report.records >= len(acknowledged)
  assert len(acknowledged) > 0
  with MemoryLineStore.open(str(tmp_path), KEY) as store:
    stored = {row.anchor.hex(): row.fields.seq for row in log.iter_rows(store._conn)}
  # Every acknowledged line is stored, in the order it was acknowledged (a writer killed
  # between its commit and its ack leaves committed lines no one was told about, which is fine).
  places = [stored.get(anchor) for anchor in acknowledged]
  assert None not in places and places == sorted(places)


def test_processes_append_one_contiguous_chain(tmp_path):
  procs = [_writer(tmp_path, 60, batch=1 + i % 3, seed=i) for i in range(4)]
  for proc in procs:
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
  report = verify(str(tmp_path), KEY)
  assert report.ok and report.records == 240


def test_power_cuts_that_drop_or_garble_unsynced_writes_lose_no_acknowledged_line(tmp_path):
  from memkernel.store import faults
  result = faults.study(30, str(tmp_path), seed=1)
  assert result["crashed"] >= 25
  assert result["verified"] == 30 and result["lost_acknowledged"] == 0, result["failures"]
  assert result["acknowledged"] > 0
  assert sum(result["pending_ops"].values()) > 0   # the crashes did hit unsynced writes


def test_a_store_whose_creation_never_finished_is_empty_not_damaged(tmp_path):
  import sqlite3
  sqlite3.connect(str(tmp_path / "lines.sqlite")).close()   # the file, no tables yet
  report = verify(str(tmp_path), KEY)
  assert report.ok and report.records == 0

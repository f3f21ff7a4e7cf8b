"""Crash safety and concurrency across processes: SIGKILL at random instants, many writers."""

import os
import signal
import time

import numpy as np

from memkernel.store import MemoryLineStore, reliability, verify

KEY = bytes(range(32))


def test_a_killed_writer_loses_no_acknowledged_line(tmp_path):
  rng = np.random.default_rng(0)
  acknowledged = []
  store = tmp_path / "store"
  for trial in range(4):
    acks = str(tmp_path / f"acks{trial}")
    proc = reliability.writer(str(store), 100000, int(rng.integers(1, 8)), trial, acks, KEY)
    reliability.wait_for_first_ack(proc, acks)
    time.sleep(rng.uniform(0.0, 0.3))
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    acknowledged += reliability.read_acks(acks)
    report = verify(str(store), KEY)
    assert report.ok, report   # a crash state is not damage
    assert report.records >= len(acknowledged)
  assert len(acknowledged) > 0
  with MemoryLineStore.open(str(store), KEY) as opened:
    stored = {line.anchor: line.seq for line in opened.lines()}
  # Every acknowledged line is stored, in the order it was acknowledged (a writer killed
  # between its commit and its ack leaves committed lines no one was told about, which is fine).
  places = [stored.get(anchor) for anchor in acknowledged]
  assert None not in places and places == sorted(places)


def test_processes_append_one_contiguous_chain(tmp_path):
  result = reliability.concurrent(4, 60, str(tmp_path / "store"))
  assert result["writer_failures"] == 0
  assert result["contiguous"] and result["verifies"] and result["lines"] == 240


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

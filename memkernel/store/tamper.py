"""Damage, on purpose: the edits an attacker with write access (or a bad disk) can make.

Used by the tests and by `experiments.store reliability` to show that `verify` names every kind
at the exact line. Each function changes a closed store in place and returns the sequence number
of the first line it damaged. None of them knows the store's secret key.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from typing import Iterator, Optional

from memkernel.store import encoding
from memkernel.store import log
from memkernel.store import merkle

KINDS = ("flipped_byte", "raw_flipped_byte", "edited_field", "edited_tags", "edited_timestamp",
         "deleted",
         "deleted_renumbered", "inserted", "inserted_copy", "swapped", "reordered",
         "truncated_tail", "forged_chain")


@contextlib.contextmanager
def _conn(directory: str) -> Iterator[sqlite3.Connection]:
  """A connection that commits on success and is closed either way (so no WAL is left open)."""
  conn = log.connect(directory, create=False)
  try:
    conn.execute("BEGIN IMMEDIATE")
    yield conn
    conn.execute("COMMIT")
  except BaseException:
    conn.execute("ROLLBACK")
    raise
  finally:
    conn.close()


def _shift(conn: sqlite3.Connection, start: int, by: int) -> None:
  """Renumbers lines seq >= start by `by` (through negative numbers: no key collisions)."""
  conn.execute("UPDATE lines SET seq = -(seq + ?) - 1 WHERE seq >= ?", (by, start))
  conn.execute("UPDATE lines SET seq = -(seq + 1) WHERE seq < 0")


def _row(conn, seq: int) -> log.Row:
  row = log.rows_by_seq(conn, [seq]).get(seq)
  if row is None:
    raise ValueError(f"the store has no line {seq}")
  return row


def flip_byte(directory: str, seq: int, field: str = "value", offset: int = 0) -> int:
  """XORs one byte of a line's `field` (key, value, ctx or prev) with 0x01, through SQL."""
  with _conn(directory) as conn:
    data = bytearray(_row(conn, seq).fields.field_bytes(field))
    data[offset % len(data)] ^= 0x01
    value = data.decode("utf-8", "replace") if field == "ctx" else bytes(data)
    conn.execute(f"UPDATE lines SET {field} = ? WHERE seq = ?", (value, seq))
  return seq


def raw_flip_byte(directory: str, seq: int, field: str = "value") -> int:
  """Flips one bit of a line's `field` in the database file itself (a bad disk), not via SQL.

  The writer must have closed (its WAL checkpointed into the file).
  """
  with _conn(directory) as conn:
    data = _row(conn, seq).fields.field_bytes(field)
  conn = log.connect(directory, create=False)
  try:
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
  finally:
    conn.close()
  path = os.path.join(directory, log.DB_NAME)
  with open(path, "r+b") as f:
    content = f.read()
    at = content.find(data)
    if at < 0 or content.find(data, at + 1) >= 0:
      raise ValueError(f"line {seq}'s {field} is not found exactly once in the file")
    f.seek(at + len(data) // 2)
    f.write(bytes([content[at + len(data) // 2] ^ 0x10]))
    f.flush()
    os.fsync(f.fileno())
  return seq


def edit_field(directory: str, seq: int, field: str = "ctx", value=None) -> int:
  """Replaces a line's `field` with another value (ctx: another JSON object by default)."""
  with _conn(directory) as conn:
    if value is None:
      value = '{"edited":true}' if field == "ctx" else os.urandom(len(_row(conn, seq).fields.key))
    conn.execute(f"UPDATE lines SET {field} = ? WHERE seq = ?", (value, seq))
  return seq


def edit_timestamp(directory: str, seq: int, delta_s: float = -3600.0) -> int:
  with _conn(directory) as conn:
    conn.execute("UPDATE lines SET ts_ns = ts_ns + ? WHERE seq = ?", (int(delta_s * 1e9), seq))
  return seq


def delete(directory: str, seq: int, renumber: bool = False) -> int:
  """Deletes line `seq`; `renumber` closes the gap by moving the later lines down."""
  with _conn(directory) as conn:
    conn.execute("DELETE FROM lines WHERE seq = ?", (seq,))
    if renumber:
      _shift(conn, seq + 1, -1)
  return seq


def insert(directory: str, seq: int, copy_of: Optional[int] = None) -> int:
  """Puts a line in at place `seq`, moving the later lines up: one made without the key
  (random anchor, chained to the line before), or a copy of line `copy_of` (a replay)."""
  with _conn(directory) as conn:
    template = _row(conn, seq if copy_of is None else copy_of)
    _shift(conn, seq, 1)
    if copy_of is None:
      prev = _row(conn, seq - 1).anchor if seq > 0 else template.fields.prev
      fields = template.fields._replace(seq=seq, prev=prev, ctx=b'{"inserted":true}')
      guess = os.urandom(32)
      new = log.Row(fields, encoding.tags(guess, fields), encoding.anchor(guess, fields))
    else:
      new = log.Row(template.fields._replace(seq=seq), template.tags, template.anchor)
    log.insert_rows(conn, [new])
  return seq


def swap(directory: str, a: int, b: int) -> int:
  """Exchanges the contents of lines `a` and `b` (each keeps the other's place)."""
  with _conn(directory) as conn:
    conn.execute("UPDATE lines SET seq = -1 WHERE seq = ?", (a,))
    conn.execute("UPDATE lines SET seq = ? WHERE seq = ?", (a, b))
    conn.execute("UPDATE lines SET seq = ? WHERE seq = -1", (b,))
  return min(a, b)


def reorder(directory: str, seqs: tuple[int, ...]) -> int:
  """Rotates the contents of lines `seqs` one place (line seqs[i] moves to seqs[i+1])."""
  with _conn(directory) as conn:
    conn.execute("UPDATE lines SET seq = -(seq + 1) WHERE seq IN (%s)" % ",".join("?" * len(seqs)),
                 seqs)
    for i, s in enumerate(seqs):
      conn.execute("UPDATE lines SET seq = ? WHERE seq = ?", (seqs[(i + 1) % len(seqs)], -(s + 1)))
  return min(seqs)


def truncate_tail(directory: str, keep: int) -> int:
  """Deletes every line from `keep` on."""
  with _conn(directory) as conn:
    conn.execute("DELETE FROM lines WHERE seq >= ?", (keep,))
  return keep


def forge_chain(directory: str, seq: int) -> int:
  """A forger's best try: edits line `seq`'s value, recomputes the anchors and tags of it and
  every later line with a guessed key, so the chain links again, and seals the result with the
  same guess (a new seal in the database and in seal.json)."""
  guess = os.urandom(32)
  with _conn(directory) as conn:
    rows = list(log.iter_rows(conn, seq))
    prev = rows[0].fields.prev
    conn.execute("DELETE FROM lines WHERE seq >= ?", (seq,))
    forged = []
    for i, row in enumerate(rows):
      fields = row.fields._replace(prev=prev)
      if i == 0:
        fields = fields._replace(value=bytes(len(fields.value)))
      anchor = encoding.anchor(guess, fields)
      forged.append(log.Row(fields, encoding.tags(guess, fields), anchor))
      prev = anchor
    log.insert_rows(conn, forged)
    anchors = [r.anchor for r in log.iter_rows(conn)]
    root, ts_ns = merkle.merkle_root(anchors), time.time_ns()
    seal = log.SealRecord(len(anchors), anchors[-1], root, ts_ns,
                          encoding.seal_mac(guess, len(anchors), anchors[-1], root, ts_ns))
    log.insert_seal(conn, seal)
  log.write_atomically(os.path.join(directory, log.SEAL_NAME),
                       json.dumps(seal.to_json()).encode())
  return seq


def edit_widths(directory: str, key_dim: int) -> int:
  """Rewrites the store's recorded key width (returns 0: the store as a whole)."""
  with _conn(directory) as conn:
    conn.execute("UPDATE meta SET value = ? WHERE name = 'key_dim'", (str(key_dim).encode(),))
  return 0


def insert_negative(directory: str, copy_of: int = 0) -> int:
  """Adds a copy of line `copy_of` at sequence number -5, below line 0."""
  with _conn(directory) as conn:
    row = _row(conn, copy_of)
    log.insert_rows(conn, [log.Row(row.fields._replace(seq=-5), row.tags, row.anchor)])
  return -5


def replay_old_seal(directory: str) -> None:
  """Re-inserts the oldest seal (a valid one) as the newest and removes seal.json."""
  with _conn(directory) as conn:
    oldest = log.seals(conn)[0]
    log.insert_seal(conn, oldest)
  os.remove(os.path.join(directory, log.SEAL_NAME))

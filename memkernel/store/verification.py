"""Verification: walk the chain from the genesis anchor, check the seals, name the first damage.

Iterative (a loop over pages of rows), so a million lines need no recursion. When a line fails,
its per-field tags and the sequence number its anchor was made for tell what happened to it:

  flipped_byte      one byte of one field differs (the byte is found and named)
  edited_field      a field (key, value, ctx, prev, novelty, anchor or tags) was changed, or a
                    line was renumbered (seq)
  edited_timestamp  only the timestamp was changed
  deleted           lines are missing (a gap, or the later lines renumbered to close it)
  inserted          a line made without the key, or a copy of an earlier line, was put in
                    (or a line with a negative sequence number)
  swapped           two lines exchanged places
  reordered         a line holds another place's record in some other permutation
  forged            a line made without the key replaces a genuine one
  forked            a line validly keyed but not following its predecessor (a key holder rewrote
                    the chain), or a chain that disagrees with its seal
  truncated_tail    the store ends before the count its newest seal covers
  edited_seal       a seal's MAC does not verify, or the database's seals shrink
  corrupt_file      SQLite cannot read the database (its page structure is damaged)
  key_mismatch      the store was not made with this key (or its widths or key check were
                    edited)

A crash is not damage: SQLite replays a killed writer's committed transactions and drops its
uncommitted tail when the database is next opened, so a crash state is an intact chain holding
every acknowledged line (`unclean_shutdown` says a writer did not close, or is still open). Lines
after the newest seal are chained but not sealed: removing them is indistinguishable from never
having written them, so `unsealed` says how many there are; seal often (`StoreConfig.seal_every`)
to keep that window small.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
from typing import Optional

from memkernel.store import encoding
from memkernel.store import log
from memkernel.store import merkle

FLIP_SEARCH_MAX_BYTES = 4096


@dataclasses.dataclass(frozen=True)
class Report:
  """What verification found.

  Attributes:
    ok: the chain, its tags and its seals verify.
    records: lines that verified, from line 0 in order.
    first_bad_record: the sequence number of the first damaged (or missing) line, else None.
    damage: the kind of damage (see the module docstring), else None.
    field: the damaged field, where one is known.
    detail: one sentence about the damage.
    sealed: lines covered by the newest valid seal.
    unsealed: verified lines after it.
    unclean_shutdown: a writer had not closed the database (crashed, or still open).
  """
  ok: bool
  records: int
  first_bad_record: Optional[int] = None
  damage: Optional[str] = None
  field: Optional[str] = None
  detail: Optional[str] = None
  sealed: int = 0
  unsealed: int = 0
  unclean_shutdown: bool = False

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


class _Chain:
  """The keyed checks on one row."""

  def __init__(self, secret: bytes, conn: sqlite3.Connection):
    self.secret = secret
    self.conn = conn

  def made_for(self, row: log.Row, seq: int) -> bool:
    """Whether `row`'s anchor is the one the key gives its fields at place `seq`."""
    return encoding.anchor(self.secret, row.fields._replace(seq=seq)) == row.anchor

  def true_seq(self, row: log.Row, around: int, upto: int) -> Optional[int]:
    """The place `row` was written for (nearest to `around` first), or None: made without
    the key."""
    for t in sorted(range(0, upto + 1), key=lambda t: abs(t - around)):
      if self.made_for(row, t):
        return t
    return None

  def bad_tags(self, row: log.Row, seq: int) -> list[str]:
    if len(row.tags) != encoding.TAG_BYTES * len(encoding.TAG_FIELDS):
      return list(encoding.TAG_FIELDS)
    bad = []
    for i, name in enumerate(encoding.TAG_FIELDS):
      want = row.tags[i * encoding.TAG_BYTES:(i + 1) * encoding.TAG_BYTES]
      if encoding.field_tag(self.secret, name, seq, row.fields.field_bytes(name)) != want:
        bad.append(name)
    return bad

  def flipped_byte(self, row: log.Row, name: str, seq: int) -> Optional[int]:
    """The offset of the one byte whose restoring makes field `name`'s tag verify, or None."""
    if name not in ("prev", "key", "value", "ctx"):
      return None
    data = bytearray(row.fields.field_bytes(name))
    if len(data) > FLIP_SEARCH_MAX_BYTES:
      return None
    i = encoding.TAG_FIELDS.index(name)
    want = row.tags[i * encoding.TAG_BYTES:(i + 1) * encoding.TAG_BYTES]
    for offset in range(len(data)):
      original = data[offset]
      for b in range(256):
        if b == original:
          continue
        data[offset] = b
        if encoding.field_tag(self.secret, name, seq, bytes(data)) == want:
          return offset
      data[offset] = original
    return None

  def row_at(self, seq: int) -> Optional[log.Row]:
    return log.rows_by_seq(self.conn, [seq]).get(seq)


def _diagnose(chain: _Chain, row: log.Row, seq: int, prev: bytes, max_seq: int) -> Report:
  """Names the damage at the first line that does not verify (expected at place `seq`)."""
  bad = lambda kind, detail, field=None, at=seq: Report(False, seq, at, kind, field, detail)
  if row.fields.seq > seq:
    if chain.made_for(row, seq) and row.fields.prev == prev:
      return bad("edited_field", f"line {seq} was renumbered to {row.fields.seq}", "seq")
    return bad("deleted", f"lines {seq}..{row.fields.seq - 1} are missing")
  if chain.made_for(row, seq):
    if row.fields.prev == prev:   # the anchor and fields agree: only the tags were changed
      return bad("edited_field", f"line {seq}'s field tags were changed", "tags")
    return bad("forked", f"line {seq} is validly keyed but does not follow line {seq - 1}",
               "prev")
  failed = chain.bad_tags(row, seq)
  if not failed:
    return bad("edited_field", f"line {seq}'s anchor was changed (its fields are intact)",
               "anchor")
  if len(failed) < len(encoding.TAG_FIELDS):
    if failed == ["timestamp"]:
      return bad("edited_timestamp", f"line {seq}'s timestamp was changed", "timestamp")
    if len(failed) == 1:
      offset = chain.flipped_byte(row, failed[0], seq)
      if offset is not None:
        return bad("flipped_byte", f"line {seq}: byte {offset} of its {failed[0]} was changed",
                   failed[0])
    return bad("edited_field", f"line {seq}: {', '.join(failed)} changed", ",".join(failed))
  t = chain.true_seq(row, seq, max_seq + 1)
  following = chain.row_at(seq + 1)
  next_true = (None if following is None
               else chain.true_seq(following, seq + 1, max_seq + 1))
  if t is None:
    if next_true == seq and following.fields.prev == prev:
      return bad("inserted", f"a line made without the key was inserted before line {seq}")
    if len(failed) == len(encoding.TAG_FIELDS) and row.fields.prev == prev:
      return bad("forged", f"line {seq} was replaced by one made without the key")
    return bad("forged", f"line {seq} was not made with this key")
  if t > seq:
    if next_true == t + 1:
      return bad("deleted", f"lines {seq}..{t - 1} are missing (the later lines renumbered)")
    other = chain.row_at(t)
    if other is not None and chain.made_for(other, seq):
      return bad("swapped", f"lines {seq} and {t} exchanged places")
    return bad("reordered", f"place {seq} holds line {t}")
  if next_true == seq:
    return bad("inserted", f"a copy of line {t} was inserted before line {seq}")
  return bad("reordered", f"place {seq} holds line {t}")


def _valid_seals(secret: bytes, conn: sqlite3.Connection, directory: str):
  """The newest valid seal over the database's seals and seal.json; (seal, problems).

  Every seal must verify and the database's must never shrink (a seal is a witness: one
  hidden or replaced by an older copy would let the lines after it be cut off unseen).
  """
  problems = []
  try:
    stored = log.seals(conn)
  except sqlite3.DatabaseError:
    stored, problems = [], ["the seals table is unreadable"]
  candidates = [("database", s) for s in stored]
  path = os.path.join(directory, log.SEAL_NAME)
  if os.path.exists(path):
    try:
      with open(path, "rb") as f:
        candidates.append((log.SEAL_NAME, log.SealRecord.from_json(json.loads(f.read()))))
    except (ValueError, KeyError, TypeError):
      problems.append(f"{log.SEAL_NAME} is not a valid seal")
  found = []
  for where, seal in candidates:
    if encoding.seal_mac(secret, seal.count, seal.last_anchor, seal.merkle_root,
                         seal.ts_ns) != seal.mac:
      problems.append(f"a seal in the {where} does not verify")
    else:
      found.append(seal)
  counts = [s.count for s in stored]
  if any(b < a for a, b in zip(counts, counts[1:])):
    problems.append(f"the database's seals shrink ({counts})")
  newest = max(found, key=lambda s: s.count, default=None)
  return newest, problems


def verify(directory: str, key: bytes) -> Report:
  """Verifies the store in `directory` with its secret `key`.

  Raises:
    FileNotFoundError: no store there.
    ValueError: a key of the wrong size.
  """
  secret = encoding.check_secret(key)
  unclean = os.path.exists(os.path.join(directory, log.DB_NAME + "-wal"))
  conn = None
  try:
    conn = log.connect(directory, create=False)
    return dataclasses.replace(_verify(secret, conn, directory), unclean_shutdown=unclean)
  except sqlite3.DatabaseError as e:
    return Report(False, 0, None, "corrupt_file", None, f"SQLite cannot read the store: {e}",
                  unclean_shutdown=unclean)
  finally:
    if conn is not None:
      conn.close()


def require_ok(directory: str, key: bytes) -> Report:
  """`verify`, raising ValueError (naming the damage and its line) unless the store is intact."""
  report = verify(directory, key)
  if not report.ok:
    raise ValueError(f"the store at {directory} does not verify: {report.damage} at line "
                     f"{report.first_bad_record} ({report.detail})")
  return report


def _uninitialised(conn: sqlite3.Connection, directory: str) -> bool:
  """Whether the store's creation never finished (a crash inside `open`): no meta, line or seal
  row and no seal file, so nothing was ever acknowledged."""
  tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            .fetchall()}
  has_rows = lambda table: table in tables and conn.execute(
      f"SELECT 1 FROM {table} LIMIT 1").fetchone() is not None
  return (not any(has_rows(t) for t in ("meta", "lines", "seals"))
          and not os.path.exists(os.path.join(directory, log.SEAL_NAME)))


def _verify(secret: bytes, conn: sqlite3.Connection, directory: str) -> Report:
  if _uninitialised(conn, directory):
    return Report(True, 0, detail="an empty store whose creation did not finish")
  dims = log.stored_widths(conn)
  if dims is None or log.get_meta(conn, "key_check") != encoding.key_check(secret, *dims):
    return Report(False, 0, None, "key_mismatch",
                  detail="the store was not made with this key, or its widths or key check "
                         "were edited")
  low = conn.execute("SELECT min(seq) FROM lines").fetchone()[0]
  if low is not None and low < 0:
    return Report(False, 0, int(low), "inserted", None,
                  f"a line with the negative sequence number {low} was put in")
  seal, seal_problems = _valid_seals(secret, conn, directory)
  last = log.last_line(conn)
  max_seq = -1 if last is None else last[0]
  chain = _Chain(secret, conn)
  frontier = merkle.MerkleFrontier()
  prev, seq, sealed_root, sealed_last = encoding.genesis(secret), 0, None, None
  if seal is not None and seal.count == 0:
    sealed_root, sealed_last = frontier.root(), prev
  try:
    for row in log.iter_rows(conn):
      if (row.fields.seq != seq or row.fields.prev != prev
          or encoding.anchor(secret, row.fields) != row.anchor
          or chain.bad_tags(row, seq)):
        report = _diagnose(chain, row, seq, prev, max_seq)
        return dataclasses.replace(report, sealed=seal.count if seal else 0)
      frontier.append(row.anchor)
      prev, seq = row.anchor, seq + 1
      if seal is not None and seq == seal.count:
        sealed_root, sealed_last = frontier.root(), prev
  except sqlite3.DatabaseError as e:
    return Report(False, seq, seq, "corrupt_file", None,
                  f"SQLite cannot read the store after line {seq - 1}: {e}")
  sealed = seal.count if seal else 0
  if seal_problems:
    return Report(False, seq, None, "edited_seal", "seal", "; ".join(seal_problems), sealed)
  if seal is not None:
    if seal.count > seq:
      return Report(False, seq, seq, "truncated_tail", None,
                    f"the seal covers {seal.count} lines, the store ends after {seq}", sealed)
    if sealed_last != seal.last_anchor or sealed_root != seal.merkle_root:
      return Report(False, seq, None, "forked", None,
                    f"the chain's first {seal.count} lines disagree with the seal", sealed)
  return Report(True, seq, sealed=sealed, unsealed=seq - sealed)

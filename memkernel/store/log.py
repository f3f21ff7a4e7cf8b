"""The source of truth on disk: an SQLite database in WAL mode with full sync.

SQLite is the embedded format with the most thorough crash testing (its own test suite injects
faults into the file layer); in WAL mode with `synchronous=FULL` a committed transaction survives
a crash or power loss, and an uncommitted one is rolled back when the database is next opened.
`BEGIN IMMEDIATE` takes the database's write lock, so one writer appends at a time across threads
and processes while readers go on. The vector index and every in-memory array are derived from
these tables and rebuilt from them.
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
from typing import Iterator, NamedTuple, Optional

from memkernel.store import encoding

DB_NAME = "lines.sqlite"
SEAL_NAME = "seal.json"
INDEX_NAME, INDEX_META_NAME = "index.faiss", "index.json"   # a derived cache, MACed
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS lines (
  seq INTEGER PRIMARY KEY, ts_ns INTEGER NOT NULL, prev BLOB NOT NULL, key BLOB NOT NULL,
  value BLOB NOT NULL, ctx TEXT NOT NULL, novelty REAL NOT NULL, tags BLOB NOT NULL,
  anchor BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS seals (
  seal INTEGER PRIMARY KEY, count INTEGER NOT NULL, last_anchor BLOB NOT NULL,
  merkle_root BLOB NOT NULL, ts_ns INTEGER NOT NULL, mac BLOB NOT NULL);
"""
LINE_COLUMNS = "seq, ts_ns, prev, key, value, ctx, novelty, tags, anchor"


class Row(NamedTuple):
  """One stored line as it is on disk (nothing checked)."""
  fields: encoding.LineFields
  tags: bytes
  anchor: bytes


class SealRecord(NamedTuple):
  """A seal: how many lines, the last anchor and the Merkle root of all anchors, MACed."""
  count: int
  last_anchor: bytes
  merkle_root: bytes
  ts_ns: int
  mac: bytes

  def to_json(self) -> dict:
    return {"count": self.count, "last_anchor": self.last_anchor.hex(),
            "merkle_root": self.merkle_root.hex(), "ts_ns": self.ts_ns, "mac": self.mac.hex()}

  @classmethod
  def from_json(cls, d: dict) -> "SealRecord":
    return cls(int(d["count"]), bytes.fromhex(d["last_anchor"]), bytes.fromhex(d["merkle_root"]),
               int(d["ts_ns"]), bytes.fromhex(d["mac"]))


class _Rows:
  def __init__(self, rows):
    self._rows = rows

  def fetchone(self):
    return self._rows[0] if self._rows else None

  def fetchall(self):
    return self._rows


class _ApswConnection:
  """The few `sqlite3.Connection` methods the store uses, over an apsw connection (which, unlike
  the standard library's, can run on a Python-defined VFS: `faults.py`)."""

  def __init__(self, conn):
    self._conn = conn

  def execute(self, sql: str, params=()) -> _Rows:
    return _Rows(list(self._conn.execute(sql, params)))

  def executemany(self, sql: str, rows) -> None:
    self._conn.executemany(sql, list(rows))

  def executescript(self, sql: str) -> None:
    list(self._conn.execute(sql))

  def close(self) -> None:
    self._conn.close()


def connect(directory: str, timeout_s: float = 60.0, *, create: bool = True,
            vfs: Optional[str] = None):
  """Opens the store's database with WAL and full sync; `create` makes its tables if missing.

  Opening replays a crashed writer's committed transactions from the WAL and drops its
  uncommitted tail (SQLite's recovery), so every reader sees the acknowledged lines. `vfs` names
  an SQLite VFS registered with apsw (the fault-injecting one of `faults.py`); None uses the
  standard library's sqlite3 and the operating system's files. Returns a `sqlite3.Connection`
  (or, with `vfs`, an object with the methods the store uses: execute, executemany,
  executescript, close).

  Raises:
    FileNotFoundError: `create` is False and there is no database.
    sqlite3.DatabaseError: the file is not a database (the connection is closed).
  """
  path = os.path.join(directory, DB_NAME)
  if not create and not os.path.exists(path):
    raise FileNotFoundError(f"no memory-line store at {directory} (no {DB_NAME})")
  if vfs is not None:
    import apsw  # Only the fault-injection study needs it.
    conn = _ApswConnection(apsw.Connection(path, vfs=vfs))
  else:
    conn = sqlite3.connect(path, timeout=timeout_s, isolation_level=None,
                           check_same_thread=False)
  try:
    conn.execute(f"PRAGMA busy_timeout={int(timeout_s * 1000)}")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    if create:
      conn.executescript(SCHEMA)
  except BaseException:
    conn.close()
    raise
  return conn


def get_meta(conn: sqlite3.Connection, name: str) -> Optional[bytes]:
  row = conn.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
  return None if row is None else bytes(row[0])


def stored_widths(conn: sqlite3.Connection) -> Optional[tuple[int, int]]:
  """(key_dim, value_dim) as the meta table holds them; None if missing or not integers."""
  try:
    dims = int(get_meta(conn, "key_dim")), int(get_meta(conn, "value_dim"))
  except (TypeError, ValueError):
    return None
  return dims if min(dims) >= 1 else None


def _bytes(x) -> bytes:
  """A column as bytes, whatever SQLite type an edit left in it."""
  if isinstance(x, (bytes, bytearray, memoryview)):
    return bytes(x)
  return b"" if x is None else str(x).encode("utf-8")


def _row(values) -> Row:
  seq, ts_ns, prev, key, value, ctx, novelty, tags, anchor = values
  try:
    ts, nov = int(ts_ns), float(novelty)
  except (TypeError, ValueError):   # an edit stored text where a number belongs
    ts, nov = -1, float("nan")
  return Row(encoding.LineFields(int(seq), ts, _bytes(prev), _bytes(key), _bytes(value),
                                 _bytes(ctx), nov), _bytes(tags), _bytes(anchor))


def iter_rows(conn: sqlite3.Connection, start: int = 0, page: int = 4096) -> Iterator[Row]:
  """Every line with seq >= `start`, in seq order, read a page at a time (no recursion)."""
  after = start - 1
  while True:
    batch = conn.execute(f"SELECT {LINE_COLUMNS} FROM lines WHERE seq > ? ORDER BY seq LIMIT ?",
                         (after, page)).fetchall()
    for values in batch:
      yield _row(values)
    if len(batch) < page:
      return
    after = batch[-1][0]


def rows_by_seq(conn: sqlite3.Connection, seqs: list[int]) -> dict[int, Row]:
  """The lines with these sequence numbers (fetched 500 at a time: SQLite bounds the number of
  bound parameters)."""
  out = {}
  for start in range(0, len(seqs), 500):
    chunk = list(seqs[start:start + 500])
    marks = ",".join("?" * len(chunk))
    found = conn.execute(f"SELECT {LINE_COLUMNS} FROM lines WHERE seq IN ({marks})", chunk)
    out.update({int(v[0]): _row(v) for v in found.fetchall()})
  return out


def anchor_at(conn: sqlite3.Connection, position: int) -> Optional[bytes]:
  """The anchor of the line at `position` in seq order (0-based), or None."""
  row = conn.execute("SELECT anchor FROM lines ORDER BY seq LIMIT 1 OFFSET ?",
                     (position,)).fetchone()
  return None if row is None else _bytes(row[0])


def last_line(conn: sqlite3.Connection) -> Optional[tuple[int, bytes, int]]:
  """(seq, anchor, ts_ns) of the newest line, or None for an empty store."""
  row = conn.execute("SELECT seq, anchor, ts_ns FROM lines ORDER BY seq DESC LIMIT 1").fetchone()
  return None if row is None else (int(row[0]), bytes(row[1]), int(row[2]))


def insert_rows(conn: sqlite3.Connection, rows: list[Row]) -> None:
  conn.executemany(
      f"INSERT INTO lines ({LINE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
      [(r.fields.seq, r.fields.ts_ns, r.fields.prev, r.fields.key, r.fields.value,
        r.fields.ctx.decode("utf-8"), r.fields.novelty, r.tags, r.anchor) for r in rows])


def seals(conn: sqlite3.Connection) -> list[SealRecord]:
  """Every seal in the database, oldest first (nothing checked)."""
  rows = conn.execute("SELECT count, last_anchor, merkle_root, ts_ns, mac FROM seals "
                      "ORDER BY seal").fetchall()
  return [SealRecord(int(r[0]), _bytes(r[1]), _bytes(r[2]), int(r[3]), _bytes(r[4]))
          for r in rows]


def insert_seal(conn: sqlite3.Connection, seal: SealRecord) -> None:
  conn.execute("INSERT INTO seals (count, last_anchor, merkle_root, ts_ns, mac) "
               "VALUES (?, ?, ?, ?, ?)", tuple(seal))


def write_atomically(path: str, data: bytes) -> None:
  """Writes `path` so that a crash leaves the old file or the new one, never a torn one:
  a temporary file (unique, in the same directory), fsync, rename over `path`, fsync of the
  directory."""
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
  try:
    os.fchmod(fd, 0o644)   # mkstemp's 0600 would make results and exports private
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  fd = os.open(directory, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)

"""The canonical bytes of a memory line and the keyed hashes over them.

A line's anchor is a keyed BLAKE2b-256 MAC over a length-prefixed encoding of every field
(sequence number, timestamp, previous anchor, key, value, context, novelty), so it chains each
line to the one before: without the secret key nobody can recompute a chain, and no two distinct
field tuples share an encoding (each field carries its length; nothing is XORed together).

Beside the anchor every line keeps one short keyed tag per field (over the sequence number and the
field's bytes). The anchor alone says *that* a line changed; the tags say *which* field, and let
verification tell a flipped byte from an edited field or a record moved to another place.
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any, Mapping, NamedTuple, Optional

import numpy as np

ANCHOR_BYTES = 32
TAG_BYTES = 16
MIN_KEY_BYTES = 16   # 128-bit keys at least
MAX_KEY_BYTES = 64   # BLAKE2b's limit
VERSION = b"memkernel.store.v1"
# The order of the per-field tags in a line's `tags` column.
TAG_FIELDS = ("timestamp", "prev", "key", "value", "ctx", "novelty")


class LineFields(NamedTuple):
  """One line's fields as the chain sees them: integers and bytes, nothing derived."""
  seq: int
  ts_ns: int
  prev: bytes
  key: bytes      # float32, little-endian
  value: bytes    # float32, little-endian
  ctx: bytes      # canonical JSON, UTF-8
  novelty: float

  def field_bytes(self, name: str) -> bytes:
    """The bytes a field's tag covers."""
    if name == "timestamp":
      return struct.pack(">q", self.ts_ns)
    if name == "novelty":
      return struct.pack(">d", self.novelty)
    return getattr(self, name)


def check_secret(secret: Any) -> bytes:
  """The store's secret key as bytes; ValueError unless it is 16-64 bytes."""
  if not isinstance(secret, (bytes, bytearray)):
    raise ValueError(f"the store key must be bytes, got {type(secret).__name__}")
  if not MIN_KEY_BYTES <= len(secret) <= MAX_KEY_BYTES:
    raise ValueError(f"the store key must be {MIN_KEY_BYTES}-{MAX_KEY_BYTES} bytes "
                     f"(128 to 512 bits), got {len(secret)}")
  return bytes(secret)


def canonical_ctx(ctx: Optional[Mapping[str, Any]]) -> bytes:
  """A context mapping as canonical JSON bytes (sorted keys, no spaces, no NaN).

  Raises:
    ValueError: `ctx` is not a mapping with string keys, or holds something JSON cannot encode.
  """
  if ctx is None:
    ctx = {}
  if not isinstance(ctx, Mapping):
    raise ValueError(f"ctx must be a mapping (a JSON object), got {type(ctx).__name__}")
  try:
    text = json.dumps(dict(ctx), sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False)
  except (TypeError, ValueError) as e:
    raise ValueError(f"ctx must be JSON-serialisable with string keys: {e}") from e
  return text.encode("utf-8")


def vector_bytes(name: str, vector: Any, dim: Optional[int]) -> bytes:
  """A 1-D finite vector as float32 little-endian bytes; ValueError naming `name` otherwise."""
  array = np.asarray(vector)
  if array.ndim != 1:
    raise ValueError(f"{name} must be a 1-D vector, got shape {array.shape}")
  if dim is not None and array.shape[0] != dim:
    raise ValueError(f"{name} must have {dim} entries (this store's width), got {array.shape[0]}")
  if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
    raise ValueError(f"{name} must be real numbers, got dtype {array.dtype}")
  array = array.astype("<f4")
  if not np.all(np.isfinite(array)):
    raise ValueError(f"{name} has non-finite entries")
  return array.tobytes()


def _framed(*parts: bytes) -> bytes:
  return b"".join(struct.pack(">Q", len(p)) + p for p in parts)


def encode(fields: LineFields) -> bytes:
  """The canonical, length-prefixed bytes of a line (what its anchor covers)."""
  return _framed(VERSION, struct.pack(">Q", fields.seq), struct.pack(">q", fields.ts_ns),
                 fields.prev, fields.key, fields.value, fields.ctx,
                 struct.pack(">d", fields.novelty))


def anchor(secret: bytes, fields: LineFields) -> bytes:
  """The line's anchor: keyed BLAKE2b-256 over its canonical encoding."""
  return hashlib.blake2b(encode(fields), key=secret, digest_size=ANCHOR_BYTES,
                         person=b"mk-anchor").digest()


def field_tag(secret: bytes, name: str, seq: int, data: bytes) -> bytes:
  """One field's keyed tag, bound to the line's sequence number."""
  return hashlib.blake2b(_framed(struct.pack(">Q", seq), data), key=secret,
                         digest_size=TAG_BYTES, person=b"mk-tag-" + name.encode()[:9]).digest()


def tags(secret: bytes, fields: LineFields) -> bytes:
  """Every field's tag, concatenated in `TAG_FIELDS` order."""
  return b"".join(field_tag(secret, n, fields.seq, fields.field_bytes(n)) for n in TAG_FIELDS)


def genesis(secret: bytes) -> bytes:
  """The anchor before line 0 (keyed, so an empty chain is also bound to its key)."""
  return hashlib.blake2b(VERSION, key=secret, digest_size=ANCHOR_BYTES,
                         person=b"mk-genesis").digest()


def key_check(secret: bytes, key_dim: int, value_dim: int) -> bytes:
  """A MAC stored with the store over its format version and widths: opening it with another
  key fails at once, and an edited width is caught."""
  data = _framed(VERSION, struct.pack(">Q", key_dim), struct.pack(">Q", value_dim))
  return hashlib.blake2b(data, key=secret, digest_size=16, person=b"mk-keycheck").digest()


def seal_mac(secret: bytes, count: int, last_anchor: bytes, merkle_root: bytes,
             ts_ns: int) -> bytes:
  """The keyed MAC over a seal's fields."""
  data = _framed(VERSION, struct.pack(">Q", count), last_anchor, merkle_root,
                 struct.pack(">q", ts_ns))
  return hashlib.blake2b(data, key=secret, digest_size=ANCHOR_BYTES, person=b"mk-seal").digest()


def index_mac(secret: bytes, count: int, last_anchor: bytes, data: bytes) -> bytes:
  """The keyed MAC over a cached vector index and the lines it covers."""
  return hashlib.blake2b(_framed(VERSION, struct.pack(">Q", count), last_anchor, data),
                         key=secret, digest_size=ANCHOR_BYTES, person=b"mk-index").digest()


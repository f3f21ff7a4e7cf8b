"""Secret key files: 32 random bytes written as hex, readable only by their owner."""

from __future__ import annotations

import os
import secrets

from memkernel.store import encoding

# The key of the studies' own stores (reliability, faults, benchmark): fixed, so any store they
# leave behind can be inspected. Never a key for a store that matters.
STUDY_KEY = bytes(range(32))


def new_key_file(path: str, nbytes: int = 32) -> bytes:
  """Writes a fresh random key to `path` (mode 0600) and returns it; never overwrites.

  Raises:
    ValueError: `path` exists (a key a store depends on must not be lost).
  """
  key = encoding.check_secret(secrets.token_bytes(nbytes))
  try:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
  except FileExistsError:
    raise ValueError(f"{path} exists; a key file is never overwritten") from None
  with os.fdopen(fd, "w") as f:
    f.write(key.hex() + "\n")
    f.flush()
    os.fsync(f.fileno())
  return key


def read_key_file(path: str) -> bytes:
  """The key in `path`: hex text (as `new_key_file` writes) or raw bytes.

  Raises:
    FileNotFoundError: no such file.
    ValueError: the key is not 16-64 bytes.
  """
  with open(path, "rb") as f:
    data = f.read()
  text = data.strip()
  if text and all(c in b"0123456789abcdefABCDEF" for c in text):
    if len(text) % 2:
      raise ValueError(f"{path}: a hex key needs an even number of digits, got {len(text)}")
    key = bytes.fromhex(text.decode("ascii"))
  else:
    key = data
  try:
    return encoding.check_secret(key)
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from None

"""A writer process for the crash and concurrency studies: appends lines, recording each ack.

    python -m memkernel.store.writer DIR KEY_HEX LINES BATCH SEED ACK_FILE

Appends `ack <anchor>` to ACK_FILE (one unbuffered write per batch) once `put_many` has
returned, which is the moment the store promises the lines are durable: a study that kills this
process at any instant checks that every acknowledged line is in the store and verifies. Acks go
to a file, not a pipe, so the writer never blocks on a reader and a kill lands wherever the
writer is (mostly inside `put_many`).
"""

import os
import sys

import numpy as np

from memkernel.store import store as store_lib

KEY_DIM, VALUE_DIM = 16, 8


def main(argv: list[str]) -> None:
  directory, key_hex, lines, batch, seed, ack_file = argv[1:7]
  lines, batch, seed = int(lines), int(batch), int(seed)
  rng = np.random.default_rng(seed)
  acks = os.open(ack_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
  try:
    with store_lib.MemoryLineStore.open(directory, bytes.fromhex(key_hex), key_dim=KEY_DIM,
                                        value_dim=VALUE_DIM) as store:
      written = 0
      while written < lines:
        n = min(batch, lines - written)
        anchors = store.put_many(rng.normal(size=(n, KEY_DIM)), rng.normal(size=(n, VALUE_DIM)),
                                 [{"writer": seed, "i": written + i} for i in range(n)])
        os.write(acks, "".join(f"ack {a}\n" for a in anchors).encode())
        written += n
  finally:
    os.close(acks)


if __name__ == "__main__":
  main(sys.argv)

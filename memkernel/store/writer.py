"""A writer process for the crash and concurrency tests: appends lines, reporting each ack.

    python -m memkernel.store.writer DIR KEY_HEX LINES [BATCH] [SEED]

Prints `ack <anchor>` (flushed) for every line once `put_many` has returned, which is the
moment the store promises the line is durable: a test that kills this process at any instant
checks that every acknowledged line is in the store and verifies.
"""

import sys

import numpy as np

from memkernel.store import store as store_lib

KEY_DIM, VALUE_DIM = 16, 8


def main(argv: list[str]) -> None:
  directory, key_hex, lines = argv[1], argv[2], int(argv[3])
  batch = int(argv[4]) if len(argv) > 4 else 1
  seed = int(argv[5]) if len(argv) > 5 else 0
  rng = np.random.default_rng(seed)
  with store_lib.MemoryLineStore.open(directory, bytes.fromhex(key_hex), key_dim=KEY_DIM,
                                      value_dim=VALUE_DIM) as store:
    written = 0
    while written < lines:
      n = min(batch, lines - written)
      anchors = store.put_many(rng.normal(size=(n, KEY_DIM)), rng.normal(size=(n, VALUE_DIM)),
                               [{"writer": seed, "i": written + i} for i in range(n)])
      for anchor in anchors:
        sys.stdout.write(f"ack {anchor}\n")
      sys.stdout.flush()
      written += n


if __name__ == "__main__":
  main(sys.argv)

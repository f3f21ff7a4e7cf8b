"""`AsyncMemoryLineStore`: the store's contract, awaitable (each call runs in a worker thread).

    async with await AsyncMemoryLineStore.open(path, key=secret, key_dim=64, value_dim=64) as s:
      anchor = await s.put(k, v, {"doc": 1})
      lines = await s.query(q, k=5)

The calls share one `MemoryLineStore`, whose lock orders them, so concurrent tasks append
contiguous, chained lines exactly as threads do.
"""

from __future__ import annotations

import asyncio
from typing import Any

from memkernel.store import store as store_lib


class AsyncMemoryLineStore:
  """Awaitable `put`, `put_many`, `query`, `bias_vector`, `seal`, `export_jsonl`, `close` and
  `length` (`len`); `sync` is the store underneath (its `lines()` generator reads pages)."""

  def __init__(self, store: store_lib.MemoryLineStore):
    self.sync = store

  @classmethod
  async def open(cls, path: str, key: bytes, **kwargs: Any) -> "AsyncMemoryLineStore":
    """As `MemoryLineStore.open`."""
    return cls(await asyncio.to_thread(store_lib.MemoryLineStore.open, path, key, **kwargs))

  async def put(self, key, value, ctx=None) -> str:
    return await asyncio.to_thread(self.sync.put, key, value, ctx)

  async def put_many(self, keys, values, ctxs=None) -> list[str]:
    return await asyncio.to_thread(self.sync.put_many, keys, values, ctxs)

  async def query(self, vec, k: int = 5) -> list[store_lib.MemoryLine]:
    return await asyncio.to_thread(self.sync.query, vec, k)

  async def bias_vector(self, vec, k: int = 5):
    return await asyncio.to_thread(self.sync.bias_vector, vec, k)

  async def seal(self) -> store_lib.Seal:
    return await asyncio.to_thread(self.sync.seal)

  async def export_jsonl(self, out_path: str) -> int:
    return await asyncio.to_thread(self.sync.export_jsonl, out_path)

  async def length(self) -> int:
    return await asyncio.to_thread(len, self.sync)

  async def close(self) -> None:
    await asyncio.to_thread(self.sync.close)

  async def __aenter__(self) -> "AsyncMemoryLineStore":
    return self

  async def __aexit__(self, *exc) -> None:
    await self.close()

"""The persistent memory-line store (seed 003): tamper-evident, crash-safe, queried by the model.

Host-side numpy, never jitted: `MemoryLineStore` (sync) and `AsyncMemoryLineStore` (the same
contract, awaitable), `verify` (walk the keyed chain, name the first damage), `StoreConfig`.
"""

from memkernel.store.async_store import AsyncMemoryLineStore
from memkernel.store.config import StoreConfig
from memkernel.store.lines import MemoryLine
from memkernel.store.store import MemoryLineStore, Seal
from memkernel.store.verification import Report, verify

__all__ = ["AsyncMemoryLineStore", "MemoryLine", "MemoryLineStore", "Report", "Seal",
           "StoreConfig", "verify"]

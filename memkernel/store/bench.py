"""The store's benchmark: put rate, query and bias latency, index recall, open and verify time.

    rows = run(sizes=(10_000, 100_000, 1_000_000), dim=64, queries=1024, workdir=tmp)

For every size it writes a store of clustered keys (durable batches), then times, one query at a
time (p50 / p99 over `queries` queries): `store.query` and `store.bias_vector` (the whole path:
catch-up check, index, scoring, the rows from SQLite), beside plain numpy (a matmul over every key
and a top-10) and the faiss index alone. Recall@10 compares the store's index candidates and the
store's answers with exact search and with a store on the exact index. Also: single durable puts
per second, the time to reopen (with the cached index, and rebuilding it from the log), seal and
verify.
"""

from __future__ import annotations

import os
import shutil
import time
from typing import Callable, Sequence

import numpy as np

from memkernel.store import index as index_lib
from memkernel.store import keys as keys_lib
from memkernel.store import log
from memkernel.store import store as store_lib
from memkernel.store import verification

KEY = keys_lib.STUDY_KEY


def _clustered(rng, n: int, dim: int, centres: np.ndarray) -> np.ndarray:
  which = rng.integers(0, len(centres), size=n)
  return (centres[which] + 0.35 * rng.normal(size=(n, dim))).astype(np.float32)


def _percentiles(times_s: list[float]) -> dict:
  ms = np.asarray(times_s) * 1e3
  return {"p50_ms": round(float(np.percentile(ms, 50)), 4),
          "p99_ms": round(float(np.percentile(ms, 99)), 4)}


def _timed(fn, items) -> tuple[list[float], list]:
  times, out = [], []
  for item in items:
    start = time.perf_counter()
    out.append(fn(item))
    times.append(time.perf_counter() - start)
  return times, out


def bench_size(n: int, dim: int, queries: int, workdir: str, seed: int = 0,
               progress: Callable[[str], None] = print) -> dict:
  """Every measurement at one store size."""
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(max(16, n // 100), dim))
  keys = _clustered(rng, n, dim, centres)
  values = rng.normal(size=(n, dim)).astype(np.float32)
  qs = keys[rng.integers(0, n, size=queries)] + 0.1 * rng.normal(size=(queries, dim))
  qs = qs.astype(np.float32)
  directory = os.path.join(workdir, f"store{n}")
  row: dict = {"lines": n, "dim": dim, "queries": queries}

  start = time.perf_counter()
  with store_lib.MemoryLineStore.open(directory, KEY, key_dim=dim, value_dim=dim) as store:
    for begin in range(0, n, 10_000):
      store.put_many(keys[begin:begin + 10_000], values[begin:begin + 10_000])
    row["put_batched_lines_per_s"] = round(n / (time.perf_counter() - start), 1)
    progress(f"  {n} lines: batched puts {row['put_batched_lines_per_s']:.0f}/s")
  start = time.perf_counter()   # closing cached a built index: reopening loads it
  store_lib.MemoryLineStore.open(directory, KEY).close()
  row["open_cached_s"] = round(time.perf_counter() - start, 2)
  for name in (log.INDEX_NAME, log.INDEX_META_NAME):
    if os.path.exists(os.path.join(directory, name)):
      os.remove(os.path.join(directory, name))
  start = time.perf_counter()   # without the cache: the index rebuilt from the log
  store = store_lib.MemoryLineStore.open(directory, KEY)
  row["open_s"] = round(time.perf_counter() - start, 2)
  row["index"] = store._index.kind
  try:
    times, found = _timed(lambda q: store.query(q, 10), qs)
    row["query"] = _percentiles(times)
    times, _ = _timed(lambda q: store.bias_vector(q, 10), qs)
    row["bias_vector"] = _percentiles(times)
    times, candidates = _timed(lambda q: store._index.search(index_lib.normalise(q), 10)[1][0],
                               qs)
    row["index_alone"] = _percentiles(times)
    unit_keys = index_lib.normalise(keys)

    def numpy_top10(q):
      sims = unit_keys @ index_lib.normalise(q)
      return np.argpartition(-sims, 10)[:10]
    times, exact = _timed(numpy_top10, qs)
    row["numpy_exact"] = _percentiles(times)
    row["index_recall_at_10"] = round(float(np.mean(
        [len(set(c.tolist()) & set(e.tolist())) / 10 for c, e in zip(candidates, exact)])), 4)
    single = [rng.normal(size=dim).astype(np.float32) for _ in range(100)]
    start = time.perf_counter()
    for k in single:
      store.put(k, k)
    row["put_single_durable_lines_per_s"] = round(len(single) / (time.perf_counter() - start), 1)
    start = time.perf_counter()
    store.seal()
    row["seal_s"] = round(time.perf_counter() - start, 2)
  finally:
    store.close()
  if store._index.kind != "exact":
    with store_lib.MemoryLineStore.open(directory, KEY, config={"index": "exact"}) as exact_store:
      reference = [exact_store.query(q, 10) for q in qs[:256]]
    row["query_agreement_at_10"] = round(float(np.mean(
        [len({l.seq for l in a} & {l.seq for l in b}) / max(1, len(b))
         for a, b in zip(found[:256], reference)])), 4)
  else:
    row["query_agreement_at_10"] = 1.0
  start = time.perf_counter()
  report = verification.verify(directory, KEY)
  verify_s = time.perf_counter() - start
  row.update(verifies=report.ok, verify_s=round(verify_s, 2),
             verify_lines_per_s=round(report.records / verify_s, 1))
  shutil.rmtree(directory)
  progress(f"  {n} lines: {row}")
  return row


def run(sizes: Sequence[int], dim: int, queries: int, workdir: str,
        progress: Callable[[str], None] = print) -> list[dict]:
  os.makedirs(workdir, exist_ok=True)
  return [bench_size(n, dim, queries, workdir, progress=progress) for n in sizes]


def markdown(rows: Sequence[dict]) -> str:
  head = ("| lines | index | batched put /s | single durable put /s | open s: cached / rebuilt "
          "| query p50 / p99 ms | bias p50 / p99 ms | index alone p50 ms | numpy exact p50 ms "
          "| index recall@10 | query agreement@10 | verify lines/s |\n|" + "---|" * 12 + "\n")
  body = "".join(
      f"| {r['lines']:,} | {r['index']} | {r['put_batched_lines_per_s']:,.0f} "
      f"| {r['put_single_durable_lines_per_s']:,.0f} | {r['open_cached_s']} / {r['open_s']} "
      f"| {r['query']['p50_ms']:.3f} / {r['query']['p99_ms']:.3f} "
      f"| {r['bias_vector']['p50_ms']:.3f} / {r['bias_vector']['p99_ms']:.3f} "
      f"| {r['index_alone']['p50_ms']:.3f} | {r['numpy_exact']['p50_ms']:.3f} "
      f"| {r['index_recall_at_10']:.4f} | {r['query_agreement_at_10']:.4f} "
      f"| {r['verify_lines_per_s']:,.0f} |\n" for r in rows)
  return head + body


def plot(rows: Sequence[dict], path: str) -> None:
  from matplotlib.figure import Figure
  fig = Figure(figsize=(6, 4))
  ax = fig.add_subplot()
  n = [r["lines"] for r in rows]
  for name, label in (("query", "store.query"), ("bias_vector", "store.bias_vector"),
                      ("index_alone", "faiss index alone"), ("numpy_exact", "numpy exact")):
    ax.plot(n, [r[name]["p50_ms"] for r in rows], marker="o", label=label)
  ax.set(xscale="log", yscale="log", xlabel="lines in the store",
         ylabel="p50 latency per query (ms)", title="One query at a time (2-core CPU)")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)

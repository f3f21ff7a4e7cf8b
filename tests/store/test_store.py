"""The memory-line store's API: the seed's scoring, persistence, bad input, concurrency, indices."""

import asyncio
import json
import os
import threading

import numpy as np
import pytest

from memkernel.store import AsyncMemoryLineStore, MemoryLineStore, StoreConfig, verify
from memkernel.store import merkle

KEY = bytes(range(32))
HOUR_NS = 3600 * 10**9


class Clock:
  """A settable clock in nanoseconds."""

  def __init__(self, t_ns: int = 10**18):
    self.t = t_ns

  def __call__(self) -> int:
    return self.t


def _store(path, clock=None, **config):
  return MemoryLineStore.open(str(path), KEY, key_dim=8, value_dim=3,
                              config=StoreConfig(**config) if config else None,
                              clock=clock or Clock())


def _unit(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_query_scores_follow_the_seed_formula(tmp_path):
  rng = np.random.default_rng(0)
  clock = Clock()
  keys, values, times = rng.normal(size=(12, 8)), rng.normal(size=(12, 3)), []
  with _store(tmp_path, clock) as store:
    for k, v in zip(keys, values):
      store.put(k, v, {"t": clock.t})
      times.append(clock.t)
      clock.t += HOUR_NS
    q = keys[4] + 0.3 * rng.normal(size=8)
    found = store.query(q, k=4)
    bias = store.bias_vector(q, k=4)
  cos = _unit(keys) @ _unit(q)
  earlier = [max((_unit(keys[j]) @ _unit(keys[i]) for j in range(i)), default=None)
             for i in range(12)]
  nov = np.array([1.0 if e is None else 1.0 - e for e in earlier])
  rec = np.exp(-(clock.t - np.array(times)) / 1e9 / (6 * 3600))
  w = 0.35 * rec + 0.50 * cos + 0.08 * nov
  w[cos < 0.15] = -np.inf
  top = np.argsort(-w)[:4]
  top = top[np.isfinite(w[top])]
  assert [l.seq for l in found] == list(top)
  np.testing.assert_allclose([l.weight for l in found], w[top], rtol=1e-5)
  np.testing.assert_allclose([l.similarity for l in found], cos[top], rtol=1e-5)
  np.testing.assert_allclose([l.recency for l in found], rec[top], rtol=1e-6)
  np.testing.assert_allclose([l.novelty for l in found], nov[top], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(bias, (w[top, None] * values[top]).sum(0) / w[top].sum(), rtol=1e-5)
  assert found[0].ctx == {"t": times[found[0].seq]}
  np.testing.assert_allclose(found[0].key, keys[found[0].seq], rtol=1e-6)


def test_bias_is_zero_when_nothing_reaches_the_floor_and_batches(tmp_path):
  with _store(tmp_path) as store:
    assert store.query(np.ones(8), 3) == []
    np.testing.assert_array_equal(store.bias_vector(np.ones(8), 3), np.zeros(3))
    store.put(np.eye(8)[0], [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(store.bias_vector(np.eye(8)[1], 3), np.zeros(3))  # cos 0
    both = store.bias_vector(np.stack([np.eye(8)[0], np.eye(8)[1]]), 3)
    assert both.shape == (2, 3)
    np.testing.assert_allclose(both[0], [1.0, 2.0, 3.0], rtol=1e-6)
    np.testing.assert_array_equal(both[1], np.zeros(3))


def test_put_many_equals_one_put_at_a_time(tmp_path):
  rng = np.random.default_rng(1)
  keys, values = rng.normal(size=(6, 8)), rng.normal(size=(6, 3))
  keys[3] = keys[1]   # a repeated key has novelty 0
  lines = {}
  for name in ("many", "one"):
    with _store(tmp_path / name, similarity_floor=-1.0) as store:
      if name == "many":
        store.put_many(keys, values, [{"i": i} for i in range(6)])
      else:
        for i, (k, v) in enumerate(zip(keys, values)):
          store.put(k, v, {"i": i})
      lines[name] = sorted(store.query(keys[1], 6), key=lambda l: l.seq)
    assert verify(str(tmp_path / name), KEY).ok
  # Batched novelty sums in another order: equal to float32 rounding, not bit for bit.
  np.testing.assert_allclose([l.novelty for l in lines["many"]],
                             [l.novelty for l in lines["one"]], atol=1e-6)
  assert [l.ctx for l in lines["many"]] == [{"i": i} for i in range(6)]
  assert lines["many"][0].novelty == 1.0 and abs(lines["many"][3].novelty) < 1e-6


def test_lines_survive_reopening_and_other_handles_see_new_lines(tmp_path):
  rng = np.random.default_rng(2)
  keys = rng.normal(size=(5, 8))
  with _store(tmp_path) as store:
    store.put_many(keys, rng.normal(size=(5, 3)))
    with MemoryLineStore.open(str(tmp_path), KEY, clock=Clock()) as other:
      assert len(other) == 5 and (other.key_dim, other.value_dim) == (8, 3)
      store.put(keys[2] * 2, np.ones(3))   # appended through the first handle
      assert len(other) == 6
      seen = [(l.seq, l.weight) for l in other.query(keys[2], 6)]
      assert 5 in [seq for seq, _ in seen]
  with MemoryLineStore.open(str(tmp_path), KEY, clock=Clock()) as store:
    assert len(store) == 6
    assert [(l.seq, l.weight) for l in store.query(keys[2], 6)] == seen


@pytest.mark.parametrize("call, message", [
    (lambda s: s.put(np.ones(7), np.ones(3)), "must have 8 entries"),
    (lambda s: s.put(np.ones(8), [1.0, np.nan, 0.0]), "non-finite"),
    (lambda s: s.put(np.ones((2, 8)), np.ones(3)), "1-D"),
    (lambda s: s.put(np.ones(8), np.ones(3), ctx=[1, 2]), "ctx must be a mapping"),
    (lambda s: s.put(np.ones(8), np.ones(3), ctx={"x": object()}), "JSON-serialisable"),
    (lambda s: s.put(np.ones(8), np.ones(3), ctx={"x": float("nan")}), "JSON-serialisable"),
    (lambda s: s.put_many(np.ones((2, 8)), np.ones((3, 3))), "2 keys and 3 values"),
    (lambda s: s.put_many(np.ones((2, 8)), [np.ones(3), np.ones(4)]), "values\\[1\\]"),
    (lambda s: s.query(np.zeros(8), 2), "zero norm"),
    (lambda s: s.query(np.ones(8), 0), "k must be a positive integer"),
    (lambda s: s.query(np.ones(5), 1), "query must be"),
])
def test_bad_input_is_refused_and_writes_nothing(tmp_path, call, message):
  with _store(tmp_path) as store:
    store.put(np.ones(8), np.ones(3))
    with pytest.raises(ValueError, match=message):
      call(store)
    assert len(store) == 1
  assert verify(str(tmp_path), KEY).ok


def test_opening_checks_the_key_the_widths_and_the_path(tmp_path):
  with pytest.raises(ValueError, match="16-64 bytes"):
    MemoryLineStore.open(str(tmp_path / "s"), b"short", key_dim=8, value_dim=3)
  with pytest.raises(ValueError, match="key_dim and value_dim are needed"):
    MemoryLineStore.open(str(tmp_path / "s"), KEY)
  assert not (tmp_path / "s").exists()   # refused before anything was created
  _store(tmp_path / "s").close()
  with pytest.raises(ValueError, match="the key does not match"):
    MemoryLineStore.open(str(tmp_path / "s"), bytes(32))
  with pytest.raises(ValueError, match="key_dim=4 but the store"):
    MemoryLineStore.open(str(tmp_path / "s"), KEY, key_dim=4)
  (tmp_path / "file").write_text("x")
  with pytest.raises(ValueError, match="is a file"):
    MemoryLineStore.open(str(tmp_path / "file"), KEY, key_dim=8, value_dim=3)
  with pytest.raises(ValueError, match="store.alpha must be"):
    StoreConfig(alpha=-1.0)
  with pytest.raises(ValueError, match="store.index must be one of"):
    StoreConfig(index="annoy")
  with pytest.raises(ValueError, match="unknown field"):
    StoreConfig.from_mapping({"tau": 1.0})
  store = _store(tmp_path / "s")
  store.close()
  with pytest.raises(ValueError, match="is closed"):
    store.put(np.ones(8), np.ones(3))


def test_threads_append_one_contiguous_chain(tmp_path):
  rng = np.random.default_rng(3)
  with _store(tmp_path) as store:
    def work(i):
      for j in range(25):
        store.put(rng.normal(size=8), rng.normal(size=3), {"thread": i, "j": j})
    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
      t.start()
    for t in threads:
      t.join()
    assert len(store) == 200
  report = verify(str(tmp_path), KEY)
  assert report.ok and report.records == 200


def test_async_store_keeps_the_sync_contract(tmp_path):
  rng = np.random.default_rng(4)
  keys, values = rng.normal(size=(10, 8)), rng.normal(size=(10, 3))

  async def run():
    async with await AsyncMemoryLineStore.open(str(tmp_path / "a"), KEY, key_dim=8, value_dim=3,
                                               clock=Clock()) as store:
      anchors = [await store.put(k, v, {"i": i}) for i, (k, v) in enumerate(zip(keys, values))]
      await asyncio.gather(*(store.put(k, v) for k, v in zip(keys, values)))
      found = await store.query(keys[0], 3)
      bias = await store.bias_vector(keys[0], 3)
      seal = await store.seal()
      return anchors, found, bias, seal, await store.length()

  anchors, found, bias, seal, length = asyncio.run(run())
  with _store(tmp_path / "s") as sync:
    assert [sync.put(k, v, {"i": i}) for i, (k, v) in enumerate(zip(keys, values))] == anchors
  assert length == 20 and seal.count == 20 and bias.shape == (3,)
  assert found[0].similarity == pytest.approx(1.0, abs=1e-6)
  assert verify(str(tmp_path / "a"), KEY).ok


def test_export_writes_every_line_as_plain_json(tmp_path):
  rng = np.random.default_rng(5)
  with _store(tmp_path / "s") as store:
    anchors = store.put_many(rng.normal(size=(4, 8)), rng.normal(size=(4, 3)),
                             [{"doc": i, "text": "ü"} for i in range(4)])
    assert store.export_jsonl(str(tmp_path / "out.jsonl")) == 4
  rows = [json.loads(l) for l in (tmp_path / "out.jsonl").read_text("utf-8").splitlines()]
  assert [r["anchor"] for r in rows] == anchors
  assert [r["ctx"] for r in rows] == [{"doc": i, "text": "ü"} for i in range(4)]
  assert rows[1]["prev"] == anchors[0] and len(rows[0]["key"]) == 8


def test_seals_are_written_to_the_database_and_the_seal_file(tmp_path):
  rng = np.random.default_rng(6)
  with _store(tmp_path, seal_every=5) as store:
    anchors = store.put_many(rng.normal(size=(7, 8)), rng.normal(size=(7, 3)))
    seal_file = json.loads((tmp_path / "seal.json").read_text())
    assert seal_file["count"] == 7 and seal_file["last_anchor"] == anchors[-1]
    assert seal_file["merkle_root"] == merkle.merkle_root(bytes.fromhex(a) for a in anchors).hex()
    store.put(rng.normal(size=8), rng.normal(size=3))
  report = verify(str(tmp_path), KEY)
  assert report.ok and (report.sealed, report.unsealed) == (7, 1)


def _rfc_root(items):
  """RFC 9162's MTH, recursively, as the RFC writes it."""
  if not items:
    return merkle.EMPTY_ROOT
  if len(items) == 1:
    return merkle.leaf_hash(items[0])
  k = 1
  while k * 2 < len(items):
    k *= 2
  return merkle.node_hash(_rfc_root(items[:k]), _rfc_root(items[k:]))


def test_merkle_root_equals_the_rfc_recursion():
  items = [os.urandom(8) for _ in range(40)]
  for n in range(41):
    assert merkle.merkle_root(items[:n]) == _rfc_root(items[:n]), n


@pytest.mark.parametrize("index", ["flat", "hnsw", "ivf"])
def test_faiss_indices_find_what_exact_search_finds(tmp_path, index):
  rng = np.random.default_rng(7)
  keys = rng.normal(size=(3000, 8)).astype(np.float32)
  queries = keys[:100] + 0.1 * rng.normal(size=(100, 8))
  found = {}
  for kind in ("exact", index):
    with _store(tmp_path / kind, index=kind, candidates=10, ivf_lists=16, ivf_probe=8,
                similarity_floor=-1.0, alpha=0.0, gamma=0.0) as store:
      store.put_many(keys, np.zeros((3000, 3)))
      found[kind] = [{l.seq for l in store.query(q, 10)} for q in queries]
  recall = np.mean([len(a & b) / 10 for a, b in zip(found["exact"], found[index])])
  assert recall >= (1.0 if index == "flat" else 0.95), recall


def test_auto_index_switches_to_hnsw_past_exact_max(tmp_path):
  rng = np.random.default_rng(8)
  with _store(tmp_path, exact_max=50) as store:
    store.put_many(rng.normal(size=(40, 8)), rng.normal(size=(40, 3)))
    assert store._index.kind == "exact"
    store.put_many(rng.normal(size=(20, 8)), rng.normal(size=(20, 3)))
    assert store._index.kind == "hnsw" and len(store._index) == 60
    q = rng.normal(size=8)
    assert store.query(q, 1)[0].seq == int(np.argmax(_unit(store._index.keys.array) @ _unit(q)))


def test_batched_novelty_is_the_same_in_any_block_size():
  from memkernel.store import scoring
  rng = np.random.default_rng(9)
  unit = _unit(rng.normal(size=(50, 8)))
  earlier = rng.uniform(-1, 1, size=50)
  earlier[:3] = -np.inf
  reference = np.array([1.0 - max([earlier[i]] + [unit[j] @ unit[i] for j in range(i)])
                        if i or np.isfinite(earlier[i]) else 1.0 for i in range(50)])
  for block in (1, 7, 50, 512):
    np.testing.assert_allclose(scoring.novelty(unit, earlier, block=block), reference,
                               atol=1e-12)


def test_a_negative_floor_cannot_turn_the_bias_inside_out(tmp_path):
  with _store(tmp_path, similarity_floor=-1.0, alpha=0.0, gamma=0.0) as store:
    store.put(np.eye(8)[0], [1.0, 0.0, 0.0])
    store.put(-np.eye(8)[0] + 0.01 * np.eye(8)[1], [5.0, 0.0, 0.0])   # weight below 0
    bias = store.bias_vector(np.eye(8)[0], 2)
  np.testing.assert_allclose(bias, [1.0, 0.0, 0.0], rtol=1e-6)   # only the positive weight


def test_a_built_index_is_cached_beside_the_log_and_checked_before_use(tmp_path):
  rng = np.random.default_rng(10)
  keys = rng.normal(size=(400, 8))
  queries = keys[:20] + 0.05 * rng.normal(size=(20, 8))
  config = {"index": "hnsw"}
  with MemoryLineStore.open(str(tmp_path), KEY, key_dim=8, value_dim=3, config=config,
                            clock=Clock()) as store:
    store.put_many(keys[:300], rng.normal(size=(300, 3)))
    expected = [[l.seq for l in store.query(q, 5)] for q in queries]
  assert (tmp_path / "index.faiss").exists() and (tmp_path / "index.json").exists()
  with MemoryLineStore.open(str(tmp_path), KEY, config=config, clock=Clock()) as store:
    assert store._cached == 300   # loaded, not rebuilt
    assert [[l.seq for l in store.query(q, 5)] for q in queries] == expected
    store.put_many(keys[300:], rng.normal(size=(100, 3)))   # beyond the cache
    assert store._index._faiss.ntotal == 400   # the 100 new keys were added to it
    assert store.query(keys[350], 1)[0].seq == 350
  # A cache that does not verify, or that another config would not build, is ignored.
  data = bytearray((tmp_path / "index.faiss").read_bytes())
  data[-1] ^= 1
  (tmp_path / "index.faiss").write_bytes(bytes(data))
  with MemoryLineStore.open(str(tmp_path), KEY, config=config, clock=Clock()) as store:
    assert store._cached == 0 and store._index.built
    assert store.query(keys[350], 1)[0].seq == 350
  with MemoryLineStore.open(str(tmp_path), KEY, config={"index": "flat"}) as store:
    assert store._cached == 0 and store._index.kind == "flat"


def test_the_benchmark_measures_every_column_it_reports(tmp_path):
  from memkernel.store import bench
  rows = bench.run([600], dim=8, queries=16, workdir=str(tmp_path), progress=lambda m: None)
  table = bench.markdown(rows)
  assert table.count("\n") == 3 and "| 600 | exact |" in table
  row = rows[0]
  assert row["verifies"] and row["index_recall_at_10"] == 1.0
  assert row["query"]["p50_ms"] > 0 and row["open_cached_s"] >= 0
  bench.plot(rows, str(tmp_path / "latency.png"))
  assert (tmp_path / "latency.png").stat().st_size > 0

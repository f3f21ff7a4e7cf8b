r"""The memory-line store from the command line: `memkernel.store`.

  python -m experiments.store keygen --key_file=store.key
  python -m experiments.store put --store=runs/store --key_file=store.key --dims=4,2 \
      --key=0.1,0.2,0.3,0.4 --value=1,0 --ctx='{"doc": 1}'
  python -m experiments.store put --store=runs/store --key_file=store.key --jsonl=lines.jsonl
  python -m experiments.store query --store=runs/store --key_file=store.key --vec=0.1,0.2,0.3,0.4
  python -m experiments.store seal --store=runs/store --key_file=store.key
  python -m experiments.store verify --store=runs/store --key_file=store.key --json
  python -m experiments.store export --store=runs/store --key_file=store.key --out=lines.jsonl

  python -m experiments.store reliability --out_dir=docs/results/store
  python -m experiments.store bench --out_dir=docs/results/store

`verify` exits 0 when the store is intact and 1 when it is damaged, printing the first bad line and
the kind of damage (with `--json`: {"ok", "records", "first_bad_record", "damage", ...}).
`--jsonl` reads one {"key": [...], "value": [...], "ctx": {...}} object per line (plain JSON).
"""

import json
import os
import sys
import tempfile

from absl import flags

from experiments import _cli
from memkernel import store as store_lib
from memkernel.store import bench as bench_lib
from memkernel.store import keys as keys_lib
from memkernel.store import log
from memkernel.store import reliability as reliability_lib

COMMANDS = ("keygen", "put", "query", "verify", "seal", "export", "reliability", "bench")
_STORE = flags.DEFINE_string("store", None, "The store's directory.")
_KEY_FILE = flags.DEFINE_string("key_file", None, "The secret key file (keygen writes one).")
_DIMS = flags.DEFINE_list("dims", None, "key_dim,value_dim: needed to create a store.")
_KEY = flags.DEFINE_list("key", None, "put: the key vector, comma-separated numbers.")
_VALUE = flags.DEFINE_list("value", None, "put: the value vector, comma-separated numbers.")
_CTX = flags.DEFINE_string("ctx", None, "put: the line's context, a JSON object.")
_JSONL = flags.DEFINE_string("jsonl", None, "put: a file of lines to append in one batch.")
_VEC = flags.DEFINE_list("vec", None, "query: the query vector, comma-separated numbers.")
_K = flags.DEFINE_integer("k", 5, "query: how many lines.")
_OUT = flags.DEFINE_string("out", None, "export: the JSONL file to write.")
_JSON = flags.DEFINE_bool("json", False, "Print machine-readable JSON.")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "reliability, bench: where the results go.")
_KILLS = flags.DEFINE_integer("kill_trials", 300, "reliability: writers killed by SIGKILL.")
_PROCESSES = flags.DEFINE_integer("processes", 8, "reliability: concurrent writer processes.")
_LINES_EACH = flags.DEFINE_integer("lines_each", 1000, "reliability: lines per writer.")
_DAMAGE = flags.DEFINE_integer("damage_trials", 20, "reliability: trials per kind of damage.")
_FORGERS = flags.DEFINE_integer("forger_trials", 20, "reliability: forged stores.")
_SCALE = flags.DEFINE_integer("scale_lines", 1_000_000, "reliability: lines verified at scale.")
_FAULTS = flags.DEFINE_integer("fault_trials", 500, "reliability: power cuts injected.")
_PARTS = flags.DEFINE_list("parts", list(reliability_lib.PARTS),
                           "reliability: the parts to run (their figures replace those in an "
                           "existing reliability.json).")
_SIZES = flags.DEFINE_list("sizes", ["10000", "100000", "1000000"], "bench: store sizes.")
_DIM = flags.DEFINE_integer("dim", 64, "bench: key and value width.")
_QUERIES = flags.DEFINE_integer("queries", 1024, "bench: queries timed one at a time.")


def _json_object(text: str, where: str) -> dict:
  try:
    value = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"{where} is not valid JSON: {e}") from None
  if not isinstance(value, dict):
    raise ValueError(f"{where} must be a JSON object, got {type(value).__name__}")
  return value


def _open() -> store_lib.MemoryLineStore:
  if not _STORE.value or not _KEY_FILE.value:
    raise ValueError("--store and --key_file are required")
  dims = (None, None)
  if _DIMS.value:
    try:
      dims = tuple(int(d) for d in _DIMS.value)
    except ValueError:
      raise ValueError(f"--dims must be key_dim,value_dim, got {','.join(_DIMS.value)}") from None
    if len(dims) != 2:
      raise ValueError(f"--dims must be key_dim,value_dim, got {','.join(_DIMS.value)}")
  return store_lib.MemoryLineStore.open(_STORE.value, keys_lib.read_key_file(_KEY_FILE.value),
                                        key_dim=dims[0], value_dim=dims[1])


def _put(store: store_lib.MemoryLineStore) -> None:
  if _JSONL.value:
    lines = []
    with open(_JSONL.value) as f:
      for n, text in enumerate(f, 1):
        if text.strip():
          item = _json_object(text, f"{_JSONL.value} line {n}")
          if "key" not in item or "value" not in item:
            raise ValueError(f"{_JSONL.value} line {n} needs \"key\" and \"value\"")
          lines.append(item)
    anchors = store.put_many([l["key"] for l in lines], [l["value"] for l in lines],
                             [l.get("ctx") for l in lines])
  else:
    ctx = _json_object(_CTX.value, "--ctx") if _CTX.value else None
    anchors = [store.put(_cli.parse_numbers(_KEY.value, "key"),
                         _cli.parse_numbers(_VALUE.value, "value"), ctx)]
  print(json.dumps({"anchors": anchors, "lines": len(store)}) if _JSON.value
        else f"appended {len(anchors)} line(s); the store has {len(store)}; last anchor "
             f"{anchors[-1] if anchors else '-'}")


def _query(store: store_lib.MemoryLineStore) -> None:
  found = store.query(_cli.parse_numbers(_VEC.value, "vec"), _K.value)
  rows = [{"seq": l.seq, "weight": l.weight, "similarity": l.similarity, "recency": l.recency,
           "novelty": l.novelty, "timestamp": l.timestamp, "ctx": l.ctx, "anchor": l.anchor,
           "value": l.value.tolist()} for l in found]
  if _JSON.value:
    print(json.dumps(rows))
    return
  print(f"{'seq':>8} {'weight':>7} {'sim':>6} {'recency':>7} {'novelty':>7}  ctx")
  for r in rows:
    print(f"{r['seq']:>8} {r['weight']:7.4f} {r['similarity']:6.3f} {r['recency']:7.4f} "
          f"{r['novelty']:7.4f}  {json.dumps(r['ctx'])}")


def _verify() -> None:
  if not _STORE.value or not _KEY_FILE.value:
    raise ValueError("--store and --key_file are required")
  report = store_lib.verify(_STORE.value, keys_lib.read_key_file(_KEY_FILE.value))
  if _JSON.value:
    print(json.dumps(report.to_json()))
  elif report.ok:
    print(f"intact: {report.records} lines, {report.sealed} sealed, {report.unsealed} after the "
          f"newest seal" + (" (a writer had not closed: recovered)" if report.unclean_shutdown
                            else ""))
  else:
    at = "" if report.first_bad_record is None else f" at line {report.first_bad_record}"
    print(f"DAMAGED{at}: {report.damage} ({report.detail}); {report.records} lines verified "
          f"before it")
  sys.exit(0 if report.ok else 1)


def _command_line() -> str:
  return _cli.command("store")


def _write(path: str, text: str) -> None:
  log.write_atomically(path, text.encode("utf-8"))


def _out_dir() -> str:
  if not _OUT_DIR.value:
    raise ValueError("--out_dir is required")
  _cli.check_directory("out_dir", _OUT_DIR.value)
  os.makedirs(_OUT_DIR.value, exist_ok=True)
  return _OUT_DIR.value


def _reliability() -> None:
  for flag, value in (("kill_trials", _KILLS.value), ("processes", _PROCESSES.value),
                      ("lines_each", _LINES_EACH.value), ("damage_trials", _DAMAGE.value),
                      ("forger_trials", _FORGERS.value), ("scale_lines", _SCALE.value),
                      ("fault_trials", _FAULTS.value)):
    _cli.check_positive(flag, value)
  out = os.path.join(_out_dir(), "reliability.json")
  result = {}
  if os.path.exists(out):
    with open(out) as f:
      result = json.load(f)
  figures = reliability_lib.run_all(
      parts=_PARTS.value, kill_trials=_KILLS.value, processes=_PROCESSES.value,
      lines_each=_LINES_EACH.value, damage_trials=_DAMAGE.value,
      forger_trials=_FORGERS.value, scale_lines=_SCALE.value, fault_trials=_FAULTS.value,
      progress=lambda m: print(m, flush=True))
  for name, part in figures.items():
    result[name] = {**part, "command": _command_line()}
  result.pop("command", None)
  _write(out, json.dumps(result, indent=1) + "\n")
  print(f"wrote {out}")


def _bench() -> None:
  sizes = _cli.parse_lengths(_SIZES.value, "sizes")
  _cli.check_positive("dim", _DIM.value)
  _cli.check_positive("queries", _QUERIES.value)
  out_dir = _out_dir()
  with tempfile.TemporaryDirectory(prefix="memkernel-store-bench-") as work:
    rows = bench_lib.run(sizes, _DIM.value, _QUERIES.value, work,
                         progress=lambda m: print(m, flush=True))
  _write(os.path.join(out_dir, "bench.json"),
         json.dumps({"rows": rows, "command": _command_line()}, indent=1) + "\n")
  table = bench_lib.markdown(rows)
  _write(os.path.join(out_dir, "bench.md"), table)
  bench_lib.plot(rows, os.path.join(out_dir, "bench_latency.png"))
  print(table)
  print(f"wrote bench.json, bench.md and bench_latency.png to {out_dir}")


def main(argv):
  command = argv[1] if len(argv) > 1 else None
  if command not in COMMANDS:
    raise ValueError(f"give a command, one of {', '.join(COMMANDS)} (got {command!r})")
  if command == "keygen":
    if not _KEY_FILE.value:
      raise ValueError("--key_file is required")
    keys_lib.new_key_file(_KEY_FILE.value)
    print(f"wrote a new 256-bit key to {_KEY_FILE.value}; keep it: the store verifies only "
          f"with it")
    return
  if command == "verify":
    _verify()
  if command == "reliability":
    return _reliability()
  if command == "bench":
    return _bench()
  with _open() as store:
    if command == "put":
      _put(store)
    elif command == "query":
      _query(store)
    elif command == "seal":
      seal = store.seal()
      print(json.dumps(seal.to_json()) if _JSON.value else
            f"sealed {seal.count} lines: merkle root {seal.merkle_root.hex()}")
    elif command == "export":
      if not _OUT.value:
        raise ValueError("--out is required")
      n = store.export_jsonl(_OUT.value)
      print(f"wrote {n} lines to {_OUT.value}")


if __name__ == "__main__":
  _cli.run(main, name="store", positional=1)

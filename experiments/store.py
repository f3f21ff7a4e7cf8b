r"""The memory-line store from the command line: `memkernel.store`.

  python -m experiments.store keygen --key_file=store.key
  python -m experiments.store put --store=runs/store --key_file=store.key --dims=4,2 \
      --key=0.1,0.2,0.3,0.4 --value=1,0 --ctx='{"doc": 1}'
  python -m experiments.store put --store=runs/store --key_file=store.key --jsonl=lines.jsonl
  python -m experiments.store query --store=runs/store --key_file=store.key --vec=0.1,0.2,0.3,0.4
  python -m experiments.store seal --store=runs/store --key_file=store.key
  python -m experiments.store verify --store=runs/store --key_file=store.key --json
  python -m experiments.store export --store=runs/store --key_file=store.key --out=lines.jsonl

`verify` exits 0 when the store is intact and 1 when it is damaged, printing the first bad line and
the kind of damage (with `--json`: {"ok", "records", "first_bad_record", "damage", ...}).
`--jsonl` reads one {"key": [...], "value": [...], "ctx": {...}} object per line (plain JSON).
"""

import json
import sys

from absl import flags

from experiments import _cli
from memkernel import store as store_lib
from memkernel.store import keys as keys_lib

COMMANDS = ("keygen", "put", "query", "verify", "seal", "export")
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


def _numbers(flag: str, values) -> list[float]:
  if not values:
    raise ValueError(f"--{flag} is required")
  try:
    return [float(v) for v in values]
  except ValueError:
    raise ValueError(f"--{flag} must be comma-separated numbers, got {','.join(values)!r}") \
        from None


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
    anchors = [store.put(_numbers("key", _KEY.value), _numbers("value", _VALUE.value), ctx)]
  print(json.dumps({"anchors": anchors, "lines": len(store)}) if _JSON.value
        else f"appended {len(anchors)} line(s); the store has {len(store)}; last anchor "
             f"{anchors[-1] if anchors else '-'}")


def _query(store: store_lib.MemoryLineStore) -> None:
  found = store.query(_numbers("vec", _VEC.value), _K.value)
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

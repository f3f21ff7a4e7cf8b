"""Verification names every kind of damage at the exact line, and raises no false alarm."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from memkernel.store import MemoryLineStore, keys, tamper, verify

KEY = bytes(range(32))
LINES = 30


@pytest.fixture(scope="module")
def sealed_store(tmp_path_factory):
  path = tmp_path_factory.mktemp("sealed")
  rng = np.random.default_rng(0)
  with MemoryLineStore.open(str(path), KEY, key_dim=16, value_dim=8) as store:
    for i in range(LINES):
      store.put(rng.normal(size=16), rng.normal(size=8), {"i": i, "note": "line"})
    store.seal()
  return path


def _copy(src, tmp_path):
  dst = tmp_path / "store"
  shutil.copytree(src, dst)
  return str(dst)


@pytest.mark.parametrize("damage, expected, field", [
    (lambda d: tamper.flip_byte(d, 11, "value", 5), "flipped_byte", "value"),
    (lambda d: tamper.flip_byte(d, 11, "key", 63), "flipped_byte", "key"),
    (lambda d: tamper.flip_byte(d, 11, "ctx", 3), "flipped_byte", "ctx"),
    (lambda d: tamper.raw_flip_byte(d, 11, "key"), "flipped_byte", "key"),
    (lambda d: tamper.edit_field(d, 11, "ctx"), "edited_field", "ctx"),
    (lambda d: tamper.edit_field(d, 11, "key"), "edited_field", "key"),
    (lambda d: tamper.edit_field(d, 11, "anchor", os.urandom(32)), "edited_field", "anchor"),
    (lambda d: tamper.edit_timestamp(d, 11), "edited_timestamp", "timestamp"),
    (lambda d: tamper.delete(d, 11), "deleted", None),
    (lambda d: tamper.delete(d, 11, renumber=True), "deleted", None),
    (lambda d: tamper.insert(d, 11), "inserted", None),
    (lambda d: tamper.insert(d, 11, copy_of=4), "inserted", None),
    (lambda d: tamper.swap(d, 11, 12), "swapped", None),
    (lambda d: tamper.swap(d, 11, 20), "swapped", None),
    (lambda d: tamper.reorder(d, (11, 14, 17)), "reordered", None),
    (lambda d: tamper.truncate_tail(d, 11), "truncated_tail", None),
    (lambda d: tamper.forge_chain(d, 11), "forged", None),
])
def test_every_damage_is_named_at_its_line(sealed_store, tmp_path, damage, expected, field):
  directory = _copy(sealed_store, tmp_path)
  assert verify(directory, KEY).ok
  first = damage(directory)
  report = verify(directory, KEY)
  assert not report.ok
  assert (report.damage, report.first_bad_record, report.field) == (expected, first, field), \
      report
  assert report.records == first   # every line before the damage still verifies


def test_a_forger_without_the_key_cannot_make_a_store_that_verifies(sealed_store, tmp_path):
  directory = _copy(sealed_store, tmp_path)
  for _ in range(3):   # each try re-chains from line 0 and re-seals with a fresh guess
    tamper.forge_chain(directory, 0)
    report = verify(directory, KEY)
    assert not report.ok and report.first_bad_record == 0
  assert verify(directory, os.urandom(32)).damage == "key_mismatch"


@pytest.mark.parametrize("damage, expected", [
    (lambda d: tamper.edit_field(d, 11, "tags", os.urandom(96)), ("edited_field", 11, "tags")),
    (lambda d: tamper.edit_widths(d, 8), ("key_mismatch", None, None)),
    (lambda d: tamper.insert_negative(d), ("inserted", -5, None)),
])
def test_edits_outside_the_fields_are_caught(sealed_store, tmp_path, damage, expected):
  directory = _copy(sealed_store, tmp_path)
  damage(directory)
  report = verify(directory, KEY)
  assert (report.ok, report.damage, report.first_bad_record, report.field) == (False, *expected)
  if expected[0] == "key_mismatch":
    with pytest.raises(ValueError, match="widths were edited"):
      MemoryLineStore.open(directory, KEY)


def test_an_older_seal_replayed_cannot_hide_a_newer_one(tmp_path):
  rng = np.random.default_rng(2)
  directory = str(tmp_path / "s")
  with MemoryLineStore.open(directory, KEY, key_dim=4, value_dim=2) as store:
    store.put_many(rng.normal(size=(5, 4)), rng.normal(size=(5, 2)))
    store.seal()
    store.put_many(rng.normal(size=(15, 4)), rng.normal(size=(15, 2)))
    store.seal()
  tamper.replay_old_seal(directory)   # the 5-line seal again, newest; seal.json removed
  tamper.truncate_tail(directory, 8)
  report = verify(directory, KEY)
  assert not report.ok and report.damage == "edited_seal"


def test_a_file_that_is_not_a_database_is_corrupt_not_a_crash(tmp_path):
  (tmp_path / "lines.sqlite").write_bytes(os.urandom(4096))
  report = verify(str(tmp_path), KEY)
  assert (report.ok, report.damage) == (False, "corrupt_file")


def test_seals_are_checked(sealed_store, tmp_path):
  directory = _copy(sealed_store, tmp_path)
  seal = json.loads(open(os.path.join(directory, "seal.json")).read())
  seal["count"] = LINES - 1
  with open(os.path.join(directory, "seal.json"), "w") as f:
    json.dump(seal, f)
  report = verify(directory, KEY)
  assert (report.ok, report.damage) == (False, "edited_seal")


def test_unsealed_lines_verify_and_are_counted(sealed_store, tmp_path):
  directory = _copy(sealed_store, tmp_path)
  with MemoryLineStore.open(directory, KEY) as store:
    store.put(np.ones(16), np.ones(8))
    store.put(np.ones(16), np.ones(8))
  report = verify(directory, KEY)
  assert report.ok and (report.records, report.sealed, report.unsealed) == (LINES + 2, LINES, 2)


def test_verification_needs_no_recursion(tmp_path):
  rng = np.random.default_rng(1)
  with MemoryLineStore.open(str(tmp_path), KEY, key_dim=4, value_dim=2) as store:
    store.put_many(rng.normal(size=(5000, 4)), rng.normal(size=(5000, 2)))
    store.seal()
  limit = sys.getrecursionlimit()
  sys.setrecursionlimit(200)   # far below 5,000: a recursive walk would overflow
  try:
    report = verify(str(tmp_path), KEY)
  finally:
    sys.setrecursionlimit(limit)
  assert report.ok and report.records == 5000


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "experiments.store", *args], capture_output=True,
                        text=True, cwd=os.path.dirname(os.path.dirname(os.path.dirname(
                            os.path.abspath(__file__)))))


def test_the_verify_command_exits_0_intact_and_1_damaged(sealed_store, tmp_path):
  directory = _copy(sealed_store, tmp_path)
  key_file = tmp_path / "key"
  key_file.write_text(KEY.hex())
  intact = _cli("verify", f"--store={directory}", f"--key_file={key_file}", "--json")
  assert intact.returncode == 0, intact.stderr
  assert json.loads(intact.stdout)["ok"] is True
  tamper.edit_timestamp(directory, 7)
  damaged = _cli("verify", f"--store={directory}", f"--key_file={key_file}", "--json")
  assert damaged.returncode == 1
  out = json.loads(damaged.stdout)
  assert {k: out[k] for k in ("ok", "records", "first_bad_record", "damage")} == {
      "ok": False, "records": 7, "first_bad_record": 7, "damage": "edited_timestamp"}
  missing = _cli("verify", f"--store={tmp_path / 'none'}", f"--key_file={key_file}")
  assert missing.returncode == 1 and missing.stderr.startswith("FATAL store: no memory-line store")


def test_the_store_commands_round_trip(tmp_path):
  key_file, store = str(tmp_path / "k"), str(tmp_path / "s")
  assert _cli("keygen", f"--key_file={key_file}").returncode == 0
  again = _cli("keygen", f"--key_file={key_file}")
  assert again.returncode == 1 and "never overwritten" in again.stderr
  lines = tmp_path / "lines.jsonl"
  lines.write_text('{"key": [1, 0, 0], "value": [1, 2], "ctx": {"doc": 1}}\n'
                   '{"key": [0, 1, 0], "value": [3, 4]}\n')
  common = [f"--store={store}", f"--key_file={key_file}"]
  assert _cli("put", *common, "--dims=3,2", f"--jsonl={lines}").returncode == 0
  found = _cli("query", *common, "--vec=1,0.1,0", "--k=1", "--json")
  assert json.loads(found.stdout)[0]["ctx"] == {"doc": 1}
  assert _cli("seal", *common).returncode == 0
  assert _cli("export", *common, f"--out={tmp_path / 'x.jsonl'}").returncode == 0
  assert len((tmp_path / "x.jsonl").read_text().splitlines()) == 2
  bad = _cli("put", *common, "--key=1,0", "--value=1,2")
  assert bad.returncode == 1 and "must have 3 entries" in bad.stderr
  assert _cli("verify", *common).returncode == 0


def test_key_files_are_hex_and_never_overwritten(tmp_path):
  key = keys.new_key_file(str(tmp_path / "k"))
  assert keys.read_key_file(str(tmp_path / "k")) == key
  assert oct(os.stat(tmp_path / "k").st_mode & 0o777) == "0o600"
  with pytest.raises(ValueError, match="never overwritten"):
    keys.new_key_file(str(tmp_path / "k"))
  (tmp_path / "typo").write_text(key.hex()[:-1] + "\n")
  with pytest.raises(ValueError, match="even number of digits"):
    keys.read_key_file(str(tmp_path / "typo"))
  (tmp_path / "short").write_text("abcd")
  with pytest.raises(ValueError, match="16-64 bytes"):
    keys.read_key_file(str(tmp_path / "short"))

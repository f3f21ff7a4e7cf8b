"""Tests for `memkernel.checkpoint`: round trips, rotation, metadata, mismatch errors, falling back
past damaged steps, and that a process killed mid-save leaves the newest complete checkpoint
restorable."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

from absl.testing import absltest
from absl.testing import parameterized
from flax import struct
import jax
import jax.numpy as jnp
import numpy as np

from memkernel import checkpoint as ckpt_lib
from memkernel.checkpoint import CheckpointMismatchError
from memkernel.checkpoint import Checkpointer

_TMP_MARKER = ".orbax-checkpoint-tmp"
_CONFIG = {"model": {"d_model": 64, "num_layers": 2, "scan_impl": "linear"}, "lr": 1e-3,
           "tags": ["a", "b"], "warmup": None, "use_tree_read": True}


@struct.dataclass
class MemoryState:
  keys_NLD: jax.Array
  count: jax.Array
  leaf_size: int = struct.field(pytree_node=False, default=16)


def _state(seed: int = 0) -> dict:
  """A nested train state with many dtypes, special float values and a dataclass node."""
  rng = np.random.default_rng(seed)
  w = rng.standard_normal((64, 128)).astype(np.float32)
  w[0, :3] = [np.nan, np.inf, -0.0]
  return {
      "params": {
          "layer_0": {"w": jnp.asarray(w), "b": jnp.asarray(rng.standard_normal(128), jnp.bfloat16)},
          "embed": jnp.asarray(rng.standard_normal((32, 8)), jnp.float16),
      },
      "opt": (jnp.asarray(rng.integers(-128, 127, (7,)), jnp.int8),
              jnp.asarray(rng.integers(0, 2**32 - 1, (3, 2)), jnp.uint32)),
      "mask": jnp.asarray(rng.integers(0, 2, (5,)), bool),
      "step": jnp.int32(seed + 7),
      "memory": MemoryState(keys_NLD=jnp.asarray(rng.standard_normal((2, 16, 4)), jnp.float32),
                            count=jnp.zeros((2,), jnp.int32)),
  }


def _assert_bit_exact(test: absltest.TestCase, actual, expected):
  test.assertEqual(jax.tree.structure(actual), jax.tree.structure(expected))
  for path_a, a, e in zip(*zip(*jax.tree_util.tree_flatten_with_path(actual)[0]),
                          jax.tree.leaves(expected)):
    a, e = np.asarray(a), np.asarray(e)
    test.assertEqual((a.shape, a.dtype), (e.shape, e.dtype), msg=str(path_a))
    test.assertEqual(a.tobytes(), e.tobytes(), msg=str(path_a))


def _tempdir(test: absltest.TestCase) -> str:
  """A fresh directory removed after the test (absl's create_tempdir needs parsed flags)."""
  path = tempfile.mkdtemp(prefix="ckpt_test_")
  test.addCleanup(shutil.rmtree, path, ignore_errors=True)
  return path


def _save(ckpt: Checkpointer, step: int, state, **kwargs) -> bool:
  return ckpt.save(step, state, config=_CONFIG, data_state={"step": step, "seed": 3}, **kwargs)


class RoundTripTest(parameterized.TestCase):

  @parameterized.parameters(True, False)
  def test_restore_is_bit_exact_with_abstract_state(self, async_save):
    workdir = _tempdir(self)
    state = _state()
    with Checkpointer(workdir, async_save=async_save) as ckpt:
      self.assertTrue(_save(ckpt, 10, state))
    # A fresh manager, as in a new process, sees the committed step.
    reader = Checkpointer(workdir, read_only=True)
    self.assertEqual(reader.latest_step(), 10)
    restored, meta = reader.restore(abstract_state=jax.eval_shape(lambda: state))
    self.assertIsInstance(restored["memory"], MemoryState)
    self.assertEqual(restored["memory"].leaf_size, 16)
    _assert_bit_exact(self, restored, state)
    self.assertEqual(meta, {"config": _CONFIG, "data_state": {"step": 10, "seed": 3}})

  def test_restore_with_concrete_target(self):
    workdir = _tempdir(self)
    state = _state(seed=1)
    with Checkpointer(workdir) as ckpt:
      _save(ckpt, 1, state)
      restored, _ = ckpt.restore(1, abstract_state=jax.tree.map(jnp.zeros_like, state))
    _assert_bit_exact(self, restored, state)

  def test_relative_directory(self):
    """`--workdir=runs/mqar` (relative, as in the README) saves and restores."""
    root = _tempdir(self)
    cwd = os.getcwd()
    os.chdir(root)
    self.addCleanup(os.chdir, cwd)
    state = _state(seed=2)
    with Checkpointer(os.path.join("runs", "rel")) as ckpt:
      self.assertTrue(_save(ckpt, 3, state))
    os.chdir(cwd)  # The absolute path was fixed at construction; a later chdir cannot move it.
    reader = Checkpointer(os.path.join(root, "runs", "rel"), read_only=True)
    restored, _ = reader.restore(abstract_state=jax.eval_shape(lambda: state))
    _assert_bit_exact(self, restored, state)

  def test_async_save_then_wait_is_restorable(self):
    workdir = _tempdir(self)
    state = _state(seed=2)
    ckpt = Checkpointer(workdir, async_save=True)
    _save(ckpt, 5, state)
    ckpt.wait()
    self.assertEqual(Checkpointer(workdir, read_only=True).latest_step(), 5)
    restored, _ = ckpt.restore(abstract_state=jax.eval_shape(lambda: state))
    _assert_bit_exact(self, restored, state)
    ckpt.close()

  def test_restore_raw_returns_saved_arrays_as_nested_containers(self):
    workdir = _tempdir(self)
    state = _state(seed=3)
    with Checkpointer(workdir) as ckpt:
      _save(ckpt, 4, state)
    raw = Checkpointer(workdir, read_only=True).restore_raw()
    self.assertIsInstance(raw["memory"], dict)  # Dataclasses come back as dicts.
    expected = dict(state, memory={"keys_NLD": state["memory"].keys_NLD,
                                   "count": state["memory"].count}, opt=list(state["opt"]))
    _assert_bit_exact(self, raw, expected)


class RotationAndMetaTest(absltest.TestCase):

  def test_keeps_latest_n(self):
    workdir = _tempdir(self)
    with Checkpointer(workdir, keep=2) as ckpt:
      for step in range(1, 6):
        _save(ckpt, step, {"x": jnp.full((4,), step, jnp.float32)})
      ckpt.wait()
      self.assertEqual(ckpt.all_steps(), [4, 5])
    self.assertEqual(sorted(n for n in os.listdir(ckpt.directory) if n.isdigit()), ["4", "5"])
    self.assertEqual(os.listdir(os.path.join(ckpt.directory, ckpt_lib._TRASH_SUBDIR)), [])
    state, meta = Checkpointer(workdir, read_only=True).restore(
        4, abstract_state={"x": jax.ShapeDtypeStruct((4,), jnp.float32)})
    np.testing.assert_array_equal(state["x"], np.full((4,), 4, np.float32))
    self.assertEqual(meta["data_state"]["step"], 4)

  def test_save_interval_and_force(self):
    workdir = _tempdir(self)
    with Checkpointer(workdir, keep=None, save_interval_steps=3) as ckpt:
      saved = [_save(ckpt, step, {"x": jnp.zeros(2)}) for step in range(1, 8)]
      self.assertTrue(_save(ckpt, 8, {"x": jnp.zeros(2)}, force=True))
      ckpt.wait()
      # orbax always takes the first save into an empty directory, then every 3rd step.
      self.assertEqual([s for s, ok in zip(range(1, 8), saved) if ok], [1, 3, 6])
      self.assertEqual(ckpt.all_steps(), [1, 3, 6, 8])

  def test_meta_round_trip_without_arrays(self):
    workdir = _tempdir(self)
    with Checkpointer(workdir) as ckpt:
      ckpt.save(12, {"x": jnp.zeros(3)}, config=_CONFIG, data_state={"step": 12, "seed": 99})
    meta = Checkpointer(workdir, read_only=True).restore_meta()
    self.assertEqual(meta, {"config": _CONFIG, "data_state": {"step": 12, "seed": 99}})

  def test_non_json_config_fails_at_save(self):
    with Checkpointer(_tempdir(self)) as ckpt:
      with self.assertRaisesRegex(TypeError, "config must be JSON-serialisable"):
        ckpt.save(1, {"x": jnp.zeros(1)}, config={"f": object()}, data_state={})

  def test_empty_directory(self):
    reader = Checkpointer(_tempdir(self), read_only=True)
    self.assertIsNone(reader.latest_step())
    with self.assertRaises(FileNotFoundError):
      reader.restore_meta()


class MismatchTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.workdir = _tempdir(self)
    self.state = _state()
    with Checkpointer(self.workdir) as ckpt:
      _save(ckpt, 1, self.state)
    self.ckpt = Checkpointer(self.workdir, read_only=True)
    self.abstract = jax.eval_shape(lambda: self.state)

  def test_shape_mismatch_names_path_and_shapes(self):
    self.abstract["params"]["layer_0"]["w"] = jax.ShapeDtypeStruct((32, 128), jnp.float32)
    with self.assertRaises(CheckpointMismatchError) as cm:
      self.ckpt.restore(abstract_state=self.abstract)
    self.assertIn("params/layer_0/w: saved (64, 128) float32, expected (32, 128) float32",
                  str(cm.exception))
    self.assertIsInstance(cm.exception, ValueError)

  def test_every_mismatch_is_reported(self):
    params = self.abstract["params"]
    params["layer_1"] = {"w": jax.ShapeDtypeStruct((8, 8), jnp.float32)}  # missing from ckpt
    del params["embed"]  # in the checkpoint but not expected
    params["layer_0"]["b"] = jax.ShapeDtypeStruct((128,), jnp.float32)  # dtype
    self.abstract["memory"] = self.abstract["memory"].replace(
        count=jax.ShapeDtypeStruct((3,), jnp.int32))  # shape inside a dataclass
    with self.assertRaises(CheckpointMismatchError) as cm:
      self.ckpt.restore(abstract_state=self.abstract)
    message = str(cm.exception)
    for expected in (
        "params/layer_1/w: missing from checkpoint, expected (8, 8) float32",
        "params/embed: saved (32, 8) float16, not in the expected state",
        "params/layer_0/b: saved (128,) bfloat16, expected (128,) float32",
        "memory/count: saved (2,) int32, expected (3,) int32",
    ):
      self.assertIn(expected, message)
    self.assertIn("4 mismatching path(s)", message)

  def test_saved_state_metadata_reads_no_arrays(self):
    tree = self.ckpt.saved_state_metadata()
    self.assertEqual(tuple(tree["params"]["layer_0"]["w"].shape), (64, 128))


def _damage(directory: str, step: int, pattern: str) -> None:
  """Cuts every file of a step whose path (relative to the step) contains `pattern` in half."""
  root = os.path.join(directory, str(step))
  cut = 0
  for parent, _, files in os.walk(root):
    for name in files:
      path = os.path.join(parent, name)
      if pattern in os.path.relpath(path, root):
        os.truncate(path, os.path.getsize(path) // 2)
        cut += 1
  assert cut, (root, pattern)


class DamagedCheckpointTest(absltest.TestCase):
  """`restore_latest` on steps whose files were damaged after their commit."""

  _ABSTRACT = {"w": jax.ShapeDtypeStruct((64,), jnp.float32)}

  def setUp(self):
    super().setUp()
    self.workdir = _tempdir(self)
    with Checkpointer(self.workdir, keep=None) as ckpt:
      for step in (1, 2, 3):
        _save(ckpt, step, {"w": jnp.full((64,), step, jnp.float32)})
    self.directory = os.path.join(self.workdir, "checkpoints")

  def test_falls_back_past_damaged_steps_and_sets_them_aside(self):
    _damage(self.directory, 3, os.path.join("state", "d", ""))  # The array data.
    _damage(self.directory, 2, os.path.join("meta", "metadata"))  # The JSON item.
    ckpt = Checkpointer(self.workdir, keep=None)
    self.addCleanup(ckpt.close)
    with self.assertLogs(level="WARNING") as logs:
      step, state, meta = ckpt.restore_latest(abstract_state=self._ABSTRACT)
    self.assertEqual(step, 1)
    np.testing.assert_array_equal(state["w"], np.full((64,), 1, np.float32))
    self.assertEqual(meta["data_state"], {"step": 1, "seed": 3})
    warnings = [line for line in logs.output if "is damaged" in line]
    self.assertLen(warnings, 2)
    self.assertIn("Checkpoint step 2", warnings[0])
    self.assertIn("JSONDecodeError", warnings[0])
    self.assertIn("Checkpoint step 3", warnings[1])
    self.assertIn("restored step 1 instead", warnings[1])
    self.assertEqual(ckpt.all_steps(), [1])
    self.assertEqual(sorted(os.listdir(os.path.join(self.directory, "_damaged"))), ["2", "3"])
    # The resumed run saves those step numbers again.
    _save(ckpt, 2, {"w": jnp.full((64,), 20, jnp.float32)})
    ckpt.wait()
    self.assertEqual(ckpt.all_steps(), [1, 2])
    restored, _ = ckpt.restore(2, abstract_state=self._ABSTRACT)
    np.testing.assert_array_equal(restored["w"], np.full((64,), 20, np.float32))

  def test_reader_falls_back_without_moving_anything(self):
    _damage(self.directory, 3, "")
    reader = Checkpointer(self.workdir, read_only=True)
    step, _, _ = reader.restore_latest(abstract_state=self._ABSTRACT)
    self.assertEqual(step, 2)
    self.assertEqual(reader.all_steps(), [1, 2, 3])
    self.assertFalse(os.path.exists(os.path.join(self.directory, "_damaged")))

  def test_nothing_readable_raises_and_moves_nothing(self):
    for step in (1, 2, 3):
      _damage(self.directory, step, os.path.join("state", "d", ""))
    ckpt = Checkpointer(self.workdir, keep=None)
    self.addCleanup(ckpt.close)
    with self.assertRaisesRegex(ValueError, r"no checkpoint in .* reads back; step 3: "):
      ckpt.restore_latest(abstract_state=self._ABSTRACT)
    self.assertEqual(ckpt.all_steps(), [1, 2, 3])

  def test_check_meta_sees_each_step_first_and_its_error_propagates(self):
    seen = []

    def check_meta(step, meta):
      seen.append((step, meta["data_state"]["step"]))
      raise CheckpointMismatchError("another run")

    with self.assertRaisesRegex(CheckpointMismatchError, "another run"):
      Checkpointer(self.workdir, read_only=True).restore_latest(
          abstract_state=self._ABSTRACT, check_meta=check_meta)
    self.assertEqual(seen, [(3, 3)])  # Not tried on older steps.

  def test_shape_mismatch_is_not_damage(self):
    with self.assertRaises(CheckpointMismatchError):
      Checkpointer(self.workdir, keep=None).restore_latest(
          abstract_state={"w": jax.ShapeDtypeStruct((32,), jnp.float32)})
    self.assertEqual(Checkpointer(self.workdir, read_only=True).all_steps(), [1, 2, 3])

  def test_a_file_is_not_a_run_directory(self):
    path = os.path.join(self.workdir, "a_file")
    open(path, "w").close()
    for read_only in (True, False):
      with self.assertRaisesRegex(ValueError, "a_file is a file"):
        Checkpointer(path, read_only=read_only)


# Saves a ~64 MB state in a loop; every array of step s is filled with s, so a torn checkpoint
# would restore wrong values rather than just fail.
_WRITER = textwrap.dedent("""
    import sys
    import jax.numpy as jnp
    from memkernel.checkpoint import Checkpointer
    ckpt = Checkpointer(sys.argv[1], keep=2, async_save=True)
    for step in range(1, 10_000):
      state = {"w": jnp.full((8, 1 << 21), step, jnp.float32), "step": jnp.int32(step)}
      ckpt.save(step, state, config={"d_model": 64}, data_state={"step": step, "seed": 0})
""")
_BIG_ABSTRACT = {"w": jax.ShapeDtypeStruct((8, 1 << 21), jnp.float32),
                 "step": jax.ShapeDtypeStruct((), jnp.int32)}


def _listing(directory: str) -> tuple[list[str], list[str]]:
  names = os.listdir(directory) if os.path.isdir(directory) else []
  return sorted(n for n in names if n.isdigit()), [n for n in names if _TMP_MARKER in n]


class CrashSafetyTest(parameterized.TestCase):

  def _kill_during_save(self, workdir: str, delay_s: float) -> list[str]:
    """Runs the writer, SIGKILLs it `delay_s` after a save of step >= 2 has begun, and returns
    the temporary directories present after the kill."""
    directory = os.path.join(workdir, "checkpoints")
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, workdir],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
      deadline = time.monotonic() + 45
      while time.monotonic() < deadline:
        committed, tmp = _listing(directory)
        if committed and tmp:
          break
        self.assertIsNone(proc.poll(), "writer exited early")
        time.sleep(0.002)
      else:
        self.fail("writer never had a save in flight")
      time.sleep(delay_s)
    finally:
      os.kill(proc.pid, signal.SIGKILL)
      proc.wait()
    return _listing(directory)[1]

  @parameterized.parameters(0.0, 0.05)
  def test_sigkill_during_async_save_keeps_latest_complete(self, delay_s):
    workdir = _tempdir(self)
    left_tmp = self._kill_during_save(workdir, delay_s)
    self.assertNotEmpty(left_tmp, "the kill should have interrupted a save")

    reader = Checkpointer(workdir, read_only=True)
    latest = reader.latest_step()
    self.assertIsNotNone(latest)
    self.assertNotIn(latest, [int(n.split(".")[0]) for n in left_tmp])
    # Every listed step, not only the latest, is complete: a kill during rotation must not leave
    # a half-deleted old step behind.
    for step in reader.all_steps():
      state, meta = reader.restore(step, abstract_state=_BIG_ABSTRACT)
      self.assertEqual(int(state["step"]), step)
      self.assertTrue(np.all(np.asarray(state["w"]) == step))
      self.assertEqual(meta["data_state"]["step"], step)
    self.assertEqual(_listing(reader.directory)[1], left_tmp)  # Readers never clean up.

    # The next writer removes the debris (in the background, finished before its first save)
    # and carries on from the last complete step, even reusing the interrupted step number.
    with Checkpointer(workdir, keep=2) as writer:
      self.assertEqual(writer.latest_step(), latest)
      writer.save(latest + 1, {"w": jnp.zeros((8, 1 << 21)), "step": jnp.int32(latest + 1)},
                  config={}, data_state={"step": latest + 1})
    self.assertEqual(_listing(writer.directory)[1], [])
    self.assertEqual(Checkpointer(workdir, read_only=True).latest_step(), latest + 1)


if __name__ == "__main__":
  absltest.main()

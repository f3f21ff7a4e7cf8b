"""Multi-process training (`memkernel.distributed`, `experiments.train --num_processes`).

Two processes on this machine, one CPU device each, talk through gloo as two hosts would; a
single process with two devices and the same global batch is the reference. Checked bit for bit:

* the two-process run's first leg (steps 1-2, its step-2 checkpoint) equals the reference's;
* resumed from that checkpoint by two fresh processes, it ends (steps 3-4: metrics rows, final
  parameters and optimiser state, `eval.json`) equal to the uninterrupted reference;
* only process 0 writes the run's files.

The reference and the first leg start when the module is set up, in subprocesses, so they run
beside the other tests.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile

from absl.testing import absltest
import chex

from memkernel import checkpoint as checkpoint_lib
from memkernel import distributed
from memkernel import experiment as experiment_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The dense peer's smoke model: what is tested is the family-independent machinery (mesh,
# sharded batches, checkpoints, who writes), and it compiles in seconds in each of five
# processes.
CONFIG = "configs/mqar.py:smoke,dense"
OVERRIDES = ("--config.train.log_every=1", "--config.train.ckpt_every=2",
             "--config.train.keep_checkpoints=3", "--config.eval.lengths=(64,)",
             "--config.eval.batches=2")
TIME_FIELDS = ("time", "steps_per_s")
_RUNS = {}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _start(workdir, steps, log, *, devices=1, process=None):
  """Starts one training process; `process` is (port, process_id) for a two-process run."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "")
                      + f" --xla_force_host_platform_device_count={devices}")
  cmd = [sys.executable, "-m", "experiments.train", f"--config={CONFIG}",
         f"--workdir={workdir}", f"--config.train.steps={steps}", *OVERRIDES]
  if process is not None:
    port, pid = process
    cmd += [f"--coordinator_address=localhost:{port}", "--num_processes=2",
            f"--process_id={pid}"]
  return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def _start_pair(workdir, steps, out, name):
  port = _free_port()
  logs = [open(os.path.join(out, f"{name}_{i}.txt"), "w") for i in range(2)]
  return [(_start(workdir, steps, logs[i], process=(port, i)), logs[i]) for i in range(2)]


def _wait(procs, timeout=600):
  """Waits for `procs` [(process, log file)]; returns their exit codes and logs."""
  codes, texts = [], []
  for proc, log in procs:
    try:
      codes.append(proc.wait(timeout=timeout))
    except subprocess.TimeoutExpired:
      proc.kill()
      codes.append(proc.wait())
    log.close()
    with open(log.name) as f:
      texts.append(f.read())
  return codes, texts


def setUpModule():
  out = tempfile.mkdtemp(prefix="memkernel_multihost_test_")
  ref_log = open(os.path.join(out, "reference.txt"), "w")
  _RUNS.update(
      out=out,
      reference=[(_start(os.path.join(out, "one"), 4, ref_log, devices=2), ref_log)],
      first_leg=_start_pair(os.path.join(out, "two"), 2, out, "first_leg"))


def tearDownModule():
  for name in ("reference", "first_leg"):
    for proc, log in _RUNS.get(name, ()):
      if proc.poll() is None:
        proc.kill()
        proc.wait()
      log.close()
  shutil.rmtree(_RUNS.get("out", ""), ignore_errors=True)


def _rows(workdir):
  with open(os.path.join(workdir, experiment_lib.METRICS_FILE)) as f:
    return [{k: v for k, v in json.loads(line).items() if k not in TIME_FIELDS} for line in f]


def _state(workdir, step):
  return checkpoint_lib.Checkpointer(workdir, read_only=True).restore_raw(step)


class TwoProcessTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    out = _RUNS["out"]
    cls.one, cls.two = os.path.join(out, "one"), os.path.join(out, "two")
    cls.codes, cls.logs = _wait(_RUNS["reference"] + _RUNS["first_leg"])
    cls.first_rows = _rows(cls.two) if all(c == 0 for c in cls.codes) else []
    if all(c == 0 for c in cls.codes):
      codes, logs = _wait(_start_pair(cls.two, 4, out, "resumed"))
      cls.codes += codes
      cls.logs += logs

  def setUp(self):
    super().setUp()
    for code, log in zip(self.codes, self.logs):
      self.assertEqual(code, 0, log[-3000:])

  def test_processes_see_each_others_devices(self):
    for log in self.logs[:3]:  # The reference (one process, two devices) and the first leg.
      self.assertIn("on 2 device(s)", log)

  def test_first_leg_equals_one_process_bit_for_bit(self):
    self.assertEqual([r["step"] for r in self.first_rows], [1, 2])
    self.assertEqual(self.first_rows, _rows(self.one)[:2])
    chex.assert_trees_all_equal(_state(self.two, 2), _state(self.one, 2))  # Bit for bit.

  def test_resumed_run_equals_the_uninterrupted_one(self):
    self.assertTrue(any("Resumed from step 2" in log for log in self.logs[3:]))
    self.assertEqual(_rows(self.two), _rows(self.one))
    chex.assert_trees_all_equal(_state(self.two, 4), _state(self.one, 4))
    with open(os.path.join(self.one, experiment_lib.EVAL_FILE)) as f:
      one = json.load(f)
    with open(os.path.join(self.two, experiment_lib.EVAL_FILE)) as f:
      two = json.load(f)
    self.assertEqual(two["lengths"], one["lengths"])
    self.assertEqual(two["step"], 4)

  def test_one_writer(self):
    """Process 1 logs its progress but writes no rows: each step's row appears once."""
    self.assertEqual([r["step"] for r in _rows(self.two)], [1, 2, 3, 4])
    self.assertEqual(checkpoint_lib.Checkpointer(self.two, read_only=True).all_steps(), [2, 4])


class InitializeTest(absltest.TestCase):
  """Bad multi-process flags are refused before `jax.distributed` or any device is touched."""

  def test_all_three_or_none(self):
    with self.assertRaisesRegex(ValueError, r"missing: \['coordinator_address', 'process_id'\]"):
      distributed.initialize(num_processes=2)

  def test_values_are_checked(self):
    with self.assertRaisesRegex(ValueError, "host:port"):
      distributed.initialize("localhost", 2, 0)
    with self.assertRaisesRegex(ValueError, r"process_id must be in \[0, num_processes=2\)"):
      distributed.initialize("localhost:1234", 2, 2)
    with self.assertRaisesRegex(ValueError, "num_processes must be >= 1"):
      distributed.initialize("localhost:1234", 0, 0)

  def test_single_process_is_primary(self):
    self.assertTrue(distributed.is_primary())
    distributed.barrier("nothing to wait for")

  def test_binary_names_the_missing_flags(self):
    result = subprocess.run(
        [sys.executable, "-m", "experiments.train", f"--config={CONFIG}",
         f"--workdir={tempfile.mkdtemp()}", "--num_processes=2"],
        cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
        timeout=120)
    self.assertEqual(result.returncode, 1)
    self.assertRegex(result.stderr.strip().splitlines()[-1],
                     r"^FATAL train: multi-process training needs coordinator_address, "
                     r"num_processes and process_id together.*missing: "
                     r"\['coordinator_address', 'process_id'\]")


if __name__ == "__main__":
  absltest.main()

"""Shared checks of the binaries' bad-input behaviour: a dense peer run to point them at, and
the one-line `FATAL <name>:` message each must end with."""

import importlib
import os
import subprocess
import sys

import numpy as np

from memkernel import checkpoint as checkpoint_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def peer_run(root: str) -> str:
  """A committed checkpoint of a tiny dense-attention run under `root`; returns its workdir."""
  peer = os.path.join(root, "peer")
  config = importlib.import_module("configs.mqar").get_config("smoke,dense")
  with checkpoint_lib.Checkpointer(peer) as ckpt:
    ckpt.save(1, {"x": np.zeros(2, np.float32)}, config=config.to_dict(),
              data_state={"step": 1, "seed": 0}, force=True)
  return peer


def assert_fatal_lines(test, binary: str, cases, *, workdir: bool = True) -> None:
  """Runs `python -m experiments.<binary> --workdir=ARGS[0] ARGS[1:]` (with `workdir=False`:
  `ARGS` as they are) for every case (in parallel) and asserts exit status 1 and one stderr
  line `FATAL <binary>: ...` holding the case's expected text."""
  argv = lambda args: [f"--workdir={args[0]}", *args[1:]] if workdir else list(args)
  procs = {args: subprocess.Popen(
      [sys.executable, "-m", f"experiments.{binary}", *argv(args)],
      cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"), stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True) for args in cases}
  for args, expected in cases.items():
    _, err = procs[args].communicate(timeout=120)
    test.assertEqual(procs[args].returncode, 1, err)
    lines = err.strip().splitlines()
    test.assertLen(lines, 1, err)
    test.assertTrue(lines[0].startswith(f"FATAL {binary}:"), lines[0])
    test.assertIn(expected, lines[0])

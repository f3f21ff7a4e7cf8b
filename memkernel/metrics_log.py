"""A run's metrics on disk: JSON rows in `workdir/metrics.jsonl`, and TensorBoard event files.

`metrics.jsonl` is the record every reader of the project uses (`load_run`, the sweeps, the
results' artifacts); one JSON object per logged step, `split` 'train' or 'eval'. With
`train.tensorboard` the same scalars also go to `workdir/tensorboard/` through `tensorboardX`,
a maintained writer that does not need TensorFlow:

    tensorboard --logdir runs/mqar/tensorboard      # or %tensorboard --logdir ... in a Colab

Train rows are tagged `train/<metric>`, evaluation rows `eval/<metric>` (their length too).

A resumed run continues from its checkpoint's step: rows logged after that step (the killed run
got further than its last checkpoint) are dropped from `metrics.jsonl` and purged from the event
files, so both hold exactly what an uninterrupted run would.
"""

from __future__ import annotations

import importlib.util
import json
import numbers
import os
import time
from typing import Any, Mapping

from absl import logging

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
# Row fields that are not metrics: never plotted.
_NOT_SCALARS = ("step", "time", "split", "length")


class MetricsLog:
  """Appends a run's metrics rows; `resume_step` is the step the run continues from (0: new).

  With `enabled=False` (every process of a multi-process run but the first) it writes nothing.
  """

  def __init__(self, workdir: str, resume_step: int, *, tensorboard: bool = False,
               enabled: bool = True):
    self.path = os.path.join(workdir, METRICS_FILE)
    self._file = self._tb = None
    if not enabled:
      return
    truncate(self.path, resume_step)
    self._file = open(self.path, "a")
    if tensorboard:
      import tensorboardX  # pylint: disable=g-import-not-at-top
      # Events after `resume_step` (a killed run's last steps) are purged when they reappear.
      # tensorboardX names the file by the second it opened it and opens it with "wb", so a
      # resume within the same second would overwrite the first run's events; a nanosecond
      # suffix keeps every run's file and sorts them in the order they were written.
      self._tb = tensorboardX.SummaryWriter(
          os.path.join(workdir, TENSORBOARD_DIR),
          purge_step=resume_step + 1 if resume_step else None,
          filename_suffix=f".{time.time_ns():020d}")

  def write(self, row: Mapping[str, Any]) -> None:
    """Appends one row (a JSON object with `step`; `split` 'train' or 'eval')."""
    if self._file is None:
      return
    self._file.write(json.dumps(row) + "\n")
    self._file.flush()
    if self._tb is not None:
      prefix = row.get("split", "train") + "/"
      for name, value in row.items():
        if (name not in _NOT_SCALARS and isinstance(value, numbers.Real)
            and not isinstance(value, bool)):
          self._tb.add_scalar(prefix + name, value, row["step"])
      self._tb.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
    if self._tb is not None:
      self._tb.close()


def check_tensorboard() -> None:
  """Raises ValueError, before anything compiles, when `train.tensorboard` cannot be honoured."""
  if importlib.util.find_spec("tensorboardX") is None:
    raise ValueError("train.tensorboard=True needs the tensorboardX package (a dependency of "
                     "memkernel: pip install tensorboardX)")


def truncate(path: str, resume_step: int) -> None:
  """Drops rows logged after the checkpoint a run resumes from (they will be logged again), and
  a line that is not JSON: the torn last row of a run killed mid-write."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    rows = [line for line in f if line.strip()]
  keep, torn = [], []
  for number, line in enumerate(rows, 1):
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      torn.append(number)
      continue
    if row.get("step", 0) <= resume_step:
      keep.append(line if line.endswith("\n") else line + "\n")
  if torn:
    logging.warning("Dropping %d unreadable row(s) (line(s) %s of %d) from %s: a run killed "
                    "mid-write.", len(torn), torn, len(rows), path)
  if keep != rows:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(keep)
    os.replace(tmp, path)

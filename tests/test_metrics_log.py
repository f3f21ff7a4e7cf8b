"""The metrics log on disk: JSON rows and TensorBoard event files across a resume."""

import os
import tempfile
from unittest import mock

from absl.testing import absltest
from tensorboard.backend.event_processing import event_accumulator

from memkernel import metrics_log


def _log_steps(workdir, resume_step, steps):
  log = metrics_log.MetricsLog(workdir, resume_step, tensorboard=True)
  for step in steps:
    log.write({"step": step, "split": "train", "loss": float(step)})
  log.close()


class TensorBoardResumeTest(absltest.TestCase):

  def test_a_resume_within_the_same_second_keeps_the_first_runs_events(self):
    """tensorboardX names event files by the second; two runs in one second must not share one."""
    tmp = tempfile.TemporaryDirectory()
    self.addCleanup(tmp.cleanup)
    workdir = tmp.name
    with mock.patch("time.time", return_value=1_800_000_000.0):
      _log_steps(workdir, 0, [1, 2, 3, 4, 5])
      _log_steps(workdir, 3, [4, 5, 6])  # killed after step 5, resumed from checkpoint 3
    self.assertLen(os.listdir(os.path.join(workdir, metrics_log.TENSORBOARD_DIR)), 2)
    events = event_accumulator.EventAccumulator(
        os.path.join(workdir, metrics_log.TENSORBOARD_DIR), size_guidance={"scalars": 0})
    events.Reload()
    self.assertEqual([(s.step, s.value) for s in events.Scalars("train/loss")],
                     [(step, float(step)) for step in range(1, 7)])


if __name__ == "__main__":
  absltest.main()

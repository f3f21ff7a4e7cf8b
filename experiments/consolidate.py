r"""Consolidation of a trained brain-core cross-document run: each stream's memory distilled into
its own copy of the slow weights by a sleep, then its questions asked with the memory wiped;
everything it does is `memkernel.analysis.consolidation`.

  python -m experiments.consolidate --workdir=runs/consolidate/xdoc_s0
  python -m experiments.consolidate --workdir=runs/consolidate/xdoc_s0 --stream=validation \
      --learning_rate=0.1 --out=runs/consolidate/xdoc_s0/sleep_val.json

Choose the sleep's settings on --stream=validation and report on the test stream. Prints the
table and writes it with the command to --out (default WORKDIR/consolidation.json; never
overwritten).
"""

import dataclasses
import logging as std_logging

from absl import flags
from absl import logging

from experiments import _cli
from memkernel import runs
from memkernel.analysis import consolidation
from memkernel.braincore import consolidate

_WORKDIR = flags.DEFINE_string("workdir", None, "A brain-core cross_doc run's --workdir.")
_BATCHES = flags.DEFINE_integer("batches", 8, "Batches of streams.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "Streams per batch (each its own sleep).")
_STREAM = flags.DEFINE_enum("stream", None, ["test", "validation"],
                            "Evaluation stream (default: the run's eval.stream).")
_DEFAULT = consolidate.SleepConfig()
_STEPS = flags.DEFINE_integer("steps", _DEFAULT.steps, "Sleep steps.")
_LR = flags.DEFINE_float("learning_rate", _DEFAULT.learning_rate, "The sleep's learning rate.")
_OPTIMIZER = flags.DEFINE_enum("optimizer", _DEFAULT.optimizer, list(consolidate.OPTIMIZERS),
                               "The sleep's optimizer (sgd: momentum 0.9).")
_REPLAY_BATCH = flags.DEFINE_integer("replay_batch", _DEFAULT.replay_batch,
                                     "Replay sequences per sleep step.")
_REPLAY_LEN = flags.DEFINE_integer("replay_len", _DEFAULT.replay_len,
                                   "Tokens per replay sequence (at most the model's span).")
_TRAINABLE = flags.DEFINE_list("trainable", [], "Top-level parameter modules the sleep moves "
                               "(default: all), e.g. lm_head,layer_1.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
_OUT = flags.DEFINE_string("out", None, "Result JSON (default: WORKDIR/consolidation.json).")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  del argv  # Checked by _cli.run.
  _cli.check_directory("workdir", _WORKDIR.value)
  out = _cli.new_result(_OUT.value, _WORKDIR.value, "consolidation.json")
  sleep = consolidate.SleepConfig(steps=_STEPS.value, learning_rate=_LR.value,
                                  replay_batch=_REPLAY_BATCH.value, replay_len=_REPLAY_LEN.value,
                                  trainable=tuple(_TRAINABLE.value),
                                  optimizer=_OPTIMIZER.value)
  _cli.quiet_orbax(std_logging.ERROR)
  logging.set_verbosity(logging.WARNING)
  experiment = runs.load_experiment(_WORKDIR.value, _STEP.value)
  if _STREAM.value:
    experiment = dataclasses.replace(
        experiment, eval=dataclasses.replace(experiment.eval, stream=_STREAM.value))
  consolidation.check(experiment)
  _, params = runs.load_run(_WORKDIR.value, _STEP.value)
  report = consolidation.measure(experiment, params, batches=_BATCHES.value,
                                 batch_size=_BATCH_SIZE.value, sleep=sleep, progress=True)
  print(consolidation.format_report(report))
  report.update(command=_cli.command("consolidate"))
  runs.write_json(out, report)
  print(f"wrote {out}")


if __name__ == "__main__":
  _cli.run(main, name="consolidate")

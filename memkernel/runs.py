"""Reading finished (or running) training runs back: model config and parameters from a workdir.

    model_config, params = load_run("/tmp/mqar")
    model = memkernel.FractalV2Model(model_config)      # or peers.build_peer for a peer
    logits, aux = model.apply({"params": params}, tokens)

Needs no flags and no config file: the run's full config is stored in every checkpoint.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import ml_collections

from memkernel import checkpoint as checkpoint_lib
from memkernel import train as train_lib


def load_experiment(workdir: str, step: Optional[int] = None) -> train_lib.Experiment:
  """The validated experiment config saved with a checkpoint (default: the newest)."""
  checkpointer = checkpoint_lib.Checkpointer(workdir, read_only=True)
  try:
    config = checkpointer.restore_meta(step)["config"]
  finally:
    checkpointer.close()
  return train_lib.parse_config(ml_collections.ConfigDict(config))


def load_run(workdir: str, step: Optional[int] = None) -> tuple[train_lib.AnyModelConfig, Any]:
  """Loads a run's model config and parameters.

  Safe beside a live training process: only committed checkpoints are read.

  Args:
    workdir: the run's `--workdir`.
    step: the checkpoint step; None means the newest committed one.

  Returns:
    (model_config, params): a `ModelConfig` (kernel) or `PeerConfig` (peers) with the capacity the
    model was trained at (use `dataclasses.replace(model_config, max_seq_len=...)` for longer
    inputs), and the parameter pytree for `model.apply({"params": params}, ...)`.

  Raises:
    FileNotFoundError: no committed checkpoint (at `step`) in `workdir`.
  """
  checkpointer = checkpoint_lib.Checkpointer(workdir, read_only=True)
  try:
    if step is None:  # Resolved once: a live run may commit a newer step meanwhile.
      step = checkpointer.latest_step()
      if step is None:
        raise FileNotFoundError(f"no committed checkpoint in {workdir}")
    config = checkpointer.restore_meta(step)["config"]
    experiment = train_lib.parse_config(ml_collections.ConfigDict(config))
    abstract = jax.eval_shape(functools.partial(train_lib.init_state, experiment))
    state, _ = checkpointer.restore(step, abstract_state=abstract)
  finally:
    checkpointer.close()
  return experiment.model, state.params

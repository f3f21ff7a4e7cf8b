"""The experiment config: sections, validation and random streams, low in the import graph.

`configs/*.py` return an `ml_collections.ConfigDict` with the sections `model_type` (a family name
from `memkernel.family.FAMILIES`), that family's model section, `task`, `train` and `eval` (layout in
`configs/common.py`). `parse_config` turns it into a frozen, validated `Experiment` before anything
is traced; every invalid value raises `ValueError` naming its section, field and value.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Union

import jax
import ml_collections

from memkernel import family as family_lib
from memkernel import fields
from memkernel import metrics_log
from memkernel import probes
from memkernel import text_task

SCHEDULES = ("cosine", "constant")
# Sections every experiment config has; each family's own model section comes on top.
COMMON_SECTIONS = ("model_type", "task", "train", "eval")
METRICS_FILE = metrics_log.METRICS_FILE
EVAL_FILE = "eval.json"
# Independent random streams derived from train.seed.
INIT_STREAM, DATA_STREAM, EVAL_STREAM, VALIDATION_STREAM, HINT_STREAM = 0, 1, 2, 3, 4
# Evaluation streams: choices (steps, widths, curricula) are tuned on 'validation' and reported
# on 'test' (the default), so no reported number is one the choice was fitted to.
EVAL_STREAMS = {"test": EVAL_STREAM, "validation": VALIDATION_STREAM}
ROUTE_HINTS = ("off", "traces", "shuffled")     # train.route_hints (`paths.train_hints`).


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """The `train` section.

  Attributes:
    seed: seeds parameter init, the training batches and (a separate stream) the eval batches.
    steps: optimiser steps in total (a resumed run continues up to this count).
    batch_size: global batch, split over the devices (must be divisible by their number).
    lr: peak learning rate of AdamW.
    schedule: 'cosine' (linear warmup, cosine decay to 10% of lr) or 'constant' (warmup, then lr).
    warmup_steps: linear warmup steps.
    decay_steps: length of the cosine schedule including warmup; 0 means `steps`. Fix it to
      extend a run without changing its schedule.
    weight_decay: AdamW decoupled weight decay, applied to matrices only (not norms or biases).
    clip_norm: global gradient-norm clip; 0 disables clipping.
    log_every: steps between progress lines and metrics rows.
    eval_every: steps between evaluations at the training length during training; 0: only at
      the end.
    ckpt_every: steps between checkpoints (one is always written at the end).
    keep_checkpoints: newest checkpoints kept.
    max_nonfinite: consecutive non-finite losses tolerated before the run stops.
    oracle: feed each batch's answer leaves to the exact read (`oracle_leaves`).
    narrow_beam_at: beam curriculum for the kernel: from this step on, train with the
      evaluation beam (`model.beam_width`) instead of `model.train_beam_width`, so the read
      adapts to the beam it is evaluated with; 0 keeps the training beam throughout.
    tensorboard: also write the metrics as TensorBoard event files in `workdir/tensorboard/`
      (`memkernel.metrics_log`); `metrics.jsonl` is written either way.
    route_hints: the kernel trains with routing hints from a read trace of its own reads
      (`memkernel.paths.train_hints`): 'off', 'traces', or 'shuffled' (the control).
    hints_every: steps between rebuilds of the hint table (a multiple of it divides ckpt_every).
    hints_batches: training-distribution batches each rebuild reads.
    hints_alpha: the hints' weight on routing scores (`evaluate --hint_alpha`).
    hints_gate: a head gets hints when its trace predicts the leaf it read on held-out rows at
      least this often (`evaluate --hint_gate`).
  """

  seed: int = 0
  steps: int = 1000
  batch_size: int = 16
  lr: float = 1e-3
  schedule: str = "cosine"
  warmup_steps: int = 100
  decay_steps: int = 0
  weight_decay: float = 0.01
  clip_norm: float = 1.0
  log_every: int = 50
  eval_every: int = 0
  ckpt_every: int = 500
  keep_checkpoints: int = 3
  max_nonfinite: int = 20
  oracle: bool = False
  narrow_beam_at: int = 0
  tensorboard: bool = False
  route_hints: str = "off"
  hints_every: int = 25
  hints_batches: int = 2
  hints_alpha: float = 16.0
  hints_gate: float = 0.5

  def __post_init__(self):
    s = "train"
    fields.check_int(s, "seed", self.seed, 0)
    for name in ("steps", "warmup_steps", "decay_steps", "eval_every", "narrow_beam_at"):
      fields.check_int(s, name, getattr(self, name), 0)
    for name in ("batch_size", "log_every", "ckpt_every", "keep_checkpoints", "max_nonfinite"):
      fields.check_int(s, name, getattr(self, name), 1)
    fields.check_number(s, "lr", self.lr, 0.0, strict=True)
    fields.check_number(s, "weight_decay", self.weight_decay, 0.0, strict=False)
    fields.check_number(s, "clip_norm", self.clip_norm, 0.0, strict=False)
    if self.schedule not in SCHEDULES:
      raise ValueError(f"train.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
    for name in ("oracle", "tensorboard"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"train.{name} must be a bool, got {getattr(self, name)!r}")
    if self.route_hints not in ROUTE_HINTS:
      raise ValueError(f"train.route_hints must be one of {ROUTE_HINTS}, got {self.route_hints!r}")
    for name in ("hints_every", "hints_batches"):
      fields.check_int(s, name, getattr(self, name), 1)
    fields.check_number(s, "hints_alpha", self.hints_alpha, 0.0, strict=False)
    fields.check_number(s, "hints_gate", self.hints_gate, 0.0, strict=False)
    if self.hints_gate > 1:
      raise ValueError(f"train.hints_gate must be in [0, 1], got {self.hints_gate}")

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> "TrainConfig":
    return fields.from_mapping(cls, values, "config.train")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """The `eval` section.

  Attributes:
    batches: fresh batches per evaluation length.
    batch_size: sequences per eval batch (divisible by the number of devices).
    lengths: sequence lengths to evaluate at; the task is rebuilt with each, the model with a
      memory capacity of at least that length.
    oracle: feed the answer leaves to the exact read during evaluation.
    audit_batches: fresh batches the causal memory auditor (`memkernel.analysis.audit`) runs on at the
      final evaluation, at the training length (kernel only); 0 disables it.
    stream: which evaluation stream the batches come from: 'test' (report) or 'validation'
      (tune); disjoint random streams of the seed, neither ever a training batch.
  """

  batches: int = 8
  batch_size: int = 16
  lengths: tuple[int, ...] = ()
  oracle: bool = False
  audit_batches: int = 0
  stream: str = "test"

  def __post_init__(self):
    if self.stream not in EVAL_STREAMS:
      raise ValueError(f"eval.stream must be one of {sorted(EVAL_STREAMS)}, got {self.stream!r}")
    fields.check_int("eval", "batches", self.batches, 1)
    fields.check_int("eval", "audit_batches", self.audit_batches, 0)
    fields.check_int("eval", "batch_size", self.batch_size, 1)
    if isinstance(self.lengths, int) or not isinstance(self.lengths, (tuple, list)) or not (
        self.lengths):
      raise ValueError(f"eval.lengths must be a non-empty tuple of sequence lengths, "
                       f"got {self.lengths!r}")
    for length in self.lengths:
      fields.check_int("eval", "lengths", length, 1)
    object.__setattr__(self, "lengths", tuple(self.lengths))
    if not isinstance(self.oracle, bool):
      raise ValueError(f"eval.oracle must be a bool, got {self.oracle!r}")

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> "EvalConfig":
    return fields.from_mapping(cls, values, "config.eval")



@dataclasses.dataclass(frozen=True)
class Experiment:
  """A validated experiment config.

  Attributes:
    model_type: the family's registry name ('kernel', 'dense', 'sliding_window').
    model: the trained model's config (the family's config) at the training length.
    task: the task at the training length: a probe (`probes.TaskConfig`) or real text
      (`text_task.TextTaskConfig`).
    train: training settings.
    eval: evaluation settings.
  """

  model_type: str
  model: Any
  task: Union[probes.TaskConfig, text_task.TextTaskConfig]
  train: TrainConfig
  eval: EvalConfig

  @property
  def family(self) -> family_lib.Family:
    return family_lib.get(self.model_type)

  def model_for_length(self, seq_len: int) -> Any:
    """The model config with a capacity of at least `seq_len` tokens (same parameters)."""
    return self.family.with_capacity(self.model, seq_len)

  def task_for_length(self, seq_len: int) -> Union[probes.TaskConfig,
                                                    text_task.TextTaskConfig]:
    return dataclasses.replace(self.task, seq_len=seq_len)


def model_sections() -> tuple[str, ...]:
  """The model sections of the registered families, each once (e.g. 'model', 'peer')."""
  return tuple(dict.fromkeys(family_lib.get(name).section for name in family_lib.names()))


def parse_config(config: Union[ml_collections.ConfigDict, Mapping[str, Any]]) -> Experiment:
  """Validates an experiment config (layout in `configs/common.py`); compiles nothing.

  Raises:
    ValueError: naming the section, field and value of the first invalid setting.
  """
  if hasattr(config, "to_dict"):
    config = config.to_dict()
  if not isinstance(config, Mapping):
    raise ValueError(f"an experiment config must be a mapping, got {type(config).__name__}")
  if "model_type" not in config:
    raise ValueError("config.model_type is missing; registered families: "
                     f"{list(family_lib.names())}")
  family = family_lib.get(config["model_type"])
  sections = set(COMMON_SECTIONS) | set(model_sections())
  unknown = sorted(set(config) - sections)
  missing = sorted((set(COMMON_SECTIONS) | {family.section}) - set(config))
  if unknown or missing:
    raise ValueError(f"config sections must be {sorted(sections)}; unknown: {unknown}, "
                     f"missing: {missing}")
  # Only the section of the model that trains is built: another may not fit (e.g. a width the
  # kernel accepts may leave the peers' RoPE heads an odd width).
  section = family.section
  values = config[section]
  if not isinstance(values, Mapping):
    raise ValueError(f"config.{section} must be a mapping, got {type(values).__name__}")
  model = family.config_from_dict(values, family.name)
  task_values = config["task"]
  if not isinstance(task_values, Mapping):
    raise ValueError(f"config.task must be a mapping, got {type(task_values).__name__}")
  is_text = task_values.get("name") in text_task.TEXT_TASKS
  task = (text_task.TextTaskConfig if is_text else probes.TaskConfig).from_dict(task_values)
  train = TrainConfig.from_dict(config["train"])
  evaluation = EvalConfig.from_dict(config["eval"])

  if task.vocab_size != model.vocab_size:
    raise ValueError(f"task.vocab_size={task.vocab_size} must equal {section}.vocab_size="
                     f"{model.vocab_size}")
  if family.routes and task.leaf_size != model.leaf_size:
    raise ValueError(f"task.leaf_size={task.leaf_size} must equal {section}.leaf_size="
                     f"{model.leaf_size} (answer leaves are counted in model leaves)")
  for length in evaluation.lengths:
    try:
      dataclasses.replace(task, seq_len=length)
    except ValueError as e:
      raise ValueError(f"eval.lengths: task {task.name!r} is invalid at length {length}: {e}") from e
  if is_text:
    _check_text(task, family, model, train, evaluation)
  if train.route_hints != "off":
    if not family.routes:
      raise ValueError(f"train.route_hints={train.route_hints!r} needs a routing family; "
                       f"{family.name!r} does not route")
    if is_text or train.oracle:
      raise ValueError(f"train.route_hints={train.route_hints!r} needs a probe trained without "
                       "oracle routes (text batches are read on the host; oracle routes "
                       "replace the routing the hints bias)")
    if train.batch_size < 2:
      raise ValueError("train.route_hints: the hints' gate compares even and odd rows, so "
                       f"train.batch_size must be at least 2, got {train.batch_size}")
    if train.ckpt_every % train.hints_every:
      raise ValueError(f"train.ckpt_every={train.ckpt_every} must be a multiple of "
                       f"train.hints_every={train.hints_every} with train.route_hints="
                       f"{train.route_hints!r} (a resume rebuilds the hints at its checkpoint)")
  experiment = Experiment(family.name, model, task, train, evaluation)
  return dataclasses.replace(experiment, model=experiment.model_for_length(task.seq_len))


def _check_text(task: text_task.TextTaskConfig, family: family_lib.Family, model: Any,
                train: "TrainConfig", evaluation: "EvalConfig") -> None:
  """What the probes have and text does not: answer leaves (oracle routes, the auditor)."""
  if train.oracle or evaluation.oracle:
    raise ValueError(f"task {task.name!r} has no answer leaves: train.oracle and eval.oracle "
                     "must be False")
  if evaluation.audit_batches:
    raise ValueError(f"task {task.name!r}: the memory auditor needs a probe's answers; set "
                     "eval.audit_batches=0")
  align = family.segment_align(model)
  if task.leaf_size % align:
    raise ValueError(f"task.leaf_size={task.leaf_size} must be a multiple of the "
                     f"{family.name} model's document alignment ({align}): files start on it")


def check_devices(experiment: Experiment, num_devices: int) -> None:
  """Batch sizes must split evenly over the data-parallel devices."""
  for name, value in (("train.batch_size", experiment.train.batch_size),
                      ("eval.batch_size", experiment.eval.batch_size)):
    if value % num_devices:
      raise ValueError(f"{name}={value} must be divisible by the number of devices "
                       f"({num_devices}) for data-parallel training")


def root_key(seed: int, stream: int) -> jax.Array:
  """The root key of one random stream of `seed`."""
  return jax.random.fold_in(jax.random.key(seed), stream)


def data_key(seed: int) -> jax.Array:
  """The key the training batches of `seed` derive from (step s: `fold_in(key, s)`)."""
  return root_key(seed, DATA_STREAM)


def eval_key(seed: int, stream: str = "test") -> jax.Array:
  """The key the evaluation batches of `seed` derive from (batch i: `fold_in(key, i)`), on the
  'test' or the 'validation' stream (`EVAL_STREAMS`)."""
  if stream not in EVAL_STREAMS:
    raise ValueError(f"evaluation stream must be one of {sorted(EVAL_STREAMS)}, got {stream!r}")
  return root_key(seed, EVAL_STREAMS[stream])

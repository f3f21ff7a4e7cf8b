"""Training and evaluation of the kernel and its attention peers on the synthetic probes.

    summary = train_and_evaluate(configs.mqar.get_config("smoke"), "/tmp/mqar")

is everything `experiments/train.py` does, callable from a Colab. The config layout is described in
`configs/common.py`; `parse_config` turns it into a validated `Experiment` before anything is traced.

The loop (after nanodo and big_vision):

* One pure, jitted `train_step(state, data_key) -> (state, metrics)`. The batch is generated
  *inside* it from `fold_in(data_key, state.step)`, so the data-iterator state is just (seed, step)
  and a resumed run sees exactly the batches an uninterrupted one would. Seeds are arguments of the
  compiled steps (init, train, eval), never constants in them, so runs that differ only in their
  seed share every compilation (the ablation sweep's seeds).
* Data parallel over every local device: a 1-D mesh with axis 'data'; the batch is sharded along
  its first dimension, parameters and optimiser state are replicated.
* Non-finite updates are skipped (`optax.apply_if_finite`); every non-finite loss is counted, and
  `max_nonfinite` consecutive ones stop the run with `NonFiniteLossError` (the last checkpoint
  taken at a finite step stays the newest).
* The next step is dispatched before the previous step's metrics are pulled to the host.
* Every `log_every` steps: a progress line (steps/s, tokens/s, ETA) and one JSON row of that step's
  metrics in `workdir/metrics.jsonl` (TensorBoard event files too where `tensorboardX`, a
  TensorFlow-free writer, is installed; it is not a dependency).
* Checkpoints (`memkernel.checkpoint`) every `ckpt_every` steps and at the end, with the full
  config and the data state; a workdir holding a checkpoint is resumed from its newest step.
* At the end `evaluate` runs `eval.batches` fresh batches (a separate seed stream) at every
  `eval.lengths` with the evaluation beam and no teacher, and writes `workdir/eval.json`; with
  `eval.audit_batches` the memory auditor's report goes there too (and to `workdir/audit.json`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from typing import Any, Mapping, Optional, Union

from absl import logging
import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from memkernel import audit as audit_lib
from memkernel import checkpoint as checkpoint_lib
from memkernel import data as data_lib
from memkernel import peers as peers_lib
from memkernel import routing
from memkernel.config import ModelConfig
from memkernel.model import FractalV2Model
from memkernel.peers import PeerConfig

MODEL_TYPES = ("kernel", "dense", "sliding_window")
SCHEDULES = ("cosine", "constant")
SECTIONS = ("model_type", "model", "peer", "task", "train", "eval")
METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.json"
# Independent random streams derived from train.seed.
_INIT_STREAM, _DATA_STREAM, _EVAL_STREAM = 0, 1, 2
# Final learning rate of the cosine schedule, relative to `lr`.
_COSINE_END_RATIO = 0.1

AnyModelConfig = Union[ModelConfig, PeerConfig]


class NonFiniteLossError(FloatingPointError):
  """Training produced `max_nonfinite` consecutive non-finite losses or gradients."""


# ------------------------------------------------------------------------------------------------
# Configuration.


def _check_int(section: str, name: str, value: Any, minimum: Optional[int]) -> None:
  if not isinstance(value, int) or isinstance(value, bool):
    raise ValueError(f"{section}.{name} must be an integer, got {value!r}")
  if minimum is not None and value < minimum:
    raise ValueError(f"{section}.{name} must be >= {minimum}, got {value!r}")


def _check_number(section: str, name: str, value: Any, minimum: float, strict: bool) -> None:
  if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
    raise ValueError(f"{section}.{name} must be a finite number, got {value!r}")
  if value < minimum or (strict and value == minimum):
    raise ValueError(f"{section}.{name} must be {'>' if strict else '>='} {minimum}, got {value!r}")


def _from_mapping(cls, section: str, values: Mapping[str, Any]):
  if hasattr(values, "to_dict"):
    values = values.to_dict()
  if not isinstance(values, Mapping):
    raise ValueError(f"config.{section} must be a mapping, got {type(values).__name__}")
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - known)
  if unknown:
    raise ValueError(f"config.{section} got unknown field(s) {unknown}; known fields: "
                     f"{sorted(known)}")
  return cls(**dict(values))


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

  def __post_init__(self):
    s = "train"
    _check_int(s, "seed", self.seed, 0)
    for name in ("steps", "warmup_steps", "decay_steps", "eval_every", "narrow_beam_at"):
      _check_int(s, name, getattr(self, name), 0)
    for name in ("batch_size", "log_every", "ckpt_every", "keep_checkpoints", "max_nonfinite"):
      _check_int(s, name, getattr(self, name), 1)
    _check_number(s, "lr", self.lr, 0.0, strict=True)
    _check_number(s, "weight_decay", self.weight_decay, 0.0, strict=False)
    _check_number(s, "clip_norm", self.clip_norm, 0.0, strict=False)
    if self.schedule not in SCHEDULES:
      raise ValueError(f"train.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
    if not isinstance(self.oracle, bool):
      raise ValueError(f"train.oracle must be a bool, got {self.oracle!r}")

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> "TrainConfig":
    return _from_mapping(cls, "train", values)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """The `eval` section.

  Attributes:
    batches: fresh batches per evaluation length.
    batch_size: sequences per eval batch (divisible by the number of devices).
    lengths: sequence lengths to evaluate at; the task is rebuilt with each, the model with a
      memory capacity of at least that length.
    oracle: feed the answer leaves to the exact read during evaluation.
    audit_batches: fresh batches the causal memory auditor (`memkernel.audit`) runs on at the
      final evaluation, at the training length (kernel only); 0 disables it.
  """

  batches: int = 8
  batch_size: int = 16
  lengths: tuple[int, ...] = ()
  oracle: bool = False
  audit_batches: int = 0

  def __post_init__(self):
    _check_int("eval", "batches", self.batches, 1)
    _check_int("eval", "audit_batches", self.audit_batches, 0)
    _check_int("eval", "batch_size", self.batch_size, 1)
    if isinstance(self.lengths, int) or not isinstance(self.lengths, (tuple, list)) or not (
        self.lengths):
      raise ValueError(f"eval.lengths must be a non-empty tuple of sequence lengths, "
                       f"got {self.lengths!r}")
    for length in self.lengths:
      _check_int("eval", "lengths", length, 1)
    object.__setattr__(self, "lengths", tuple(self.lengths))
    if not isinstance(self.oracle, bool):
      raise ValueError(f"eval.oracle must be a bool, got {self.oracle!r}")

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> "EvalConfig":
    return _from_mapping(cls, "eval", values)


def capacity(seq_len: int, leaf_size: int) -> int:
  """The smallest memory capacity >= seq_len holding a power-of-two number of leaves."""
  leaves = -(-seq_len // leaf_size)
  return leaf_size * (1 << max(leaves - 1, 0).bit_length())


@dataclasses.dataclass(frozen=True)
class Experiment:
  """A validated experiment config.

  Attributes:
    model_type: 'kernel', 'dense' or 'sliding_window'.
    model: the trained model's config (a `ModelConfig` or `PeerConfig`) at the training length.
    task: the probe task at the training length.
    train: training settings.
    eval: evaluation settings.
  """

  model_type: str
  model: AnyModelConfig
  task: data_lib.TaskConfig
  train: TrainConfig
  eval: EvalConfig

  def model_for_length(self, seq_len: int) -> AnyModelConfig:
    """The model config with a capacity of at least `seq_len` tokens (same parameters)."""
    if isinstance(self.model, ModelConfig):
      needed = capacity(seq_len, self.model.leaf_size)
    else:
      needed = seq_len
    return dataclasses.replace(self.model, max_seq_len=max(self.model.max_seq_len, needed))

  def task_for_length(self, seq_len: int) -> data_lib.TaskConfig:
    return dataclasses.replace(self.task, seq_len=seq_len)


def parse_config(config: Union[ml_collections.ConfigDict, Mapping[str, Any]]) -> Experiment:
  """Validates an experiment config (layout in `configs/common.py`); compiles nothing.

  Raises:
    ValueError: naming the section, field and value of the first invalid setting.
  """
  if hasattr(config, "to_dict"):
    config = config.to_dict()
  unknown = sorted(set(config) - set(SECTIONS))
  missing = sorted(set(SECTIONS) - set(config))
  if unknown or missing:
    raise ValueError(f"config sections must be {list(SECTIONS)}; unknown: {unknown}, "
                     f"missing: {missing}")
  model_type = config["model_type"]
  if model_type not in MODEL_TYPES:
    raise ValueError(f"config.model_type must be one of {MODEL_TYPES}, got {model_type!r}")
  # Only the section of the model that trains is built: the other may not fit (e.g. a width the
  # kernel accepts may leave the peers' RoPE heads an odd width).
  if model_type == "kernel":
    section = "model"
    model = ModelConfig.from_dict(config["model"])
  else:
    section = "peer"
    if "kind" in config["peer"]:
      raise ValueError("config.peer.kind is not a field: set config.model_type instead")
    model = PeerConfig.from_dict({**config["peer"], "kind": model_type})
  task = data_lib.TaskConfig.from_dict(config["task"])
  train = TrainConfig.from_dict(config["train"])
  evaluation = EvalConfig.from_dict(config["eval"])

  if task.vocab_size != model.vocab_size:
    raise ValueError(f"task.vocab_size={task.vocab_size} must equal {section}.vocab_size="
                     f"{model.vocab_size}")
  if model_type == "kernel" and task.leaf_size != model.leaf_size:
    raise ValueError(f"task.leaf_size={task.leaf_size} must equal model.leaf_size="
                     f"{model.leaf_size} (answer leaves are counted in model leaves)")
  for length in evaluation.lengths:
    try:
      dataclasses.replace(task, seq_len=length)
    except ValueError as e:
      raise ValueError(f"eval.lengths: task {task.name!r} is invalid at length {length}: {e}") from e
  experiment = Experiment(model_type, model, task, train, evaluation)
  return dataclasses.replace(experiment, model=experiment.model_for_length(task.seq_len))


def check_devices(experiment: Experiment, num_devices: int) -> None:
  """Batch sizes must split evenly over the data-parallel devices."""
  for name, value in (("train.batch_size", experiment.train.batch_size),
                      ("eval.batch_size", experiment.eval.batch_size)):
    if value % num_devices:
      raise ValueError(f"{name}={value} must be divisible by the number of devices "
                       f"({num_devices}) for data-parallel training")


def build_model(model_config: AnyModelConfig) -> nn.Module:
  """The Flax module a model config describes."""
  if isinstance(model_config, ModelConfig):
    return FractalV2Model(model_config)
  return peers_lib.build_peer(model_config)


# ------------------------------------------------------------------------------------------------
# State, optimiser and the steps.


@flax.struct.dataclass
class TrainState:
  """Everything a step changes. The data-iterator state is `step` (with the seed)."""

  step: jax.Array
  params: Any
  opt_state: Any


def make_schedule(train: TrainConfig) -> optax.Schedule:
  warmup = optax.linear_schedule(train.lr / (train.warmup_steps + 1), train.lr, train.warmup_steps)
  if train.schedule == "constant":
    after = optax.constant_schedule(train.lr)
  else:
    decay = train.decay_steps or train.steps
    after = optax.cosine_decay_schedule(train.lr, max(decay - train.warmup_steps, 1),
                                        alpha=_COSINE_END_RATIO)
  return optax.join_schedules([warmup, after], [train.warmup_steps])


def make_optimizer(train: TrainConfig) -> optax.GradientTransformation:
  """AdamW with global-norm clipping; non-finite updates are skipped (`apply_if_finite`)."""
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  tx = optax.chain(
      optax.clip_by_global_norm(train.clip_norm) if train.clip_norm > 0 else optax.identity(),
      optax.adamw(make_schedule(train), weight_decay=train.weight_decay, mask=decay_mask))
  # The loop stops after max_nonfinite consecutive skips, before apply_if_finite would give up.
  return optax.apply_if_finite(tx, max_consecutive_errors=train.max_nonfinite)


def _root_key(seed: int, stream: int) -> jax.Array:
  return jax.random.fold_in(jax.random.key(seed), stream)


def data_key(seed: int) -> jax.Array:
  """The key the training batches of `seed` derive from (step s: `fold_in(key, s)`)."""
  return _root_key(seed, _DATA_STREAM)


def eval_key(seed: int) -> jax.Array:
  """The key the evaluation batches of `seed` derive from (batch i: `fold_in(key, i)`)."""
  return _root_key(seed, _EVAL_STREAM)


def init_state(experiment: Experiment, key: Optional[jax.Array] = None) -> TrainState:
  """A fresh train state (call under `jax.jit`; un-jitted init is slow). `key` defaults to the
  init stream of `experiment.train.seed`."""
  model = build_model(experiment.model)
  leaf = getattr(experiment.model, "leaf_size", 16)
  tokens = jnp.zeros((1, min(leaf, experiment.model.max_seq_len)), jnp.int32)
  if key is None:
    key = _root_key(experiment.train.seed, _INIT_STREAM)
  params = model.init(key, tokens)["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=make_optimizer(experiment.train).init(params))


def routing_metrics(route_aux, batch: Mapping[str, jax.Array], leaf_size: int) -> dict:
  """Per-layer routing recall, distinct leaves read per token and routing sparsity.

  Sparsity is (distinct leaves read) / (leaves sealed) per token, averaged over tokens that see at
  least one sealed leaf.
  """
  metrics = {}
  t = batch["tokens"].shape[1]
  sealed_T = jnp.arange(t) // leaf_size
  sees = jnp.broadcast_to(sealed_T > 0, batch["tokens"].shape).astype(jnp.float32)
  count = jnp.maximum(jnp.sum(sees), 1.0)
  for i, layer in enumerate(route_aux or ()):
    if layer is None:
      continue
    leaves = layer["leaves"]
    metrics[f"layer_{i}/routing_recall"] = routing.routing_recall(
        leaves, batch["answer_leaves"], batch["mask"])
    flat = jnp.sort(leaves.reshape(leaves.shape[:2] + (-1,)), axis=-1)
    new = jnp.concatenate([jnp.ones_like(flat[..., :1], bool), flat[..., 1:] != flat[..., :-1]],
                          axis=-1)
    read_BT = jnp.sum(new & (flat >= 0), axis=-1).astype(jnp.float32)
    metrics[f"layer_{i}/leaves_read"] = jnp.sum(read_BT * sees) / count
    metrics[f"layer_{i}/routing_sparsity"] = jnp.sum(
        read_BT / jnp.maximum(sealed_T, 1) * sees) / count
  return metrics


def forward_metrics(model: nn.Module, params, batch: Mapping[str, jax.Array], *, train: bool,
                    oracle: bool) -> tuple[jax.Array, dict]:
  """(objective, metrics) of one batch: masked cross entropy + the model's auxiliary losses.

  Returns:
    objective: scalar, the task loss plus `sum(aux['losses'])` when training.
    metrics: loss (task cross entropy over masked positions), accuracy, each auxiliary loss as
      `loss/<name>`, the model's diagnostics and `routing_metrics` (of the leaves actually read:
      with `oracle` those are the answer leaves wherever they are visible).
  """
  kwargs = {"loss_mask": batch["mask"]} if train and isinstance(model, FractalV2Model) else {}
  logits, aux = model.apply({"params": params}, batch["tokens"],
                            oracle_leaves=batch["answer_leaves"] if oracle else None, train=train,
                            **kwargs)
  mask = batch["mask"]
  denom = jnp.maximum(jnp.sum(mask), 1.0)
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
  loss = jnp.sum(nll * mask) / denom
  accuracy = jnp.sum((jnp.argmax(logits, -1) == batch["targets"]) * mask) / denom
  losses = aux.get("losses", {}) if train else {}
  objective = loss + sum(losses.values())
  metrics = {"loss": loss, "accuracy": accuracy}
  metrics.update({f"loss/{k}": v for k, v in losses.items()})
  metrics.update(aux.get("metrics", {}))
  leaf_size = getattr(model.config, "leaf_size", None)
  if leaf_size is not None:
    metrics.update(routing_metrics(aux.get("routing"), batch, leaf_size))
  return objective, metrics


def make_mesh() -> Mesh:
  """A 1-D mesh with axis 'data' over every local device."""
  return Mesh(np.asarray(jax.devices()), ("data",))


def _schedule_count(opt_state) -> jax.Array:
  """Updates applied so far, as the learning-rate schedule counts them (skips excluded)."""
  is_schedule = lambda x: isinstance(x, optax.ScaleByScheduleState)
  (found,) = [x for x in jax.tree.leaves(opt_state, is_leaf=is_schedule) if is_schedule(x)]
  return found.count


def _step_settings(train: TrainConfig) -> TrainConfig:
  """`train` with only the fields a compiled step depends on (a cache key: resuming with more
  steps, logging differently or another seed reuses the compiled step)."""
  return dataclasses.replace(train, seed=0, steps=0, decay_steps=train.decay_steps or train.steps,
                             log_every=1, eval_every=0, ckpt_every=1, keep_checkpoints=1,
                             narrow_beam_at=0)


def make_train_step(experiment: Experiment, mesh: Mesh):
  """The jitted `train_step(state, data_key) -> (state, metrics)`; the state is donated.

  `data_key` is `data_key(train.seed)`. Compiled steps are cached per (model, task, step settings
  but the seed, mesh), so calling `train_and_evaluate` again in one process (a Colab, a resumed
  run, another seed) does not recompile.
  """
  return _train_step_fn(experiment.model, experiment.task, _step_settings(experiment.train), mesh)


@functools.lru_cache(maxsize=8)
def _train_step_fn(model_config: AnyModelConfig, task: data_lib.TaskConfig, train: TrainConfig,
                   mesh: Mesh):
  model = build_model(model_config)
  tx = make_optimizer(train)
  schedule = make_schedule(train)
  batch_sharding = NamedSharding(mesh, P("data"))
  replicated = NamedSharding(mesh, P())

  def train_step(state: TrainState, data_key: jax.Array):
    batch = data_lib.generate(task, jax.random.fold_in(data_key, state.step), train.batch_size)
    batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
    grad_fn = jax.value_and_grad(
        functools.partial(forward_metrics, model, batch=batch, train=True, oracle=train.oracle),
        has_aux=True)
    (objective, metrics), grads = grad_fn(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree.norm(grads)
    metrics.update(
        objective=objective, grad_norm=grad_norm, param_norm=optax.tree.norm(params),
        lr=schedule(_schedule_count(state.opt_state)),
        nonfinite=(~(jnp.isfinite(objective) & jnp.isfinite(grad_norm))).astype(jnp.int32),
        nonfinite_total=opt_state.total_notfinite)
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return jax.jit(train_step, in_shardings=(replicated, replicated),
                 out_shardings=(replicated, replicated), donate_argnums=0)


@functools.lru_cache(maxsize=8)
def _init_fn(experiment: Experiment, mesh: Mesh):
  """The jitted `init(key) -> TrainState` (cached without the seed: pass `experiment` through
  `_step_settings`)."""
  return jax.jit(functools.partial(init_state, experiment),
                 out_shardings=NamedSharding(mesh, P()))


@functools.lru_cache(maxsize=16)
def _eval_fn(model_config: AnyModelConfig, task: data_lib.TaskConfig, batch_size: int,
             oracle: bool, mesh: Mesh):
  """The jitted `eval_batch(params, key) -> metrics`; the batch is generated from `key`."""
  model = build_model(model_config)
  batch_sharding = NamedSharding(mesh, P("data"))
  replicated = NamedSharding(mesh, P())

  def eval_batch(params, key):
    batch = data_lib.generate(task, key, batch_size)
    batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
    return forward_metrics(model, params, batch, train=False, oracle=oracle)[1]

  return jax.jit(eval_batch, in_shardings=(replicated, replicated), out_shardings=replicated)


def evaluate(experiment: Experiment, params, *, lengths: Optional[tuple[int, ...]] = None,
             mesh: Optional[Mesh] = None) -> dict[str, dict[str, float]]:
  """Evaluates `params` on `eval.batches` fresh batches at each length (evaluation beam).

  The eval batches come from their own seed stream, so they are never training batches; the same
  batches are used for every call with the same seed.

  Returns:
    {str(length): {metric: mean over batches}} with the metrics of `forward_metrics`.
  """
  mesh = mesh or make_mesh()
  ev = experiment.eval
  results = {}
  for length in lengths or ev.lengths:
    step = _eval_fn(experiment.model_for_length(length), experiment.task_for_length(length),
                    ev.batch_size, ev.oracle, mesh)
    key = eval_key(experiment.train.seed)
    per_batch = jax.device_get([step(params, jax.random.fold_in(key, i))
                                for i in range(ev.batches)])
    results[str(length)] = {k: float(np.mean([m[k] for m in per_batch])) for k in per_batch[0]}
  return results


# ------------------------------------------------------------------------------------------------
# Logging.


class _MetricsWriter:
  """Appends JSON rows to `workdir/metrics.jsonl` (and TensorBoard event files if available)."""

  def __init__(self, workdir: str, resume_step: int):
    self.path = os.path.join(workdir, METRICS_FILE)
    _truncate_metrics(self.path, resume_step)
    self._file = open(self.path, "a")
    self._tb = None
    try:  # Optional: a maintained, TensorFlow-free writer. Not a dependency.
      import tensorboardX  # pylint: disable=g-import-not-at-top
      self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, "tb"))
    except ImportError:
      pass

  def write(self, row: Mapping[str, Any]) -> None:
    self._file.write(json.dumps(row) + "\n")
    self._file.flush()
    if self._tb is not None:
      prefix = "eval/" if row.get("split") == "eval" else ""
      for k, v in row.items():
        if isinstance(v, float) and k not in ("time", "step"):
          self._tb.add_scalar(prefix + k, v, row["step"])

  def close(self) -> None:
    self._file.close()
    if self._tb is not None:
      self._tb.close()


def _truncate_metrics(path: str, resume_step: int) -> None:
  """Drops rows logged after the checkpoint a run resumes from (they will be logged again)."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    rows = [line for line in f if line.strip()]
  keep = [line for line in rows if json.loads(line).get("step", 0) <= resume_step]
  if len(keep) != len(rows):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(keep)
    os.replace(tmp, path)


def _format_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _brief(metrics: Mapping[str, float]) -> str:
  parts = [f"loss {metrics['loss']:.4f}", f"acc {metrics['accuracy']:.3f}"]
  recalls = [v for k, v in sorted(metrics.items()) if k.endswith("/routing_recall")]
  if recalls:
    parts.append("recall " + "/".join(f"{r:.2f}" for r in recalls))
  return " ".join(parts)


def format_summary(summary: Mapping[str, Any]) -> str:
  """A readable table of an `eval.json` summary."""
  lines = [f"{summary['model_type']} on {summary['task']['name']} after {summary['step']} steps "
           f"({summary['num_params']:,} parameters):"]
  lines.append(f"  {'length':>8} {'accuracy':>9} {'loss':>8}  routing recall / sparsity per layer")
  for length, m in summary["lengths"].items():
    layers = sorted({k.split("/")[0] for k in m if k.endswith("/routing_recall")})
    routes = "  ".join(f"{layer}: {m[layer + '/routing_recall']:.3f} / "
                       f"{m[layer + '/routing_sparsity']:.3f}" for layer in layers)
    lines.append(f"  {length:>8} {m['accuracy']:>9.4f} {m['loss']:>8.4f}  {routes or '-'}")
  return "\n".join(lines)


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
  return out


# Settings that may change when a run resumes (curricula, capacity, implementation); every other
# model field defines the architecture the checkpoint was trained as.
_RESUMABLE_MODEL_FIELDS = ("beam_width", "train_beam_width", "teacher_weight", "teacher_positions",
                           "teacher_cross_level", "teacher_queries", "salience_weight",
                           "max_seq_len", "scan_impl", "remat", "query_block", "min_timescale",
                           "max_timescale")


def _architecture(config: Mapping[str, Any]) -> dict[str, Any]:
  """The part of a raw config a checkpoint's parameters are only meaningful for."""
  model_type = config.get("model_type")
  section = "model" if model_type == "kernel" else "peer"
  fields = {k: v for k, v in dict(config.get(section, {})).items()
            if k not in _RESUMABLE_MODEL_FIELDS}
  return {"model_type": model_type, section: fields}


def _config_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
  saved, current = _flatten(saved), _flatten(current)
  return [f"{k}: saved {saved.get(k, '<absent>')!r}, now {current.get(k, '<absent>')!r}"
          for k in sorted(saved.keys() | current.keys()) if saved.get(k) != current.get(k)]


# ------------------------------------------------------------------------------------------------
# The loop.


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (or resumes) the configured model in `workdir`, then evaluates it.

  Args:
    config: an experiment config (`configs/*.py:get_config`).
    workdir: where checkpoints, `metrics.jsonl` and `eval.json` go. If it holds a checkpoint, the
      run resumes from its newest step (an incompatible model raises
      `checkpoint.CheckpointMismatchError`).

  Returns:
    The evaluation summary written to `workdir/eval.json`.

  Raises:
    ValueError: an invalid config (before anything is compiled).
    NonFiniteLossError: `train.max_nonfinite` consecutive non-finite losses.
  """
  experiment = parse_config(config)
  mesh = make_mesh()
  check_devices(experiment, mesh.size)
  config_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  train = experiment.train
  os.makedirs(workdir, exist_ok=True)
  replicated = NamedSharding(mesh, P())

  abstract = jax.eval_shape(functools.partial(init_state, experiment))
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), abstract)
  num_params = peers_lib.count_params(abstract.params)

  checkpointer = checkpoint_lib.Checkpointer(workdir, keep=train.keep_checkpoints)
  writer = None
  try:
    latest = checkpointer.latest_step()
    if latest is None:
      init_experiment = dataclasses.replace(experiment, train=_step_settings(train),
                                            eval=EvalConfig(lengths=(1,)))
      state = _init_fn(init_experiment, mesh)(_root_key(train.seed, _INIT_STREAM))
      logging.info("Initialised %s: %s parameters, on %d device(s).", experiment.model_type,
                   f"{num_params:,}", mesh.size)
    else:
      saved_config = checkpointer.restore_meta(latest)["config"]
      differences = _config_differences(saved_config, config_dict)
      incompatible = _config_differences(_architecture(saved_config), _architecture(config_dict))
      try:
        state, meta = checkpointer.restore(latest, abstract_state=abstract)
      except checkpoint_lib.CheckpointMismatchError as e:
        raise checkpoint_lib.CheckpointMismatchError(
            f"{workdir} holds a checkpoint of a different model: "
            + "; ".join(incompatible or differences) + f"\n{e}") from e
      if incompatible:
        raise checkpoint_lib.CheckpointMismatchError(
            f"{workdir} holds a checkpoint of a different model (same parameter shapes, "
            "different architecture): " + "; ".join(incompatible))
      if differences:
        logging.warning("Resuming with a config that differs from the checkpoint's:\n  %s",
                        "\n  ".join(differences))
      if meta["data_state"].get("step") != int(state.step):
        raise ValueError(f"checkpoint {latest} in {workdir} is inconsistent: data_state "
                         f"{meta['data_state']} but state.step={int(state.step)}")
      logging.info("Resumed from step %d in %s.", int(state.step), workdir)

    start = int(state.step)
    writer = _MetricsWriter(workdir, start)
    if start < train.steps:
      state = _train_loop(experiment, state, mesh, checkpointer, writer, config_dict, start)
    elif start > train.steps:
      logging.warning("The checkpoint is at step %d, past train.steps=%d; evaluating it.",
                      start, train.steps)
    checkpointer.wait()

    results = evaluate(experiment, state.params, mesh=mesh)
    summary = {"step": int(state.step), "model_type": experiment.model_type,
               "num_params": num_params, "task": experiment.task.to_dict(),
               "seed": experiment.train.seed, "eval": dataclasses.asdict(experiment.eval),
               "lengths": results}
    if experiment.eval.audit_batches and experiment.model_type == "kernel":
      summary["audit"] = audit_lib.audit_experiment(experiment, state.params,
                                                    num_batches=experiment.eval.audit_batches)
      audit_lib.write_report(summary["audit"], os.path.join(workdir, audit_lib.AUDIT_FILE))
      logging.info("Memory audit:\n%s", audit_lib.format_report(summary["audit"]))
    with open(os.path.join(workdir, EVAL_FILE), "w") as f:
      json.dump(summary, f, indent=2)
    logging.info("Evaluation:\n%s", format_summary(summary))
    return summary
  finally:
    if writer is not None:
      writer.close()
    checkpointer.close()


def _train_loop(experiment: Experiment, state: TrainState, mesh: Mesh,
                checkpointer: checkpoint_lib.Checkpointer, writer: _MetricsWriter,
                config_dict: dict, start: int) -> TrainState:
  train = experiment.train
  wide_step = make_train_step(experiment, mesh)
  narrow_step = wide_step
  if train.narrow_beam_at and experiment.model_type == "kernel":
    narrow = dataclasses.replace(experiment.model, train_beam_width=0)
    narrow_step = make_train_step(dataclasses.replace(experiment, model=narrow), mesh)
  key = data_key(train.seed)
  train_step = lambda state, step: (
      narrow_step if train.narrow_beam_at and step >= train.narrow_beam_at else wide_step
  )(state, key)
  tokens_per_step = train.batch_size * experiment.task.seq_len
  data_state = lambda step: {"step": step, "seed": train.seed}
  clock = {"t": time.time(), "step": start, "t0": time.time(), "consecutive": 0}

  def record(step: int, metrics) -> None:
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if metrics["nonfinite"]:
      clock["consecutive"] += 1
      logging.warning("Step %d: non-finite loss %s / grad norm %s (%d in a row; update skipped).",
                      step, metrics["objective"], metrics["grad_norm"], clock["consecutive"])
    else:
      clock["consecutive"] = 0
    if step == start + 1:
      logging.info("First step (including compilation) took %.1fs.", time.time() - clock["t0"])
      clock.update(t=time.time(), step=step)
    if step % train.log_every == 0 or step == train.steps:
      now = time.time()
      rate = (step - clock["step"]) / max(now - clock["t"], 1e-9) if step > clock["step"] else 0.
      writer.write({"step": step, "split": "train", "time": now,
                    "steps_per_s": rate, **metrics})
      eta = (train.steps - step) / rate if rate > 0 else float("nan")
      logging.info("step %d/%d | %s | %.2f steps/s, %s tokens/s | ETA %s", step, train.steps,
                   _brief(metrics), rate, f"{rate * tokens_per_step:,.0f}",
                   _format_duration(eta))
      clock.update(t=now, step=step)
    if clock["consecutive"] >= train.max_nonfinite:
      checkpointer.wait()
      last = checkpointer.latest_step()
      raise NonFiniteLossError(
          f"stopping at step {step}: {clock['consecutive']} consecutive non-finite losses "
          f"(train.max_nonfinite={train.max_nonfinite}); the newest checkpoint is step {last}. "
          "Lower train.lr or raise train.clip_norm / train.warmup_steps.")

  pending = None
  step = start
  while step < train.steps:
    # Dispatched before the previous metrics are pulled.
    state, metrics = train_step(state, step)
    step += 1
    if pending is not None:
      record(*pending)
    pending = (step, metrics)
    at_ckpt = step % train.ckpt_every == 0 or step == train.steps
    at_eval = train.eval_every and step % train.eval_every == 0 and step != train.steps
    if at_ckpt or at_eval:
      record(*pending)
      pending = None
      if at_eval:
        length = experiment.task.seq_len
        results = evaluate(experiment, state.params, lengths=(length,), mesh=mesh)[str(length)]
        writer.write({"step": step, "split": "eval", "time": time.time(), "length": length,
                      **results})
        logging.info("eval at step %d (length %d) | %s", step, length, _brief(results))
      if at_ckpt:
        if clock["consecutive"]:
          logging.warning("Step %d: not checkpointing a non-finite step.", step)
        else:
          checkpointer.save(step, state, config=config_dict, data_state=data_state(step),
                            force=True)
  if pending is not None:
    record(*pending)
  return state

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
  metrics in `workdir/metrics.jsonl`; with `train.tensorboard` TensorBoard event files too
  (`memkernel.metrics_log`).
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
from typing import Any, Mapping

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from memkernel import checkpoint as checkpoint_lib
from memkernel import distributed
from memkernel import evaluate as evaluate_lib
from memkernel import experiment as experiment_lib
from memkernel import family as family_lib
from memkernel import metrics as metrics_lib
from memkernel import metrics_log
from memkernel import optim
from memkernel import probes
from memkernel import text_task
from memkernel.analysis import audit as audit_lib
from memkernel.paths import train_hints
from memkernel.experiment import EvalConfig, Experiment, TrainConfig
from memkernel.optim import TrainState


class NonFiniteLossError(FloatingPointError):
  """Training produced `max_nonfinite` consecutive non-finite losses or gradients."""



def _step_settings(train: TrainConfig) -> TrainConfig:
  """`train` with only the fields a compiled step depends on (a cache key: resuming with more
  steps, logging differently or another seed reuses the compiled step)."""
  return dataclasses.replace(train, seed=0, steps=0, decay_steps=train.decay_steps or train.steps,
                             log_every=1, eval_every=0, ckpt_every=1, keep_checkpoints=1,
                             narrow_beam_at=0, tensorboard=False)


def make_train_step(experiment: Experiment, mesh: Mesh):
  """The jitted `train_step(state, data_key) -> (state, metrics)`; the state is donated.

  `data_key` is `data_key(train.seed)`; for a text task the step takes the batch instead,
  `train_step(state, batch)`, sharded along 'data' (`text_task.as_global`); with
  `train.route_hints` it takes the hint table too, `train_step(state, data_key, table)`
  (`paths.train_hints`). Compiled steps are cached per (model, task, step settings but the
  seed, mesh), so calling `train_and_evaluate` again in one process (a Colab, a resumed run,
  another seed) does not recompile.
  """
  return _train_step_fn(experiment.model, experiment.task, _step_settings(experiment.train), mesh)


@functools.lru_cache(maxsize=8)
def _train_step_fn(model_config: Any, task: probes.TaskConfig, train: TrainConfig,
                   mesh: Mesh):
  model = family_lib.build(model_config)
  tx = optim.make_optimizer(train)
  schedule = optim.make_schedule(train)
  batch_sharding = NamedSharding(mesh, P("data"))
  replicated = NamedSharding(mesh, P())

  def update(state: TrainState, batch, route_hints=None):
    batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
    grad_fn = jax.value_and_grad(
        functools.partial(metrics_lib.forward_metrics, model, batch=batch, train=True,
                          oracle=train.oracle, route_hints=route_hints),
        has_aux=True)
    (objective, metrics), grads = grad_fn(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree.norm(grads)
    metrics.update(
        objective=objective, grad_norm=grad_norm, param_norm=optax.tree.norm(params),
        lr=schedule(optim.schedule_count(state.opt_state)),
        nonfinite=(~(jnp.isfinite(objective) & jnp.isfinite(grad_norm))).astype(jnp.int32),
        nonfinite_total=opt_state.total_notfinite)
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  if text_task.is_text(task):  # Read on the host; each device gets its own rows.
    return jax.jit(update, in_shardings=(replicated, batch_sharding),
                   out_shardings=(replicated, replicated), donate_argnums=0)

  def train_step(state: TrainState, data_key: jax.Array):
    return update(state, probes.generate(task, jax.random.fold_in(data_key, state.step),
                                         train.batch_size))

  def hinted_step(state: TrainState, data_key: jax.Array, table):
    batch = probes.generate(task, jax.random.fold_in(data_key, state.step), train.batch_size)
    return update(state, batch,
                  evaluate_lib.hints_for(batch["tokens"], table, model_config.num_layers))

  if train.route_hints != "off":  # `train_step(state, data_key, hint_table)`.
    return jax.jit(hinted_step, in_shardings=(replicated, replicated, replicated),
                   out_shardings=(replicated, replicated), donate_argnums=0)
  return jax.jit(train_step, in_shardings=(replicated, replicated),
                 out_shardings=(replicated, replicated), donate_argnums=0)


@functools.lru_cache(maxsize=8)
def _init_fn(experiment: Experiment, mesh: Mesh):
  """The jitted `init(key) -> TrainState` (cached without the seed: pass `experiment` through
  `_step_settings`)."""
  return jax.jit(functools.partial(optim.init_state, experiment),
                 out_shardings=NamedSharding(mesh, P()))



# ------------------------------------------------------------------------------------------------
# Logging.


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
  if "corpus" in summary:  # Text: bits per byte, and by context position.
    lines.append(f"  {'length':>8} {'bytes':>10} {'bits/byte ± se':>16} {'accuracy':>9}  "
                 "long-range recall rare / common (bytes)  bits/byte by context position")
    for length, m in summary["lengths"].items():
      by_position = "  ".join(f"{k.split('@')[1]}: {v:.3f}" for k, v in m.items()
                              if k.startswith("bits_per_byte@"))
      recall = " / ".join(f"{m[f'recall_{c}_accuracy']:.3f} ({int(m[f'recall_{c}_queries'])})"
                          for c in text_task.RECALL_CLASSES)
      lines.append(f"  {length:>8} {int(m['queries']):>10} "
                   f"{m['bits_per_byte']:>8.4f} ± {m['bits_per_byte_se']:.4f} "
                   f"{m['accuracy']:>9.4f}  {recall}  {by_position}")
    return "\n".join(lines)
  lines.append(f"  {'length':>8} {'queries':>8} {'accuracy ± se':>16} {'loss':>8}  "
               "routing recall (query-blind baseline) / sparsity per layer")
  for length, m in summary["lengths"].items():
    layers = sorted({k.split("/")[0] for k in m if k.endswith("/routing_recall")})
    routes = "  ".join(f"{layer}: {m[layer + '/routing_recall']:.3f} "
                       f"({m.get(layer + '/routing_recall_blind', float('nan')):.3f}) / "
                       f"{m[layer + '/routing_sparsity']:.3f}" for layer in layers)
    accuracy = f"{m['accuracy']:.4f} ± {m.get('accuracy_se', float('nan')):.4f}"
    lines.append(f"  {length:>8} {int(m.get('queries', 0)):>8} {accuracy:>16} "
                 f"{m['loss']:>8.4f}  {routes or '-'}")
  return "\n".join(lines)


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
  return out


def _architecture(config: Mapping[str, Any]) -> dict[str, Any]:
  """The part of a raw config a checkpoint's parameters are only meaningful for: the family,
  its model fields but those the family lets a resumed run change (curricula, capacity,
  implementation), and the task."""
  model_type = config.get("model_type")
  task = {"task": dict(config.get("task", {}))}
  try:
    family = family_lib.get(model_type)
  except ValueError:
    return {"model_type": model_type, **task}
  fields = {k: v for k, v in dict(config.get(family.section, {})).items()
            if k not in family.resumable_fields}
  return {"model_type": model_type, family.section: fields, **task}


def _config_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
  saved, current = _flatten(saved), _flatten(current)
  return [f"{k}: saved {saved.get(k, '<absent>')!r}, now {current.get(k, '<absent>')!r}"
          for k in sorted(saved.keys() | current.keys()) if saved.get(k) != current.get(k)]


# ------------------------------------------------------------------------------------------------
# The loop.


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       force_resume: bool = False) -> dict[str, Any]:
  """Trains (or resumes) the configured model in `workdir`, then evaluates it.

  Args:
    config: an experiment config (`configs/*.py:get_config`).
    workdir: where checkpoints, `metrics.jsonl` and `eval.json` go. If it holds a checkpoint, the
      run resumes from its newest readable step (a damaged newer step is moved aside with a
      warning; `checkpoint.Checkpointer.restore_latest`).
    force_resume: resume a checkpoint trained with another architecture, model type or task
      (its parameter shapes must still match); without it such a workdir raises.

  Returns:
    The evaluation summary written to `workdir/eval.json`.

  Raises:
    ValueError: an invalid config or a `workdir` that is a file (before anything is compiled).
    checkpoint.CheckpointMismatchError: `workdir` holds a checkpoint of another architecture,
      model type or task (without `force_resume`), or of other parameter shapes.
    NonFiniteLossError: `train.max_nonfinite` consecutive non-finite losses.
  """
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f"workdir {workdir} is a file; it must be a directory")
  experiment = experiment_lib.parse_config(config)
  if experiment.train.tensorboard:
    metrics_log.check_tensorboard()
  mesh = evaluate_lib.make_mesh()
  experiment_lib.check_devices(experiment, mesh.size)
  if experiment.train.route_hints != "off" and jax.process_count() > 1:
    raise ValueError("train.route_hints builds its traces on the host of one process; train "
                     "with hints in a single process")
  config_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  train = experiment.train
  os.makedirs(workdir, exist_ok=True)
  replicated = NamedSharding(mesh, P())

  abstract = jax.eval_shape(functools.partial(optim.init_state, experiment))
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), abstract)
  num_params = optim.count_params(abstract.params)

  checkpointer = checkpoint_lib.Checkpointer(workdir, keep=train.keep_checkpoints)
  writer = None
  try:
    latest = checkpointer.latest_step()
    if latest is None:
      init_experiment = dataclasses.replace(experiment, train=_step_settings(train),
                                            eval=EvalConfig(lengths=(1,)))
      state = _init_fn(init_experiment, mesh)(experiment_lib.root_key(train.seed, experiment_lib.INIT_STREAM))
      logging.info("Initialised %s: %s parameters, on %d device(s).", experiment.model_type,
                   f"{num_params:,}", mesh.size)
    else:
      refused = []

      def check_meta(step: int, meta: Mapping[str, Any]) -> None:
        """Refuses a checkpoint of another run before its arrays are read."""
        incompatible = _config_differences(_architecture(meta["config"]),
                                           _architecture(config_dict))
        if incompatible and not force_resume:
          refused.append(checkpoint_lib.CheckpointMismatchError(
              f"{workdir} holds a checkpoint (step {step}) of another run: "
              + "; ".join(incompatible) + " (pass --force_resume to resume it anyway)"))
          raise refused[-1]
        if incompatible:
          logging.warning("Resuming a checkpoint of another run (--force_resume): %s",
                          "; ".join(incompatible))

      try:
        latest, state, meta = checkpointer.restore_latest(abstract_state=abstract,
                                                          check_meta=check_meta)
      except checkpoint_lib.CheckpointMismatchError as e:
        if refused:
          raise
        header, *problems = str(e).splitlines()
        raise checkpoint_lib.CheckpointMismatchError(
            f"{workdir} holds a checkpoint of a model with other parameter shapes: "
            + ("; ".join(p.strip() for p in problems) or header)) from e
      differences = _config_differences(meta["config"], config_dict)
      if differences:
        logging.warning("Resuming with a config that differs from the checkpoint's:\n  %s",
                        "\n  ".join(differences))
      if meta["data_state"].get("step") != int(state.step):
        raise ValueError(f"checkpoint {latest} in {workdir} is inconsistent: data_state "
                         f"{meta['data_state']} but state.step={int(state.step)}")
      logging.info("Resumed from step %d in %s.", int(state.step), workdir)

    start = int(state.step)
    resumed_data = meta["data_state"] if latest is not None else {}
    writer = metrics_log.MetricsLog(workdir, start, tensorboard=train.tensorboard,
                                   enabled=distributed.is_primary())
    if start < train.steps:
      state = _train_loop(experiment, state, mesh, checkpointer, writer, config_dict, start,
                          resumed_data)
    elif start > train.steps:
      logging.warning("The checkpoint is at step %d, past train.steps=%d; evaluating it.",
                      start, train.steps)
    checkpointer.wait()

    hints = hint_stats = None
    if train.route_hints != "off":  # The hints of the final parameters.
      hints, hint_stats = train_hints.HintRefresher(experiment).refresh(state.params,
                                                                        int(state.step))
    results = evaluate_lib.evaluate(experiment, state.params, mesh=mesh, route_hints=hints)
    summary = {"step": int(state.step), "model_type": experiment.model_type,
               "num_params": num_params, "task": experiment.task.to_dict(),
               "seed": experiment.train.seed, "eval": dataclasses.asdict(experiment.eval),
               "lengths": results}
    if hint_stats is not None:
      summary["route_hints"] = {"mode": train.route_hints, **hint_stats}
    if text_task.is_text(experiment.task):
      summary["corpus"] = text_task.describe(experiment.task)
    if experiment.eval.audit_batches and experiment.family.routes:
      # The auditor's programs run on one device; each process audits its own copy of the
      # (replicated) parameters.
      params = jax.device_get(state.params) if jax.process_count() > 1 else state.params
      summary["audit"] = audit_lib.audit_experiment(experiment, params,
                                                    num_batches=experiment.eval.audit_batches)
      if distributed.is_primary():
        audit_lib.write_report(summary["audit"], os.path.join(workdir, audit_lib.AUDIT_FILE))
      logging.info("Memory audit:\n%s", audit_lib.format_report(summary["audit"]))
    if distributed.is_primary():
      with open(os.path.join(workdir, experiment_lib.EVAL_FILE), "w") as f:
        json.dump(summary, f, indent=2)
    logging.info("Evaluation:\n%s", format_summary(summary))
    return summary
  finally:
    if writer is not None:
      writer.close()
    checkpointer.close()


def _train_loop(experiment: Experiment, state: TrainState, mesh: Mesh,
                checkpointer: checkpoint_lib.Checkpointer, writer: metrics_log.MetricsLog,
                config_dict: dict, start: int, resumed_data: Mapping[str, Any]) -> TrainState:
  train = experiment.train
  wide_step = make_train_step(experiment, mesh)
  narrow_step = wide_step
  if train.narrow_beam_at and experiment.family.routes:
    narrow = dataclasses.replace(experiment.model, train_beam_width=0)
    narrow_step = make_train_step(dataclasses.replace(experiment, model=narrow), mesh)
  if text_task.is_text(experiment.task):  # Host batches from a resumable stream.
    stream = text_task.train_stream(experiment.task, train.batch_size, train.seed,
                                    state=resumed_data.get("stream"))
    batch_sharding = NamedSharding(mesh, P("data"))
    feed = lambda: text_task.as_global(next(stream), batch_sharding)
    data_state = lambda step: {"step": step, "seed": train.seed, "stream": stream.state()}
  else:  # Batches generated inside the step from (seed, step).
    key = experiment_lib.data_key(train.seed)
    feed = lambda: key
    data_state = lambda step: {"step": step, "seed": train.seed}
  refresher = hints = None
  hint_stats: dict[str, float] = {}
  if train.route_hints != "off":
    refresher = train_hints.HintRefresher(experiment)

  def train_step(state, step):
    step_fn = narrow_step if train.narrow_beam_at and step >= train.narrow_beam_at else wide_step
    return step_fn(state, feed()) if hints is None else step_fn(state, feed(), hints)
  tokens_per_step = train.batch_size * experiment.task.seq_len
  clock = {"t": time.time(), "step": start, "t0": time.time(), "consecutive": 0}

  def record(step: int, metrics) -> None:
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    metrics.update(hint_stats)
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
    if refresher is not None and step % train.hints_every == 0:
      if pending is not None:
        record(*pending)
        pending = None
      hints, hint_stats = refresher.refresh(state.params, step)
      logging.info("step %d: %s", step, train_hints.log_line(hint_stats))
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
        results = evaluate_lib.evaluate(experiment, state.params, lengths=(length,), mesh=mesh,
                                        route_hints=hints)[str(length)]
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

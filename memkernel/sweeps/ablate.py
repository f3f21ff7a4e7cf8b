"""The ablation sweep: the nine memory configurations, the peers and oracle routes on every probe.

    rows = run(configs.ablate.get_config("smoke"), "/tmp/ablate")

is everything `experiments/ablate.py` does, callable from a Colab. Config: `configs/ablate.py`.

A *cell* is task x model x seed. Every trained cell runs `memkernel.train.train_and_evaluate` in
its own workdir, `OUT/runs/<task>/<model>/seed<k>`, on the task's probe config (`configs/<task>.py`)
with the sweep's overrides; it is then evaluated at `length_factors` x the training length. Models
(`MODELS`; the kernel ones are overrides of the probe config's `model` section):

  single_root/no_memory                         num_roots=1, both reads off
  multi_root/no_memory                          num_roots=R (the probe default, 2), both reads off
  single_root/summaries_only                    num_roots=1, route_descend=False, tree read only
  single_root/sparse_retrieval                  num_roots=1, beam-routed tree read only
  single_root/sparse_retrieval+exact_read       num_roots=1, the full kernel
  multi_root/summaries_only                     num_roots=R, route_descend=False, tree read only
  multi_root/sparse_retrieval                   num_roots=R, beam-routed tree read only
  multi_root/sparse_retrieval_without_exact_read  not trained: the full kernel's checkpoint,
                                                evaluated with `Interventions(drop=("exact",))`
  multi_root/sparse_retrieval+exact_read        the full kernel (the probe default)
  dense, sliding_window                         the attention peers (same width and depth)
  oracle                                        the full kernel trained and evaluated with the true
                                                answer leaves fed to the exact read
  braincore                                     the brain-core (the probe config's `:braincore`)
  braincore/no_working, braincore/no_episodic, braincore/no_procedural
                                                the brain-core built without that memory
                                                (`BrainCoreConfig.without`: no parameters, no state)
  braincore/lifelong_off                        episodic and procedural memory reset at a document
                                                boundary (instead of decaying); differs only on
                                                tasks with documents (cross_doc)

"summaries only" is the tree value as a softmax over the query's Fenwick-node summaries (no
descent, no leaf); "sparse retrieval" is the beam-routed tree value (the summaries of the nodes
the beam visits, down to the selected leaves), no token read; "+ exact read" adds the token-level
read of the selected leaves.

Equal budget: a memory source the config switches off has no parameters, so with `match_params`
every kernel configuration gets the MLP width (`KernelConfig.mlp_dim`) that brings its parameter
count closest to the full multi-root kernel's, and every brain-core without a memory the width
(`BrainCoreConfig.mlp_dim`) that brings it closest to the full brain-core's (counted with
`jax.eval_shape`, nothing compiled).
The memory state each configuration carries is reported per token: `state_bytes_per_token` is
the recurrent form's memory pytree (`init_memory` at the evaluation length's capacity, divided by
the length; the same for every kernel configuration of one width), `state_bytes_per_token_read`
counts only the fields the configuration reads (roots and conv always; the tree store when a read
is on; the token cache with the exact read). The peers carry their KV cache (dense: every
position; sliding window: a ring of `window` positions). Both come from `memkernel.costs`.

Evaluation: every length of a cell is evaluated on `eval.batches` batches of the harness's own
evaluation stream (`fold_in(fold_in(key(seed), 2), batch)`, the batches `train.evaluate` uses) with
the evaluation beam and no teacher. The training length comes from `train_and_evaluate` (which
also runs the memory auditor on every trained kernel); the longer lengths from
`memkernel.evaluate`, whose compiled step takes the batch as an argument, so the seeds of one
configuration share it. A model whose largest buffers would need more than `max_eval_memory_gb`
at a length (`costs.activation_bytes`; dense attention's [B, heads, T, T] scores) is recorded as
skipped there, with the reason.

Outputs: `OUT/results.jsonl` (one row per task x model x length x seed), `OUT/results.md` (per
task: accuracy by model and length, mean +- half the range over seeds; routing recall; the
audit), `OUT/accuracy_vs_length.png`, `OUT/learning_curves.png`. A cell is finished when its
`result.json` is written; finished cells are skipped, a cell whose `eval.json` exists is not
trained again (only its longer lengths are evaluated), and an unfinished run resumes from its
checkpoint, so the sweep resumes after an interruption. Results cover every finished cell under
`OUT/runs`, so a sweep may be run in pieces (e.g. one task at a time).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import math
import os
import time
from typing import Any, Mapping, Optional, Sequence, Union

from absl import logging
import ml_collections
import numpy as np
from jax.sharding import Mesh

from memkernel import costs
from memkernel import evaluate as evaluate_lib
from memkernel import experiment as experiment_lib
from memkernel import probes
from memkernel import runs as runs_lib
from memkernel import train as train_lib
from memkernel.kernel import family as kernel_family
from memkernel.kernel import fusion
from memkernel.kernel.config import KernelConfig
from memkernel.kernel.interventions import NONE, Interventions

FULL_KERNEL = "multi_root/sparse_retrieval+exact_read"
WITHOUT_EXACT_READ = "multi_root/sparse_retrieval_without_exact_read"
ORACLE = "oracle"
PEERS = ("dense", "sliding_window")
# The nine configurations of the checklist, in the order of seed 000.
KERNEL_MODELS = (
    "single_root/no_memory",
    "multi_root/no_memory",
    "single_root/summaries_only",
    "single_root/sparse_retrieval",
    "single_root/sparse_retrieval+exact_read",
    "multi_root/summaries_only",
    "multi_root/sparse_retrieval",
    WITHOUT_EXACT_READ,
    FULL_KERNEL,
)
BRAINCORE = "braincore"
# The brain-core and its ablations: `BrainCoreConfig` fields over the probe config's brain-core.
BRAINCORE_OVERRIDES = {
    BRAINCORE: {},
    "braincore/no_working": dict(without="working"),
    "braincore/no_episodic": dict(without="episodic"),
    "braincore/no_procedural": dict(without="procedural"),
    "braincore/lifelong_off": dict(em_boundary="reset", pm_boundary="reset"),
}
BRAINCORE_MODELS = tuple(BRAINCORE_OVERRIDES)
MODELS = KERNEL_MODELS + PEERS + (ORACLE,) + BRAINCORE_MODELS
# Models evaluated from another model's checkpoint under an intervention: (source, intervention).
EVAL_ONLY = {WITHOUT_EXACT_READ: (FULL_KERNEL, Interventions(drop=("exact",)))}

_MEMORY = {
    "no_memory": dict(use_tree_read=False, use_exact_read=False, route_descend=True),
    "summaries_only": dict(use_tree_read=True, use_exact_read=False, route_descend=False),
    "sparse_retrieval": dict(use_tree_read=True, use_exact_read=False, route_descend=True),
    "sparse_retrieval+exact_read": dict(use_tree_read=True, use_exact_read=True,
                                        route_descend=True),
}
# Fields of the sweep config (configs/ablate.py).
FIELDS = ("tasks", "models", "seeds", "length_factors", "match_params", "max_eval_memory_gb",
          "task_arg", "task", "model", "peer", "braincore", "train", "eval")
# The sizes the sweep's `model` section gives the peers and the brain-core too.
SHARED_SIZES = ("d_model", "num_layers", "mlp_ratio")
# Set per cell, so not overridable through the sweep's sections.
_CELL_FIELDS = {"model": ("vocab_size", "leaf_size", "max_seq_len", "num_roots", "use_tree_read",
                          "use_exact_read", "route_descend"),
                # The peers share the kernel's width, depth and MLP ratio (config.model).
                "peer": ("vocab_size", "max_seq_len", "kind", "d_model", "num_layers",
                         "mlp_ratio"),
                "braincore": ("vocab_size", "max_seq_len", "d_model", "num_layers", "mlp_ratio",
                              "mlp_dim", "without"),
                "train": ("seed", "oracle"),
                "eval": ("lengths", "oracle")}
TASK_ARGS = ("", "smoke")

RUNS_DIR = "runs"
CELL_FILE = "result.json"
RESULTS_FILE = "results.jsonl"
TABLES_FILE = "results.md"
ACCURACY_PLOT = "accuracy_vs_length.png"
CURVES_PLOT = "learning_curves.png"


# ------------------------------------------------------------------------------------------------
# Configuration.


def kernel_overrides(model: str, num_roots: int) -> dict[str, Any]:
  """The `model`-section fields that make kernel configuration `model` (one of KERNEL_MODELS or
  ORACLE) out of a probe config whose multi-root kernel has `num_roots` roots."""
  if model == ORACLE:
    model = FULL_KERNEL
  if model in EVAL_ONLY:
    model = EVAL_ONLY[model][0]
  roots, _, memory = model.partition("/")
  if roots not in ("single_root", "multi_root") or memory not in _MEMORY:
    raise ValueError(f"{model!r} is not a kernel configuration; known: {list(KERNEL_MODELS)}")
  return dict(num_roots=1 if roots == "single_root" else num_roots, **_MEMORY[memory])


def match_mlp_dim(config: Any, target: int) -> Any:
  """`config` (a `KernelConfig` or `BrainCoreConfig`) with the MLP width whose parameter count
  is closest to `target`.

  The count is affine in `mlp_dim` (each layer's MLP holds 2 d_model mlp_dim parameters, plus
  what reads its hidden units), so the counts at two widths give it everywhere.
  """
  width = config.mlp_hidden
  base = costs.num_params(dataclasses.replace(config, mlp_dim=width))
  slope = costs.num_params(dataclasses.replace(config, mlp_dim=width + 1)) - base
  return dataclasses.replace(config, mlp_dim=max(1, width + round((target - base) / slope)))


@dataclasses.dataclass(frozen=True, eq=False)
class Cell:
  """One task x model x seed of the sweep.

  Attributes:
    task, model, seed: what it is.
    workdir: its run directory, `OUT/runs/<task>/<model>/seed<seed>` (relative to OUT).
    config: the experiment config it trains (for an evaluation-only model, the source's), as a
      plain dict (`configs/common.py` layout).
    config_hash: sha256 prefix of `config` (plus the intervention of an evaluation-only model).
    lengths: evaluation lengths, the training length first.
    skipped: {length: reason} for lengths the model is not run at.
    source: evaluation-only models: the workdir (relative to OUT) of the trained checkpoint.
    interventions: evaluation-only models: the intervention they are evaluated under.
  """

  task: str
  model: str
  seed: int
  workdir: str
  config: Mapping[str, Any]
  config_hash: str
  lengths: tuple[int, ...]
  skipped: Mapping[int, str]
  source: Optional[str] = None
  interventions: Interventions = NONE

  @property
  def label(self) -> str:
    return f"{self.task} / {self.model} / seed {self.seed}"

  @property
  def trains(self) -> bool:
    return self.source is None


@dataclasses.dataclass(frozen=True)
class Sweep:
  """A validated sweep config and its cells (in run order; sources before what reads them)."""

  tasks: tuple[str, ...]
  models: tuple[str, ...]
  seeds: tuple[int, ...]
  length_factors: tuple[int, ...]
  match_params: bool
  max_eval_memory_gb: float
  cells: tuple[Cell, ...]


def _names(field: str, value: Any, known: Sequence[str]) -> tuple[str, ...]:
  items = value.split(",") if isinstance(value, str) else list(value or ())
  names = tuple(str(v).strip() for v in items if str(v).strip())
  unknown = [n for n in names if n not in known]
  if unknown or not names:
    raise ValueError(f"config.{field} must be a comma-separated subset of {list(known)}, got "
                     f"{value!r}" + (f" (unknown: {unknown})" if unknown else ""))
  if len(set(names)) != len(names):
    raise ValueError(f"config.{field} names something twice: {value!r}")
  return names


def _ints(field: str, value: Any, minimum: int) -> tuple[int, ...]:
  items = value.split(",") if isinstance(value, str) else (
      [value] if isinstance(value, int) else list(value or ()))
  try:
    ints = tuple(int(str(v).strip()) for v in items if str(v).strip())
  except ValueError:
    ints = ()
  if not ints or any(i < minimum for i in ints) or len(set(ints)) != len(ints):
    raise ValueError(f"config.{field} must be comma-separated distinct integers >= {minimum}, "
                     f"got {value!r}")
  return ints


def _section(config: Mapping[str, Any], name: str) -> dict[str, Any]:
  values = config.get(name) or {}
  if hasattr(values, "to_dict"):
    values = values.to_dict()
  if not isinstance(values, Mapping):
    raise ValueError(f"config.{name} must be a mapping, got {type(values).__name__}")
  fixed = sorted(set(values) & set(_CELL_FIELDS.get(name, ())))
  if fixed:
    raise ValueError(f"config.{name}: {fixed} are set per cell by the sweep, not in config.{name}")
  return dict(values)


# Fields added after cells were finished, left out of a cell's hash at the value those cells ran
# with (written out, not read from TrainConfig, so that changing a default does change the hash).
_UNHASHED = {("train", "tensorboard"): False, ("train", "route_hints"): "off",
             ("train", "hints_every"): 25, ("train", "hints_batches"): 2,
             ("train", "hints_alpha"): 16.0, ("train", "hints_gate"): 0.5,
             ("braincore", "em_write_gate"): "learned", ("braincore", "without"): "",
             ("braincore", "mlp_dim"): 0}


def _config_hash(config: Mapping[str, Any], extra: Any = None) -> str:
  config = {name: ({k: v for k, v in section.items() if _UNHASHED.get((name, k), ...) != v}
                   if isinstance(section, Mapping) else section)
            for name, section in config.items()}
  text = json.dumps({"config": config, "extra": extra}, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:12]


def _skip_reason(experiment: experiment_lib.Experiment, length: int, budget_gb: float) -> Optional[str]:
  """Why a length is not evaluated: the family's largest buffers (`costs.activation_bytes`, e.g.
  dense attention's [B, heads, T, T] scores) over `max_eval_memory_gb`; None if it fits."""
  model = experiment.model_for_length(length)
  need = costs.activation_bytes(model, length, experiment.eval.batch_size)
  if need is None or need <= budget_gb * 2**30:
    return None
  return (f"{experiment.model_type} at T={length} needs ~{need / 2**30:.1f} GB for its largest "
          f"buffers (eval.batch_size={experiment.eval.batch_size}), over "
          f"max_eval_memory_gb={budget_gb:g}")


def _task_config(task: str, task_arg: str, braincore: bool = False) -> ml_collections.ConfigDict:
  arg = ",".join(a for a in (task_arg, "braincore" if braincore else "") if a)
  return importlib.import_module(f"configs.{task}").get_config(arg or None)


def cell_config(sweep_config: Mapping[str, Any], task: str, model: str,
                seed: int) -> ml_collections.ConfigDict:
  """The experiment config of one trained cell (before the equal-budget MLP width and the
  evaluation lengths, which `parse_config` sets).

  The task's probe config (`configs/<task>.py`, variant `task_arg`; with `braincore` for the
  brain-core models), then the sweep's sections: `task.<task>` (TaskConfig fields), `model`
  (KernelConfig fields; the shared sizes reach the peers and the brain-core too), `peer`,
  `braincore`, `train`, `eval`; then the model's own fields and `train.seed`.
  """
  is_braincore = model in BRAINCORE_MODELS
  config = _task_config(task, sweep_config.get("task_arg", ""), is_braincore)
  for key, value in _section(sweep_config.get("task") or {}, task).items():
    config.task[key] = value
  # Capacity of the training model: the training length (the harness raises it per eval length).
  config.model.max_seq_len = kernel_family.capacity(config.task.seq_len, config.task.leaf_size)
  config.peer.max_seq_len = config.task.seq_len
  sections = ("model", "peer", "braincore", "train", "eval") if is_braincore else (
      "model", "peer", "train", "eval")
  for name in sections:
    for key, value in _section(sweep_config, name).items():
      config[name][key] = tuple(value) if isinstance(value, list) else value
  config.train.seed = seed
  config.train.oracle = config.eval.oracle = model == ORACLE
  if model in PEERS:
    config.model_type = model
  elif is_braincore:
    config.model_type = BRAINCORE
    config.braincore.max_seq_len = config.task.seq_len
    for key in SHARED_SIZES:
      config.braincore[key] = config.model[key]
    for key, value in BRAINCORE_OVERRIDES[model].items():
      config.braincore[key] = value
  else:
    config.model_type = "kernel"
    if model.startswith("multi_root") and config.model.num_roots < 2:
      raise ValueError(f"{model} needs the probe config's model.num_roots >= 2, got "
                       f"{config.model.num_roots}")
    for key, value in kernel_overrides(model, config.model.num_roots).items():
      config.model[key] = value
  return config


def _check_sections(config: Mapping[str, Any]) -> None:
  unknown = sorted(set(config) - set(FIELDS))
  if unknown:
    raise ValueError(f"config got unknown field(s) {unknown}; known fields: {list(FIELDS)}")
  if config.get("task_arg", "") not in TASK_ARGS:
    raise ValueError(f"config.task_arg must be one of {list(TASK_ARGS)}, got "
                     f"{config.get('task_arg')!r}")
  tasks = _section(config, "task")
  unknown = sorted(set(tasks) - set(probes.TASKS))
  if unknown:
    raise ValueError(f"config.task has unknown task(s) {unknown}; known: {list(probes.TASKS)}")
  for name in ("model", "peer", "braincore", "train", "eval"):
    _section(config, name)
  if not isinstance(config.get("match_params", True), bool):
    raise ValueError(f"config.match_params must be a bool, got {config.get('match_params')!r}")
  budget = config.get("max_eval_memory_gb", 2.0)
  if (not isinstance(budget, (int, float)) or isinstance(budget, bool) or not math.isfinite(budget)
      or budget <= 0):
    raise ValueError(f"config.max_eval_memory_gb must be a positive number, got {budget!r}")


def parse_config(config: Union[ml_collections.ConfigDict, Mapping[str, Any]]) -> Sweep:
  """Validates a sweep config and builds its cells; traces shapes, compiles nothing.

  Raises:
    ValueError: naming the field (and, for a cell's experiment config, the cell) of the first
      invalid setting.
  """
  if hasattr(config, "to_dict"):
    config = config.to_dict()
  _check_sections(config)
  tasks = _names("tasks", config.get("tasks"), probes.TASKS)
  models = _names("models", config.get("models"), MODELS)
  seeds = _ints("seeds", config.get("seeds"), 0)
  factors = _ints("length_factors", config.get("length_factors"), 1)
  match = config.get("match_params", True)
  budget = float(config.get("max_eval_memory_gb", 2.0))
  # An evaluation-only model needs its source trained.
  trained = [m for m in MODELS if m in models and m not in EVAL_ONLY]
  trained += [EVAL_ONLY[m][0] for m in models if m in EVAL_ONLY and EVAL_ONLY[m][0] not in trained]

  cells = []
  for task in tasks:
    budgets = {}  # The equal budget of each family: its full model's parameter count.
    for model in [m for m in MODELS if m in trained]:
      for seed in seeds:
        raw = cell_config(config, task, model, seed)
        try:
          experiment = experiment_lib.parse_config(raw)
        except ValueError as e:
          raise ValueError(f"{task} / {model}: {e}") from e
        full = BRAINCORE if model in BRAINCORE_MODELS else FULL_KERNEL
        # Every model that leaves a memory out (the brain-core's boundary rules change none).
        leaves_out = (model in KERNEL_MODELS and model != FULL_KERNEL
                      or "without" in BRAINCORE_OVERRIDES.get(model, {}))
        if match and leaves_out:
          if full not in budgets:
            budgets[full] = costs.num_params(
                experiment_lib.parse_config(cell_config(config, task, full, seed)).model)
          section = "braincore" if model in BRAINCORE_MODELS else "model"
          raw[section].mlp_dim = match_mlp_dim(experiment.model, budgets[full]).mlp_dim
        train_len = experiment.task.seq_len
        lengths = (train_len,) + tuple(dict.fromkeys(f * train_len for f in factors if f != 1))
        raw.eval.lengths = (train_len,)  # The harness evaluates the training length.
        as_dict = raw.to_dict()
        try:  # The task must be valid at every length.
          experiment = experiment_lib.parse_config({**as_dict, "eval": {**as_dict["eval"],
                                                                   "lengths": lengths}})
        except ValueError as e:
          raise ValueError(f"{task} / {model}: {e}") from e
        skipped = {length: reason for length in lengths
                   if (reason := _skip_reason(experiment, length, budget))}
        evaluation = {"lengths": lengths, "skipped": sorted(skipped)}
        cell = Cell(task, model, seed, os.path.join(RUNS_DIR, task, model, f"seed{seed}"),
                    as_dict, _config_hash(as_dict, evaluation), lengths, skipped)
        cells.append(cell)
        for derived, (source, interventions) in EVAL_ONLY.items():
          if source == model and derived in models:
            cells.append(dataclasses.replace(
                cell, model=derived, workdir=os.path.join(RUNS_DIR, task, derived, f"seed{seed}"),
                config_hash=_config_hash(as_dict, {
                    **evaluation, "interventions": dataclasses.asdict(interventions)}),
                source=cell.workdir, interventions=interventions))
  # Run order: task, then model, then seed (the seeds of a model share compiled evaluations).
  order = {m: i for i, m in enumerate(MODELS)}
  order.update({d: order[s] + 0.5 for d, (s, _) in EVAL_ONLY.items()})
  cells.sort(key=lambda c: (tasks.index(c.task), order[c.model], c.seed))
  return Sweep(tasks, models, seeds, factors, match, budget, tuple(cells))


def parameter_budget(config: Union[ml_collections.ConfigDict, Mapping[str, Any]],
                     task: str) -> dict[str, dict[str, int]]:
  """{model: {"params", "mlp_dim"}} of the nine kernel configurations on `task` as the sweep
  builds them (equal-budget MLP widths when `match_params`); shapes only, nothing compiled."""
  if hasattr(config, "to_dict"):
    config = config.to_dict()
  sweep = parse_config({**config, "tasks": task, "models": ",".join(KERNEL_MODELS),
                        "seeds": str(_ints("seeds", config.get("seeds"), 0)[0])})
  out = {}
  for cell in sweep.cells:
    model_config = KernelConfig.from_dict(cell.config["model"])
    out[cell.model] = {"params": costs.num_params(model_config),
                       "mlp_dim": model_config.mlp_hidden}
  return {model: out[model] for model in KERNEL_MODELS}


# ------------------------------------------------------------------------------------------------
# State per token.


def state_bytes(model_config: Any, length: int,
                interventions: Interventions = NONE) -> dict[str, Any]:
  """Memory-state bytes per token of one sequence of `length` tokens, for any family.

  Args:
    model_config: the model at `length` (its capacity).
    length: tokens in the sequence.
    interventions: a source they drop is not counted as read.

  Returns:
    {"state_bytes_per_token": the recurrent form's memory (`init_memory` at the capacity, shapes
    only) / length, "state_bytes_per_token_read": the part its configuration reads
    (`costs.state_bytes_read`), "state_bytes_formula": how they are computed}.
  """
  return {"state_bytes_per_token": costs.state_bytes(model_config) / length,
          "state_bytes_per_token_read":
              costs.state_bytes_read(model_config, interventions.drop) / length,
          "state_bytes_formula": f"init_memory(capacity {model_config.max_seq_len}) / T"}


# ------------------------------------------------------------------------------------------------
# Evaluation.


def evaluate(experiment: experiment_lib.Experiment, params, lengths: Sequence[int], *,
             interventions: Interventions = NONE,
             mesh: Optional[Mesh] = None) -> dict[str, dict[str, float]]:
  """`evaluate.evaluate` (the harness's batches and metrics) under the cell's `interventions`."""
  return evaluate_lib.evaluate(experiment, params, lengths=lengths,
                               interventions=None if interventions == NONE else interventions,
                               mesh=mesh)


def _is_out_of_memory(error: Exception) -> bool:
  text = str(error)
  return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def _compact_audit(report: Optional[Mapping[str, Any]]) -> Optional[dict[str, Any]]:
  """The auditor's headline numbers: reference, each source's verdict, each intervention's delta."""
  if not report:
    return None
  keep = ("loss_delta", "loss_delta_se", "accuracy_delta", "kl")
  return {
      "length": report.get("length"),
      "num_scored": report["num_scored"],
      "reference": {k: report["reference"][k] for k in ("loss", "accuracy")},
      "sources": {s: {k: v[k] for k in ("verdict", "utility", "utility_se", "gate_mean")}
                  for s, v in report["sources"].items()},
      "interventions": {n: {k: v.get(k) for k in keep}
                        for n, v in report["interventions"].items()},
      "dead_weight": list(report["dead_weight"]),
  }


# ------------------------------------------------------------------------------------------------
# Running cells.


def _read_json(path: str) -> Optional[Any]:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _last_train_time(workdir: str) -> Optional[float]:
  path = os.path.join(workdir, experiment_lib.METRICS_FILE)
  if not os.path.exists(path):
    return None
  last = None
  with open(path) as f:
    for line in f:
      if line.strip():
        row = json.loads(line)
        if row.get("split") == "train":
          last = row["time"]
  return last


def _finished(cell: Cell, out_dir: str) -> Optional[dict]:
  """The cell's stored result if it is finished; raises if it was made with another config."""
  record = _read_json(os.path.join(out_dir, cell.workdir, CELL_FILE))
  if record is None:
    return None
  if record["config_hash"] != cell.config_hash:
    # pylint: disable=protected-access
    differences = train_lib._config_differences(record["config"], cell.config)
    raise ValueError(
        f"{os.path.join(out_dir, cell.workdir)} was finished with a different config (hash "
        f"{record['config_hash']}, now {cell.config_hash}): "
        + "; ".join(differences or ["lengths or intervention"])
        + ". Use another --out, or delete that cell to redo it.")
  return record


def pending_cells(sweep: Sweep, out_dir: str) -> list[Cell]:
  """The sweep's cells not finished in `out_dir`, in run order.

  Raises:
    ValueError: a finished cell was made with another config (its result would be stale).
  """
  return [cell for cell in sweep.cells if _finished(cell, out_dir) is None]


def _run_cell(cell: Cell, out_dir: str, command: str, mesh: Mesh) -> dict:
  """Trains (or resumes) and evaluates one cell; writes and returns its `result.json` record."""
  workdir = os.path.join(out_dir, cell.workdir)
  os.makedirs(workdir, exist_ok=True)
  start = time.time()
  train_wall_s = None
  config = ml_collections.ConfigDict(cell.config)
  experiment = experiment_lib.parse_config(config)
  if cell.trains:
    summary = _read_json(os.path.join(workdir, experiment_lib.EVAL_FILE))
    # A finished run is not trained again; one stopped early (or meant for more steps) resumes.
    if summary is None or summary["step"] != experiment.train.steps:
      try:
        summary = train_lib.train_and_evaluate(config, workdir)
      except train_lib.NonFiniteLossError as e:  # A result: recorded, and the sweep goes on.
        logging.warning("%s failed: %s", cell.label, e)
        summary = {"failed": f"training diverged: {e}"}
      last = _last_train_time(workdir)
      train_wall_s = last - start if last and last > start else None
    source = workdir
  else:
    source = os.path.join(out_dir, cell.source)
    summary = _read_json(os.path.join(source, experiment_lib.EVAL_FILE))
    if summary is None:
      failed = (_read_json(os.path.join(source, CELL_FILE)) or {}).get("failed")
      if not failed:
        raise FileNotFoundError(f"{cell.label} reads the checkpoint of {source}, which has no "
                                f"{experiment_lib.EVAL_FILE} yet")
      summary = {"failed": f"{cell.source}: {failed}"}
  if "failed" in summary:
    summary.update(step=None, num_params=costs.num_params(experiment.model))
  lengths = {}
  todo = [length for length in cell.lengths
          if length not in cell.skipped and "failed" not in summary]
  if "failed" in summary:
    lengths = {str(length): {"failed": summary["failed"]} for length in cell.lengths}
  if cell.trains and todo:  # The harness evaluated the training length.
    lengths[str(cell.lengths[0])] = summary["lengths"][str(cell.lengths[0])]
    todo = todo[1:] if todo and todo[0] == cell.lengths[0] else todo
  if todo:
    _, params = runs_lib.load_run(source)
    for length in todo:
      try:
        lengths.update(evaluate(experiment, params, (length,), interventions=cell.interventions,
                                mesh=mesh))
      except Exception as e:  # pylint: disable=broad-except
        if not _is_out_of_memory(e):
          raise
        lengths[str(length)] = {"skipped": f"out of memory at T={length}: {str(e)[:300]}"}
  for length, reason in cell.skipped.items():
    lengths[str(length)] = {"skipped": reason}
  record = {
      "task": cell.task, "model": cell.model, "seed": cell.seed, "failed": summary.get("failed"),
      "model_type": experiment.model_type, "oracle": experiment.eval.oracle,
      "workdir": cell.workdir, "source": cell.source,
      "interventions": dataclasses.asdict(cell.interventions) if not cell.trains else None,
      "config_hash": cell.config_hash, "config": cell.config, "command": command,
      "steps": summary["step"], "params": summary["num_params"],
      "mlp_dim": getattr(experiment.model, "mlp_hidden",
                         experiment.model.mlp_ratio * experiment.model.d_model),
      "train_length": cell.lengths[0],
      "lengths": {str(length): lengths[str(length)] for length in cell.lengths},
      "state": {str(length): state_bytes(experiment.model_for_length(length), length,
                                         cell.interventions)
                for length in cell.lengths},
      "audit": _compact_audit(summary.get("audit")) if cell.trains else None,
      "train_wall_s": train_wall_s,
      "wall_s": time.time() - start,
  }
  runs_lib.write_json(os.path.join(workdir, CELL_FILE), record)
  return record


def _format_duration(seconds: Optional[float]) -> str:
  if seconds is None:
    return "?"
  return train_lib._format_duration(seconds)  # pylint: disable=protected-access


def _brief(record: Mapping[str, Any]) -> str:
  parts = []
  for length, m in record["lengths"].items():
    status = next((k for k in ("skipped", "failed") if k in m), None)
    parts.append(f"{length}: " + (status or f"{m['accuracy']:.3f}"))
  return "acc " + ", ".join(parts)


def run(config: Union[ml_collections.ConfigDict, Mapping[str, Any]], out_dir: str,
        command: str = "") -> list[dict]:
  """Runs (or resumes) the sweep and writes the results, tables and plots.

  Args:
    config: a sweep config (`configs/ablate.py:get_config`).
    out_dir: output directory (created); cells go to `out_dir/runs`.
    command: the command line that ran it, recorded in every row and table.
  Returns:
    The rows written to `out_dir/results.jsonl` (every finished cell under `out_dir`).
  Raises:
    ValueError: an invalid config, or a finished cell made with another config (before anything
      is compiled).
  """
  sweep = parse_config(config)
  os.makedirs(out_dir, exist_ok=True)
  todo = pending_cells(sweep, out_dir)
  logging.info("Ablation sweep: %d cells (%d tasks x %d models x %d seeds), %d finished, %d to "
               "run, into %s.", len(sweep.cells), len(sweep.tasks),
               len({c.model for c in sweep.cells}), len(sweep.seeds), len(sweep.cells) - len(todo),
               len(todo), out_dir)
  mesh = evaluate_lib.make_mesh()
  begin = time.time()
  spent = {True: [], False: []}
  for i, cell in enumerate(todo):
    logging.info("[%d/%d] %s: %s", i + 1, len(todo), cell.label, "training" if cell.trains
                 else f"evaluating {cell.source} under {cell.interventions}")
    t = time.time()
    record = _run_cell(cell, out_dir, command, mesh)
    spent[cell.trains].append(time.time() - t)
    rest = todo[i + 1:]
    per_cell = {k: (np.mean(v) if v else np.mean(spent[True] or spent[False]))
                for k, v in spent.items()}
    eta = sum(per_cell[c.trains] for c in rest)
    logging.info("[%d/%d] %s done in %s | %s | elapsed %s, ETA %s", i + 1, len(todo), cell.label,
                 _format_duration(time.time() - t), _brief(record),
                 _format_duration(time.time() - begin), _format_duration(eta))
    write_rows(collect_rows(out_dir), out_dir)
  rows = collect_rows(out_dir)
  paths = write_results(rows, out_dir)
  logging.info("Wrote %s in %s.", ", ".join(os.path.basename(p) for p in paths), out_dir)
  return rows


# ------------------------------------------------------------------------------------------------
# Results: rows, tables, plots.


def cell_rows(record: Mapping[str, Any]) -> list[dict]:
  """The results rows (one per evaluation length) of a cell's `result.json` record."""
  rows = []
  train_length = record["train_length"]
  for length, m in record["lengths"].items():
    reason = m.get("skipped") or m.get("failed")
    status = "skipped" if "skipped" in m else "failed" if "failed" in m else "ok"
    recall = {k.split("/")[0]: v for k, v in sorted(m.items()) if k.endswith("/routing_recall")}
    rows.append({
        "task": record["task"], "model": record["model"], "seed": record["seed"],
        "length": int(length), "length_factor": int(length) // train_length,
        "train_length": train_length,
        "status": status, "reason": reason,
        "accuracy": None if reason else m["accuracy"],
        # The binomial standard error over the cell's questions (absent in rows made before it).
        "accuracy_se": None if reason else m.get("accuracy_se"),
        "queries": None if reason else m.get("queries"),
        "loss": None if reason else m["loss"],
        "routing_recall": recall or None,
        "params": record["params"], "mlp_dim": record["mlp_dim"],
        **record["state"][length],
        "train_wall_s": record["train_wall_s"], "steps": record["steps"],
        "model_type": record["model_type"], "oracle": record["oracle"],
        "evaluated_from": record["source"], "interventions": record["interventions"],
        "config_hash": record["config_hash"], "command": record["command"],
        "workdir": record["workdir"], "audit": record["audit"],
    })
  return rows


def _sort_key(row: Mapping[str, Any]):
  task = probes.TASKS.index(row["task"]) if row["task"] in probes.TASKS else len(probes.TASKS)
  model = MODELS.index(row["model"]) if row["model"] in MODELS else len(MODELS)
  return (task, model, row["seed"], row["length"])


def collect_rows(out_dir: str) -> list[dict]:
  """Rows of every finished cell under `out_dir/runs`, ordered by task, model, seed, length."""
  rows = []
  for root, _, files in os.walk(os.path.join(out_dir, RUNS_DIR)):
    if CELL_FILE in files:
      rows.extend(cell_rows(_read_json(os.path.join(root, CELL_FILE))))
  return sorted(rows, key=_sort_key)


def write_rows(rows: Sequence[Mapping[str, Any]], out_dir: str) -> str:
  path = os.path.join(out_dir, RESULTS_FILE)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")
  os.replace(tmp, path)
  return path


def write_results(rows: Sequence[Mapping[str, Any]], out_dir: str) -> list[str]:
  """Writes results.jsonl, results.md and the two plots; returns their paths."""
  paths = [write_rows(rows, out_dir), os.path.join(out_dir, TABLES_FILE)]
  with open(paths[1], "w") as f:
    f.write(markdown(rows))
  paths.append(plot_accuracy(rows, os.path.join(out_dir, ACCURACY_PLOT)))
  paths.append(plot_learning_curves(rows, out_dir, os.path.join(out_dir, CURVES_PLOT)))
  return paths


def _mean_spread(values: Sequence[float]) -> tuple[float, float]:
  """Mean and half the range (the spread the tables report)."""
  values = np.asarray(values, float)
  return float(values.mean()), float((values.max() - values.min()) / 2)


def _grouped(rows: Sequence[Mapping[str, Any]]) -> dict:
  """{task: {model: {length: [rows over seeds]}}}, in table order."""
  out = {}
  for row in sorted(rows, key=_sort_key):
    out.setdefault(row["task"], {}).setdefault(row["model"], {}).setdefault(
        row["length"], []).append(row)
  return out


def _fmt_bytes(x: float) -> str:
  return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def markdown(rows: Sequence[Mapping[str, Any]]) -> str:
  """The results tables (see the module docstring)."""
  lines = ["# memkernel ablations", "",
           "Produced by `memkernel.sweeps.ablate` (how: `docs/results/README.md`). Accuracy on the scored "
           "positions at each evaluation length: mean ± half the range over seeds (n = seeds). "
           "`skipped`: the model cannot run there; `failed`: training diverged (reasons in "
           "results.jsonl). Params and state "
           "bytes per token (held / read by the configuration) at the training length.", ""]
  for task, by_model in _grouped(rows).items():
    first = next(iter(next(iter(by_model.values())).values()))[0]
    lengths = sorted({length for m in by_model.values() for length in m})
    commands = sorted({r["command"] for m in by_model.values() for rs in m.values() for r in rs})
    lines += [f"## {task} (trained at {first['train_length']} tokens)", ""]
    lines += [f"`{c or '(library call)'}`" for c in commands] + [""]
    header = ["model", "n", "params", "MLP", "state B/token"]
    header += [f"{length} ({length // first['train_length']}×)" for length in lengths]
    header += ["train s"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model, by_length in by_model.items():
      base = by_length[min(by_length)][0]
      seeds = {r["seed"] for rs in by_length.values() for r in rs}
      cells = [model, str(len(seeds)), f"{base['params']:,}", str(base["mlp_dim"]),
               f"{_fmt_bytes(base['state_bytes_per_token'])} / "
               f"{_fmt_bytes(base['state_bytes_per_token_read'])}"]
      for length in lengths:
        rs = by_length.get(length, [])
        ok = [r["accuracy"] for r in rs if r["status"] == "ok"]
        if ok:
          mean, spread = _mean_spread(ok)
          cells.append(f"{mean:.3f} ± {spread:.3f}" + ("" if len(ok) == len(rs) else "*"))
        else:
          cells.append(rs[0]["status"] if rs else "–")
      times = [r["train_wall_s"] for r in by_length[min(by_length)] if r["train_wall_s"]]
      cells.append(f"{np.mean(times):.0f}" if times else "–")
      lines.append("| " + " | ".join(cells) + " |")
    lines.append("")

    recall_models = {m: bl for m, bl in by_model.items()
                     if any(r["routing_recall"] for rs in bl.values() for r in rs)}
    if recall_models:
      lines += ["Routing recall (the answer leaf among the leaves read), per layer, mean over "
                "seeds:", ""]
      header = ["model"] + [str(length) for length in lengths]
      lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
      for model, by_length in recall_models.items():
        cells = [model]
        for length in lengths:
          rs = [r for r in by_length.get(length, []) if r["routing_recall"]]
          if not rs:
            cells.append("–")
            continue
          layers = sorted(rs[0]["routing_recall"])
          cells.append(" / ".join(f"{np.mean([r['routing_recall'][k] for r in rs]):.2f}"
                                  for k in layers))
        lines.append("| " + " | ".join(cells) + " |")
      lines.append("")

    audited = {m: bl[min(bl)] for m, bl in by_model.items() if bl[min(bl)][0]["audit"]}
    if audited:
      lines += ["Memory audit at the training length: utility = loss increase (nats per scored "
                "token) when the source is removed, mean over seeds, and the verdicts:", ""]
      sources = sorted(s for s in fusion.SOURCES if s != fusion.TRUNK) + ["memory"]
      header = ["model"] + sources + ["roots", "dead weight"]
      lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
      for model, rs in audited.items():
        cells = [model]
        for source in sources + ["roots"]:
          names = ([s for s in rs[0]["audit"]["sources"] if s.startswith("root_")]
                   if source == "roots" else [source])
          parts = []
          for name in names:
            values = [r["audit"]["sources"][name] for r in rs]
            verdicts = sorted({v["verdict"] for v in values})
            utilities = [v["utility"] for v in values if v["utility"] is not None]
            parts.append((f"{np.mean(utilities):+.3f} " if utilities else "")
                         + "/".join(verdicts))
          cells.append("; ".join(parts))
        dead = sorted({d for r in rs for d in r["audit"]["dead_weight"]})
        cells.append(", ".join(dead) or "–")
        lines.append("| " + " | ".join(cells) + " |")
      lines.append("")
  return "\n".join(lines)


def _style(model: str) -> dict:
  import matplotlib  # pylint: disable=g-import-not-at-top  (plots only)
  index = MODELS.index(model) if model in MODELS else 0
  # tab20's strong shades first (10 distinct colours), then its light ones.
  color = matplotlib.colormaps["tab20"]((2 * index) % 20 + (2 * index) // 20)
  if model in PEERS:
    linestyle = ":"
  elif model == ORACLE:
    linestyle = "-."
  else:
    linestyle = "--" if model.startswith("single_root") else "-"
  return dict(color=color, linestyle=linestyle, marker="o", markersize=3)


def _figure(num: int):
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top  (plots only)
  cols = min(num, 3)
  rows = -(-num // cols)
  fig = Figure(figsize=(5 * cols + 3, 3.6 * rows), layout="constrained")
  axes = fig.subplots(rows, cols, squeeze=False).ravel()
  for ax in axes[num:]:
    ax.set_visible(False)
  return fig, axes


def _legend(fig, axes) -> None:
  """One legend for every panel (a model missing from the first panel is still listed)."""
  entries = {}
  for ax in axes:
    for handle, label in zip(*ax.get_legend_handles_labels()):
      entries.setdefault(label, handle)
  if entries:
    labels = [m for m in MODELS if m in entries] + [m for m in entries if m not in MODELS]
    fig.legend([entries[m] for m in labels], labels, loc="outside right center", fontsize=7)


def plot_accuracy(rows: Sequence[Mapping[str, Any]], path: str) -> str:
  """Accuracy vs evaluation length, one panel per task, one line per model (mean, spread bars)."""
  grouped = _grouped(rows)
  fig, axes = _figure(max(len(grouped), 1))
  for ax, (task, by_model) in zip(axes, grouped.items()):
    for model, by_length in by_model.items():
      xs, ys, es = [], [], []
      for length, rs in sorted(by_length.items()):
        ok = [r["accuracy"] for r in rs if r["status"] == "ok"]
        if ok:
          mean, spread = _mean_spread(ok)
          xs.append(length), ys.append(mean), es.append(spread)
      if xs:
        ax.errorbar(xs, ys, yerr=es, label=model, capsize=2, **_style(model))
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({length for by_length in by_model.values() for length in by_length}))
    ax.get_xaxis().set_major_formatter("{x:.0f}")
    ax.minorticks_off()
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(task)
    ax.set_xlabel("evaluation length (tokens)")
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
  _legend(fig, axes)
  fig.savefig(path, dpi=100)
  return path


def plot_learning_curves(rows: Sequence[Mapping[str, Any]], out_dir: str, path: str) -> str:
  """Training loss vs step (each run's metrics.jsonl), one panel per task, mean over seeds."""
  workdirs = {}
  for row in rows:
    if row["evaluated_from"] is None:
      workdirs.setdefault((row["task"], row["model"]), set()).add(row["workdir"])
  tasks = list(dict.fromkeys(task for task, _ in sorted(
      workdirs, key=lambda k: _sort_key({"task": k[0], "model": k[1], "seed": 0, "length": 0}))))
  fig, axes = _figure(max(len(tasks), 1))
  for ax, task in zip(axes, tasks):
    for model in [m for m in MODELS if (task, m) in workdirs]:
      curves = {}
      for workdir in sorted(workdirs[(task, model)]):
        metrics = os.path.join(out_dir, workdir, experiment_lib.METRICS_FILE)
        if not os.path.exists(metrics):
          continue
        with open(metrics) as f:
          for line in f:
            r = json.loads(line)
            if r.get("split") == "train" and r.get("loss") is not None:
              curves.setdefault(r["step"], []).append(r["loss"])
      if curves:
        steps = sorted(curves)
        ax.plot(steps, [np.mean(curves[s]) for s in steps], label=model,
                **{**_style(model), "marker": None})
    ax.set_yscale("log")
    ax.set_title(task)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (scored positions)")
    ax.grid(alpha=0.3)
  _legend(fig, axes)
  fig.savefig(path, dpi=100)
  return path

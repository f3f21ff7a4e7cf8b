r"""The ablation sweep: nine memory configurations, two peers and oracle routes on the five probes.

  GLIBC_TUNABLES=glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736 \
      python -m experiments.ablate --config=configs/ablate.py --out=runs/ablate
  python -m experiments.ablate --config=configs/ablate.py:smoke --out=/tmp/ablate_smoke  # CI-sized
  python -m experiments.ablate --config=configs/ablate.py:gpu --out=runs/ablate_gpu
  python -m experiments.ablate --config=configs/ablate.py --out=runs/ablate \
      --config.tasks=mqar --config.models=multi_root/no_memory,dense --config.seeds=0

Default (CPU): every probe scaled down to 128-token training sequences (8 leaves), the probe
configs' model (`configs/common.py`) at d_model 64 and 2 layers, evaluated at 1x, 4x, 16x and 64x
(128 ... 8192 tokens), 2 seeds: 5 tasks x 11 trained models x 2 seeds plus the evaluation-only
model. Sized for a few hours on a 2-core CPU (measured: docs/results/sweep_cost/); it
resumes, so it may be run in pieces (`--config.tasks=...`).

`arg` variants (after the colon):
  smoke   1 task (mqar), the full kernel, its no-exact-read evaluation and the dense peer,
          1 seed, 4 steps of the probes' smoke variant, lengths 1x and 4x: what CI runs.
  gpu     the probes at their own sizes (512-token training, e.g. MQAR with 32 pairs), d_model
          128, 2000 steps, lengths up to 64x (32k tokens), 3 seeds.

Fields:
  tasks           comma-separated subset of copy, mqar, induction, noisy_retrieval, far_compare
                  (the default), passkey, cross_doc.
  models          comma-separated subset of `memkernel.sweeps.ablate.MODELS` (the nine kernel
                  configurations, dense, sliding_window, oracle; and, not in the default, the
                  brain-core's: braincore, braincore/no_working, braincore/no_episodic,
                  braincore/no_procedural, braincore/lifelong_off). The evaluation-only model
                  (multi_root/sparse_retrieval_without_exact_read) trains the full kernel too.
  seeds           comma-separated seeds; every cell runs once per seed.
  length_factors  evaluation lengths as multiples of the training length (the training length
                  is always evaluated).
  match_params    give every kernel configuration the MLP width that matches the full kernel's
                  parameter count (`KernelConfig.mlp_dim`).
  max_eval_memory_gb  a peer whose attention scores at an evaluation length would need more is
                  recorded as skipped there.
  task_arg        the variant of the probe configs the cells start from ('' or 'smoke').
  task.<name>     `TaskConfig` fields of probe <name> (seq_len, num_pairs, ...).
  model           `KernelConfig` fields for every cell (d_model, num_layers and mlp_ratio reach the
                  peers too). Starts as the probe configs' defaults; the sweep pins the sizes.
  peer            `PeerConfig` fields (num_heads, window); width, depth and MLP ratio follow
                  `model`.
  braincore       `BrainCoreConfig` fields of the brain-core models (the probe configs'
                  `:braincore`); width, depth and MLP ratio follow `model`.
  train, eval     the harness's sections (`memkernel.train`), without seed, oracle and lengths.
"""

from __future__ import annotations

import importlib
from typing import Optional

import ml_collections

ARGS = ("smoke", "gpu")
TASKS = "copy,mqar,induction,noisy_retrieval,far_compare"
EXTRA_TASKS = ("passkey", "cross_doc")  # Probes a sweep may name in `tasks`; not in the default.
MODELS = ",".join((
    "single_root/no_memory", "multi_root/no_memory",
    "single_root/summaries_only", "single_root/sparse_retrieval",
    "single_root/sparse_retrieval+exact_read",
    "multi_root/summaries_only", "multi_root/sparse_retrieval",
    "multi_root/sparse_retrieval_without_exact_read", "multi_root/sparse_retrieval+exact_read",
    "dense", "sliding_window", "oracle"))
# Set per cell by the sweep (memkernel.sweeps.ablate), so not copied into the sweep's sections.
_PER_CELL = {"model": ("vocab_size", "leaf_size", "max_seq_len", "num_roots", "use_tree_read",
                       "use_exact_read", "route_descend"),
             # The peers share the kernel's width, depth and MLP ratio: set them in `model`.
             "peer": ("vocab_size", "max_seq_len", "d_model", "num_layers", "mlp_ratio"),
             "braincore": ("vocab_size", "max_seq_len", "d_model", "num_layers", "mlp_ratio",
                           "mlp_dim", "without"),
             "train": ("seed", "oracle"),
             "eval": ("lengths", "oracle")}
# The CPU sweep's probes: 128-token training sequences, the probe's structure otherwise.
CPU_TASKS = {
    "copy": dict(seq_len=128),
    "mqar": dict(seq_len=128, num_pairs=8),
    "induction": dict(seq_len=128, num_pairs=4),
    "noisy_retrieval": dict(seq_len=128, num_pairs=4),
    "far_compare": dict(seq_len=128, num_compares=8),
}


def _probe(task: str, task_arg: str) -> ml_collections.ConfigDict:
  return importlib.import_module(f"configs.{task}").get_config(task_arg or None)


def _probe_sections(task_arg: str) -> dict:
  """The probe configs' sections (`configs/common.py` defaults), less what each cell sets."""
  probe = _probe("mqar", ",".join(a for a in (task_arg, "braincore") if a))
  return {name: {k: v for k, v in probe[name].to_dict().items() if k not in fields}
          for name, fields in _PER_CELL.items()}


def _task_sections(task_arg: str, sizes: dict) -> ml_collections.ConfigDict:
  """Every probe's own TaskConfig fields (so each is overridable, also of the probes not in the
  default `tasks`: passkey, cross_doc), updated with `sizes`."""
  return ml_collections.ConfigDict({
      task: {**{k: v for k, v in _probe(task, task_arg).task.to_dict().items() if k != "name"},
             **sizes.get(task, {})}
      for task in TASKS.split(",") + list(EXTRA_TASKS)})


def get_config(arg: Optional[str] = None) -> ml_collections.ConfigDict:
  names = {a.strip() for a in (arg or "").split(",") if a.strip()}
  unknown = sorted(names - set(ARGS))
  if unknown:
    raise ValueError(f"unknown config arg(s) {unknown}; known: {list(ARGS)}")
  if len(names) > 1:
    raise ValueError(f"config args {sorted(names)} are exclusive")
  task_arg = "smoke" if "smoke" in names else ""
  sections = _probe_sections(task_arg)

  config = ml_collections.ConfigDict()
  config.tasks = TASKS
  config.models = MODELS
  config.seeds = "0,1"
  config.length_factors = "1,4,16,64"
  config.match_params = True
  config.max_eval_memory_gb = 2.0
  config.task_arg = task_arg
  config.task = _task_sections(task_arg, CPU_TASKS)
  config.model = ml_collections.ConfigDict(dict(sections["model"], mlp_dim=0))
  config.peer = ml_collections.ConfigDict(sections["peer"])
  config.braincore = ml_collections.ConfigDict(sections["braincore"])
  config.train = ml_collections.ConfigDict(sections["train"])
  config.eval = ml_collections.ConfigDict(sections["eval"])

  # CPU sizes (cost measured in docs/results/sweep_cost/): pinned, so tuning the probe
  # defaults does not change the sweep's cost.
  config.model.update(dict(d_model=64, num_layers=2))
  config.peer.window = 64  # Half the training length, as the probes' 256 of 512.
  config.train.update(dict(steps=150, batch_size=8, warmup_steps=15, log_every=25,
                           eval_every=0, ckpt_every=50))
  config.eval.update(dict(batches=2, batch_size=8, audit_batches=1))

  if "gpu" in names:
    config.task = _task_sections(task_arg, {})  # The probes' own sizes.
    config.seeds = "0,1,2"
    config.max_eval_memory_gb = 24.0
    config.model.update(dict(d_model=128, num_layers=2))
    config.peer.window = 256
    config.train.update(dict(steps=2000, batch_size=32, warmup_steps=100, log_every=50,
                             ckpt_every=500))
    config.eval.update(dict(batches=8, batch_size=8, audit_batches=4))
  if "smoke" in names:
    config.tasks = "mqar"
    config.models = ("multi_root/sparse_retrieval+exact_read,"
                     "multi_root/sparse_retrieval_without_exact_read,dense")
    config.seeds = "0"
    config.length_factors = "1,4"
    config.task = _task_sections(task_arg, {})  # The probes' smoke sizes.
    config.model.update(dict(d_model=16, num_layers=1))
    config.peer.window = 32
    config.train.update(dict(steps=4, batch_size=4, warmup_steps=1, log_every=2, ckpt_every=4))
    config.eval.update(dict(batches=1, batch_size=2, audit_batches=1))
  return config

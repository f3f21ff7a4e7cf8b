"""Defaults shared by every probe config, and the `arg` variants they all accept.

Layout of an experiment config (`memkernel.train.parse_config` validates it):

  model_type  'kernel' | 'dense' | 'sliding_window' | 'braincore': which model trains.
  model       `memkernel.KernelConfig` fields (the kernel).
  peer        `memkernel.peers.PeerConfig` fields except `kind` (the attention peers).
  braincore   `memkernel.braincore.BrainCoreConfig` fields (only with the `braincore` arg, so the
              other configs, and the sweeps' hashes of them, are unchanged).
  task        `memkernel.probes.TaskConfig` fields.
  train       seed, steps, batch_size, lr, schedule, warmup_steps, decay_steps, weight_decay,
              clip_norm, log_every, eval_every, ckpt_every, keep_checkpoints, max_nonfinite, oracle,
              narrow_beam_at, tensorboard, route_hints, hints_every, hints_batches,
              hints_alpha, hints_gate.
  eval        batches, batch_size, lengths, oracle, audit_batches.

Sizes the kernel and its peers must share (vocab_size, d_model, num_layers, mlp_ratio) and sizes the
task and the kernel must share (vocab_size, leaf_size) are one `FieldReference` each, so
`--config.model.d_model=128` changes the kernel, the peers and nothing else in step.

`arg` (after the colon in `--config=configs/mqar.py:ARG`) is a comma-separated list of:
  smoke            tiny model, short sequences, ~20 steps: trains in seconds (tests, CI).
  dense, sliding_window, kernel, braincore   the model_type.
  oracle           feed the true answer leaves to the exact read (train and eval).
"""

from __future__ import annotations

from typing import Any, Optional

import ml_collections

MODEL_TYPES = ("kernel", "dense", "sliding_window", "braincore")
ARGS = ("smoke",) + MODEL_TYPES + ("oracle",)


def parse_arg(arg: Optional[str]) -> set[str]:
  """The set of variant names in `arg`; unknown names raise ValueError."""
  names = {a.strip() for a in (arg or "").split(",") if a.strip()}
  unknown = sorted(names - set(ARGS))
  if unknown:
    raise ValueError(f"unknown config arg(s) {unknown}; known: {list(ARGS)}")
  model_types = names & set(MODEL_TYPES)
  if len(model_types) > 1:
    raise ValueError(f"config arg names more than one model type: {sorted(model_types)}")
  return names


def get_config(task: dict[str, Any], arg: Optional[str] = None, *,
               smoke_task: Optional[dict[str, Any]] = None) -> ml_collections.ConfigDict:
  """The full experiment config for one probe task.

  Args:
    task: TaskConfig fields of the full-size task (vocab_size, seq_len, leaf_size are shared with
      the model; the other fields are the task's own).
    arg: the variant string (see the module docstring).
    smoke_task: TaskConfig fields that override `task` in the smoke variant.
  """
  names = parse_arg(arg)
  task = dict(task)
  if "smoke" in names:
    task.update(smoke_task or {})
  vocab_size = ml_collections.FieldReference(task.pop("vocab_size", 256))
  leaf_size = ml_collections.FieldReference(task.pop("leaf_size", 16))
  d_model = ml_collections.FieldReference(64)
  num_layers = ml_collections.FieldReference(2)
  mlp_ratio = ml_collections.FieldReference(4)
  seq_len = task.pop("seq_len", 512)

  config = ml_collections.ConfigDict()
  config.model_type = "kernel"

  config.model = ml_collections.ConfigDict(dict(
      vocab_size=vocab_size,
      d_model=d_model,
      num_layers=num_layers,
      mlp_ratio=mlp_ratio,
      leaf_size=leaf_size,
      num_roots=2,
      num_route_heads=4,
      beam_width=2,
      # Measured on MQAR (docs/results/merge_rerank/): training with the evaluation beam from step 0
      # works once shift_init breaks the find/read deadlock, and beats a wide training beam.
      train_beam_width=0,
      teacher_weight=1.0,
      # The teacher trains the router at the positions the task loss scores (docs/results/teacher/:
      # at every position, the unscored ones' arbitrary attention drowned the probes' queries).
      teacher_positions="scored",
      # Each level's teacher softmax also holds the query's smaller Fenwick nodes, so the router
      # learns the mixed-size comparisons its beam makes (docs/results/teacher/).
      teacher_cross_level=True,
      # Off: it hurt routing beyond the training length (docs/results/salience/).
      salience_weight=0.0,
      teacher_queries=256,    # Every scored position of every probe (copy at 512 scores 255).
      tree_merge="pooled",
      leaf_rerank=True,
      read_sink=False,
      # Capacity of the training model; the harness raises it to fit task.seq_len (and each eval
      # length), rounded up to a power-of-two number of leaves. Parameters do not depend on it.
      max_seq_len=seq_len,
      use_tree_read=True,
      use_exact_read=True,
      head_dim=0,
      # Wide routing keys: better MQAR than 2 * head_dim (docs/results/merge_rerank/); 64 holds
      # the probes too (docs/results/route_dim/).
      route_dim=128,
      conv_width=4,
      # Tokens the memory projections read apart from the trunk: 2 (the token and the one before)
      # instead of conv_width's 4: fewer FLOPs, the probes unchanged (docs/results/memory_lags/).
      memory_lags=2,
      # lax.scan: as fast as associative_scan at these widths, and faster to compile
      # (docs/design.md).
      scan_impl="linear",
      min_timescale=1.0,
      max_timescale=256.0,
  ))

  config.peer = ml_collections.ConfigDict(dict(
      vocab_size=vocab_size,
      d_model=d_model,
      num_layers=num_layers,
      mlp_ratio=mlp_ratio,
      num_heads=4,
      window=256,
      max_seq_len=seq_len,
  ))

  config.task = ml_collections.ConfigDict(dict(
      vocab_size=vocab_size, leaf_size=leaf_size, seq_len=seq_len, **task))

  config.train = ml_collections.ConfigDict(dict(
      seed=0,
      # Minutes on a 2-core CPU (wall times per probe: docs/results/probes/).
      steps=400,
      batch_size=8,
      lr=3e-3,
      schedule="cosine",      # 'cosine' (warmup, then cosine to 10% of lr) or 'constant'.
      warmup_steps=40,
      decay_steps=0,          # Length of the cosine decay; 0 means `steps`.
      weight_decay=0.01,
      clip_norm=1.0,
      log_every=10,
      eval_every=200,         # In-training eval at the train length; 0 disables it.
      ckpt_every=100,
      keep_checkpoints=3,
      max_nonfinite=20,       # Consecutive non-finite losses tolerated before the run stops.
      oracle=False,
      narrow_beam_at=0,       # From this step on, train with the evaluation beam (0: never).
      tensorboard=False,      # Also write TensorBoard event files (workdir/tensorboard/).
      route_hints="off",      # 'traces': train with routing hints from its own read traces.
      hints_every=25,         # Steps between rebuilds of the hint table.
      hints_batches=2,        # Batches each rebuild reads.
      hints_alpha=16.0,       # The hints' weight on routing scores.
      hints_gate=0.5,         # Held-out read hit rate a head needs to get hints.
  ))

  config.eval = ml_collections.ConfigDict(dict(
      batches=8,
      batch_size=8,
      lengths=(seq_len,),     # A tuple so `--config.eval.lengths='(512, 2048)'` works.
      oracle=False,
      audit_batches=2,        # Batches the memory auditor runs on at the final eval; 0: off.
      stream="test",          # 'test' (report) or 'validation' (tune): disjoint eval streams.
  ))

  if "braincore" in names:
    # Seed 002's memories at the probes' widths; the seed's own sizes are the field defaults.
    # Every token an episodic candidate, the gate trained by hindsight and writing above 1/2
    # (docs/results/braincore/: the seed's one candidate per span stores one fact per span, and
    # a gate without the teacher let filler evict the facts).
    span = ml_collections.FieldReference(64)  # Plasticity span; every token a candidate.
    config.braincore = ml_collections.ConfigDict(dict(
        vocab_size=vocab_size,
        d_model=d_model,
        num_layers=num_layers,
        mlp_ratio=mlp_ratio,
        num_heads=4,
        window=256,
        em_items=256,
        em_k=4,
        em_key_dim=64,
        em_writes=span,
        em_features="input",
        em_threshold=0.5,
        em_write_gate="learned",
        em_teacher=1.0,
        em_target="first",
        em_novelty_init=4.0,
        em_decay=0.999,
        pm_rank=8,
        pm_lr=0.1,
        pm_decay=0.99,
        pm_budget=1.0,
        span=span,
        plasticity=True,
        without="",             # Memories left out (the sweep's ablations): working,episodic,...
        mlp_dim=0,              # 0: mlp_ratio * d_model.
        token_shift=True,
        wm_rope=False,
        scan_impl="linear",
        core_boundary="reset",
        wm_boundary="reset",
        em_boundary="decay",
        pm_boundary="decay",
        boundary_decay=0.5,
        max_seq_len=seq_len,
    ))
  for model_type in MODEL_TYPES:
    if model_type in names:
      config.model_type = model_type
  if "oracle" in names:
    config.train.oracle = True
    config.eval.oracle = True
  if "smoke" in names:
    make_smoke(config, d_model=d_model, num_layers=num_layers)
  return config


def make_smoke(config: ml_collections.ConfigDict, *, d_model: ml_collections.FieldReference,
               num_layers: ml_collections.FieldReference) -> None:
  """Shrinks `config` in place to something that trains in seconds on a CPU."""
  d_model.set(16)
  num_layers.set(1)
  config.model.mlp_ratio = 2
  config.model.num_roots = 2
  config.model.route_dim = 0
  config.model.max_timescale = 32.0
  config.peer.window = 32
  if "braincore" in config:
    config.braincore.update(dict(window=32, em_items=16, em_key_dim=16, pm_rank=4, span=16))
  config.train.update(dict(steps=20, batch_size=4, warmup_steps=2, log_every=5, eval_every=0,
                           ckpt_every=10))
  # Two lengths, so the smoke run also exercises evaluation beyond the training length.
  config.eval.update(dict(batches=1, batch_size=4, audit_batches=0,
                          lengths=(config.task.seq_len, 2 * config.task.seq_len)))

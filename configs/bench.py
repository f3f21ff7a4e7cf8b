r"""Scaling benchmark: the kernel against dense attention, sliding-window attention, a pure scan and
the brain-core.

  python -m experiments.bench --config=configs/bench.py --out=/tmp/bench
  python -m experiments.bench --config=configs/bench.py:smoke --out=/tmp/bench_smoke   # seconds
  python -m experiments.bench --config=configs/bench.py --out=/tmp/bench_fwd \
      --config.models=kernel,dense --config.lengths=8192,32768 --config.modes=forward

Default: the issue's setting, d_model 256, 4 layers, batch 1, lengths 256 ... 64k (dense attention
stops at `quadratic_max_length` = 8k; everything else runs every length the budget allows), modes
forward, train, scan, decode, with the kernel's components and observability at every length.
Expect hours on a 2-core CPU; select models / lengths / modes to measure less.

`arg` variants (after the colon): `smoke` (tiny: d 32, 1 layer, lengths 64 and 128, 2 timed
runs; what the tests run).

CPU: the command restarts itself with `bench.RECOMMENDED_GLIBC_TUNABLES` where GLIBC_TUNABLES is
unset (glibc reads them only at start; `--allocator=inherit` keeps the environment). Large fresh
XLA buffers are otherwise page-faulted on every call, which slows some points down (measured:
docs/bench/README.md); the run records the setting in bench.md. Run nothing else on the machine.

GPU: the same command runs unchanged (JAX picks the accelerator; install `.[cuda12]`). The memory
budget then defaults to 80% of the device's memory, `measured_peak_bytes` comes from the device
allocator, the trunk uses the parallel scan (`scan_impl` associative; lax.scan on the CPU), the
kernel routes and reads every query at once and dense attention is unblocked (`query_block` 0;
blocks of 512 on the CPU, for memory), and f32 matmuls may use TF32 unless
`JAX_DEFAULT_MATMUL_PRECISION=highest` is set (bench_meta.json records the device and the setting
as `matmul_precision`).

Fields:
  models        comma-separated subset of kernel, dense, sliding_window, scan, braincore,
                dense_params, sliding_window_params (the two peers with their MLP widened to
                the kernel's parameter count; the others are measured at its width).
  modes         comma-separated subset of forward, train, scan, decode.
  lengths       comma-separated sequence lengths (8k, 32k accepted).
  components    time the kernel's components at every length.
  observability kernel routing / tree / root diagnostics with each kernel forward point.
  batch_size, warmup, repeats, decode_steps, seed.
  max_point_s   time budget of one point, seconds (compile + warm-up + timed calls).
  max_memory_gb memory budget of one point; 0 = 80% of the accelerator's memory, or on the CPU
                of the memory available when the run starts.
  quadratic_max_length  longest length dense attention runs at; 0 = no limit but the budget.
  ceiling_size  size of the square matmul that measures the machine's GFLOP/s.
  model         every `memkernel.KernelConfig` field except max_seq_len (set from each length);
                the ones not listed in `get_config` keep the library's defaults. The train mode
                uses `train=True`: the training beam and the dense routing teacher (O(T^2), a
                short-length training aid) are off here; set train_beam_width / teacher_weight
                to measure them.
  peer          every `memkernel.peers.PeerConfig` field except kind and max_seq_len.
  braincore     every `memkernel.braincore.BrainCoreConfig` field except max_seq_len (the
                seed's memories at the kernel's width).
  targets       lengths of the issue's target ratios in bench.md.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import ml_collections

from memkernel.kernel.config import KernelConfig
from memkernel.braincore.config import BrainCoreConfig
from memkernel.peers import PeerConfig

ARGS = ("smoke",)
LENGTHS = "256,512,1024,2048,4096,8192,16384,32768,65536"


def _defaults(cls, exclude: tuple[str, ...]) -> dict:
  """A config class's default field values (every field is overridable from the command line)."""
  return {f.name: f.default for f in dataclasses.fields(cls)
          if f.name not in exclude and f.default is not dataclasses.MISSING}


def get_config(arg: Optional[str] = None) -> ml_collections.ConfigDict:
  names = {a.strip() for a in (arg or "").split(",") if a.strip()}
  unknown = sorted(names - set(ARGS))
  if unknown:
    raise ValueError(f"unknown config arg(s) {unknown}; known: {list(ARGS)}")
  vocab_size = ml_collections.FieldReference(256)
  d_model = ml_collections.FieldReference(256)
  num_layers = ml_collections.FieldReference(4)
  mlp_ratio = ml_collections.FieldReference(4)

  config = ml_collections.ConfigDict()
  config.models = "kernel,dense,sliding_window,scan,braincore,dense_params,sliding_window_params"
  config.modes = "forward,train,scan,decode"
  config.lengths = LENGTHS
  config.components = True
  config.observability = True
  config.batch_size = 1
  config.warmup = 1
  config.repeats = 5
  config.decode_steps = 32
  config.max_point_s = 900.0
  config.max_memory_gb = 0.0
  config.quadratic_max_length = 8192
  config.ceiling_size = 2048
  config.seed = 0

  config.model = ml_collections.ConfigDict(dict(
      _defaults(KernelConfig, ("max_seq_len",)),
      vocab_size=vocab_size,
      d_model=d_model,
      num_layers=num_layers,
      mlp_ratio=mlp_ratio,
      num_roots=2,
      leaf_size=16,
      num_route_heads=4,
      beam_width=2,
      train_beam_width=0,
      teacher_weight=0.0,
      leaf_rerank=True,       # As the probe configs train it.
      # On the CPU lax.scan is as fast as associative_scan at d 256, batch 1, and faster to
      # compile; on an accelerator a 32k-step lax.scan is latency-bound, so the parallel scan
      # (docs/design.md, "Trunk scan").
      scan_impl="linear" if jax.default_backend() == "cpu" else "associative",
      # Route and read the queries in blocks of 512 on the CPU (bounds the gathered tokens of a
      # 32k train step to fit 24 GiB); on an accelerator all at once: the blocks run one after
      # another under lax.map, which made an H200's 8k forward slower (docs/bench/gpu_h200/).
      query_block=512 if jax.default_backend() == "cpu" else 0,
  ))

  config.peer = ml_collections.ConfigDict(dict(
      _defaults(PeerConfig, ("kind", "max_seq_len")),
      vocab_size=vocab_size,
      d_model=d_model,
      num_layers=num_layers,
      mlp_ratio=mlp_ratio,
      num_heads=4,
      window=256,
      # Dense attention over checkpointed blocks of 512 queries on the CPU (same values): its 8k
      # train step would otherwise not fit a 24 GiB machine (docs/bench/train_memory/).
      # Unblocked on an accelerator, where the blocks only cost time (docs/bench/gpu_h200/).
      query_block=512 if jax.default_backend() == "cpu" else 0,
  ))

  config.braincore = ml_collections.ConfigDict(dict(
      _defaults(BrainCoreConfig, ("max_seq_len",)),
      vocab_size=vocab_size,
      d_model=d_model,
      num_layers=num_layers,
      mlp_ratio=mlp_ratio,
      num_heads=4,
      window=256,
      scan_impl="linear" if jax.default_backend() == "cpu" else "associative",
  ))

  config.targets = ml_collections.ConfigDict(dict(
      short_length=8192, long_length=32768, decode_short=1024, decode_long=32768))

  if "smoke" in names:
    d_model.set(32)
    num_layers.set(1)
    mlp_ratio.set(2)
    vocab_size.set(64)
    config.lengths = "64,128"
    config.repeats = 2
    config.decode_steps = 2
    config.ceiling_size = 256
    config.peer.window = 32
    config.braincore.update(dict(window=32, em_items=8, em_key_dim=16, pm_rank=4, span=16))
    config.targets.update(dict(short_length=64, long_length=128, decode_short=64,
                               decode_long=128))
  return config

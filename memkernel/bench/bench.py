"""Scaling benchmark of the kernel and its peers, in one process: throughput, memory, observability.

    rows = run(configs.bench.get_config(), "/tmp/bench")

is everything `experiments/bench.py` does. It measures, at each sequence length and at the same
width and depth:

* models: `kernel` (`KernelModel`), `dense` and `sliding_window` (`memkernel.peers`), `scan`
  (the kernel with its memory off: `use_tree_read=False, use_exact_read=False`, the trunk alone)
  and `braincore` (`memkernel.braincore`, bounded working, episodic and procedural memory);
* modes: `forward` (the parallel form), `train` (forward + backward + the project's AdamW update,
  jitted, state donated), `scan` (the recurrent form `model.scan` from an empty memory: the
  kernel's tree, the dense peer's KV cache, the window's ring buffer) and `decode` (`model.step`
  latency per token at a context of `length` tokens, the memory prefilled with `model.scan`);
* components of the kernel, one layer, timed as standalone jitted functions on random inputs of the
  model's shapes: the parallel form's `summarize` (every leaf's summary), `tree_build`, `route`
  (`routing.route_beam` for every query) and `exact_read` (`read.exact_read` for every query), and
  the decoding form's per-event work: `append` (one token into the live leaf), `seal` (one leaf's
  summary and its K/V into the token cache), `tree_update` (`tree.insert_leaf`), `route_token` and
  `read_token` (one query at the full context);
* kernel observability at each length, from the forward's aux on random tokens and untrained
  parameters (see `observe`).

Per point: tokens/s, the median / min / max wall time of `repeats` timed calls after `warmup`
calls, compile time (ahead-of-time `lower().compile()`, kept out of the timed calls), the analytic
matmul FLOPs (`memkernel.costs`) and the achieved GFLOP/s against the machine's
own f32 matmul GFLOP/s, measured in the same run (`matmul_gflops`).

Peak memory. `peak_mem_bytes` is XLA's buffer assignment for the compiled call (`xla_memory`:
arguments + outputs - donated + temporaries, so the parameters, the optimiser state and the memory
pytree are included). It is per point, deterministic, known before the call runs (points over the
budget are skipped, not run) and the same on every backend (docs/bench/README.md compares it with
the measured peak). Beside it, `measured_peak_bytes` is what the process actually used, with its source in
`measured_peak_source`: on a GPU/TPU the device allocator's `peak_bytes_in_use` minus `bytes_in_use`
before the point (the allocator's peak is a process-wide high-water mark, so it only counts when
the point raised it); on the CPU the rise of the process's resident high-water mark (`VmHWM`, reset
through `/proc/self/clear_refs` before the timed calls) over the resident size before them. With
the recommended `GLIBC_TUNABLES` freed memory stays resident: reuse of it hides a point's memory
and heap fragmentation inflates it, so read the CPU measurement as a cross-check only.

Budget: a point whose estimated peak memory (`costs.activation_bytes` before compiling, then
XLA's after compiling) exceeds `max_memory_gb`, or whose predicted or first-call time would take it
past `max_point_s`, is recorded with `status: "skipped"` and the reason; so are the longer lengths
of a model and mode already over budget. Any other exception is recorded as `status: "error"`.
Rows are written to `DIR/bench.json` after every point, so an interrupted run keeps what it had.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import math
import os
import platform
import statistics
import time
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from memkernel import costs
from memkernel import experiment as experiment_lib
from memkernel import family as family_lib
from memkernel import fields
from memkernel import metrics as metrics_lib
from memkernel import optim
from memkernel import runs as runs_lib
from memkernel.bench import report as bench_report
from memkernel.kernel import family as kernel_family
from memkernel.kernel import read as read_lib
from memkernel.kernel import routing
from memkernel.kernel import tree as tree_lib
from memkernel.kernel.config import KernelConfig
from memkernel.kernel.model import KernelModel
from memkernel.braincore.config import BrainCoreConfig
from memkernel.peers import PeerConfig

MODELS = ("kernel", "dense", "sliding_window", "scan", "braincore", "dense_params",
          "sliding_window_params")
# Peers at the kernel's parameter count (their MLP widened), beside the peers at its width.
PARAM_MATCHED = {"dense_params": "dense", "sliding_window_params": "sliding_window"}
MODES = ("forward", "train", "scan", "decode")
# Kernel components: the parallel form's whole-sequence work, then the decoding form's events.
SEQUENCE_COMPONENTS = bench_report.SEQUENCE_COMPONENTS
EVENT_COMPONENTS = bench_report.EVENT_COMPONENTS
COMPONENTS = SEQUENCE_COMPONENTS + EVENT_COMPONENTS
KERNEL_VARIANTS = ("kernel", "scan")  # the kernel, and the kernel with its memory off
QUADRATIC_MODELS = ("dense", "dense_params")
JSON_FILE, META_FILE, MD_FILE = "bench.json", "bench_meta.json", "bench.md"
PLOT_FILES = bench_report.PLOT_FILES
RECOMMENDED_GLIBC_TUNABLES = (
    "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736")
# Share of the device's memory a point may use when `max_memory_gb` is 0 (auto).
_AUTO_MEMORY_FRACTION = 0.8
# Event components are microseconds each: time at least this many calls.
_MIN_EVENT_REPEATS = 20


# ------------------------------------------------------------------------------------------------
# Configuration.


def _parse_names(field: str, value: Any, known: Sequence[str]) -> tuple[str, ...]:
  items = value.split(",") if isinstance(value, str) else list(value)
  names = tuple(str(v).strip() for v in items if str(v).strip())
  if not names:
    raise ValueError(f"config.{field} must name at least one of {list(known)}, got {value!r}")
  unknown = [n for n in names if n not in known]
  if unknown:
    raise ValueError(f"config.{field} names unknown {unknown}; known: {list(known)}")
  return tuple(dict.fromkeys(names))


def _parse_lengths(value: Any) -> tuple[int, ...]:
  items = value.split(",") if isinstance(value, str) else list(value)
  lengths = []
  for item in items:
    text = str(item).strip().lower()
    if not text:
      continue
    try:
      length = int(text[:-1]) * 1024 if text.endswith("k") else int(text)
    except ValueError:
      raise ValueError(f"config.lengths must be comma-separated positive integers (or 8k, 32k), "
                       f"got {value!r}") from None
    if length <= 0:
      raise ValueError(f"config.lengths must be positive, got {length} in {value!r}")
    lengths.append(length)
  if not lengths:
    raise ValueError(f"config.lengths must hold at least one length, got {value!r}")
  return tuple(sorted(set(lengths)))


@dataclasses.dataclass(frozen=True)
class Targets:
  """Lengths at which bench.md computes the issue's target ratios.

  Attributes:
    short_length: kernel vs dense attention, and the base of the scaling ratio (8k).
    long_length: kernel vs sliding window, peak memory, the top of the scaling ratio (32k).
    decode_short, decode_long: decode latency at these contexts are compared (1k, 32k).
  """

  short_length: int = 8192
  long_length: int = 32768
  decode_short: int = 1024
  decode_long: int = 32768


@dataclasses.dataclass(frozen=True)
class BenchConfig:
  """A validated benchmark config (layout and defaults in `configs/bench.py`).

  Attributes:
    models, modes, lengths: what to measure (every model x length x mode is one row).
    components: time the kernel's components at every length (needs 'kernel' in models).
    observability: record the kernel's routing / tree / root diagnostics with its forward.
    batch_size: sequences per call (B).
    warmup: untimed calls after compiling (>= 1); repeats: timed calls per point (median, min,
      max).
    decode_steps: timed `model.step` calls per decode point.
    max_point_s: time budget of one point (compile + warm-up + timed calls), seconds.
    max_memory_bytes: memory budget of one point; 0 means 80% of the accelerator's memory, or on
      the CPU of the memory available at the start (resolved by `run`).
    quadratic_max_length: longest length for dense attention (longer points are skipped); 0 = none.
    ceiling_size: square f32 matmul size for the machine's GFLOP/s ceiling.
    seed: parameters and random tokens.
    kernel: the kernel's KernelConfig (max_seq_len is set per length).
    peer: PeerConfig fields shared by both attention peers (kind and max_seq_len set per point).
    braincore: BrainCoreConfig fields (max_seq_len set per point).
    targets: lengths of the target ratios in bench.md.
  """

  models: tuple[str, ...]
  modes: tuple[str, ...]
  lengths: tuple[int, ...]
  components: bool
  observability: bool
  batch_size: int
  warmup: int
  repeats: int
  decode_steps: int
  max_point_s: float
  max_memory_bytes: int
  quadratic_max_length: int
  ceiling_size: int
  seed: int
  kernel: KernelConfig
  peer: Mapping[str, Any]
  braincore: Mapping[str, Any]
  targets: Targets

  def model_config(self, model: str, length: int):
    """The config of `model` with a capacity of at least `length` tokens."""
    if model in KERNEL_VARIANTS:
      config = dataclasses.replace(self.kernel,
                                   max_seq_len=kernel_family.capacity(length, self.kernel.leaf_size))
      if model == "scan":
        config = dataclasses.replace(config, use_tree_read=False, use_exact_read=False)
      return config
    if model == "braincore":
      return BrainCoreConfig.from_dict({**self.braincore, "max_seq_len": length})
    if model in PARAM_MATCHED:
      kind = PARAM_MATCHED[model]
      ratio = matched_mlp_ratio(self.kernel, tuple(sorted(self.peer.items())), kind)
      return PeerConfig.from_dict({**self.peer, "kind": kind, "max_seq_len": length,
                                   "mlp_ratio": ratio})
    return PeerConfig.from_dict({**self.peer, "kind": model, "max_seq_len": length})


@functools.lru_cache(maxsize=None)
def param_count(config) -> int:
  """Parameters of the model `config` describes (shapes only: nothing is compiled or allocated;
  no parameter depends on the capacity)."""
  module = family_lib.build(config)
  tokens = jnp.zeros((1, 16), jnp.int32)
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), tokens))
  return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes["params"]))


@functools.lru_cache(maxsize=None)
def matched_mlp_ratio(kernel: KernelConfig, peer: tuple, kind: str) -> int:
  """The peer's MLP ratio whose parameter count is nearest the kernel's (`peer`: the peer
  section's sorted items). Parameters grow linearly with the ratio, so two counts settle it."""
  target = param_count(dataclasses.replace(kernel, max_seq_len=kernel.leaf_size))
  count = lambda r: param_count(PeerConfig.from_dict({**dict(peer), "kind": kind,
                                                      "max_seq_len": 16, "mlp_ratio": r}))
  per_unit = count(2) - count(1)
  guess = max(1, round((target - count(1)) / per_unit) + 1)
  return min((r for r in (guess - 1, guess, guess + 1) if r >= 1),
             key=lambda r: abs(count(r) - target))


_FIELDS = ("models", "modes", "lengths", "components", "observability", "batch_size", "warmup",
           "repeats", "decode_steps", "max_point_s", "max_memory_gb", "quadratic_max_length",
           "ceiling_size", "seed", "model", "peer", "braincore", "targets")


def parse_config(config: ml_collections.ConfigDict | Mapping[str, Any]) -> BenchConfig:
  """Validates a benchmark config; compiles nothing.

  Raises:
    ValueError: naming the field and the value of the first invalid setting.
  """
  if hasattr(config, "to_dict"):
    config = config.to_dict()
  unknown = sorted(set(config) - set(_FIELDS))
  missing = sorted(set(_FIELDS) - set(config))
  if unknown or missing:
    raise ValueError(f"bench config fields must be {list(_FIELDS)}; unknown: {unknown}, "
                     f"missing: {missing}")
  for name in ("batch_size", "warmup", "repeats", "decode_steps", "ceiling_size"):
    fields.check_int("config", name, config[name], 1)
  for name in ("seed", "quadratic_max_length"):
    fields.check_int("config", name, config[name], 0)
  fields.check_number("config", "max_point_s", config["max_point_s"], 0.0, strict=True)
  fields.check_number("config", "max_memory_gb", config["max_memory_gb"], 0.0, strict=False)
  for name in ("components", "observability"):
    if not isinstance(config[name], bool):
      raise ValueError(f"config.{name} must be a bool, got {config[name]!r}")
  model = dict(config["model"])
  if "max_seq_len" in model:
    raise ValueError("config.model.max_seq_len is not a field: the benchmark sets the capacity "
                     "from each length")
  lengths = _parse_lengths(config["lengths"])
  capacity = kernel_family.capacity(max(lengths), model.get("leaf_size", 16))
  kernel = KernelConfig.from_dict({**model, "max_seq_len": capacity})
  peer = dict(config["peer"])
  for name in ("kind", "max_seq_len"):
    if name in peer:
      raise ValueError(f"config.peer.{name} is not a field: the benchmark sets it per point")
  for kind in ("dense", "sliding_window"):
    PeerConfig.from_dict({**peer, "kind": kind, "max_seq_len": max(lengths)})
  for name in ("vocab_size", "d_model", "num_layers", "mlp_ratio"):
    if peer.get(name) != getattr(kernel, name):
      raise ValueError(f"config.peer.{name}={peer.get(name)!r} must equal config.model.{name}="
                       f"{getattr(kernel, name)!r}: peers are measured at the kernel's size")
  braincore = dict(config["braincore"])
  if "max_seq_len" in braincore:
    raise ValueError("config.braincore.max_seq_len is not a field: the benchmark sets it per point")
  braincore_config = BrainCoreConfig.from_dict({**braincore, "max_seq_len": max(lengths)},
                                               "config.braincore")
  for name in ("vocab_size", "d_model", "num_layers", "mlp_ratio"):
    if getattr(braincore_config, name) != getattr(kernel, name):
      raise ValueError(f"config.braincore.{name}={getattr(braincore_config, name)!r} must equal "
                       f"config.model.{name}={getattr(kernel, name)!r}: every model is measured "
                       "at the kernel's size")
  targets = fields.from_mapping(Targets, config["targets"], "config.targets")
  for f in dataclasses.fields(Targets):
    fields.check_int("targets", f.name, getattr(targets, f.name), 1)
  return BenchConfig(
      models=_parse_names("models", config["models"], MODELS),
      modes=_parse_names("modes", config["modes"], MODES),
      lengths=lengths, components=config["components"], observability=config["observability"],
      batch_size=config["batch_size"], warmup=config["warmup"], repeats=config["repeats"],
      decode_steps=config["decode_steps"], max_point_s=float(config["max_point_s"]),
      max_memory_bytes=int(config["max_memory_gb"] * 2**30),
      quadratic_max_length=config["quadratic_max_length"],
      ceiling_size=config["ceiling_size"], seed=config["seed"], kernel=kernel, peer=peer,
      braincore=braincore, targets=targets)


def allocator_environment(environ: Mapping[str, str]) -> Optional[dict[str, str]]:
  """The environment to restart a CPU benchmark with: `environ` plus the recommended
  GLIBC_TUNABLES, or None where nothing changes (they are set, or JAX runs on an accelerator).
  glibc reads the tunables only when a process starts, so the command re-executes itself."""
  if environ.get("GLIBC_TUNABLES") or jax.default_backend() != "cpu":
    return None
  return dict(environ, GLIBC_TUNABLES=RECOMMENDED_GLIBC_TUNABLES)


def _auto_memory_budget() -> int:
  """80% of the accelerator's memory; on the CPU, 80% of the memory available when the run starts.

  Available, not physical: other processes' memory is not ours to budget, and a point that
  outgrows what is left is killed by the kernel's OOM killer, which takes the run with it. The
  estimates the budget is checked against (XLA's buffer assignment, dense attention's scores)
  undercount a CPU point's resident peak beside what the process already holds: on 24 GiB,
  dense attention's 8k train step (~17 GiB of scores) was killed, so set `max_memory_gb` with a
  margin on a small machine.
  """
  stats = _device_memory_stats()
  if stats and stats.get("bytes_limit"):
    return int(_AUTO_MEMORY_FRACTION * stats["bytes_limit"])
  available_kb = _proc_kb("/proc/meminfo", "MemAvailable")
  if available_kb is not None:
    return int(_AUTO_MEMORY_FRACTION * available_kb * 1024)
  return int(_AUTO_MEMORY_FRACTION * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


# ------------------------------------------------------------------------------------------------
# Analytic costs (`memkernel.costs`).


def per_token_costs(bench: BenchConfig, lengths: Sequence[int]) -> list[dict]:
  """Analytic cost of one decoded token at each context length n: kernel vs dense attention.

  FLOPs of a one-token `step` (recurrent form) at capacity n (`memkernel.costs`): the kernel's
  routing part is O(log n) (log2(N) + 1 Fenwick nodes, then 2K children per level), the rest O(1);
  dense attention scores its n-slot KV cache. State: the `init_memory` pytree at capacity n (shapes
  only), per token of context. One sequence; float32.
  """
  rows = []
  for n in lengths:
    config = bench.model_config("kernel", n)
    parts = costs.flops_by_part(config, 1, form="recurrent")
    peer = bench.model_config("dense", n)
    rows.append({
        "length": n, "tree_levels": config.num_leaves.bit_length(),
        "kernel_flops_per_token": sum(parts.values()),
        "kernel_route_flops_per_token": parts.get("route", 0),
        "kernel_state_bytes_per_token": costs.state_bytes(config) / n,
        "dense_flops_per_token": costs.flops(peer, 1, form="recurrent"),
        "dense_kv_bytes_per_token": costs.state_bytes(peer) / n,
    })
  return rows


def per_token_costs_markdown(rows: Sequence[dict]) -> str:
  """`per_token_costs` as a markdown table."""
  lines = ["| context n | tree levels | kernel FLOPs/token | of which routing | dense FLOPs/token "
           "| dense / kernel | kernel state B/token | dense KV B/token |",
           "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
  for r in rows:
    lines.append(
        f"| {r['length']:,} | {r['tree_levels']} | {r['kernel_flops_per_token'] / 1e6:.2f} M "
        f"| {r['kernel_route_flops_per_token'] / 1e3:.1f} k | {r['dense_flops_per_token'] / 1e6:.2f} M "
        f"| {r['dense_flops_per_token'] / r['kernel_flops_per_token']:.2f} "
        f"| {r['kernel_state_bytes_per_token']:,.0f} | {r['dense_kv_bytes_per_token']:,} |")
  return "\n".join(lines) + "\n"


def point_flops(bench: BenchConfig, model: str, mode: str, length: int) -> int:
  """Analytic FLOPs of one call of a point (batch included)."""
  config = bench.model_config(model, length)
  if mode == "decode":
    return bench.batch_size * costs.flops(config, 1, form="recurrent")
  form = "recurrent" if mode == "scan" else "parallel"
  return bench.batch_size * costs.flops(config, length, form=form, train=mode == "train")


def component_flops(config: KernelConfig, name: str, length: int, batch_size: int) -> int:
  """Analytic FLOPs of one call of a kernel component (one layer)."""
  one_layer = dataclasses.replace(config, num_layers=1)
  if name in ("route", "exact_read", "summarize"):
    return batch_size * costs.flops_by_part(one_layer, length).get(name, 0)
  if name in ("route_token", "read_token"):
    part = {"route_token": "route", "read_token": "exact_read"}[name]
    return batch_size * costs.flops_by_part(one_layer, 1).get(part, 0)
  if name == "seal":
    return batch_size * costs.flops_by_part(one_layer, 1, form="recurrent").get("summarize", 0)
  return 0


def matmul_gflops(size: int, repeats: int = 5) -> float:
  """The device's f32 matmul GFLOP/s: the median of `repeats` timed [size, size] products."""
  a = jnp.asarray(np.random.default_rng(0).standard_normal((size, size)), jnp.float32)
  f = jax.jit(lambda x, y: x @ y).lower(a, a).compile()
  jax.block_until_ready(f(a, a))
  times = []
  for _ in range(max(repeats, 3)):
    start = time.perf_counter()
    jax.block_until_ready(f(a, a))
    times.append(time.perf_counter() - start)
  return 2 * size ** 3 / statistics.median(times) / 1e9


# ------------------------------------------------------------------------------------------------
# Memory.


def _device_memory_stats() -> Optional[dict]:
  try:
    return jax.devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except
    return None


def _proc_kb(path: str, field: str) -> Optional[int]:
  """A kB field of a Linux /proc file (/proc/self/status, /proc/meminfo), or None."""
  try:
    with open(path) as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1])
  except OSError:
    pass
  return None


class _MemoryProbe:
  """Measures what a stretch of work adds to the process's (or device's) peak memory."""

  def __init__(self):
    self.source = None
    self.stats = _device_memory_stats()
    if self.stats and "peak_bytes_in_use" in self.stats:
      self.source = "device_memory_stats"
    elif _proc_kb("/proc/self/status", "VmHWM") is not None:
      self.source = "rss_hwm_delta"

  def start(self) -> None:
    if self.source == "device_memory_stats":
      stats = _device_memory_stats()
      self._before, self._peak_before = stats["bytes_in_use"], stats["peak_bytes_in_use"]
    elif self.source == "rss_hwm_delta":
      try:
        with open("/proc/self/clear_refs", "w") as f:
          f.write("5")  # Resets VmHWM to the current resident size.
        self._before = _proc_kb("/proc/self/status", "VmRSS") * 1024
      except OSError:
        self.source = None

  def stop(self) -> Optional[int]:
    if self.source == "device_memory_stats":
      stats = _device_memory_stats()
      if stats["peak_bytes_in_use"] <= self._peak_before:
        return None  # This point did not raise the process-wide peak: unknown.
      return stats["peak_bytes_in_use"] - self._before
    if self.source == "rss_hwm_delta":
      return max(_proc_kb("/proc/self/status", "VmHWM") * 1024 - self._before, 0)
    return None


def estimate_peak_bytes(bench: BenchConfig, model: str, mode: str, length: int) -> Optional[int]:
  """A pre-compile estimate of a parallel point's largest buffers (`costs.activation_bytes`:
  dense attention's O(T^2) scores); None for the recurrent modes and the families without one.
  """
  if mode not in ("forward", "train"):
    return None
  config = bench.model_config(model, length)
  return costs.activation_bytes(config, length, bench.batch_size, train=mode == "train")


def xla_memory(compiled) -> Optional[dict[str, int]]:
  """XLA's buffer assignment of a compiled call: what it holds while it runs, in bytes.

  Returns:
    {"arguments", "outputs", "aliased" (outputs written into donated arguments), "temporaries",
    "total" = arguments + outputs - aliased + temporaries}, or None where the backend has no
    memory analysis. (`peak_memory_in_bytes` is not used: XLA:CPU leaves the temporaries out of it.)
  """
  try:
    stats = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if stats is None:
    return None
  parts = {"arguments": stats.argument_size_in_bytes, "outputs": stats.output_size_in_bytes,
           "aliased": stats.alias_size_in_bytes, "temporaries": stats.temp_size_in_bytes}
  parts = {k: int(v) for k, v in parts.items()}
  parts["total"] = (parts["arguments"] + parts["outputs"] - parts["aliased"]
                    + parts["temporaries"])
  return parts


# ------------------------------------------------------------------------------------------------
# Points.


class Skip(Exception):
  """A point that is not run; the message is the recorded reason."""


class _Prepared(NamedTuple):
  """A jittable call and how to chain it.

  fn: the `jax.jit`-wrapped function; args: its first arguments; feed(out, args) -> the next
  call's arguments (threads donated state); tokens: tokens per call (batch included).
  """

  fn: Callable
  args: tuple
  feed: Callable
  tokens: int
  extra: dict


def _same(out, args):
  del out
  return args


class _Models:
  """Modules, parameters (one initialisation per model, reused at every length) and tokens."""

  def __init__(self, bench: BenchConfig):
    self.bench = bench
    self._params = {}
    self._tokens = {}
    self.num_params = {}

  def module(self, model: str, length: int):
    config = self.bench.model_config(model, length)
    return family_lib.build(config), config

  def params(self, model: str):
    if model not in self._params:
      module, config = self.module(model, 16)
      tokens = jnp.zeros((1, 16), jnp.int32)
      key = jax.random.key(self.bench.seed)
      self._params[model] = jax.jit(lambda k: module.init(k, tokens)["params"])(key)
      self.num_params[model] = optim.count_params(self._params[model])
    return self._params[model]

  def tokens(self, length: int) -> jax.Array:
    if length not in self._tokens:
      rng = np.random.default_rng(self.bench.seed + length)
      self._tokens = {length: jnp.asarray(rng.integers(
          0, self.bench.kernel.vocab_size, (self.bench.batch_size, length)), jnp.int32)}
    return self._tokens[length]


def _copy(tree):
  return jax.tree.map(jnp.copy, tree)


def _prepare_model_point(models: _Models, model: str, mode: str, length: int) -> _Prepared:
  bench = models.bench
  b = bench.batch_size
  module, config = models.module(model, length)
  params = models.params(model)
  tokens = models.tokens(length)

  if mode == "forward":
    fn = jax.jit(lambda p, x: module.apply({"params": p}, x)[0])
    return _Prepared(fn, (params, tokens), _same, b * length, {})

  if mode == "train":
    tx = optim.make_optimizer(experiment_lib.TrainConfig())

    def train_step(state, x):
      def loss_fn(p):
        logits, aux = module.apply({"params": p}, x, train=True)
        logp = jax.nn.log_softmax(logits[:, :-1])
        nll = -jnp.mean(jnp.take_along_axis(logp, x[:, 1:, None], axis=-1))
        return nll + sum(aux.losses.values())

      p, opt_state = state
      loss, grads = jax.value_and_grad(loss_fn)(p)
      updates, opt_state = tx.update(grads, opt_state, p)
      return (optax.apply_updates(p, updates), opt_state), loss

    p = _copy(params)
    fn = jax.jit(train_step, donate_argnums=0)
    return _Prepared(fn, ((p, tx.init(p)), tokens), lambda out, a: (out[0], a[1]), b * length, {})

  scan = jax.jit(lambda p, x, mem: module.apply({"params": p}, x, mem, method=module.scan),
                 donate_argnums=2)
  if mode == "scan":
    fresh = lambda: family_lib.init_memory(config, b)
    return _Prepared(scan, (params, tokens, fresh()),
                     lambda out, a: (a[0], a[1], fresh()), b * length, {})

  # decode: prefill a whole number of the family's alignment units (the kernel's leaves), then time
  # steps that end at `length` tokens.
  steps = bench.warmup + bench.decode_steps
  align = family_lib.of_config(config).segment_align(config)
  prefill = length - align * -(-steps // align)
  if prefill < 0:
    raise Skip(f"context {length} is shorter than the {steps} warm-up + timed decode steps")
  memory = family_lib.init_memory(config, b)
  # Tokens in the memory when each timed step starts: within one leaf (or so) below `length`.
  extra = {"context": length, "prefill_tokens": prefill,
           "context_timed": [prefill + bench.warmup, prefill + steps - 1]}
  if prefill:
    start = time.perf_counter()
    compiled = scan.lower(params, tokens[:, :prefill], memory).compile()
    extra["prefill_compile_s"] = time.perf_counter() - start
    start = time.perf_counter()
    _, memory = compiled(params, tokens[:, :prefill], memory)
    jax.block_until_ready(memory)
    extra["prefill_s"] = time.perf_counter() - start
  step = jax.jit(lambda p, x, mem: module.apply({"params": p}, x, mem, method=module.step),
                 donate_argnums=2)
  token = tokens[:, prefill]
  return _Prepared(step, (params, token, memory), lambda out, a: (a[0], a[1], out[1]), b, extra)


def _merge_kwargs(config: KernelConfig) -> dict:
  """The tree's merge rule, as the model passes it to `build_tree` / `insert_leaf`."""
  return {"pooled": config.tree_merge == "pooled"}


def _prepare_component(bench: BenchConfig, name: str, length: int) -> _Prepared:
  """One layer's component on random inputs of the kernel's shapes at context `length`.

  The tree functions are called as the model calls them: a leaf summary is whatever tuple
  `summarize_leaf` returns, the store is every array `build_tree` returns before the span.
  """
  config = bench.model_config("kernel", length)
  b, l, n = bench.batch_size, config.leaf_size, config.num_leaves
  h, e, p, k = config.num_route_heads, config.read_dim, config.key_dim, config.beam_width
  n_full = length // l
  merge = _merge_kwargs(config)
  rng = np.random.default_rng(bench.seed)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  leaf_tokens = lambda *lead: (normal(*lead, l, h, p), normal(*lead, l, h, e), normal(*lead, l, h))

  if name == "append":
    live = (normal(b, l, h, e), normal(b, l, h, e), normal(b, l, h, p), normal(b, l, h))
    new = (normal(b, 1, h, e), normal(b, 1, h, e), normal(b, 1, h, p), normal(b, 1, h))

    def append(live, new, fill):
      return tuple(jax.lax.dynamic_update_slice_in_dim(x, y, fill, axis=1)
                   for x, y in zip(live, new))

    fn = jax.jit(append, donate_argnums=0)
    return _Prepared(fn, (live, new, jnp.int32(l - 1)), lambda out, a: (out,) + a[1:], b, {})

  if name == "seal":
    def seal(cache, leaf, keys, index):
      summary = tree_lib.summarize_leaf(*leaf)
      write = lambda c, x: jax.lax.dynamic_update_index_in_dim(c, x, index, axis=1)
      return (write(cache[0], keys), write(cache[1], leaf[1])), summary

    cache = (jnp.zeros((b, n, l, h, e)), jnp.zeros((b, n, l, h, e)))
    fn = jax.jit(seal, donate_argnums=0)
    return _Prepared(fn, (cache, leaf_tokens(b), normal(b, l, h, e), jnp.int32(max(n_full - 1, 0))),
                     lambda out, a: (out[0],) + a[1:], b * l, {})

  if name == "summarize":
    return _Prepared(jax.jit(tree_lib.summarize_leaf), leaf_tokens(b, n), _same, b * length, {})

  summaries = jax.jit(tree_lib.summarize_leaf)(*leaf_tokens(b, n))
  if name == "tree_build":
    fn = jax.jit(lambda *leaves: tree_lib.build_tree(*leaves, n_full, **merge))
    return _Prepared(fn, tuple(summaries), _same, b * length, {})

  *store, span = jax.jit(lambda *leaves: tree_lib.build_tree(*leaves, n_full, **merge))(*summaries)
  if name == "tree_update":
    def update(store, span, leaf, index):
      *store, span = tree_lib.insert_leaf(*store, span, *leaf, index, jnp.bool_(True), **merge)
      return tuple(store), span

    leaf = jax.jit(tree_lib.summarize_leaf)(*leaf_tokens(b))
    fn = jax.jit(update, donate_argnums=(0, 1))
    return _Prepared(fn, (tuple(store), span, tuple(leaf), jnp.int32(max(n_full - 1, 0))),
                     lambda out, a: out + a[2:], b * l, {})

  node_keys, node_vals = store[0], store[1]
  cache_k, cache_v = normal(b, n, l, h, e), normal(b, n, l, h, e)
  queries = length if name in ("route", "exact_read") else 1
  # One query: the last leaf of the context (it sees every other leaf: the most candidates).
  query_leaf = (jnp.arange(length, dtype=jnp.int32) // l if queries == length
                else jnp.full((1,), max(min(n_full, n) - 1, 0), jnp.int32))
  rq, q = normal(b, queries, h, p), normal(b, queries, h, e)

  def route(rq, node_keys, node_vals, query_leaf, q, cache_k):
    rerank = (q, cache_k) if config.leaf_rerank else None
    return routing.route_beam(rq, node_keys, node_vals, query_leaf, k, rerank,
                              descend=config.route_descend)

  route_args = (rq, node_keys, node_vals, query_leaf, q, cache_k)
  if name in ("route", "route_token"):
    return _Prepared(jax.jit(route), route_args, _same, b * queries, {})
  selected = jax.jit(route)(*route_args)
  sink = jnp.zeros((h,), jnp.float32) if config.read_sink else None
  fn = jax.jit(read_lib.exact_read)
  return _Prepared(fn, (q, cache_k, cache_v, selected.leaves, selected.weights, sink), _same,
                   b * queries, {})


# ------------------------------------------------------------------------------------------------
# Observability.


def _histogram(values, valid, num_bins):
  """Counts of integer `values` in [0, num_bins) where `valid`."""
  one_hot = jax.nn.one_hot(jnp.clip(values, 0, num_bins - 1), num_bins, dtype=jnp.int32)
  return jnp.sum(one_hot * valid[..., None].astype(jnp.int32), axis=tuple(range(values.ndim)))


def make_observe_fn(config: KernelConfig) -> Callable:
  """A jittable `(params, tokens) -> diagnostics` of the kernel's parallel forward.

  Per layer: routing sparsity (distinct leaves read per token / leaves sealed) and leaves read per
  token; the routing depth histogram (aux `start_level`: the level of the best first-step Fenwick
  node, index 0 = nothing visible, index 1 + l = level l); mean candidate entropy per head; head
  agreement (fraction of tokens whose heads' top-1 leaves all agree); root similarity and norms;
  exact-read usage, entropy and max probability; fusion gates; the retrieval-distance histogram
  (query leaf - selected leaf, bin j = distances in [2^j, 2^(j+1)), over every selected leaf of
  every head) and its mean; and the tree the forward routed over, rebuilt from the layer's captured
  features exactly as the parallel form builds it, through `tree.tree_diagnostics` (nodes and dead
  nodes per level).
  """
  model = KernelModel(config)
  l, n = config.leaf_size, config.num_leaves
  levels = n.bit_length()

  def observe(params, tokens):
    b, t = tokens.shape
    (_, aux), state = model.apply(
        {"params": params}, tokens, capture_intermediates=lambda _, name: name == "features",
        mutable=["intermediates"])
    batch = {"tokens": tokens, "answer_leaves": jnp.full((b, t, 1), -1, jnp.int32),
             "mask": jnp.ones((b, t), jnp.float32)}
    route_metrics = metrics_lib.routing_metrics(aux.routes, batch, l)
    metrics = aux.metrics
    query_leaf = jnp.arange(t, dtype=jnp.int32) // l
    n_full = t // l
    layers = []
    for i, route in enumerate(aux.routes):
      feats = state["intermediates"][f"layer_{i}"]["features"][0][0]

      def leaf_major(y):
        y = y[:, :n_full * l].reshape((b, n_full, l) + y.shape[2:])
        return jnp.pad(y, [(0, 0), (0, n - n_full)] + [(0, 0)] * (y.ndim - 2))

      summaries = tree_lib.summarize_leaf(leaf_major(feats.rk), leaf_major(feats.v),
                                          leaf_major(feats.pool))
      node_store = tree_lib.build_tree(*summaries, n_full, **_merge_kwargs(config))
      node_keys, span = node_store[0], node_store[-1]
      tree = tree_lib.tree_diagnostics(node_keys, span, n)
      sees = jnp.broadcast_to((query_leaf > 0)[None, :, None], route.entropy.shape)
      entropy = jnp.sum(jnp.where(sees, route.entropy, 0.0), axis=(0, 1)) / jnp.maximum(
          jnp.sum(sees, axis=(0, 1)), 1)
      leaves = route.leaves
      selected = leaves >= 0
      distance = query_leaf[None, :, None, None] - leaves
      bins = jnp.floor(jnp.log2(jnp.maximum(distance, 1).astype(jnp.float32))).astype(jnp.int32)
      layer = {
          "routing_sparsity": route_metrics[f"layer_{i}/routing_sparsity"],
          "leaves_read_per_token": route_metrics[f"layer_{i}/leaves_read"],
          "depth_histogram": _histogram(route.start_level + 1, jnp.ones_like(sees), levels + 1),
          "candidate_entropy_per_head": entropy,
          "head_agreement": 1.0 - metrics[f"layer_{i}/head_disagreement"],
          "retrieval_distance_histogram": _histogram(bins, selected, levels),
          "mean_retrieval_distance": jnp.sum(jnp.where(selected, distance, 0)) / jnp.maximum(
              jnp.sum(selected), 1),
          "nodes_per_level": tree["nodes_per_level"],
          "dead_nodes_per_level": tree["dead_nodes_per_level"],
          "dead_nodes": jnp.sum(tree["dead_nodes_per_level"]),
      }
      prefix = f"layer_{i}/"
      for key, value in metrics.items():
        if key.startswith(prefix) and key != prefix + "head_disagreement":
          layer[key[len(prefix):]] = value
      layers.append(layer)
    return layers

  return observe


def observe(models: _Models, length: int) -> dict:
  """The kernel's diagnostics at `length` (see `make_observe_fn`), as JSON-ready values."""
  module, config = models.module("kernel", length)
  del module
  fn = jax.jit(make_observe_fn(config))
  layers = jax.device_get(fn(models.params("kernel"), models.tokens(length)))
  to_py = lambda x: x.tolist() if isinstance(x, np.ndarray) and x.ndim else (
      float(x) if np.issubdtype(np.asarray(x).dtype, np.floating) else int(x))
  layers = [{k: to_py(v) for k, v in layer.items()} for layer in layers]
  return {"layers": layers, "num_leaves": config.num_leaves,
          "leaves_sealed": length // config.leaf_size}


# ------------------------------------------------------------------------------------------------
# Measuring one point.


def _measure(prep: _Prepared, bench: BenchConfig, repeats: int, deadline: float,
             probe: _MemoryProbe) -> dict:
  """Compiles, checks the memory budget, warms up, checks the time budget, then times."""
  start = time.perf_counter()
  compiled = prep.fn.lower(*prep.args).compile()
  compile_s = time.perf_counter() - start
  memory = xla_memory(compiled)
  peak = None if memory is None else memory["total"]
  if peak is not None and peak > bench.max_memory_bytes:
    raise Skip(f"XLA estimates {peak / 2**30:.2f} GiB > memory budget "
               f"{bench.max_memory_bytes / 2**30:.2f} GiB")
  args = prep.args
  jax.block_until_ready(args)
  first_s = None
  for _ in range(bench.warmup):
    begin = time.perf_counter()
    out = compiled(*args)
    jax.block_until_ready(out)
    first_s = first_s if first_s is not None else time.perf_counter() - begin
    args = prep.feed(out, args)
    del out
  if time.perf_counter() + first_s * repeats > deadline:
    raise Skip(f"found over the time budget: one call took {first_s:.3g} s, {repeats} timed "
               f"calls would pass max_point_s={bench.max_point_s:g}")
  times = []
  jax.block_until_ready(args)
  probe.start()
  for _ in range(repeats):
    begin = time.perf_counter()
    out = compiled(*args)
    jax.block_until_ready(out)
    times.append(time.perf_counter() - begin)
    args = prep.feed(out, args)
    del out
    jax.block_until_ready(args)  # e.g. a fresh memory for the next scan, outside the timing.
  measured = probe.stop()
  median = statistics.median(times)
  return {"status": "ok", "reason": "", "tokens_per_s": prep.tokens / median, "median_s": median,
          "min_s": min(times), "max_s": max(times), "repeats": repeats, "first_call_s": first_s,
          "compile_s": compile_s, "peak_mem_bytes": peak, "peak_mem_source":
          "xla_buffer_assignment" if peak is not None else None, "xla_memory": memory,
          "measured_peak_bytes": measured, "measured_peak_source": probe.source, **prep.extra}


class _Point(NamedTuple):
  model: str
  mode: str
  length: int
  component: str
  flops: int

  @property
  def key(self) -> tuple[str, str, str]:
    return self.model, self.mode, self.component

  def label(self) -> str:
    what = f"component {self.component}" if self.component else self.mode
    return f"{self.model} {what} T={self.length}"


def plan(bench: BenchConfig) -> list[_Point]:
  """Every point of the run, shortest length first (models interleaved at each length)."""
  points = []
  for length in bench.lengths:
    for model in bench.models:
      for mode in bench.modes:
        points.append(_Point(model, mode, length, "", point_flops(bench, model, mode, length)))
    if bench.components and "kernel" in bench.models:
      config = bench.model_config("kernel", length)
      for name in COMPONENTS:
        points.append(_Point("kernel", "component", length, name,
                             component_flops(config, name, length, bench.batch_size)))
  return points


def _empty_row(point: _Point, bench: BenchConfig) -> dict:
  return {"model": point.model, "length": point.length, "mode": point.mode,
          "component": point.component or None, "status": None, "reason": "",
          "tokens_per_s": None, "median_s": None, "min_s": None, "max_s": None,
          "peak_mem_bytes": None, "compile_s": None, "flops": point.flops,
          "gflops_per_s": None, "batch_size": bench.batch_size}


def _run_point(point: _Point, bench: BenchConfig, models: _Models, history: dict,
               over_budget: dict, probe: _MemoryProbe) -> dict:
  row = _empty_row(point, bench)
  start = time.perf_counter()
  try:
    if point.key in over_budget:
      raise Skip(f"over budget at a shorter length ({over_budget[point.key]})")
    if (point.model in QUADRATIC_MODELS and bench.quadratic_max_length
        and point.length > bench.quadratic_max_length):
      raise Skip(f"quadratic-cost model above quadratic_max_length="
                 f"{bench.quadratic_max_length}")
    estimate = estimate_peak_bytes(bench, point.model, point.mode, point.length)
    if estimate is not None and estimate > bench.max_memory_bytes:
      raise Skip(f"estimated {estimate / 2**30:.2f} GiB of attention scores "
                 f"(costs.activation_bytes) > memory budget "
                 f"{bench.max_memory_bytes / 2**30:.2f} GiB")
    repeats = bench.repeats
    if point.component in EVENT_COMPONENTS:
      repeats = max(repeats, _MIN_EVENT_REPEATS)
    elif point.mode == "decode":
      repeats = bench.decode_steps
    previous = history.get(point.key)
    if previous and previous["flops"]:
      predicted = previous["median_s"] * point.flops / previous["flops"]
      if predicted * (repeats + bench.warmup) > bench.max_point_s:
        raise Skip(f"predicted over the time budget: ~{predicted:.3g} s per call from "
                   f"T={previous['length']}, max_point_s={bench.max_point_s:g}")
    if point.component:
      prep = _prepare_component(bench, point.component, point.length)
    else:
      prep = _prepare_model_point(models, point.model, point.mode, point.length)
    row.update(_measure(prep, bench, repeats, start + bench.max_point_s, probe))
    if point.flops and row["median_s"]:
      row["gflops_per_s"] = point.flops / row["median_s"] / 1e9
    history[point.key] = {"median_s": row["median_s"], "flops": point.flops,
                          "length": point.length}
    if point.model in models.num_params:
      row["num_params"] = models.num_params[point.model]
    if (bench.observability and point.model == "kernel" and point.mode == "forward"):
      row["observability"] = observe(models, point.length)
  except Skip as e:
    row.update(status="skipped", reason=str(e))
    if "budget" in str(e) and "shorter length" not in str(e):
      over_budget[point.key] = f"T={point.length}"
  except Exception as e:  # pylint: disable=broad-except
    message = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    if isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in str(e):
      row.update(status="skipped", reason=f"out of memory at run time: {message[:300]}")
      over_budget[point.key] = f"T={point.length}"
    else:
      row.update(status="error", reason=message[:500])
      logging.exception("%s failed", point.label())
  row["wall_s"] = time.perf_counter() - start
  gc.collect()
  return row


# ------------------------------------------------------------------------------------------------
# The run.


def _format_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _eta(done: list[dict], remaining: Sequence[_Point], bench: BenchConfig) -> float:
  """Remaining time: per-point overhead (compile, warm-up) + timed calls at the FLOP rate so far."""
  ok = [r for r in done if r["status"] == "ok"]
  if not ok:
    return float("nan")
  timed = sum(r["median_s"] * r["repeats"] for r in ok if r["flops"])
  rate = sum(r["flops"] * r["repeats"] for r in ok if r["flops"]) / max(timed, 1e-9)
  overhead = statistics.mean(r["wall_s"] - r["median_s"] * r["repeats"] for r in ok)
  return sum(overhead + bench.repeats * p.flops / max(rate, 1.0) for p in remaining)


def _summary(row: dict) -> str:
  if row["status"] != "ok":
    return f"{row['status']}: {row['reason']}"
  peak = row["peak_mem_bytes"]
  peak = "?" if peak is None else f"{peak / 2**20:,.1f} MiB"
  return (f"{row['tokens_per_s']:,.0f} tok/s, median {row['median_s']:.4g} s "
          f"[{row['min_s']:.4g}, {row['max_s']:.4g}], peak {peak}, "
          f"compile {row['compile_s']:.1f} s")


def _device_description() -> str:
  device = jax.devices()[0]
  if device.platform != "cpu":
    return f"{device.platform}: {device.device_kind}"
  name = platform.processor()
  try:
    with open("/proc/cpuinfo") as f:
      name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                  name)
  except OSError:
    pass
  return f"cpu: {name or platform.machine()}"


def environment(bench: BenchConfig) -> dict:
  """Device, versions and settings recorded beside the rows."""
  return {"device": _device_description(),
          "num_devices": jax.device_count(), "cpu_count": os.cpu_count(),
          "machine": platform.machine(), "python": platform.python_version(),
          "jax": jax.__version__, "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
          # None is the backend's default (TF32 for f32 matmuls on recent NVIDIA GPUs).
          "matmul_precision": jax.config.jax_default_matmul_precision,
          "max_memory_bytes": bench.max_memory_bytes, "max_point_s": bench.max_point_s,
          "peak_mem_source": "xla_buffer_assignment",
          "measured_peak_source": _MemoryProbe().source}


def _write_tables(out_dir: str, rows: list[dict], meta: dict, bench: BenchConfig) -> None:
  """bench.json, bench_meta.json and bench.md from the rows so far (each file replaced whole)."""
  runs_lib.write_json(os.path.join(out_dir, JSON_FILE), rows)
  runs_lib.write_json(os.path.join(out_dir, META_FILE), meta)
  text = bench_report.markdown(rows, meta, targets=dataclasses.asdict(bench.targets),
                               num_layers=bench.kernel.num_layers)
  runs_lib.write_text(os.path.join(out_dir, MD_FILE), text)


def run(config: ml_collections.ConfigDict | Mapping[str, Any], out_dir: str,
        command: str = "") -> list[dict]:
  """Runs the benchmark and writes `bench.json`, `bench_meta.json`, `bench.md` and the plots.

  Args:
    config: a benchmark config (`configs/bench.py:get_config`).
    out_dir: output directory (created).
    command: the command line that ran it, quoted in bench.md.
  Returns:
    The rows written to `out_dir/bench.json`.
  Raises:
    ValueError: an invalid config (before anything is compiled).
  """
  bench = parse_config(config)
  if not bench.max_memory_bytes:
    bench = dataclasses.replace(bench, max_memory_bytes=_auto_memory_budget())
  os.makedirs(out_dir, exist_ok=True)
  config_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  meta = {"command": command, "config": config_dict, **environment(bench)}
  if meta["device"].startswith("cpu") and not meta["glibc_tunables"]:
    logging.warning("GLIBC_TUNABLES is not set; on CPU, %s is recommended (`experiments.bench` "
                    "sets it unless --allocator=inherit).", RECOMMENDED_GLIBC_TUNABLES)
  meta["ceiling_gflops_start"] = matmul_gflops(bench.ceiling_size, bench.repeats)
  logging.info("Device %s, f32 matmul ceiling %.1f GFLOP/s (%d^3).", meta["device"],
               meta["ceiling_gflops_start"], bench.ceiling_size)
  points = plan(bench)
  models = _Models(bench)
  probe = _MemoryProbe()
  history, over_budget, rows = {}, {}, []
  begin = time.time()
  for i, point in enumerate(points):
    row = _run_point(point, bench, models, history, over_budget, probe)
    rows.append(row)
    # Everything but the plots after every point, so a run stopped early keeps its tables.
    meta.update(wall_s=time.time() - begin, num_params=dict(models.num_params),
                points_done=len(rows), points_planned=len(points))
    _write_tables(out_dir, rows, meta, bench)
    logging.info("[%d/%d] %s: %s | elapsed %s, ETA %s", i + 1, len(points), point.label(),
                 _summary(row), _format_duration(time.time() - begin),
                 _format_duration(_eta(rows, points[i + 1:], bench)))
  meta["ceiling_gflops_end"] = matmul_gflops(bench.ceiling_size, bench.repeats)
  meta["ceiling_gflops"] = max(meta["ceiling_gflops_start"], meta["ceiling_gflops_end"])
  meta["wall_s"] = time.time() - begin
  meta["num_params"] = dict(models.num_params)
  for row in rows:
    row["ceiling_gflops_per_s"] = meta["ceiling_gflops"]
    row["efficiency"] = (row["gflops_per_s"] / meta["ceiling_gflops"]
                         if row["gflops_per_s"] else None)
  _write_tables(out_dir, rows, meta, bench)
  bench_report.plots(rows, out_dir, num_layers=bench.kernel.num_layers)
  logging.info("Wrote %s, %s and the plots to %s (%s).", JSON_FILE, MD_FILE, out_dir,
               _format_duration(meta["wall_s"]))
  return rows

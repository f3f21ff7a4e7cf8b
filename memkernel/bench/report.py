"""Tables, target ratios and plots of a benchmark run (`memkernel.bench`); no JAX here.

Everything is computed from the rows of one run, so every ratio compares points measured in the same
process against the same matmul ceiling:

    markdown(rows, meta, targets=..., num_layers=...)  -> the text of bench.md
    plots(rows, out_dir, num_layers=...)                -> tokens_per_s.png, peak_memory.png,
                                                           components.png
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping, Optional, Sequence

from matplotlib.figure import Figure

# The kernel's components, as `memkernel.bench` times them (one layer each).
# The parallel form's whole-sequence work ...
SEQUENCE_COMPONENTS = ("summarize", "tree_build", "route", "exact_read")
# ... and the decoding form's per-token work. `model.step` seals and updates the tree under a
# mask, so every step pays for `seal` and `tree_update`, not only every L-th.
EVENT_COMPONENTS = ("append", "seal", "tree_update", "route_token", "read_token")
PLOT_FILES = ("tokens_per_s.png", "peak_memory.png", "components.png")
_MIB = 2 ** 20


def _ok(rows: Sequence[dict], model: str, mode: str, length: int,
        component: Optional[str] = None) -> Optional[dict]:
  for row in rows:
    if (row["model"], row["mode"], row["length"], row.get("component")) == (
        model, mode, length, component) and row["status"] == "ok":
      return row
  return None


def _ordered(rows: Sequence[dict], field: str) -> list:
  return list(dict.fromkeys(row[field] for row in rows))


def target_checks(rows: Sequence[dict], targets: Mapping[str, int]) -> list[dict]:
  """The issue's target ratios, from points of this run.

  Args:
    rows: the run's rows.
    targets: short_length, long_length, decode_short, decode_long (`bench.Targets`).
  Returns:
    One dict per check: name, value (None if a point is missing), bound, passed, note.
  """
  short, long_ = targets["short_length"], targets["long_length"]
  d_short, d_long = targets["decode_short"], targets["decode_long"]
  checks = []

  def add(name, bound, upper, numerator, denominator, field, invert=False):
    missing = [f"{p[0]} {p[1]} T={p[2]}" for p in (numerator, denominator) if _ok(rows, *p) is None]
    value, passed = None, None
    if not missing:
      a, b = _ok(rows, *numerator)[field], _ok(rows, *denominator)[field]
      if a is not None and b:
        value = a / b
        passed = value <= bound if upper else value >= bound
    note = "not measured: " + ", ".join(missing) if missing else ""
    checks.append({"name": name, "value": value, "bound": f"{'<=' if upper else '>='} {bound:g}",
                   "passed": passed, "note": note})

  for mode in ("forward", "train"):
    add(f"kernel {mode} time({long_}) / time({short})", 4.5, True, ("kernel", mode, long_),
        ("kernel", mode, short), "median_s")
  add(f"kernel / dense forward tokens/s at {short}", 3.0, False, ("kernel", "forward", short),
      ("dense", "forward", short), "tokens_per_s")
  add(f"kernel / sliding_window forward tokens/s at {long_}", 0.6, False,
      ("kernel", "forward", long_), ("sliding_window", "forward", long_), "tokens_per_s")
  add(f"kernel / dense train tokens/s at {short}", 5.0, False, ("kernel", "train", short),
      ("dense", "train", short), "tokens_per_s")
  # The same three against the peers at the kernel's parameter count (`bench.PARAM_MATCHED`).
  add(f"kernel / dense_params forward tokens/s at {short}", 3.0, False,
      ("kernel", "forward", short), ("dense_params", "forward", short), "tokens_per_s")
  add(f"kernel / sliding_window_params forward tokens/s at {long_}", 0.6, False,
      ("kernel", "forward", long_), ("sliding_window_params", "forward", long_), "tokens_per_s")
  add(f"kernel / dense_params train tokens/s at {short}", 5.0, False, ("kernel", "train", short),
      ("dense_params", "train", short), "tokens_per_s")
  add(f"kernel decode latency at {d_long} / at {d_short}", 1.5, True, ("kernel", "decode", d_long),
      ("kernel", "decode", d_short), "median_s")
  for mode in ("forward", "train"):
    add(f"kernel / sliding_window {mode} peak memory at {long_}", 2.0, True,
        ("kernel", mode, long_), ("sliding_window", mode, long_), "peak_mem_bytes")
  # The brain-core issue's target.
  add(f"braincore / sliding_window forward tokens/s at {long_}", 0.5, False,
      ("braincore", "forward", long_), ("sliding_window", "forward", long_), "tokens_per_s")
  return checks


def forward_breakdown(rows: Sequence[dict], length: int, num_layers: int) -> Optional[dict]:
  """Seconds of the kernel's forward at `length` per component (x layers) and the rest."""
  forward = _ok(rows, "kernel", "forward", length)
  if forward is None:
    return None
  parts = {}
  for name in SEQUENCE_COMPONENTS:
    row = _ok(rows, "kernel", "component", length, name)
    if row is not None:
      parts[name] = num_layers * row["median_s"]
  if not parts:
    return None
  parts["rest (trunk, projections, MLP, head)"] = max(forward["median_s"] - sum(parts.values()), 0.)
  return parts


def decode_breakdown(rows: Sequence[dict], length: int, num_layers: int) -> Optional[dict]:
  """Seconds of one decoded token at context `length` per component (x layers) and the rest."""
  decode = _ok(rows, "kernel", "decode", length)
  if decode is None:
    return None
  parts = {}
  for name in EVENT_COMPONENTS:
    row = _ok(rows, "kernel", "component", length, name)
    if row is not None:
      parts[name] = num_layers * row["median_s"]
  if not parts:
    return None
  parts["rest (trunk, projections, MLP, head, dispatch)"] = max(
      decode["median_s"] - sum(parts.values()), 0.)
  return parts


def hot_path(rows: Sequence[dict], num_layers: int) -> str:
  """One line naming the largest part of the kernel's forward at its longest measured length."""
  lengths = sorted({r["length"] for r in rows if forward_breakdown(rows, r["length"], num_layers)})
  if not lengths:
    return "no kernel forward with components measured"
  length = lengths[-1]
  parts = forward_breakdown(rows, length, num_layers)
  total = sum(parts.values())
  ranked = sorted(parts.items(), key=lambda kv: -kv[1])
  shares = ", ".join(f"{name} {100 * t / total:.0f}%" for name, t in ranked)
  return f"kernel forward at T={length}: {shares} (components timed alone, x {num_layers} layers)"


# ------------------------------------------------------------------------------------------------
# Markdown.


def _fmt(value: Any, spec: str = ".3g") -> str:
  if value is None:
    return "-"
  if isinstance(value, float) and not math.isfinite(value):
    return "-"
  return format(value, spec)


def _cell(row: Optional[dict], field: str, spec: str, scale: float = 1.0) -> str:
  if row is None:
    return ""
  if row["status"] != "ok":
    return row["status"]
  value = row.get(field)
  return _fmt(None if value is None else value / scale, spec)


def _table(header: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(str(c) for c in line) + " |" for line in body]
  return lines


def _find(rows, model, mode, length, component=None):
  for row in rows:
    if (row["model"], row["mode"], row["length"], row.get("component")) == (
        model, mode, length, component):
      return row
  return None


def markdown(rows: Sequence[dict], meta: Mapping[str, Any], *, targets: Mapping[str, int],
             num_layers: int) -> str:
  """The text of bench.md: setting, targets, throughput, memory, components, observability."""
  models = [m for m in _ordered(rows, "model")]
  modes = [m for m in _ordered(rows, "mode") if m != "component"]
  lengths = sorted(set(r["length"] for r in rows))
  out = ["# memkernel benchmark", ""]
  if meta.get("command"):
    out += ["```", meta["command"], "```", ""]
  params = ", ".join(f"{k} {v:,}" for k, v in meta.get("num_params", {}).items())
  out += [f"- device: {meta.get('device')} ({meta.get('cpu_count')} CPU cores), "
          f"jax {meta.get('jax')}",
          f"- f32 matmul ceiling: {_fmt(meta.get('ceiling_gflops'), '.1f')} GFLOP/s "
          f"(start {_fmt(meta.get('ceiling_gflops_start'), '.1f')}, end "
          f"{_fmt(meta.get('ceiling_gflops_end'), '.1f')})",
          f"- GLIBC_TUNABLES: `{meta.get('glibc_tunables') or '(unset)'}`",
          f"- parameters: {params}",
          f"- budget per point: {_fmt(meta.get('max_memory_bytes', 0) / 2**30, '.1f')} GiB, "
          f"{_fmt(meta.get('max_point_s'), 'g')} s; wall time {_fmt(meta.get('wall_s'), '.0f')} s",
          "- peak memory: XLA buffer assignment of the compiled call (arguments, outputs, "
          f"temporaries); measured: `{meta.get('measured_peak_source')}`",
          "- config: `bench_meta.json`; every point: `bench.json`", ""]

  out += ["## Targets", ""]
  body = []
  for check in target_checks(rows, targets):
    verdict = {True: "met", False: "missed", None: check["note"] or "n/a"}[check["passed"]]
    body.append([check["name"], _fmt(check["value"], ".2f"), check["bound"], verdict])
  out += _table(["check", "measured", "target", "result"], body) + [""]
  out += [f"Hot path: {hot_path(rows, num_layers)}.", ""]

  for title, field, spec, scale in (("Tokens/s", "tokens_per_s", ",.0f", 1.0),
                                    ("Median wall time per call, s", "median_s", ".4g", 1.0),
                                    ("Peak memory, MiB", "peak_mem_bytes", ",.1f", _MIB)):
    out += [f"## {title}", ""]
    for mode in modes:
      out += [f"### {mode}", ""]
      body = [[str(t)] + [_cell(_find(rows, m, mode, t), field, spec, scale) for m in models]
              for t in lengths if any(_find(rows, m, mode, t) for m in models)]
      out += _table(["T"] + models, body) + [""]

  components = [c for c in _ordered(rows, "component") if c]
  if components:
    out += ["## Kernel components (one layer, ms per call)", "",
            "Standalone jitted calls on random inputs of the kernel's shapes. Sequence components "
            "process all T queries / leaves; event components are one decoding step's work at "
            "context T.", ""]
    body = [[str(t)] + [_cell(_find(rows, "kernel", "component", t, c), "median_s", ".3g", 1e-3)
                        for c in components] for t in lengths]
    out += _table(["T"] + components, body) + [""]
    body = []
    for t in lengths:
      for title, parts in (("forward", forward_breakdown(rows, t, num_layers)),
                           ("decode", decode_breakdown(rows, t, num_layers))):
        if parts:
          total = sum(parts.values())
          body.append([str(t), title, " / ".join(f"{k} {100 * v / total:.0f}%"
                                                 for k, v in parts.items())])
    if body:
      out += ["Share of the kernel's time (components x layers; the rest is measured minus their "
              "sum):", ""] + _table(["T", "mode", "breakdown"], body) + [""]

  observed = [(r["length"], r["observability"]) for r in rows if r.get("observability")]
  if observed:
    out += ["## Kernel observability (random tokens, untrained parameters)", "",
            "sparsity = distinct leaves read per token / leaves sealed; depth = histogram of the "
            "best first-step Fenwick level (none, 0, 1, ...); distance = query leaf - selected "
            "leaf, histogram over [1,2), [2,4), ...", ""]
    body = []
    for length, obs in observed:
      for i, layer in enumerate(obs["layers"]):
        roots = [v for k, v in sorted(layer.items()) if k.startswith("root_") and
                 k.endswith("_norm")]
        body.append([
            str(length), str(i), _fmt(layer["routing_sparsity"], ".3g"),
            _fmt(layer["leaves_read_per_token"], ".2f"),
            " ".join(str(c) for c in layer["depth_histogram"]),
            " ".join(_fmt(x, ".2f") for x in layer["candidate_entropy_per_head"]),
            _fmt(layer["head_agreement"], ".2f"), _fmt(layer["root_similarity"], ".2f"),
            " ".join(_fmt(x, ".2f") for x in roots), _fmt(layer.get("exact_read_usage"), ".2f"),
            _fmt(layer["mean_retrieval_distance"], ".1f"),
            " ".join(str(c) for c in layer["retrieval_distance_histogram"]),
            f"{layer['dead_nodes']} / {sum(layer['nodes_per_level'])}"])
    out += _table(["T", "layer", "sparsity", "leaves/token", "depth hist", "entropy/head",
                   "head agreement", "root sim", "root norms", "exact-read usage", "mean dist",
                   "dist hist", "dead / nodes"], body) + [""]

  out += ["## All points", ""]
  body = []
  for r in rows:
    what = r["mode"] + (f" {r['component']}" if r.get("component") else "")
    if r["status"] != "ok":
      body.append([r["model"], what, str(r["length"]), f"{r['status']}: {r['reason']}"] + [""] * 6)
      continue
    measured = r.get("measured_peak_bytes")
    body.append([r["model"], what, str(r["length"]), "ok", _fmt(r["tokens_per_s"], ",.0f"),
                 f"{_fmt(r['median_s'], '.4g')} [{_fmt(r['min_s'], '.3g')}, "
                 f"{_fmt(r['max_s'], '.3g')}]",
                 f"{_fmt(r['peak_mem_bytes'] and r['peak_mem_bytes'] / _MIB, ',.1f')} "
                 f"({_fmt(measured and measured / _MIB, ',.1f')})",
                 _fmt(r["compile_s"], ".2f"), _fmt(r["gflops_per_s"], ".2f"),
                 _fmt(r.get("efficiency") and 100 * r["efficiency"], ".1f")])
  out += _table(["model", "mode", "T", "status", "tokens/s", "median s [min, max]",
                 "peak MiB (measured)", "compile s", "GFLOP/s", "% ceiling"], body) + [""]
  return "\n".join(out)


# ------------------------------------------------------------------------------------------------
# Plots.


def _log_log_panels(rows, field, scale, ylabel, path):
  modes = [m for m in _ordered(rows, "mode") if m != "component"]
  models = _ordered(rows, "model")
  fig = Figure(figsize=(4.2 * max(len(modes), 1), 3.6), layout="constrained")
  axes = fig.subplots(1, max(len(modes), 1), squeeze=False)[0]
  for ax, mode in zip(axes, modes):
    for model in models:
      points = sorted((r["length"], r[field] / scale) for r in rows
                      if r["model"] == model and r["mode"] == mode and r["status"] == "ok"
                      and r.get(field))
      if points:
        ax.plot(*zip(*points), marker="o", label=model)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_title(mode)
    ax.set_xlabel("sequence length T (decode: context)")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize="small")
  fig.savefig(path, dpi=110)


def _stacked(ax, breakdowns, title):
  if not breakdowns:
    ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(title)
    return
  names = list(dict.fromkeys(n for _, parts in breakdowns for n in parts))
  xs = list(range(len(breakdowns)))
  bottom = [0.0] * len(breakdowns)
  for name in names:
    shares = [100 * parts.get(name, 0.0) / max(sum(parts.values()), 1e-12)
              for _, parts in breakdowns]
    ax.bar(xs, shares, bottom=bottom, label=name)
    bottom = [b + s for b, s in zip(bottom, shares)]
  ax.set_xticks(xs, [str(t) for t, _ in breakdowns], rotation=45)
  ax.set_xlabel("T")
  ax.set_ylabel("% of the measured time")
  ax.set_title(title)
  ax.legend(fontsize="x-small", loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=3)


def plots(rows: Sequence[dict], out_dir: str, *, num_layers: int) -> list[str]:
  """Writes the three PNGs into `out_dir`; returns their paths."""
  paths = [os.path.join(out_dir, name) for name in PLOT_FILES]
  _log_log_panels(rows, "tokens_per_s", 1.0, "tokens/s", paths[0])
  _log_log_panels(rows, "peak_mem_bytes", _MIB, "peak memory, MiB", paths[1])
  lengths = sorted(set(r["length"] for r in rows))
  fig = Figure(figsize=(11, 5.0), layout="constrained")
  ax_fwd, ax_dec = fig.subplots(1, 2)
  _stacked(ax_fwd, [(t, p) for t in lengths if (p := forward_breakdown(rows, t, num_layers))],
           "kernel forward: time by component")
  _stacked(ax_dec, [(t, p) for t in lengths if (p := decode_breakdown(rows, t, num_layers))],
           "kernel decode step: time by component")
  fig.savefig(paths[2], dpi=110)
  return paths

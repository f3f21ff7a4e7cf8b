"""How fast runs learn, compared by group: steps to an accuracy threshold and final accuracy.

    report = compare({"off": [run0, run1, run2], "traces": [...]}, evals=("eval.json",))

Per run, from its `metrics.jsonl`: the first step at which the training accuracy, averaged over
the last `window` logged rows, reaches each threshold (None: never). Per group: those steps as a
mean ± standard error over its runs (only when every run got there), the mean training-accuracy
curve, and, for each named evaluation file every run of the group has (`eval.json`,
`experiments.evaluate --out` files), the accuracy at each length: the mean over runs, the lowest
and highest run, and the queries each run scored. `experiments/convergence.py` is the command; it
writes `convergence.json`, `convergence.md` and `convergence.png`.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from memkernel import metrics_log

REPORT_FILE, TABLE_FILE, PLOT_FILE = "convergence.json", "convergence.md", "convergence.png"


def train_accuracy(workdir: str) -> tuple[np.ndarray, np.ndarray]:
  """(steps, accuracy) of a run's training rows, in step order."""
  path = os.path.join(workdir, metrics_log.METRICS_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no {metrics_log.METRICS_FILE} in {workdir}: not a training run")
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  rows = sorted((r for r in rows if r.get("split") == "train" and "accuracy" in r),
                key=lambda r: r["step"])
  if not rows:
    raise ValueError(f"{path} has no training rows with an accuracy")
  return (np.array([r["step"] for r in rows]), np.array([r["accuracy"] for r in rows]))


def steps_to(steps: np.ndarray, accuracy: np.ndarray, threshold: float,
             window: int) -> Optional[int]:
  """The first step whose trailing mean over `window` rows reaches `threshold` (None: never)."""
  if window < 1:
    raise ValueError(f"window must be a positive integer, got {window}")
  for i in range(window - 1, len(steps)):
    if accuracy[i - window + 1:i + 1].mean() >= threshold:
      return int(steps[i])
  return None


def _eval_cells(workdir: str, name: str) -> Optional[dict[str, dict[str, float]]]:
  path = os.path.join(workdir, name)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    lengths = json.load(f)["lengths"]
  return {length: {"accuracy": cell["accuracy"], "queries": cell.get("queries", 0)}
          for length, cell in lengths.items()}


def compare(groups: Mapping[str, Sequence[str]], *, thresholds: Sequence[float] = (0.9, 0.95),
            window: int = 3, evals: Sequence[str] = ("eval.json",)) -> dict[str, Any]:
  """The report of `groups` (label -> run directories); see the module docstring."""
  if not groups or any(not runs for runs in groups.values()):
    raise ValueError("every group needs at least one run")
  for t in thresholds:
    if not 0.0 < t <= 1.0:
      raise ValueError(f"thresholds must lie in (0, 1], got {t}")
  report: dict[str, Any] = {"thresholds": list(thresholds), "window": window,
                            "evals": list(evals), "groups": {}}
  for label, runs in groups.items():
    per_run = []
    curves = {}
    for workdir in runs:
      steps, acc = train_accuracy(workdir)
      per_run.append({"workdir": workdir, "final_train_accuracy": float(acc[-1]),
                      "steps_to": {str(t): steps_to(steps, acc, t, window)
                                   for t in thresholds}})
      for s, a in zip(steps, acc):
        curves.setdefault(int(s), []).append(float(a))
    group: dict[str, Any] = {"runs": per_run, "steps_to": {}, "evals": {}}
    for t in thresholds:
      reached = [r["steps_to"][str(t)] for r in per_run]
      done = [s for s in reached if s is not None]
      group["steps_to"][str(t)] = {
          "reached": len(done), "runs": len(reached),
          "mean": float(np.mean(done)) if len(done) == len(reached) else None,
          "se": (float(np.std(done, ddof=1) / np.sqrt(len(done)))
                 if len(done) == len(reached) and len(done) > 1 else None)}
    full = [s for s in sorted(curves) if len(curves[s]) == len(runs)]
    group["curve"] = {"step": full, "accuracy": [float(np.mean(curves[s])) for s in full]}
    for name in evals:
      cells = [_eval_cells(w, name) for w in runs]
      if any(c is None for c in cells):
        continue
      lengths = sorted(set.intersection(*(set(c) for c in cells)), key=int)
      group["evals"][name] = {length: {
          "mean": float(np.mean([c[length]["accuracy"] for c in cells])),
          "min": float(min(c[length]["accuracy"] for c in cells)),
          "max": float(max(c[length]["accuracy"] for c in cells)),
          "queries_per_run": int(min(c[length]["queries"] for c in cells))} for length in lengths}
    report["groups"][label] = group
  return report


def format_table(report: Mapping[str, Any]) -> str:
  """Markdown: steps to each threshold, then accuracy per evaluation file and length."""
  thresholds = report["thresholds"]
  lines = ["| group | runs | " + " | ".join(f"steps to {t:.0%} (mean ± se)" for t in thresholds)
           + " | final train accuracy |",
           "| --- | ---: |" + " ---: |" * (len(thresholds) + 1)]
  for label, group in report["groups"].items():
    cells = []
    for t in thresholds:
      s = group["steps_to"][str(t)]
      if s["mean"] is None:
        cells.append(f"{s['reached']}/{s['runs']} reached")
      else:
        cells.append(f"{s['mean']:.0f}" + (f" ± {s['se']:.0f}" if s["se"] is not None else ""))
    final = np.mean([r["final_train_accuracy"] for r in group["runs"]])
    lines.append(f"| {label} | {len(group['runs'])} | " + " | ".join(cells)
                 + f" | {final:.2%} |")
  lines.append("")
  lines += ["| group | evaluation | length | accuracy: mean (lowest-highest run) | queries per run |",
            "| --- | --- | ---: | ---: | ---: |"]
  for label, group in report["groups"].items():
    for name, by_length in group["evals"].items():
      for length, cell in by_length.items():
        lines.append(f"| {label} | {name} | {length} | {cell['mean']:.2%} "
                     f"({cell['min']:.2%}-{cell['max']:.2%}) | {cell['queries_per_run']:,} |")
  return "\n".join(lines) + "\n"


def plot(report: Mapping[str, Any], path: str) -> str:
  """Mean training accuracy against step, one line per group."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 4))
  for label, group in report["groups"].items():
    ax.plot(group["curve"]["step"], group["curve"]["accuracy"],
            label=f"{label} ({len(group['runs'])} runs)")
  for t in report["thresholds"]:
    ax.axhline(t, color="grey", lw=0.5, ls="--")
  ax.set_xlabel("step")
  ax.set_ylabel("training accuracy (mean over runs)")
  ax.set_ylim(0, 1.02)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def write(report: Mapping[str, Any], out_dir: str) -> list[str]:
  """Writes the report, its table and its plot to `out_dir` (each atomically)."""
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  for name, text in ((REPORT_FILE, json.dumps(report, indent=2)),
                     (TABLE_FILE, format_table(report))):
    path = os.path.join(out_dir, name)
    with open(path + ".tmp", "w") as f:
      f.write(text)
    os.replace(path + ".tmp", path)
    paths.append(path)
  paths.append(plot(report, os.path.join(out_dir, PLOT_FILE)))
  return paths

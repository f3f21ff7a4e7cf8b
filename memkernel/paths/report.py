"""The routing-path study of a trained kernel run: which paths recur, what they encode, what
they are worth.

    report = paths_run("runs/mqar_scattered", batches=4)
    print(format_table(report))

On fresh batches of the run's task (the auditor's seed stream, never training batches; for
text, the validation split's first batches, documents and all), the
reference forward's route trace gives every scored query's path per layer and head
(`motifs.encode`). The `next_best_span` intervention (each head reads its best unselected leaves
instead) gives each scored query's loss delta: the utility of the router's choice there, credited
to every path taken at that query. The paths go into a `PathTrie`; the report holds, per layer
and head, the paths' statistics (`motifs.path_statistics`: entropy, token identity against the
previous token, recurrence across positions and sequences, the acceptance of crystallized
paths proposed by token) and, overall, the most frequent
motifs with their utility and entropy. `task` overrides evaluate the same run on another
setting of its task (e.g. MQAR's zoology layout beside the scattered one), and the report then
also says how many of one setting's queries took a path the other setting's queries took.
`experiments/paths.py` is the command; it writes `paths.json`, `paths.md` and `paths.png`.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from memkernel import runs
from memkernel import text_task
from memkernel.analysis import audit as audit_lib
from memkernel.kernel.interventions import NONE, Interventions
from memkernel.kernel.model import KernelModel
from memkernel.paths import motifs as motifs_lib
from memkernel.paths.trie import PathTrie

PATHS_FILE, TABLE_FILE, PLOT_FILE = "paths.json", "paths.md", "paths.png"
TRIE_DIR = "paths_trie"      # WORKDIR/paths_trie/<task>: each task's trie, saved by orbax.
TOP_MOTIFS = 32
SWAP = Interventions(next_best_span=True)   # Each head reads its best unselected leaves.


def _nll(logits_BTV: jax.Array, targets_BT: jax.Array) -> np.ndarray:
  logp = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
  return np.asarray(-jnp.take_along_axis(logp, targets_BT[..., None], axis=-1)[..., 0])


@functools.lru_cache(maxsize=16)
def reference_forward(model: KernelModel, interventions: Optional[Interventions]):
  """Jitted (params, tokens, segments) -> (logits, outputs) of the parallel form."""
  return jax.jit(lambda params, tokens, segments: model.apply(
      {"params": params}, tokens, segments, interventions=interventions or NONE))


def collect(model: KernelModel, params, batches: Sequence[Mapping[str, Any]]
            ) -> dict[str, np.ndarray]:
  """Every scored query's paths and context, flattened over (batch row, position):
  `paths` int64 [N, layers, H, S], `utility` [N] (next_best_span's loss delta), `tokens` [N],
  `previous` [N] (the token before; -1 at position 0), `sequence` [N] (a global row number)."""
  out: dict[str, list] = {k: [] for k in ("paths", "utility", "tokens", "previous", "sequence")}
  num_leaves = model.config.num_leaves
  row0 = 0
  for batch in batches:
    tokens, segments = jnp.asarray(batch["tokens"]), batch.get("segments")
    segments = None if segments is None else jnp.asarray(segments)
    logits, aux = reference_forward(model, None)(params, tokens, segments)
    swapped = reference_forward(model, SWAP)(params, tokens, segments)[0]
    targets = jnp.asarray(batch["targets"])
    delta = _nll(swapped, targets) - _nll(logits, targets)
    layers = [motifs_lib.encode(jax.device_get(r.path), num_leaves, layer=i)
              for i, r in enumerate(aux.routes) if r is not None]
    paths = np.stack(layers, axis=2)                        # [B, T, layers, H, S]
    mask = np.asarray(batch["mask"]) > 0
    tok = np.asarray(tokens)
    prev = np.concatenate([np.full((tok.shape[0], 1), -1), tok[:, :-1]], axis=1)
    rows = np.broadcast_to(row0 + np.arange(tok.shape[0])[:, None], tok.shape)
    for name, value in (("paths", paths), ("utility", delta), ("tokens", tok),
                        ("previous", prev), ("sequence", rows)):
      out[name].append(np.asarray(value)[mask])
    row0 += tok.shape[0]
  return {k: np.concatenate(v) for k, v in out.items()}


def study_batches(task, seed: int, batches: int, batch_size: int) -> list[Mapping[str, Any]]:
  """The auditor's fresh batches of a probe; the validation split's first batches of text."""
  if text_task.is_text(task):
    return text_task.eval_batches(task, "validation", batch_size, batches)
  return audit_lib.eval_batches(task, seed, batches, batch_size)


def build_trie(collected: Mapping[str, np.ndarray], budget: int) -> PathTrie:
  """A trie of every (layer, head) path of `collected`, each with its query's utility."""
  paths = collected["paths"]
  n, layers, heads, width = paths.shape
  trie = PathTrie(budget)
  trie.insert(paths.reshape(-1, width), utility=np.repeat(collected["utility"], layers * heads))
  return trie


def _statistics(collected: Mapping[str, np.ndarray]) -> dict[str, Any]:
  paths = collected["paths"]
  out = {}
  for layer in range(paths.shape[1]):
    for head in range(paths.shape[2]):
      p = paths[:, layer, head]
      taken = p[:, 0] >= 0
      out[f"layer_{layer}/head_{head}"] = motifs_lib.path_statistics(
          p[taken], collected["tokens"][taken],
          collected["previous"][taken], collected["sequence"][taken])
  return out


def shared_paths(a: np.ndarray, b: np.ndarray) -> float:
  """The fraction of rows of `b` (paths [N, S]) that occur among the rows of `a`."""
  if not len(b):
    return 0.0
  seen = {row.tobytes() for row in a}
  return float(np.mean([row.tobytes() in seen for row in b]))


def paths_experiment(experiment, params, *, batches: int, tasks: Mapping[str, Mapping[str, Any]],
                     budget: int = 1 << 14, batch_size: Optional[int] = None,
                     seed: Optional[int] = None) -> tuple[dict[str, Any], dict[str, PathTrie]]:
  """The study on `batches` auditor batches per task setting (`tasks`: name -> task overrides,
  {} for the run's own task): the JSON-ready report and each setting's trie."""
  if not experiment.family.routes:
    raise ValueError(f"routing paths need a memory-kernel run; this run trains the "
                     f"{experiment.model_type!r} family, which does not route")
  if not isinstance(batches, int) or isinstance(batches, bool) or batches < 1:
    raise ValueError(f"batches must be a positive integer, got {batches!r}")
  batch_size = batch_size or experiment.eval.batch_size
  seed = experiment.train.seed if seed is None else seed
  report: dict[str, Any] = {"batches": batches, "batch_size": batch_size, "seed": seed,
                            "budget": budget, "tasks": {}}
  settings = {name: runs.with_task(experiment, dict(overrides))   # Every setting checked first.
              for name, overrides in tasks.items()}
  flat, tries = {}, {}
  for name, exp in settings.items():
    task = exp.task
    model = KernelModel(exp.model_for_length(task.seq_len))
    collected = collect(model, params, study_batches(task, seed, batches, batch_size))
    trie = tries[name] = build_trie(collected, budget)
    motifs = trie.motifs()
    report["tasks"][name] = {
        "task": task.to_dict(), "queries": int(len(collected["utility"])),
        "utility_mean": float(np.mean(collected["utility"])),
        "trie_nodes": len(trie), "heads": _statistics(collected),
        "motifs": [{"path": list(m.path), "count": m.count, "utility": m.utility,
                    "entropy_bits": m.entropy} for m in motifs[:TOP_MOTIFS]],
        "distinct_motifs": len(motifs)}
    flat[name] = collected["paths"].reshape(-1, collected["paths"].shape[-1])
    flat[name] = flat[name][flat[name][:, 0] >= 0]
  names = list(tasks)
  report["shared"] = {f"{b}_in_{a}": shared_paths(flat[a], flat[b])
                      for a in names for b in names if a != b}
  return report, tries


def paths_run(workdir: str, *, batches: int = 4, tasks: Optional[Mapping[str, Mapping]] = None,
              budget: int = 1 << 14, step: Optional[int] = None, write: bool = True,
              command: Optional[str] = None) -> dict[str, Any]:
  """`paths_experiment`'s report on a run's checkpoint; with `write`, `paths.json`, `paths.md`,
  `paths.png` and each task's trie (`paths_trie/<task>`, `load_trie`) in the workdir.
  `command`, if given, is recorded (the command line that made the report)."""
  experiment = runs.load_experiment(workdir, step)
  if not experiment.family.routes:   # Before any array is read.
    raise ValueError(f"{workdir} holds a {experiment.model_type!r} run; routing paths need a "
                     "memory-kernel run")
  params = runs.load_run(workdir, step)[1]
  report, tries = paths_experiment(experiment, params, batches=batches, budget=budget,
                                   tasks=tasks or {experiment.task.name: {}})
  report["workdir"] = workdir
  if command:
    report["command"] = command
  if write:
    for name, trie in tries.items():
      save_trie(os.path.join(workdir, TRIE_DIR, name), trie)
    runs.write_json(os.path.join(workdir, PATHS_FILE), report)
    runs.write_text(os.path.join(workdir, TABLE_FILE), format_table(report))
    save_plot(report, os.path.join(workdir, PLOT_FILE))
  return report


def save_trie(path: str, trie: PathTrie) -> None:
  """Saves `trie.state()` with orbax at `path` (a directory; an older one is replaced)."""
  path = os.path.abspath(path)
  with ocp.StandardCheckpointer() as saver:
    saver.save(path, trie.state(), force=True)


def load_trie(path: str) -> PathTrie:
  """The trie `save_trie` saved at `path`."""
  with ocp.StandardCheckpointer() as loader:
    return PathTrie.from_state(loader.restore(os.path.abspath(path)))


def describe_path(path: Sequence[int], heads: int) -> str:
  """'L0H1 level 3: 0 1 1' for symbols [layer * heads + head, level, choices...]."""
  layer, head = divmod(path[0], heads)
  return f"L{layer}H{head} level {path[1]}: " + (" ".join(str(c) for c in path[2:]) or "-")


def format_table(report: Mapping[str, Any]) -> str:
  """Markdown: per task, a row per layer and head, then the most frequent motifs."""
  lines = []
  for name, t in report["tasks"].items():
    heads = 1 + max(int(k.split("head_")[1]) for k in t["heads"])
    lines += [f"## {name} ({t['queries']:,} scored queries; mean next-best-span loss delta "
              f"{t['utility_mean']:+.4f} nats)", "",
              "| layer/head | distinct paths | entropy (bits) | top-16 share | token explains "
              "| previous token explains | recurs in sequence | recurs across sequences "
              "| proposal by token: accepted / prefix | most frequent path: accepted / prefix |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for key, s in t["heads"].items():
      lines.append(f"| {key} | {s['distinct_paths']:,} | {s['entropy_bits']:.2f} | "
                   f"{s['top16_share']:.3f} | {s['token']['fraction']:.3f} | "
                   f"{s['previous_token']['fraction']:.3f} | "
                   f"{s['recurs']['within_sequence']:.3f} | "
                   f"{s['recurs']['across_sequences']:.3f} | "
                   f"{s['proposals']['by_token']['accepted']:.3f} / "
                   f"{s['proposals']['by_token']['prefix']:.3f} | "
                   f"{s['proposals']['most_frequent']['accepted']:.3f} / "
                   f"{s['proposals']['most_frequent']['prefix']:.3f} |")
    lines += ["", "| motif | count | utility (nats) | entropy (bits) |",
              "| --- | ---: | ---: | ---: |"]
    for m in t["motifs"][:16]:
      u = "-" if m["utility"] is None else f"{m['utility']:+.4f}"
      lines.append(f"| {describe_path(m['path'], heads)} | {m['count']:.0f} | {u} | "
                   f"{m['entropy_bits']:.2f} |")
    lines.append("")
  for key, value in report.get("shared", {}).items():
    lines.append(f"- paths of {key.replace('_in_', ' taken in ')}: {value:.3f}")
  return "\n".join(lines) + "\n"


def save_plot(report: Mapping[str, Any], path: str) -> None:
  """Motif frequency against utility, per task (one point per motif)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # Lazy: only plots need it.
  from matplotlib.figure import Figure
  from matplotlib.ticker import NullFormatter

  names = list(report["tasks"])
  fig = Figure(figsize=(5 * len(names), 4))
  FigureCanvasAgg(fig)
  for ax, name in zip(np.atleast_1d(fig.subplots(1, len(names))), names):
    ms = [m for m in report["tasks"][name]["motifs"] if m["utility"] is not None]
    points = ax.scatter([m["count"] for m in ms], [m["utility"] for m in ms],
                        c=[m["entropy_bits"] for m in ms], cmap="viridis")
    fig.colorbar(points, ax=ax, label="entropy of the next choice (bits)")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_xlabel("motif frequency (queries)")
    ax.set_ylabel("utility: next-best-span loss delta (nats)")
    ax.set_title(name)
  fig.tight_layout()
  fig.savefig(path, dpi=100)

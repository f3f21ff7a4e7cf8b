r"""Evaluates a trained run again: other lengths, another setting of its task; `memkernel.runs`.

  python -m experiments.evaluate --workdir=runs/mqar --lengths=512,8192 --task=distance=uniform
  python -m experiments.evaluate --workdir=runs/mqar --lengths=32768 --batches=2
  python -m experiments.evaluate --workdir=runs/induction --lengths=2048,8192 --beam_width=8
  python -m experiments.evaluate --workdir=runs/mqar --stream=validation
  python -m experiments.evaluate --workdir=runs/mqar_scattered --lengths=8192 --search_width=8
  python -m experiments.evaluate --workdir=runs/mqar_scattered --lengths=8192 --node_reps=8
  python -m experiments.evaluate --workdir=runs/mqar_bc --model=em_items=32 --task=num_pairs=64
  python -m experiments.evaluate --workdir=runs/mqar_scattered --lengths=1048576 \
      --batch_size=1 --batches=32 --chunk=4096

Uses the run's own evaluation (eval seed stream, batch size, evaluation beam). Prints one line per
length and writes the result, with the command, to --out (default WORKDIR/eval_<tag>.json, where
the tag names the task changes and the beam; an existing file is never overwritten). With
--beam_width a kernel run routes with another beam: at lengths beyond training, a wider beam that
recovers the routing recall says the answer leaf was ranked just outside the trained beam.
--search_width searches with a wider beam and reads the same number of leaves (the re-rank
picks them), so it separates a search that loses the answer from a read that cannot use more.
--node_reps=M routes by every tree node's M most salient tokens' keys (the best of them scores
the node) instead of its pooled summary key; no parameter changes, so any trained run takes it.
--stream=validation draws the batches from the validation stream, on which choices (steps,
widths, curricula) are tuned; the default 'test' stream is the one results are reported on.
--route_hints=WORKDIR/route_hints.npz (written by `experiments.traces`) biases every routing head
toward the nodes holding a token that follows its query token's hint, by --hint_alpha times the
read trace's edge strength (--hint_table=shuffled: the control built from shuffled reads), for
the heads whose trace predicted the leaf they read on at least --hint_gate of held-out queries.
With --chunk the recurrent form keeps which tokens every tree node follows in its memory (packed
sets of 4 * ceil(V / 32) bytes per node), so hints reach any length the recurrent form does.

--model=FIELD=VALUE changes a field of the model's memory that no parameter depends on (the
family's `memory_fields`: for the brain-core its episodic items, read width, decays, threshold
and boundary rules), e.g. fewer episodic items than the facts a sequence holds.

--chunk=N runs the recurrent form over N-token chunks with the memory carried instead of the
parallel form: it holds one chunk's activations at a time, so lengths to 2^20 tokens fit on a
CPU (batch 1); the two forms agree. Each length also records its wall time and peak memory.
"""

import math

from absl import flags

from experiments import _cli
from memkernel import runs
from memkernel.paths import trace_study

_WORKDIR = flags.DEFINE_string("workdir", None, "A training run's --workdir.")
_LENGTHS = flags.DEFINE_list("lengths", None, "Sequence lengths (default: the run's "
                             "eval.lengths).")
_TASK = flags.DEFINE_multi_string("task", [], "A task field to change, FIELD=VALUE (repeatable), "
                                  "e.g. distance=uniform.")
_MODEL = flags.DEFINE_multi_string("model", [], "A memory field of the model config to change, "
                                   "FIELD=VALUE (repeatable; the family's memory_fields, e.g. "
                                   "em_items=32 for a brain-core run).")
_BATCHES = flags.DEFINE_integer("batches", None, "Batches per length (default: the run's).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "Sequences per batch (default: the "
                                   "run's eval.batch_size).")
_CHUNK = flags.DEFINE_integer("chunk", None, "Run the recurrent form over chunks of this many "
                              "tokens, the memory carried (for lengths whose parallel form does "
                              "not fit; default: the parallel form).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
_BEAM = flags.DEFINE_integer("beam_width", None, "Leaves each routing head selects (kernel runs; "
                             "default: the run's model.beam_width).")
_SEARCH = flags.DEFINE_integer("search_width", None, "Nodes each head's beam keeps per routing "
                               "step (kernel runs with the leaf re-rank; >= the beam width, the "
                               "same leaves read; default: the run's model.search_width).")
_REPS = flags.DEFINE_integer("node_reps", None, "Representative keys per tree node the router "
                             "scores nodes by (kernel runs; 0: the pooled summary keys; default: "
                             "the run's model.node_reps).")
_STREAM = flags.DEFINE_enum("stream", None, ["test", "validation"], "Evaluation stream: tune "
                            "choices on 'validation', report 'test' (default: the run's, 'test').")
_DROP = flags.DEFINE_list("drop", [], "Memory sources to switch off, e.g. episodic,procedural "
                          "(the family's source names; the run-time ablation).")
_HINTS = flags.DEFINE_string("route_hints", None, "Routing hints (kernel runs, either form, "
                             "synthetic probes): the route_hints.npz `experiments.traces` "
                             "writes; each head favours what follows its query token's hint.")
_HINT_ALPHA = flags.DEFINE_float("hint_alpha", 1.0, "With --route_hints: the hint's weight "
                                 "(added to the routing scores, times the edge's strength).")
_HINT_TABLE = flags.DEFINE_enum("hint_table", "trace", ["trace", "shuffled"], "With "
                                "--route_hints: the read trace's table, or the control built "
                                "from shuffled reads.")
_HINT_GATE = flags.DEFINE_float("hint_gate", 0.5, "With --route_hints: heads whose trace "
                                "predicted the leaf read on fewer held-out queries get no hint.")
_OUT = flags.DEFINE_string("out", None, "Result JSON (default: WORKDIR/eval_<tag>.json).")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  del argv  # Checked by _cli.run.
  _cli.check_directory("workdir", _WORKDIR.value)
  lengths = _cli.parse_lengths(_LENGTHS.value)
  task = runs.parse_task_overrides(_TASK.value)
  memory = runs.parse_task_overrides(_MODEL.value, flag="model")
  hints = None
  if _HINTS.value is not None:
    if not math.isfinite(_HINT_ALPHA.value) or _HINT_ALPHA.value < 0:
      raise ValueError(f"--hint_alpha must be a finite number >= 0, got {_HINT_ALPHA.value}")
    hints = trace_study.load_hint_table(_HINTS.value, _HINT_TABLE.value, _HINT_ALPHA.value,
                                        _HINT_GATE.value)
  changes = (sorted(task.items()) + sorted(memory.items())
             + ([("beam", _BEAM.value)] if _BEAM.value is not None else [])
             + ([("search", _SEARCH.value)] if _SEARCH.value is not None else [])
             + ([("reps", _REPS.value)] if _REPS.value is not None else [])
             + ([("stream", _STREAM.value)] if _STREAM.value is not None else [])
             + ([("chunk", _CHUNK.value)] if _CHUNK.value is not None else [])
             + ([("drop", "+".join(_DROP.value))] if _DROP.value else [])
             + ([("hints", f"{_HINT_TABLE.value}{_HINT_ALPHA.value:g}-gate{_HINT_GATE.value:g}")]
                if hints else []))
  tag = "_".join(f"{k}-{v}" for k, v in changes) or "default"
  out = _cli.new_result(_OUT.value, _WORKDIR.value, f"eval_{tag}.json")
  _cli.quiet_orbax()
  result = runs.evaluate_run(_WORKDIR.value, lengths=lengths, task=task, batches=_BATCHES.value,
                             step=_STEP.value, beam_width=_BEAM.value,
                             stream=_STREAM.value, search_width=_SEARCH.value,
                             node_reps=_REPS.value, batch_size=_BATCH_SIZE.value,
                             chunk=_CHUNK.value, progress=_CHUNK.value is not None,
                             drop=_DROP.value, route_hints=hints, memory=memory)
  beam = (f" (beam {result['beam_width']}, search {result['search_width']}, "
          f"reps {result['node_reps']})"
          if result["beam_width"] is not None else "")
  for length, metrics in result["lengths"].items():
    print(f"length {length}{beam}: " + ", ".join(
        f"{k} {v:.4f}" for k, v in sorted(metrics.items())
        if k in ("accuracy", "accuracy_se", "queries", "loss") or k.endswith("routing_recall")
        or k.endswith("routing_recall_blind"))
        + "; " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(result["cost"][length].items())))
  if hints is not None:
    result["route_hints"] = {"file": _HINTS.value, "table": _HINT_TABLE.value,
                             "alpha": _HINT_ALPHA.value, "gate": _HINT_GATE.value}
  result["command"] = _cli.command("evaluate")
  runs.write_json(out, result)
  print(f"wrote {out}")


if __name__ == "__main__":
  _cli.run(main, name="evaluate")

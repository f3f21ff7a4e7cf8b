r"""The memory-line store's logits bias on real text (`memkernel.text_store`): a kNN-LM over bytes.

  python -m experiments.text_store write --workdir=runs/text/kernel_s0 \
      --store=runs/text/store_s0 --key_file=runs/text/store.key --sequences=64
  python -m experiments.text_store ask --workdir=runs/text/kernel_s0 \
      --store=runs/text/store_s0 --key_file=runs/text/store.key --out=runs/text/store_s0.json

`write` reads `--sequences` sequences of the training split and writes a line per byte (the
final hidden state -> the next byte) and seals the store. `ask`, in a new process, verifies the
store, chooses alpha and the similarity floor by the validation split's bits per byte, and
reports the test split (bits per byte, long-range recall of rare and common identifiers) with
that setting and without the store, at `--length` bytes.
"""

import os

from absl import flags
from absl import logging

from experiments import _cli
from memkernel import runs
from memkernel import text_store
from memkernel import text_task
from memkernel.store import keys as keys_lib

COMMANDS = ("write", "ask")
_WORKDIR = flags.DEFINE_string("workdir", None, "A trained run of the text task.")
_STORE = flags.DEFINE_string("store", None, "The store's directory.")
_KEY_FILE = flags.DEFINE_string("key_file", None, "The store's key file (made if missing).")
_SEQUENCES = flags.DEFINE_integer("sequences", 64, "write: training sequences read for lines "
                                  "(one line per byte).")
_LENGTH = flags.DEFINE_integer("length", None, "ask: sequence length (default: the run's "
                               "task.seq_len).")
_ALPHAS = flags.DEFINE_list("alphas", ["1", "2", "4", "8"], "ask: alphas tried.")
_FLOORS = flags.DEFINE_list("floors", ["0.5", "0.8"], "ask: similarity floors tried.")
_K = flags.DEFINE_integer("k", 5, "ask: lines per bias vector.")
_OUT = flags.DEFINE_string("out", None, "ask: the JSON file to write.")
flags.mark_flags_as_required(["workdir", "store", "key_file"])


def _settings() -> tuple[list[float], list[float]]:
  alphas = _cli.parse_numbers(_ALPHAS.value, "alphas")
  floors = _cli.parse_numbers(_FLOORS.value, "floors")
  if min(alphas) < 0:
    raise ValueError(f"--alphas must be >= 0, got {_ALPHAS.value}")
  if min(floors) < -1 or max(floors) > 1:
    raise ValueError(f"--floors must lie in [-1, 1], got {_FLOORS.value}")
  return alphas, floors


def main(argv):
  command = argv[1] if len(argv) > 1 else None
  if command not in COMMANDS:
    raise ValueError(f"give a command, one of {', '.join(COMMANDS)} (got {command!r})")
  for flag, value in (("sequences", _SEQUENCES.value), ("k", _K.value)):
    _cli.check_positive(flag, value)
  if _LENGTH.value is not None:
    _cli.check_positive("length", _LENGTH.value)
  if command == "ask":
    _settings()
    if _OUT.value and os.path.exists(_OUT.value):
      raise ValueError(f"{_OUT.value} exists; pass another --out")
  _cli.check_directory("workdir", _WORKDIR.value)
  experiment = runs.load_experiment(_WORKDIR.value)
  if not text_task.is_text(experiment.task):
    raise ValueError(f"{_WORKDIR.value} was trained on {experiment.task.name}; the store's text "
                     "row needs a run of the text task (configs/text.py)")
  length = _LENGTH.value or experiment.task.seq_len
  if length % experiment.task.leaf_size:
    raise ValueError(f"--length must be a multiple of the run's task.leaf_size "
                     f"({experiment.task.leaf_size}), got {length}")
  if command == "write" and not os.path.exists(_KEY_FILE.value):
    keys_lib.new_key_file(_KEY_FILE.value)
  key = keys_lib.read_key_file(_KEY_FILE.value)
  _cli.quiet_orbax()
  logging.set_verbosity(logging.WARNING)
  params = runs.load_run(_WORKDIR.value)[1]
  if command == "write":
    seal = text_store.write_store(_STORE.value, key, experiment, params,
                                  sequences=_SEQUENCES.value)
    print(f"wrote {seal.count} byte lines to {_STORE.value}; sealed")
    return
  alphas, floors = _settings()
  result = text_store.ask_store(_STORE.value, key, experiment, params, alphas=alphas,
                                floors=floors, k=_K.value, length=length,
                                progress=lambda m: print(m, flush=True))
  result["command"] = _cli.command("text_store")
  result["corpus"] = text_task.describe(experiment.task)
  for name, m in (("without the store", result["no_store"]["test"]),
                  (f"with the store (alpha {result['chosen']['alpha']:g}, floor "
                   f"{result['chosen']['similarity_floor']:g})", result["chosen"]["test"])):
    print(f"test {name}: {m['bits_per_byte']:.4f} +- {m['bits_per_byte_se']:.4f} bits/byte, "
          f"rare recall {m['recall_rare_accuracy']:.4f} +- {m['recall_rare_accuracy_se']:.4f}, "
          f"common recall {m['recall_common_accuracy']:.4f}")
  if _OUT.value:
    runs.write_json(_OUT.value, result)
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  _cli.run(main, name="text_store", positional=1)

r"""The cross-process recall probe (`memkernel.store_recall`): facts written by one process,
answered by another whose model memory is empty, with the store and without.

  python -m experiments.store_recall write --workdir=runs/mqar --store=runs/recall_store \
      --key_file=store.key --site=embed
  python -m experiments.store_recall ask --workdir=runs/mqar --store=runs/recall_store \
      --key_file=store.key --site=embed --out=runs/recall.json

`write` reads the fact documents, writes a line per fact (the output of submodule `--site` at the
key token -> the value token) and seals the store. `ask`, in a new process, verifies the store,
tunes alpha and the similarity floor on validation questions (the best question accuracy that
keeps the accuracy on in-context documents, whose keys no fact uses, within 1 point and the other
positions' loss within 1%), and reports the test questions, the in-context documents and the
conflicting ones (the facts' keys with other values) with the chosen setting and without the
store. Both regenerate the facts from `--facts_seed`; the answer key never enters the model.
"""

import os

from absl import flags
from absl import logging

from experiments import _cli
from memkernel import family as family_lib
from memkernel import runs
from memkernel import store_recall
from memkernel.store import keys as keys_lib

COMMANDS = ("write", "ask")
_WORKDIR = flags.DEFINE_string("workdir", None, "A trained run of the scattered MQAR task.")
_STORE = flags.DEFINE_string("store", None, "The store's directory.")
_KEY_FILE = flags.DEFINE_string("key_file", None, "The store's key file (made if missing).")
_SITE = flags.DEFINE_string("site", "embed", "The submodule whose output keys the lines.")
_FACTS = flags.DEFINE_integer("facts", 64, "How many facts (distinct keys).")
_FACTS_SEED = flags.DEFINE_integer("facts_seed", 0, "Seeds the facts and their documents.")
_DOCS = flags.DEFINE_integer("docs", 32, "ask: documents per stream (num_pairs queries each).")
_ALPHAS = flags.DEFINE_list("alphas", ["4", "8", "16", "32", "64"], "ask: alphas tried.")
_FLOORS = flags.DEFINE_list("floors", ["0.15", "0.5", "0.9"], "ask: similarity floors tried.")
_K = flags.DEFINE_integer("k", 5, "ask: lines per bias vector.")
_OUT = flags.DEFINE_string("out", None, "ask: the JSON file to write.")
flags.mark_flags_as_required(["workdir", "store"])


def _load():
  config, params = runs.load_run(_WORKDIR.value)
  task = runs.load_experiment(_WORKDIR.value).task
  if task.name != "mqar" or task.layout != "scattered":
    raise ValueError(f"{_WORKDIR.value} was trained on {task.name} ({task.layout}); the recall "
                     "probe needs the scattered MQAR task")
  return family_lib.build(config), params, task


def _settings() -> tuple[list[float], list[float]]:
  alphas = _cli.parse_numbers(_ALPHAS.value, "alphas")
  floors = _cli.parse_numbers(_FLOORS.value, "floors")
  if min(alphas) < 0:
    raise ValueError(f"--alphas must be >= 0, got {_ALPHAS.value}")
  if min(floors) < 0 or max(floors) > 1:
    raise ValueError(f"--floors must lie in [0, 1], got {_FLOORS.value}")
  return alphas, floors


def _write(model, params, task, key):
  seal = store_recall.write_store(_STORE.value, key, model, params, task, site=_SITE.value,
                                  facts=_FACTS.value, facts_seed=_FACTS_SEED.value)
  print(f"wrote {seal.count} fact lines to {_STORE.value} (site {_SITE.value}); sealed")


def _ask(model, params, task, key):
  alphas, floors = _settings()
  result = store_recall.ask_store(
      _STORE.value, key, model, params, task, site=_SITE.value, facts=_FACTS.value,
      facts_seed=_FACTS_SEED.value, docs=_DOCS.value, alphas=alphas, floors=floors, k=_K.value,
      progress=lambda m: print(m, flush=True))
  result["command"] = _cli.command("store_recall")
  none = result["no_store"]["test"]
  print(f"test questions without the store: {none['questions']['accuracy']:.4f} +- "
        f"{none['questions']['accuracy_se']:.4f} ({none['questions']['queries']} queries); "
        f"the nearest line asks the same key: {result['site_match']:.4f}")
  chosen = result["chosen"]
  if chosen is None:
    print("no setting kept the in-context accuracy and the other positions' loss: none chosen")
  else:
    t = chosen["test"]
    print(f"with the store (alpha {chosen['alpha']:g}, floor {chosen['similarity_floor']:g}): "
          f"questions {t['questions']['accuracy']:.4f} +- {t['questions']['accuracy_se']:.4f}; "
          f"in-context {t['in_context']['queries']['accuracy']:.4f} (without: "
          f"{none['in_context']['queries']['accuracy']:.4f}); conflicting "
          f"{t['conflicting']['queries']['accuracy']:.4f} (without: "
          f"{none['conflicting']['queries']['accuracy']:.4f})")
  if _OUT.value:
    runs.write_json(_OUT.value, result)
    print(f"wrote {_OUT.value}")


def main(argv):
  command = argv[1] if len(argv) > 1 else None
  if command not in COMMANDS:
    raise ValueError(f"give a command, one of {', '.join(COMMANDS)} (got {command!r})")
  for flag, value in (("facts", _FACTS.value), ("docs", _DOCS.value), ("k", _K.value)):
    _cli.check_positive(flag, value)
  if command == "ask":
    _settings()
    if _OUT.value and os.path.exists(_OUT.value):
      raise ValueError(f"{_OUT.value} exists; pass another --out")
  if not _KEY_FILE.value:
    raise ValueError("--key_file is required")
  if command == "write" and not os.path.exists(_KEY_FILE.value):
    keys_lib.new_key_file(_KEY_FILE.value)
  key = keys_lib.read_key_file(_KEY_FILE.value)
  _cli.quiet_orbax()
  logging.set_verbosity(logging.WARNING)
  model, params, task = _load()
  (_write if command == "write" else _ask)(model, params, task, key)


if __name__ == "__main__":
  _cli.run(main, name="store_recall", positional=1)

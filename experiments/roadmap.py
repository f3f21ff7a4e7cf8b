r"""Regenerates ROADMAP.md from ROADMAP.toml and the committed result files.

  python -m experiments.roadmap            # rewrite ROADMAP.md
  python -m experiments.roadmap --check    # exit 1 if ROADMAP.md is out of date

People write ROADMAP.toml (vision, phases, learnings, what each experiment is for); every number
in ROADMAP.md (success criteria and their check marks, experiments' outcomes, the status line) is
read from the result files under docs/ (`memkernel/roadmap.py`).
"""

import os

from absl import flags

from experiments import _cli
from memkernel import roadmap

_SOURCE = flags.DEFINE_string("source", "ROADMAP.toml", "The roadmap's source; result-file "
                              "globs are relative to its directory.")
_OUT = flags.DEFINE_string("out", "ROADMAP.md", "Where the roadmap goes.")
_CHECK = flags.DEFINE_bool("check", False, "Write nothing; exit 1 if --out is not what "
                           "regenerating it gives.")


def main(argv):
  del argv
  if not os.path.isfile(_SOURCE.value):
    raise FileNotFoundError(f"--source={_SOURCE.value} is not a file")
  text = roadmap.render(roadmap.load(_SOURCE.value),
                        os.path.dirname(os.path.abspath(_SOURCE.value)))
  current = None
  if os.path.exists(_OUT.value):
    with open(_OUT.value) as f:
      current = f.read()
  if _CHECK.value:
    if current != text:
      _cli.fatal(f"{_OUT.value} is out of date: run python -m experiments.roadmap", "roadmap")
    print(f"{_OUT.value} is up to date")
    return
  tmp = _OUT.value + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, _OUT.value)
  print(f"wrote {_OUT.value}" + (" (unchanged)" if current == text else ""))


if __name__ == "__main__":
  _cli.run(main, name="roadmap")

r"""Scaling benchmark of the kernel and its peers; everything it does is `memkernel.bench.bench.run`.

  python -m experiments.bench --config=configs/bench.py --out=/tmp/bench
  python -m experiments.bench --config=configs/bench.py:smoke --out=/tmp/bench_smoke
  python -m experiments.bench --config=configs/bench.py --out=/tmp/bench_fwd \
      --config.models=kernel,dense --config.lengths=8192,32768 --config.modes=forward
  python -m experiments.bench --config=configs/bench.py --out=/tmp/costs --costs \
      --config.lengths=1024,4096,16384,65536,262144,1048576

Writes OUT/bench.json (one row per model x length x mode, plus the kernel's components),
OUT/bench_meta.json, OUT/bench.md and the PNG plots. Fields and variants: configs/bench.py.
With --costs nothing is timed: the analytic FLOPs and state bytes of one decoded token at each
context length (kernel vs dense attention) go to OUT/costs.json and OUT/costs.md, and are printed.

On the CPU the command sets its own allocator: where GLIBC_TUNABLES is unset it starts itself
again with `bench.RECOMMENDED_GLIBC_TUNABLES` (glibc reads them only when a process starts; they
keep freed memory resident, without which large fresh XLA buffers are page-faulted on every call).
`--allocator=inherit` keeps the environment as it is; bench_meta.json records the setting.
"""

import json
import os
import sys

from absl import flags
from ml_collections import config_flags

from experiments import _cli
from memkernel.bench import bench as bench_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Benchmark config file.",
                                          lock_config=True)
_OUT = flags.DEFINE_string("out", None, "bench.json, bench.md and the plots go here.")
_COSTS = flags.DEFINE_bool("costs", False, "Only write the analytic per-token cost table "
                           "(FLOPs and state bytes per decoded token vs context length).")
_ALLOCATOR = flags.DEFINE_enum("allocator", "recommended", ["recommended", "inherit"],
                               "On the CPU: 'recommended' starts the command again with the "
                               "recommended GLIBC_TUNABLES where they are unset; 'inherit' keeps "
                               "the environment.")
flags.mark_flags_as_required(["config", "out"])


def main(argv):
  del argv  # Checked by _cli.run.
  _cli.check_directory("out", _OUT.value)
  try:
    bench = bench_lib.parse_config(_CONFIG.value)  # Fails fast, before anything is compiled.
  except ValueError as e:
    raise ValueError(f"invalid config: {e}") from e
  if not _COSTS.value and _ALLOCATOR.value == "recommended":
    env = bench_lib.allocator_environment(os.environ)
    if env is not None:
      print(f"restarting with GLIBC_TUNABLES={env['GLIBC_TUNABLES']}", file=sys.stderr, flush=True)
      os.execve(sys.executable, [sys.executable, "-m", "experiments.bench"] + sys.argv[1:], env)
  command = _cli.command("bench")
  if _COSTS.value:
    rows = bench_lib.per_token_costs(bench, bench.lengths)
    table = bench_lib.per_token_costs_markdown(rows)
    os.makedirs(_OUT.value, exist_ok=True)
    with open(os.path.join(_OUT.value, "costs.json"), "w") as f:
      json.dump({"command": command, "rows": rows}, f, indent=1)
    with open(os.path.join(_OUT.value, "costs.md"), "w") as f:
      f.write(f"```bash\n{command}\n```\n\n{table}")
    print(table)
    return
  bench_lib.run(_CONFIG.value, _OUT.value, command=command)


if __name__ == "__main__":
  _cli.run(main, fields="configs/bench.py")

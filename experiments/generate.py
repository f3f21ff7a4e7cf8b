r"""Samples tokens from a trained run of any family, printing them as they come; `memkernel.sampler`.

  python -m experiments.generate --workdir=runs/mqar --prompt="3 17 130 5" --max_new_tokens=16
  python -m experiments.generate --workdir=runs/mqar --prompt="3,17,130" --temperature=0.8 --top_k=8

The prompt is token ids (the probes' vocabularies are synthetic), separated by spaces or commas.
It is prefilled with the family's recurrent form and decoded with its single-token step.
"""

import re

from absl import flags

from experiments import _cli
from memkernel import family as family_lib
from memkernel import runs
from memkernel import sampler

_WORKDIR = flags.DEFINE_string("workdir", None, "A training run's --workdir.")
_PROMPT = flags.DEFINE_string("prompt", None, "Token ids, separated by spaces or commas.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 16, "Tokens to sample.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "Softmax temperature; 0 samples greedily.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0: all).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
flags.mark_flags_as_required(["workdir", "prompt"])


def parse_prompt(text: str) -> list[int]:
  """Token ids from "3 17 130" or "3,17,130"."""
  parts = [p for p in re.split(r"[\s,]+", text.strip()) if p]
  try:
    ids = [int(p) for p in parts]
  except ValueError as e:
    raise ValueError(f"--prompt must be integer token ids separated by spaces or commas, "
                     f"got {text!r}") from e
  if not ids:
    raise ValueError("--prompt is empty")
  return ids


def main(argv):
  del argv  # Checked by _cli.run.
  _cli.check_directory("workdir", _WORKDIR.value)
  _cli.check_positive("max_new_tokens", _MAX_NEW.value)
  prompt = parse_prompt(_PROMPT.value)
  _cli.quiet_orbax()
  config, params = runs.load_run(_WORKDIR.value, _STEP.value)
  config = family_lib.of_config(config).with_capacity(config, len(prompt) + _MAX_NEW.value)
  model = family_lib.build(config)
  print(" ".join(map(str, prompt)), end="", flush=True)
  sampler.generate(model, params, prompt, max_new_tokens=_MAX_NEW.value,
                   temperature=_TEMPERATURE.value, top_k=_TOP_K.value, seed=_SEED.value,
                   callback=lambda i, tokens: print(f" {int(tokens[0])}", end="", flush=True))
  print()


if __name__ == "__main__":
  _cli.run(main, name="generate")

r"""Samples tokens from a trained run of any family, printing them as they come; `memkernel.sampler`.

  python -m experiments.generate --workdir=runs/mqar --prompt="3 17 130 5" --max_new_tokens=16
  python -m experiments.generate --workdir=runs/mqar --prompt="3,17,130" --temperature=0.8 --top_k=8

  python -m experiments.generate --workdir=runs/mqar --prompt="3 17 130" \
      --store=runs/recall_store --key_file=store.key --store_alpha=16 --store_site=embed

The prompt is token ids (the probes' vocabularies are synthetic), separated by spaces or commas.
It is prefilled with the family's recurrent form and decoded with its single-token step.
`--store` adds a persistent memory-line store's bias to every step's logits (kNN-LM style,
`memkernel.store_bias`): alpha * the bias vector of the k heaviest lines matching the output of
submodule `--store_site`; the store is verified first and refused if damaged.
"""

import contextlib
import re

from absl import flags

from experiments import _cli
from memkernel import family as family_lib
from memkernel import runs
from memkernel import sampler
from memkernel import store_bias
from memkernel.store import keys as keys_lib
from memkernel.store import store as store_lib
from memkernel.store import verification

_WORKDIR = flags.DEFINE_string("workdir", None, "A training run's --workdir.")
_PROMPT = flags.DEFINE_string("prompt", None, "Token ids, separated by spaces or commas.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 16, "Tokens to sample.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "Softmax temperature; 0 samples greedily.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0: all).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
_STORE = flags.DEFINE_string("store", None, "A memory-line store whose bias joins the logits.")
_KEY_FILE = flags.DEFINE_string("key_file", None, "The store's key file.")
_STORE_ALPHA = flags.DEFINE_float("store_alpha", None,
                                  "The store bias's weight (default: StoreConfig.bias_alpha).")
_STORE_K = flags.DEFINE_integer("store_k", None,
                                "Lines per bias vector (default: StoreConfig.bias_k).")
_STORE_SITE = flags.DEFINE_string("store_site", "final_norm",
                                  "The submodule whose output queries the store.")
_STORE_FLOOR = flags.DEFINE_float("store_floor", None,
                                  "The store's similarity floor (default: the store's config).")
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
  if _STORE.value:
    if not _KEY_FILE.value:
      raise ValueError("--store needs --key_file")
    if _STORE_ALPHA.value is not None and not _STORE_ALPHA.value >= 0:
      raise ValueError(f"--store_alpha must be >= 0, got {_STORE_ALPHA.value}")
    if _STORE_K.value is not None:
      _cli.check_positive("store_k", _STORE_K.value)
    if _STORE_FLOOR.value is not None and not 0 <= _STORE_FLOOR.value <= 1:
      raise ValueError(f"--store_floor must lie in [0, 1], got {_STORE_FLOOR.value}")
  _cli.quiet_orbax()
  config, params = runs.load_run(_WORKDIR.value, _STEP.value)
  config = family_lib.of_config(config).with_capacity(config, len(prompt) + _MAX_NEW.value)
  model = family_lib.build(config)
  with contextlib.ExitStack() as stack:
    bias = _store_bias(stack, config.vocab_size) if _STORE.value else None
    print(" ".join(map(str, prompt)), end="", flush=True)
    sampler.generate(model, params, prompt, max_new_tokens=_MAX_NEW.value,
                     temperature=_TEMPERATURE.value, top_k=_TOP_K.value, seed=_SEED.value,
                     callback=lambda i, tokens: print(f" {int(tokens[0])}", end="", flush=True),
                     logits_bias=bias, bias_site=_STORE_SITE.value)
    print()


def _store_bias(stack: contextlib.ExitStack, vocab_size: int) -> store_bias.StoreBias:
  key = keys_lib.read_key_file(_KEY_FILE.value)
  verification.require_ok(_STORE.value, key)
  config = {} if _STORE_FLOOR.value is None else {"similarity_floor": _STORE_FLOOR.value}
  store = stack.enter_context(store_lib.MemoryLineStore.open(_STORE.value, key, config=config))
  return store_bias.StoreBias(store, alpha=_STORE_ALPHA.value, k=_STORE_K.value,
                              vocab_size=vocab_size)


if __name__ == "__main__":
  _cli.run(main, name="generate")

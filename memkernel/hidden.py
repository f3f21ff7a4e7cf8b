"""A model's internal vector at every position, beside the logits, for any family.

    logits_BTV, hidden_BTD = hidden.parallel(model, params, tokens_BT)               # final_norm
    logits_BTV, embed_BTD = hidden.parallel(model, params, tokens_BT, site="embed")
    logits_BV, memory, hidden_BD = hidden.step(model, params, token_B, memory)

A site is the path of a submodule ("final_norm", "embed", "layer_0/norm"); its output, captured
with Flax's `capture_intermediates`, is what a kNN-LM style memory keys on
(`memkernel.store_bias`). The default, `final_norm`, is the input of the unembedding (kNN-LM's
choice); every family names its last norm so and its token embedding `embed`. Nothing in the
model changes: the logits are those of `model.__call__` and `model.step`.
"""

from __future__ import annotations

import functools
from typing import Any

import jax

FINAL_NORM = "final_norm"


def check_site(site: str) -> None:
  """Raises ValueError unless `site` is a submodule path (whether the model has it shows only
  when it runs)."""
  _site_path(site)


def _site_path(site: str) -> tuple[str, ...]:
  if not isinstance(site, str) or not site or any(not p for p in site.split("/")):
    raise ValueError(f"a hidden-state site is a submodule path like 'final_norm' or "
                     f"'layer_0/norm', got {site!r}")
  return tuple(site.split("/"))


def _output(state, path: tuple[str, ...], site: str) -> jax.Array:
  node = state.get("intermediates", {})
  for name in path:
    node = node.get(name, {}) if isinstance(node, dict) else {}
  if "__call__" not in node:
    raise ValueError(f"the model has no submodule {site!r} called on this pass: its output "
                     "cannot be read")
  return node["__call__"][0]


@functools.lru_cache(maxsize=16)
def _compiled(model, site: str):
  path = _site_path(site)
  capture = lambda module, method: method == "__call__" and tuple(module.scope.path) == path

  def run_parallel(params, tokens, segments):
    (logits, _), state = model.apply({"params": params}, tokens, segments,
                                     capture_intermediates=capture, mutable=["intermediates"])
    return logits, _output(state, path, site)

  def run_step(params, token, memory):
    (logits, memory), state = model.apply({"params": params}, token, memory, method=model.step,
                                          capture_intermediates=capture,
                                          mutable=["intermediates"])
    return logits, memory, _output(state, path, site)[:, 0]

  return jax.jit(run_parallel), jax.jit(run_step)


def parallel(model, params: Any, tokens: jax.Array, segments: Any = None, *,
             site: str = FINAL_NORM):
  """(logits float32 [B, T, V], the site's output [B, T, D]) of the parallel form."""
  _site_path(site)
  return _compiled(model, site)[0](params, tokens, segments)


def step(model, params: Any, token: jax.Array, memory: Any, *, site: str = FINAL_NORM):
  """(logits float32 [B, V], memory', the site's output [B, D]) of the single-token step."""
  _site_path(site)
  return _compiled(model, site)[1](params, token, memory)

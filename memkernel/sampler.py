"""The sampler: prefill with the recurrent form, decode with the single-token step, any family.

    result = memkernel.generate(model, params, prompt_BP, max_new_tokens=32, temperature=0.0)

The prompt goes through `model.scan` once (one compiled program for its length), then each new
token through `model.step` (one compiled program for every step), so the memory a family keeps
(the kernel's tree and token cache, a peer's KV cache or ring buffer) is what the decode reads.
The logits the sampler samples from are those of the parallel form on the same tokens (tested).

`logits_bias` adds a host-side term to every step's logits from the model's final hidden state
(`memkernel.hidden`): a persistent memory-line store queried kNN-LM style
(`memkernel.store_bias.StoreBias`). The prompt's last token then goes through `model.step`, so
the first sampled token is biased too.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from memkernel import family as family_lib
from memkernel import hidden as hidden_lib

# callback(step_index, tokens int32 [B]) is called on the host after every sampled token.
TokenCallback = Callable[[int, np.ndarray], None]
# logits_bias(hidden float32 [B, D]) -> float32 [B, V], added to the logits before sampling.
LogitsBias = Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True)
class SampleResult:
  """What `generate` returns.

  Attributes:
    tokens: int32 [B, P + N], the prompt followed by the sampled tokens.
    logits: float32 [B, N, V], the logits each sampled token was drawn from (position P - 1 + i
      predicts token P + i).
    memory: the family's memory after the prompt and every sampled token but the last, which is
      sampled and not yet fed (feed it with `model.step` to continue).
  """

  tokens: np.ndarray
  logits: np.ndarray
  memory: Any


def sample_token(logits_BV: jax.Array, key: jax.Array, *, temperature: float,
                 top_k: int) -> jax.Array:
  """One token per row: greedy at temperature 0, else softmax(logits / temperature) restricted to
  the `top_k` largest logits (0: all)."""
  if temperature == 0.0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits = logits_BV / temperature
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _check(model: nn.Module, prompt: Any, max_new_tokens: int, temperature: float,
           top_k: int) -> np.ndarray:
  config = model.config
  prompt = np.asarray(prompt)
  if prompt.ndim == 1:
    prompt = prompt[None]
  if prompt.ndim != 2 or prompt.shape[1] == 0 or not np.issubdtype(prompt.dtype, np.integer):
    raise ValueError(f"prompt must be a non-empty int array [P] or [B, P], got shape "
                     f"{prompt.shape} and dtype {prompt.dtype}")
  if prompt.min() < 0 or prompt.max() >= config.vocab_size:
    raise ValueError(f"prompt token ids must lie in [0, {config.vocab_size}), got "
                     f"[{prompt.min()}, {prompt.max()}]")
  if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
  if not isinstance(temperature, (int, float)) or not temperature >= 0:
    raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature!r}")
  if not isinstance(top_k, int) or isinstance(top_k, bool) or not 0 <= top_k <= config.vocab_size:
    raise ValueError(f"top_k must be an integer in [0, {config.vocab_size}], got {top_k!r}")
  total = prompt.shape[1] + max_new_tokens
  if total > config.max_seq_len:
    raise ValueError(f"prompt ({prompt.shape[1]}) + max_new_tokens ({max_new_tokens}) = {total} "
                     f"tokens exceed the model's max_seq_len={config.max_seq_len}; build it with "
                     "family.with_capacity(config, length)")
  return prompt.astype(np.int32)


@functools.lru_cache(maxsize=8)
def _compiled(model: nn.Module, temperature: float, top_k: int):
  """(prefill, decode) for one model and sampling setting, each compiled once per shape."""

  def prefill(params, prompt, memory):
    return model.apply({"params": params}, prompt, memory, method=model.scan)

  def decode(params, token, memory, key):
    logits, memory = model.apply({"params": params}, token, memory, method=model.step)
    return logits, memory, sample_token(logits, key, temperature=temperature, top_k=top_k)

  return jax.jit(prefill), jax.jit(decode)


def generate(model: nn.Module, params: Any, prompt: Any, *, max_new_tokens: int,
             temperature: float = 1.0, top_k: int = 0, seed: int = 0,
             callback: Optional[TokenCallback] = None,
             logits_bias: Optional[LogitsBias] = None,
             bias_site: str = hidden_lib.FINAL_NORM) -> SampleResult:
  """Samples `max_new_tokens` tokens after `prompt` from any registered family's model.

  Args:
    model: a family's Flax module (`memkernel.family.build(config)`), whose `max_seq_len` holds
      the prompt and the new tokens.
    params: its parameters.
    prompt: int [P] or [B, P] token ids.
    max_new_tokens: tokens to sample (N).
    temperature: softmax temperature; 0 samples greedily.
    top_k: sample among the k most likely tokens only (0: all).
    seed: seeds the sampling (token i uses `fold_in(key(seed), i)`).
    callback: called with (i, tokens [B]) as each token is sampled, e.g. to print it.
    logits_bias: maps each step's final hidden state [B, D] to a term [B, V] added to its logits
      (on the host); `SampleResult.logits` then holds the biased logits.
    bias_site: the submodule whose output `logits_bias` receives (`memkernel.hidden`).

  Returns:
    A `SampleResult`.

  Raises:
    ValueError: a bad prompt, setting or a model too short for P + N tokens (named).
  """
  prompt = _check(model, prompt, max_new_tokens, temperature, top_k)
  if logits_bias is not None:
    hidden_lib.check_site(bias_site)
    return _generate_biased(model, params, prompt, max_new_tokens, float(temperature),
                            int(top_k), seed, callback, logits_bias, bias_site)
  prefill, decode = _compiled(model, float(temperature), int(top_k))
  memory = family_lib.init_memory(model.config, prompt.shape[0])
  logits_BPV, memory = prefill(params, jnp.asarray(prompt), memory)
  key = jax.random.key(seed)
  last = logits_BPV[:, -1]
  token = sample_token(last, jax.random.fold_in(key, 0), temperature=float(temperature),
                       top_k=int(top_k))
  tokens, logits = [], [last]
  for i in range(max_new_tokens):
    _emit(i, token, tokens, callback)
    if i + 1 == max_new_tokens:
      break
    last, memory, token = decode(params, token, memory, jax.random.fold_in(key, i + 1))
    logits.append(last)
  return _result(prompt, tokens, logits, memory)


def _emit(i: int, token: jax.Array, tokens: list, callback: Optional[TokenCallback]) -> None:
  """Brings sampled token i to the host, keeps it and tells the callback."""
  host_token = np.asarray(jax.device_get(token))
  tokens.append(host_token)
  if callback is not None:
    callback(i, host_token)


def _result(prompt: np.ndarray, tokens: list, logits: list, memory: Any) -> SampleResult:
  return SampleResult(tokens=np.concatenate([prompt, np.stack(tokens, axis=1)], axis=1),
                      logits=np.asarray(jax.device_get(jnp.stack(logits, axis=1))),
                      memory=memory)


@functools.lru_cache(maxsize=8)
def _sampler(temperature: float, top_k: int):
  return jax.jit(functools.partial(sample_token, temperature=temperature, top_k=top_k))


def _biased(logits_bias: LogitsBias, logits: jax.Array, hidden: jax.Array) -> jax.Array:
  term = np.asarray(logits_bias(np.asarray(jax.device_get(hidden), np.float32)), np.float32)
  if term.shape != logits.shape:
    raise ValueError(f"logits_bias returned shape {term.shape}, the logits are {logits.shape}")
  return logits + term


def _generate_biased(model, params, prompt, max_new_tokens, temperature, top_k, seed, callback,
                     logits_bias, site) -> SampleResult:
  """`generate` with a host-side logits term after every step (the prompt's last token too)."""
  prefill, _ = _compiled(model, temperature, top_k)
  sample = _sampler(temperature, top_k)
  memory = family_lib.init_memory(model.config, prompt.shape[0])
  if prompt.shape[1] > 1:
    _, memory = prefill(params, jnp.asarray(prompt[:, :-1]), memory)
  last, memory, hidden = hidden_lib.step(model, params, jnp.asarray(prompt[:, -1]), memory,
                                         site=site)
  key = jax.random.key(seed)
  tokens, logits = [], []
  for i in range(max_new_tokens):
    last = _biased(logits_bias, last, hidden)
    logits.append(last)
    token = sample(last, jax.random.fold_in(key, i))
    _emit(i, token, tokens, callback)
    if i + 1 == max_new_tokens:
      break
    last, memory, hidden = hidden_lib.step(model, params, token, memory, site=site)
  return _result(prompt, tokens, logits, memory)

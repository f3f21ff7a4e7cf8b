"""The sampler: its logits are the parallel form's on the same tokens, for every family."""

import subprocess
import sys

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from memkernel import family
from memkernel import hidden as hidden_lib
from memkernel import sampler
from memkernel.kernel.config import KernelConfig
from memkernel.peers import PeerConfig


def _config(name: str):
  if name == "kernel":
    return KernelConfig(vocab_size=32, d_model=32, num_layers=1, max_seq_len=64, query_block=0)
  return PeerConfig(kind=name, vocab_size=32, d_model=32, num_layers=1, window=8, max_seq_len=64)


class SamplerTest(parameterized.TestCase):

  @parameterized.parameters("kernel", "dense", "sliding_window")
  def test_greedy_logits_equal_the_parallel_form(self, name):
    config = _config(name)
    model = family.build(config)
    params = model.init(jax.random.key(0), jnp.zeros((1, 16), jnp.int32))["params"]
    prompt = np.random.RandomState(0).randint(0, 32, (2, 21))
    seen = []
    result = sampler.generate(model, params, prompt, max_new_tokens=12, temperature=0.0,
                              callback=lambda i, tokens: seen.append((i, tokens.copy())))
    self.assertEqual(result.tokens.shape, (2, 33))
    np.testing.assert_array_equal(result.tokens[:, :21], prompt)
    full, _ = model.apply({"params": params}, jnp.asarray(result.tokens))
    np.testing.assert_allclose(result.logits, np.asarray(full[:, 20:32]), atol=1e-4)
    # Greedy: every sampled token is the argmax of the parallel form's logits before it.
    np.testing.assert_array_equal(result.tokens[:, 21:], np.argmax(full[:, 20:32], axis=-1))
    self.assertEqual([i for i, _ in seen], list(range(12)))
    np.testing.assert_array_equal(np.stack([t for _, t in seen], 1), result.tokens[:, 21:])

  @parameterized.parameters("kernel", "dense", "sliding_window")
  def test_a_logits_bias_is_added_from_the_hidden_state_of_every_step(self, name):
    config = _config(name)
    model = family.build(config)
    params = model.init(jax.random.key(0), jnp.zeros((1, 16), jnp.int32))["params"]
    prompt = np.random.RandomState(1).randint(0, 32, (2, 9))
    plain = sampler.generate(model, params, prompt, max_new_tokens=6, temperature=0.0)
    seen = []

    def zero(hidden):
      seen.append(hidden)
      return np.zeros((hidden.shape[0], 32), np.float32)
    same = sampler.generate(model, params, prompt, max_new_tokens=6, temperature=0.0,
                            logits_bias=zero)
    np.testing.assert_array_equal(same.tokens, plain.tokens)
    np.testing.assert_allclose(same.logits, plain.logits, atol=1e-4)
    # The hidden state it saw at each step is the parallel form's at that position.
    _, hidden_BTD = hidden_lib.parallel(model, params, jnp.asarray(plain.tokens))
    np.testing.assert_allclose(np.stack(seen, 1), np.asarray(hidden_BTD[:, 8:14]), atol=1e-4)
    # A bias toward token 5 wins every greedy step.
    push = lambda hidden: np.eye(32, dtype=np.float32)[[5] * hidden.shape[0]] * 1e4
    pushed = sampler.generate(model, params, prompt, max_new_tokens=6, temperature=0.0,
                              logits_bias=push)
    np.testing.assert_array_equal(pushed.tokens[:, 9:], 5)
    with self.assertRaisesRegex(ValueError, "logits_bias returned shape"):
      sampler.generate(model, params, prompt, max_new_tokens=2, temperature=0.0,
                       logits_bias=lambda h: np.zeros((2, 7)))

  def test_top_k_and_temperature_sample_only_the_top_tokens(self):
    logits = jnp.tile(jnp.arange(10.0)[None], (4, 1))
    keys = jax.random.split(jax.random.key(1), 64)
    draws = np.stack([sampler.sample_token(logits, k, temperature=5.0, top_k=3) for k in keys])
    self.assertEqual(set(np.unique(draws)), {7, 8, 9})
    greedy = sampler.sample_token(logits, keys[0], temperature=0.0, top_k=0)
    np.testing.assert_array_equal(greedy, [9, 9, 9, 9])

  @parameterized.named_parameters(
      ("too_long", dict(max_new_tokens=60), "exceed the model's max_seq_len"),
      ("zero_tokens", dict(max_new_tokens=0), "max_new_tokens"),
      ("bad_top_k", dict(max_new_tokens=2, top_k=-1), "top_k"),
      ("bad_temperature", dict(max_new_tokens=2, temperature=-1.0), "temperature"),
      ("out_of_vocab", dict(max_new_tokens=2, prompt=[1, 99]), r"\[0, 32\)"),
  )
  def test_bad_input_is_named_before_anything_compiles(self, kwargs, regex):
    model = family.build(_config("kernel"))
    kwargs = dict(kwargs)
    prompt = kwargs.pop("prompt", [1, 2, 3, 4, 5, 6, 7, 8])
    with self.assertRaisesRegex(ValueError, regex):
      sampler.generate(model, {}, prompt, **kwargs)

  def test_prompt_parsing_of_the_binary(self):
    from experiments import generate  # pylint: disable=g-import-not-at-top
    self.assertEqual(generate.parse_prompt(" 3, 17  130,5 "), [3, 17, 130, 5])
    with self.assertRaisesRegex(ValueError, "integer token ids"):
      generate.parse_prompt("3 x")
    result = subprocess.run([sys.executable, "-m", "experiments.generate", "--workdir=/nonexistent",
                             "--prompt=1 2"], capture_output=True, text=True, check=False)
    self.assertNotEqual(result.returncode, 0)
    self.assertNotIn("Traceback", result.stderr)
    self.assertRegex(result.stderr.strip().splitlines()[-1], r"^FATAL generate: .*/nonexistent")


if __name__ == "__main__":
  absltest.main()

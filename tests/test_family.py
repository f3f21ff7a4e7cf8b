"""The family protocol and its registry (`memkernel.family`).

* every registered family, and a family from outside the library (`toy_family`, registered with
  one line), meets the protocol: a validated config from its section, an empty memory, three
  forms that agree on a stream of two documents, its sources and boundaries;
* the toy family trains, evaluates, reloads and samples through the harness, which names no
  family: adding one touches its own package and one line of `FAMILIES`.
"""

import os
import tempfile
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest
from absl.testing import parameterized

from configs import mqar
from memkernel import costs
from memkernel import family
from memkernel import runs
from memkernel import sampler
from memkernel import train

TOY = {"toy": "toy_family:FAMILY"}  # The one registry line.

# Small model sections of each family (vocabulary 32, capacity 64).
_SECTIONS = {
    "kernel": {"vocab_size": 32, "d_model": 32, "num_layers": 1, "max_seq_len": 64,
               "teacher_weight": 0.0, "trunk_boundary": "reset", "tree_boundary": "reset"},
    "dense": {"vocab_size": 32, "d_model": 32, "num_layers": 1, "max_seq_len": 64},
    "sliding_window": {"vocab_size": 32, "d_model": 32, "num_layers": 1, "window": 16,
                       "max_seq_len": 64},
    "toy": {"vocab_size": 32, "max_seq_len": 64},
}


def _forms(model, parallel_fn, params, tokens, segments, config):
  """Logits of the parallel form, the recurrent form (two calls) and the step, [B, T, V] each
  (jitted: op by op, the kernel's forms take a minute on the CPU)."""
  parallel = parallel_fn(params, tokens, segments)
  memory = family.init_memory(config, tokens.shape[0])
  half = tokens.shape[1] // 2
  scan = jax.jit(lambda p, x, m, s: model.apply({"params": p}, x, m, s, method=model.scan))
  first, memory_half = scan(params, tokens[:, :half], memory, segments[:, :half])
  second, _ = scan(params, tokens[:, half:], memory_half, segments[:, half:])
  step = jax.jit(lambda p, x, m, s: model.apply({"params": p}, x, m, s, method=model.step))
  stepped = []
  for t in range(tokens.shape[1]):
    logits, memory = step(params, tokens[:, t], memory, segments[:, t])
    stepped.append(logits)
  return parallel, jnp.concatenate([first, second], axis=1), jnp.stack(stepped, axis=1)


def _parallel(model):
  return jax.jit(lambda p, x, s: model.apply({"params": p}, x, s)[0])


class RegistryTest(parameterized.TestCase):

  def test_names_and_unknown(self):
    self.assertEqual(family.names(), ("kernel", "dense", "sliding_window", "braincore"))
    with self.assertRaisesRegex(ValueError, r"registered families .*'kernel'.*got 'lstm'"):
      family.get("lstm")

  def test_a_registry_line_must_name_its_family(self):
    with mock.patch.dict(family.FAMILIES, {"other": "toy_family:FAMILY"}):
      with self.assertRaisesRegex(RuntimeError, "points at family 'toy'"):
        family.get("other")

  @parameterized.named_parameters(*((name, name) for name in _SECTIONS))
  def test_the_protocol_on_a_stream_of_two_documents(self, name):
    with mock.patch.dict(family.FAMILIES, TOY):
      fam = family.get(name)
      config = fam.config_from_dict(_SECTIONS[name], name)
      self.assertIs(family.of_config(config), fam)
      with self.assertRaisesRegex(ValueError, "no_such_field"):
        fam.config_from_dict({**_SECTIONS[name], "no_such_field": 1}, name)
      self.assertTrue(all(isinstance(s, str) for s in fam.sources(config)))
      self.assertTrue(fam.boundaries(config))
      self.assertTrue(all(isinstance(b, family.Boundary) for b in fam.boundaries(config).values()))
      self.assertEqual(fam.with_capacity(config, 128).max_seq_len, 128)
      model = family.build(config)
      align = fam.segment_align(config)
      unit = 16  # a multiple of every family's alignment here
      self.assertEqual(unit % align, 0)
      tokens = jax.random.randint(jax.random.key(0), (2, 64), 0, 32, jnp.int32)
      # Row 0: documents of 16, 16 and 32 tokens; row 1: one document.
      segments = np.zeros((2, 64), np.int32)
      segments[0, unit:] = 1
      segments[0, 2 * unit:] = 2
      segments = jnp.asarray(segments)
      params = model.init(jax.random.key(1), tokens[:, :unit])["params"]
      parallel_fn = _parallel(model)
      parallel, scanned, stepped = _forms(model, parallel_fn, params, tokens, segments, config)
      np.testing.assert_allclose(scanned, parallel, atol=1e-4, rtol=1e-4)
      np.testing.assert_allclose(stepped, parallel, atol=1e-4, rtol=1e-4)
      # With reset, a later document does not see an earlier one: changing the first document
      # leaves the third one's logits as they were.
      changed = tokens.at[0, :unit].set((tokens[0, :unit] + 1) % 32)
      again = parallel_fn(params, changed, segments)
      np.testing.assert_allclose(again[0, unit:], parallel[0, unit:], atol=1e-5)
      self.assertGreater(float(jnp.abs(again[0, :unit] - parallel[0, :unit]).max()), 1e-4)


class NewFamilyTest(absltest.TestCase):
  """A family the library does not know runs through the whole harness."""

  def test_toy_family_trains_evaluates_reloads_and_samples(self):
    config = mqar.get_config("smoke")
    config.model_type = "toy"
    config.toy = {"vocab_size": config.task.vocab_size, "d_model": 16,
                  "max_seq_len": config.task.seq_len}
    config.eval.lengths = (config.task.seq_len,)
    workdir = os.path.join(tempfile.mkdtemp(), "run")
    with mock.patch.dict(family.FAMILIES, TOY):
      summary = train.train_and_evaluate(config, workdir)
      self.assertEqual(summary["model_type"], "toy")
      metrics = summary["lengths"][str(config.task.seq_len)]
      self.assertTrue(np.isfinite(metrics["loss"]))
      self.assertIsNone(metrics.get("routing_recall"))
      model_config, params = runs.load_run(workdir)
      self.assertEqual(type(model_config).__name__, "ToyConfig")
      again = runs.evaluate_run(workdir, batches=1)
      self.assertIsNone(again["beam_width"])
      self.assertTrue(np.isfinite(again["lengths"][str(config.task.seq_len)]["loss"]))
      self.assertEqual(costs.num_params(model_config),
                       sum(x.size for x in jax.tree_util.tree_leaves(params)))
      with self.assertRaisesRegex(ValueError, "declares no FLOP count"):
        costs.flops(model_config, 8)
      result = sampler.generate(family.build(model_config), params, [1, 2, 3],
                                max_new_tokens=4, temperature=0.0)
      self.assertEqual(result.tokens.shape, (1, 7))


if __name__ == "__main__":
  absltest.main()

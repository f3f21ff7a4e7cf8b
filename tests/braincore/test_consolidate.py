"""The sleep: an empty memory teaches nothing, a full one moves the wiped student toward it,
streams sleep apart, only the trainable modules move, and bad settings are refused by name."""

import dataclasses
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cli_checks
from absl.testing import absltest

from configs import cross_doc
from memkernel import experiment as experiment_lib
from memkernel import probes
from memkernel.analysis import consolidation
from memkernel.braincore import consolidate
from memkernel.braincore.state import init_memory

SLEEP = consolidate.SleepConfig(steps=24, learning_rate=0.03, replay_batch=4, replay_len=16)


@pytest.fixture(scope="module")
def setup():
  config = cross_doc.get_config("smoke,braincore")
  experiment = experiment_lib.parse_config(config)
  model = experiment.family.build(experiment.model)
  tokens = np.zeros((1, experiment.task.seq_len), np.int32)
  params = model.init(jax.random.key(0), tokens)["params"]
  # Every candidate written (the write gate's bias open), so the memory holds what it read.
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: x * 0 + 30.0 if "em_gate" in jax.tree_util.keystr(path)
      and "bias" in jax.tree_util.keystr(path) else x, params)
  batch = probes.generate(experiment.task, jax.random.key(1), 2)
  split = experiment.task.scattered_split
  _, memory = jax.jit(lambda p, t, s: model.apply(
      {"params": p}, t, init_memory(model.config, 2), s, method=model.scan))(
          params, batch["tokens"][:, :split], batch["segments"][:, :split])
  return experiment, model, params, memory


@pytest.fixture(scope="module")
def sleep_fn(setup):
  """The SLEEP of one stream, compiled once for every test that uses it."""
  _, model, params, _ = setup
  return jax.jit(lambda memory, key: consolidate.sleep(model, params, memory, SLEEP, key))


@pytest.fixture(scope="module")
def adam_head_fn(setup):
  """A sleep with Adam that moves the LM head only."""
  _, model, params, _ = setup
  config = dataclasses.replace(SLEEP, optimizer="adam", learning_rate=1e-2, trainable=("lm_head",))
  return jax.jit(lambda memory, key: consolidate.sleep(model, params, memory, config, key))


def _first(memory):
  return jax.tree_util.tree_map(lambda x: x[0], consolidate.per_stream(memory))


def test_an_empty_memory_teaches_nothing(setup, sleep_fn, adam_head_fn):
  _, model, params, _ = setup
  empty = init_memory(model.config, 1)
  student, kls = sleep_fn(empty, jax.random.key(2))
  assert float(jnp.max(kls)) < 1e-6
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(student)):
    np.testing.assert_allclose(a, b, atol=1e-6)
  # Adam turns the round-off gradient into full steps: why SGD is the default.
  _, kls = adam_head_fn(empty, jax.random.key(2))
  assert float(jnp.max(kls)) > 1e-4  # SGD stays below 1e-6 from the same start.


def test_a_sleep_moves_the_wiped_student_toward_the_memory(setup, sleep_fn):
  _, model, params, memory = setup
  one = _first(memory)
  student, kls = sleep_fn(one, jax.random.key(3))
  # KL on replay the sleep did not see.
  tokens = consolidate.replay_tokens(jax.random.key(4), dataclasses.replace(SLEEP, replay_batch=8),
                                     model.config.vocab_size)
  heldout = jax.jit(lambda p: consolidate.replay_kl(model, params, p, one, tokens))
  before, after = float(heldout(params)), float(heldout(student))
  assert before > 1e-3  # The memory changes what the model says.
  assert after < 0.7 * before  # 0.58 of it at these settings; an unmoved student is 1.
  assert float(kls[-1]) < float(kls[0])


def test_streams_sleep_apart(setup, sleep_fn):
  _, model, params, memory = setup
  keys = jax.random.split(jax.random.key(5), 2)
  both, _ = jax.vmap(lambda m, k: consolidate.sleep(model, params, m, SLEEP, k))(
      consolidate.per_stream(memory), keys)
  streams = consolidate.per_stream(memory)
  for i in range(2):
    alone, _ = sleep_fn(jax.tree_util.tree_map(lambda x: x[i], streams), keys[i])
    for a, b in zip(jax.tree_util.tree_leaves(alone), jax.tree_util.tree_leaves(both)):
      np.testing.assert_allclose(a, b[i], atol=1e-5)


def test_only_the_trainable_modules_move(setup, adam_head_fn):
  _, model, params, memory = setup
  student, _ = adam_head_fn(_first(memory), jax.random.key(6))
  for name in params:
    moved = any(not np.array_equal(a, b) for a, b in zip(
        jax.tree_util.tree_leaves(params[name]), jax.tree_util.tree_leaves(student[name])))
    assert moved == (name == "lm_head"), name


def test_bad_settings_are_refused_by_name(setup):
  experiment, model, params, memory = setup
  with pytest.raises(ValueError, match="steps"):
    consolidate.SleepConfig(steps=0)
  with pytest.raises(ValueError, match="learning_rate"):
    consolidate.SleepConfig(learning_rate=-1.0)
  with pytest.raises(ValueError, match="optimizer"):
    consolidate.SleepConfig(optimizer="lamb")
  with pytest.raises(ValueError, match="trainable"):
    consolidate.SleepConfig(trainable="lm_head")
  with pytest.raises(ValueError, match="plasticity span"):
    consolidate.sleep(model, params, _first(memory),
                      dataclasses.replace(SLEEP, replay_len=model.config.span + 1),
                      jax.random.key(0))
  with pytest.raises(ValueError, match="not modules"):
    consolidate.sleep(model, params, _first(memory),
                      dataclasses.replace(SLEEP, trainable=("lm_hed",)), jax.random.key(0))
  with pytest.raises(ValueError, match="batch 1"):
    consolidate.sleep(model, params, memory, SLEEP, jax.random.key(0))
  mid_span = _first(memory).replace(position=jnp.asarray(3, jnp.int32))
  with pytest.raises(ValueError, match="span start"):
    consolidate.sleep(model, params, mid_span, SLEEP, jax.random.key(0))
  kernel = experiment_lib.parse_config(cross_doc.get_config("smoke"))
  with pytest.raises(ValueError, match="brain-core run"):
    consolidation.measure(kernel, params, batches=1, batch_size=2, sleep=SLEEP)


def test_the_measurement_scores_every_question(setup):
  experiment, _, params, _ = setup
  report = consolidation.measure(experiment, params, batches=1, batch_size=2, sleep=SLEEP)
  questions = 2 * experiment.task.num_pairs
  assert set(report["cells"]) == set(consolidation.CELLS)
  for cell in report["cells"].values():
    assert cell["queries"] == questions
    assert 0.0 <= cell["accuracy"] <= 1.0
  assert "wiped_after" in consolidation.format_report(report)
  flat = report["lengths"][str(experiment.task.seq_len)]
  assert flat["wiped_after"] == report["cells"]["wiped_after"]["accuracy"]


def test_the_relabelled_episode_changes_every_value_and_no_key():
  task = experiment_lib.parse_config(cross_doc.get_config("smoke,braincore")).task
  batch = probes.generate(task, jax.random.key(7), 3)
  moved = consolidation._relabel(jax.random.key(8), batch, task.vocab_size)
  half = task.vocab_size // 2
  tokens, new = np.asarray(batch["tokens"]), np.asarray(moved["tokens"])
  np.testing.assert_array_equal(tokens[tokens < half], new[tokens < half])
  assert np.all(new[tokens >= half] >= half)
  mask = np.asarray(batch["mask"]) > 0
  # Each question's new answer is its pair's new value token.
  for row in range(3):
    for t in np.nonzero(mask[row])[0]:
      source = int(np.asarray(batch["answer_sources"])[row, t, 0])
      assert int(moved["targets"][row, t]) == int(new[row, source])
  assert np.mean(np.asarray(moved["targets"])[mask] != np.asarray(batch["targets"])[mask]) > 0.5


class BinaryTest(absltest.TestCase):

  def test_bad_input_ends_in_one_fatal_line(self):
    root = tempfile.mkdtemp()
    peer = cli_checks.peer_run(root)
    taken = f"{root}/taken.json"
    open(taken, "w").close()
    cli_checks.assert_fatal_lines(self, "consolidate", {
        (peer, f"--out={taken}"): "taken.json exists; pass another --out",
        (peer,): "brain-core run of the cross_doc probe",
        (peer, "--steps=0"): "SleepConfig.steps must be a positive integer",
        (peer, "--learning_rate=-1"): "SleepConfig.learning_rate must be positive",
        (f"{root}/missing",): "missing",
    })

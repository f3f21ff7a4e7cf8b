"""Tests for the synthetic probe tasks in `memkernel.probes`."""

import collections
import dataclasses
import functools

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
import numpy as np

from memkernel import probes

_BATCH = 16
_TRACES = collections.Counter()


def _counted_generate(task, key, batch_size, seq_len):
  _TRACES[(task, batch_size, seq_len)] += 1
  return probes.generate(task, key, batch_size, seq_len)


# One compilation per (task, batch size, length), shared by all tests.
_jit_generate = jax.jit(_counted_generate, static_argnums=(0, 2, 3))


def _small(name: str, **overrides) -> probes.TaskConfig:
  return probes.TaskConfig(name, **{"seq_len": 256, **overrides})


@functools.lru_cache(maxsize=None)
def _batch(task: probes.TaskConfig, seed: int = 0, batch_size: int = _BATCH) -> dict:
  batch = _jit_generate(task, jax.random.key(seed), batch_size, None)
  return jax.tree.map(np.asarray, batch)


def _solve(task: probes.TaskConfig, tokens: np.ndarray, position: int):
  """Reference solver: the answer at `position` and the positions it is read from, from tokens alone."""
  n = task.num_pairs
  earlier = tokens[:position]
  if task.name == "cross_doc" or (task.name == "mqar" and task.layout == "scattered"):
    (j,) = np.flatnonzero(earlier == tokens[position])  # a key occurs once before its query
    return tokens[j + 1], (j + 1,)
  if task.name == "passkey":
    assert tokens[position] == probes.MARKER
    (j,) = np.flatnonzero(earlier == probes.MARKER)  # the one fact
    return tokens[j + 1], (j + 1,)
  if task.name == "mqar":
    keys = list(tokens[0:2 * n:2])
    i = keys.index(tokens[position])
    return tokens[2 * i + 1], (2 * i + 1,)
  if task.name == "copy":
    c = int(np.flatnonzero(tokens == probes.SEP)[0])
    return tokens[position - c], (position - c,)
  if task.name == "induction":
    (j,) = np.flatnonzero(earlier == tokens[position])  # the trigger occurs exactly once before
    return tokens[j + 1], (j + 1,)
  if task.name == "noisy_retrieval":
    assert tokens[position - 1] == probes.MARKER
    starts = np.flatnonzero((earlier[:-2] == probes.MARKER) & (earlier[1:-1] == tokens[position]))
    (j,) = starts  # exactly one earlier triple carries this key
    return tokens[j + 2], (j + 2,)
  if task.name == "far_compare":
    assert tokens[position - 1] == probes.MARKER
    starts = np.flatnonzero((earlier[:-2] == probes.MARKER) & (earlier[1:-1] == tokens[position]))
    ja, jb = starts  # exactly two earlier triples carry this key: a in quarter 1, b in quarter 2
    a, b = tokens[ja + 2], tokens[jb + 2]
    if task.compare_target == "max":
      answer = max(a, b)
    else:
      answer = probes.GREATER if a > b else probes.LESS
    return answer, (ja + 2, jb + 2)
  raise AssertionError(task.name)


def _check_solver(test, task, batch):
  """Every scored target and answer leaf equals what the reference solver reads off the tokens."""
  L = task.leaf_size
  for b in range(batch["tokens"].shape[0]):
    positions = np.flatnonzero(batch["mask"][b])
    test.assertLen(positions, task.num_queries)
    for p in positions:
      answer, sources = _solve(task, batch["tokens"][b], p)
      test.assertEqual(batch["targets"][b, p], answer, msg=f"row {b} position {p}")
      expected_leaves = [s // L for s in sources] + [-1] * (2 - len(sources))
      np.testing.assert_array_equal(batch["answer_leaves"][b, p], expected_leaves)
      np.testing.assert_array_equal(batch["answer_sources"][b, p],
                                    list(sources) + [-1] * (2 - len(sources)))


class GenerateTest(parameterized.TestCase):

  @parameterized.parameters(*probes.TASKS)
  def test_shapes_and_dtypes(self, name):
    task = _small(name)
    batch = _batch(task)
    T = task.seq_len
    chex.assert_shape([batch["tokens"], batch["targets"], batch["mask"]], (_BATCH, T))
    chex.assert_shape([batch["answer_leaves"], batch["answer_sources"]], (_BATCH, T, 2))
    self.assertEqual(batch["tokens"].dtype, np.int32)
    self.assertEqual(batch["targets"].dtype, np.int32)
    self.assertEqual(batch["mask"].dtype, np.float32)
    self.assertEqual(batch["answer_leaves"].dtype, np.int32)
    np.testing.assert_array_equal(batch["mask"].sum(axis=1), task.num_queries)
    self.assertTrue(np.isin(batch["mask"], (0.0, 1.0)).all())

  @parameterized.parameters(*probes.TASKS)
  def test_seeds_and_rows_differ_and_traced_once(self, name):
    """The key decides the batch (the same key gives the same batch: the eager test below), and
    every row is its own sequence; another key reuses the compiled generator."""
    task = _small(name)
    tokens = _batch(task)["tokens"]
    other = _jit_generate(task, jax.random.key(1), _BATCH, None)
    self.assertFalse(np.array_equal(tokens, other["tokens"]))
    self.assertLen({row.tobytes() for row in tokens}, _BATCH)
    self.assertEqual(_TRACES[(task, _BATCH, None)], 1)

  @parameterized.parameters(*probes.TASKS)
  def test_eager_matches_jit_and_rows_are_prefix_stable(self, name):
    task = _small(name)
    eager = probes.generate(task, jax.random.key(0), 2)
    chex.assert_trees_all_equal(eager, jax.tree.map(lambda x: x[:2], _batch(task)))

  @parameterized.parameters(*probes.TASKS)
  def test_scored_positions_are_valid(self, name):
    task = _small(name)
    batch = _batch(task)
    tokens, targets, mask, leaves = (batch[k] for k in ("tokens", "targets", "mask", "answer_leaves"))
    self.assertTrue(((tokens >= 0) & (tokens < task.vocab_size)).all())
    scored = mask > 0
    self.assertTrue(((targets[scored] >= 0) & (targets[scored] < task.vocab_size)).all())
    np.testing.assert_array_equal(targets[~scored], 0)
    np.testing.assert_array_equal(leaves[~scored], -1)
    query_leaf = np.broadcast_to(np.arange(task.seq_len) // task.leaf_size, mask.shape)[scored]
    self.assertTrue(((leaves[scored][:, 0] >= 0) & (leaves[scored][:, 0] < query_leaf)).all())
    if name == "far_compare":
      self.assertTrue(((leaves[scored][:, 1] >= 0) & (leaves[scored][:, 1] < query_leaf)).all())
    else:
      np.testing.assert_array_equal(leaves[scored][:, 1], -1)

  @parameterized.parameters(*probes.TASKS)
  def test_reference_solver_is_exact(self, name):
    task = _small(name)
    _check_solver(self, task, _batch(task))

  def test_long_sequence_via_seq_len_argument(self):
    task = probes.TaskConfig("mqar", seq_len=512)
    batch = jax.tree.map(np.asarray, _jit_generate(task, jax.random.key(7), 2, 4096))
    chex.assert_shape(batch["tokens"], (2, 4096))
    _check_solver(self, probes.TaskConfig("mqar", seq_len=4096), batch)
    self.assertLess(batch["answer_leaves"].max(), 2 * task.num_pairs // task.leaf_size)

  def test_seq_len_argument_overrides_task(self):
    eager = probes.generate(_small("copy", seq_len=64), jax.random.key(0), 2, 256)
    chex.assert_trees_all_equal(eager, jax.tree.map(lambda x: x[:2], _batch(_small("copy"))))


class TaskLayoutTest(parameterized.TestCase):

  def test_scattered_mqar_moves_the_answer(self):
    task = _small("mqar", layout="scattered", seq_len=512)
    batch = _batch(task)
    _check_solver(self, task, batch)
    n, V = task.num_pairs, task.vocab_size
    tokens, scored = batch["tokens"], batch["mask"] > 0
    for row in tokens:  # every key twice (its pair, its query), filler from the value range
      keys = row[row < V // 2]
      self.assertEqual(sorted(collections.Counter(keys.tolist()).values()), [2] * n)
      self.assertTrue((keys >= 1).all())
    self.assertTrue((np.flatnonzero(scored.any(0)) >= task.scattered_split).all())
    # The answers spread over the whole first half (the Zoology layout keeps them in its first
    # 2n / L leaves).
    leaves = batch["answer_leaves"][..., 0][scored]
    self.assertGreater(len(set(leaves.tolist())), 3 * 2 * n // task.leaf_size)
    self.assertLess(leaves.max(), task.scattered_split // task.leaf_size)
    zoology = _batch(_small("mqar", seq_len=512))
    self.assertLessEqual(zoology["answer_leaves"][..., 0].max(), 2 * n // task.leaf_size)

  def test_cross_doc_asks_in_the_next_document(self):
    task = _small("cross_doc", seq_len=512)
    batch = _batch(task)
    _check_solver(self, task, batch)
    split = task.scattered_split
    np.testing.assert_array_equal(batch["segments"][:, :split], 0)
    np.testing.assert_array_equal(batch["segments"][:, split:], 1)
    self.assertTrue((np.flatnonzero(batch["mask"].any(0)) >= split).all())
    self.assertLess(batch["answer_leaves"][..., 0].max(), split // task.leaf_size)
    # The same tokens as the scattered MQAR: only the documents are new.
    scattered = _batch(_small("mqar", layout="scattered", seq_len=512))
    np.testing.assert_array_equal(batch["tokens"], scattered["tokens"])
    self.assertNotIn("segments", scattered)

  def test_passkey_fact_sits_anywhere_before_the_query(self):
    task = _small("passkey", seq_len=512)
    batch = _batch(task, batch_size=64)
    np.testing.assert_array_equal(batch["mask"][:, -1], 1.0)
    self.assertTrue(((batch["tokens"] == probes.MARKER).sum(1) == 2).all())
    leaves = batch["answer_leaves"][:, -1, 0]
    self.assertGreater(len(set(leaves.tolist())), 20)  # of 31 possible leaves
    self.assertLess(leaves.max(), task.seq_len // task.leaf_size - 1)

  def test_mqar_layout(self):
    task = _small("mqar")
    batch = _batch(task)
    n, V = task.num_pairs, task.vocab_size
    keys, values = batch["tokens"][:, 0:2 * n:2], batch["tokens"][:, 1:2 * n:2]
    self.assertTrue(((keys >= 1) & (keys < V // 2)).all())
    self.assertTrue(((values >= V // 2) & (values < V)).all())
    for row in keys:
      self.assertLen(set(row.tolist()), n)
    rows, positions = np.nonzero(batch["mask"])
    self.assertTrue((positions >= task.mqar_query_start).all())
    self.assertTrue((positions % 2 == 0).all())  # Zoology's stride-2 query slots
    self.assertEqual(task.mqar_query_start % task.leaf_size, 0)
    self.assertTrue(((batch["targets"][rows, positions] >= V // 2)).all())

  def test_mqar_power_law_gaps_are_shorter_than_uniform(self):
    def mean_gap(distance):
      task = _small("mqar", distance=distance)
      _, positions = np.nonzero(_batch(task)["mask"])
      return (positions - task.mqar_query_start).mean()
    power_law, uniform = mean_gap("power_law"), mean_gap("uniform")
    self.assertLess(power_law, 0.7 * uniform)

  def test_copy_layout(self):
    task = _small("copy")
    tokens = _batch(task)["tokens"]
    c = task.effective_copy_len
    np.testing.assert_array_equal(tokens[:, c], probes.SEP)
    np.testing.assert_array_equal(tokens[:, :c], tokens[:, c + 1:2 * c + 1])
    self.assertTrue((tokens[:, :c] >= 2).all())

  def test_induction_triggers_are_reserved(self):
    task = _small("induction")
    batch = _batch(task)
    is_trigger = ((batch["tokens"] >= probes.NUM_SPECIAL)
                  & (batch["tokens"] < probes.NUM_SPECIAL + task.num_pairs))
    np.testing.assert_array_equal(is_trigger.sum(axis=1), 2 * task.induction_pairs)
    _, positions = np.nonzero(batch["mask"])
    self.assertTrue((positions >= task.induction_split).all())

  def test_noisy_retrieval_noise_shares_vocabulary(self):
    task = _small("noisy_retrieval")
    tokens = _batch(task)["tokens"]
    np.testing.assert_array_equal((tokens == probes.MARKER).sum(axis=1), 2 * task.num_pairs)
    self.assertTrue(((tokens == probes.MARKER) | (tokens >= probes.NUM_SPECIAL)).all())
    # The keys and values also occur as noise somewhere in the batch.
    self.assertGreater(len(np.unique(tokens[tokens >= probes.NUM_SPECIAL])), 0.9 * (
        task.vocab_size - probes.NUM_SPECIAL))

  def test_far_compare_order_answers_are_balanced(self):
    task = dataclasses.replace(_small("far_compare"), compare_target="order")
    batch = _batch(task)
    answers = batch["targets"][batch["mask"] > 0]
    self.assertTrue(np.isin(answers, (probes.LESS, probes.GREATER)).all())
    self.assertBetween((answers == probes.GREATER).mean(), 0.3, 0.7)
    _check_solver(self, task, batch)

  def test_far_compare_numbers_sit_in_the_first_two_quarters(self):
    task = _small("far_compare")
    batch = _batch(task)
    tokens, targets, mask = (batch[k] for k in ("tokens", "targets", "mask"))
    q1, q2, _ = task.far_quarters
    from_a = []
    for row in range(_BATCH):
      for position in np.flatnonzero(mask[row]):
        _, (ja, jb) = _solve(task, tokens[row], position)
        self.assertTrue(ja < q1 <= jb < q2, (ja, jb))
        from_a.append(targets[row, position] == tokens[row, ja])
    self.assertBetween(np.mean(from_a), 0.3, 0.7)  # the max is either number, about equally often


class TaskConfigTest(parameterized.TestCase):

  @parameterized.parameters(
      (dict(name="sorting"), "name"),
      (dict(name="mqar", vocab_size=0), "vocab_size"),
      (dict(name="mqar", vocab_size=64), "vocab_size"),
      (dict(name="mqar", seq_len=100), "seq_len"),
      (dict(name="mqar", distance="gaussian"), "distance"),
      (dict(name="mqar", layout="random"), "layout"),
      (dict(name="copy", layout="scattered"), "layout"),
      (dict(name="mqar", layout="scattered", seq_len=80), "seq_len"),
      (dict(name="passkey", seq_len=16), "seq_len"),
      (dict(name="passkey", vocab_size=33), "vocab_size"),
      (dict(name="mqar", power_a=0.0), "power_a"),
      (dict(name="mqar", num_pairs=True), "num_pairs"),
      (dict(name="copy", vocab_size=2), "vocab_size"),
      (dict(name="copy", seq_len=3), "seq_len"),
      (dict(name="copy", seq_len=64, copy_len=40), "copy_len"),
      (dict(name="induction", vocab_size=40), "vocab_size"),
      (dict(name="induction", seq_len=16), "seq_len"),
      (dict(name="noisy_retrieval", seq_len=200), "seq_len"),
      (dict(name="noisy_retrieval", vocab_size=48), "vocab_size"),
      (dict(name="far_compare", seq_len=48), "seq_len"),
      (dict(name="far_compare", num_compares=50), "seq_len"),
      (dict(name="far_compare", vocab_size=40, num_compares=16), "vocab_size"),
      (dict(name="far_compare", compare_target="min"), "compare_target"),
      (dict(name="far_compare", leaf_size=0), "leaf_size"),
  )
  def test_invalid_config_names_the_field(self, kwargs, field):
    with self.assertRaisesRegex(ValueError, field):
      probes.TaskConfig(**kwargs)

  @parameterized.parameters(*probes.TASKS)
  def test_defaults_fit_from_512_to_32768(self, name):
    for seq_len in (512, 32768):
      probes.TaskConfig(name, seq_len=seq_len)

  def test_from_dict(self):
    task = probes.TaskConfig.from_dict({"name": "mqar", "seq_len": 1024})
    self.assertEqual(task, probes.TaskConfig("mqar", seq_len=1024))
    self.assertEqual(probes.TaskConfig.from_dict(task.to_dict()), task)
    with self.assertRaisesRegex(ValueError, "seq_length"):
      probes.TaskConfig.from_dict({"name": "mqar", "seq_length": 1024})

  def test_generate_rejects_bad_batch_size(self):
    with self.assertRaisesRegex(ValueError, "batch_size"):
      probes.generate(_small("copy"), jax.random.key(0), 0)


if __name__ == "__main__":
  absltest.main()

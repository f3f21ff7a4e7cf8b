"""The peers' recurrent forms and document streams: parallel == scan == step, reset vs carry."""

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np

from memkernel import family
from memkernel import peers
from memkernel.peers import memory as memory_lib

_T = 37  # not a multiple of the window or the dense chunk
# Two rows, three documents each, with different boundaries (mid-chunk too).
_SEGMENTS = np.array([[0] * 5 + [1] * 14 + [2] * 18, [0] * 11 + [3] * 3 + [4] * 23], np.int32)
_LAST_START = (19, 14)  # where each row's last document starts


def _config(kind: str, **overrides) -> peers.PeerConfig:
  values = dict(kind=kind, vocab_size=32, d_model=16, num_layers=2, num_heads=2, mlp_ratio=2,
                window=8, max_seq_len=64)
  values.update(overrides)
  return peers.PeerConfig(**values)


def _tokens(seed: int, batch: int = 2, seq_len: int = _T) -> jax.Array:
  return jax.random.randint(jax.random.PRNGKey(seed), (batch, seq_len), 0, 32, dtype=jnp.int32)


def _setup(config):
  model = peers.build_peer(config)
  tokens = _tokens(0)
  return model, model.init(jax.random.PRNGKey(1), tokens)["params"], tokens


def _parallel(model, params, tokens, segments=None):
  return jax.jit(lambda p, t, s: model.apply({"params": p}, t, s)[0])(params, tokens, segments)


def _scan(model, params, tokens, memory, segments=None):
  fn = jax.jit(lambda p, t, m, s: model.apply({"params": p}, t, m, s, method=model.scan))
  return fn(params, tokens, memory, segments)


def _steps(model, params, tokens, segments):
  """Feeds the tokens one by one through one compiled `step`; logits [B, T, V] and the memory."""
  traces = []

  @jax.jit
  def step(p, token, memory, segment):
    traces.append(1)
    return model.apply({"params": p}, token, memory, segment, method=model.step)

  memory = peers.init_memory(model.config, tokens.shape[0])
  logits = []
  for t in range(tokens.shape[1]):
    out, memory = step(params, tokens[:, t], memory, jnp.asarray(segments[:, t]))
    logits.append(out)
  if len(traces) != 1:
    raise AssertionError(f"step compiled {len(traces)} times for one shape")
  return jnp.stack(logits, axis=1), memory


def _max_change(a, b) -> float:
  return float(jnp.max(jnp.abs(a - b)))


_FORMS = (("dense", dict(kind="dense")), ("dense_chunked", dict(kind="dense", query_block=8)),
          ("sliding_window", dict(kind="sliding_window")))


class RecurrentFormTest(parameterized.TestCase):

  @parameterized.named_parameters(
      (f"{name}_{boundary}", overrides, boundary) for name, overrides in _FORMS
      for boundary in ("reset", "carry"))
  def test_parallel_scan_and_step_agree_on_a_document_stream(self, overrides, boundary):
    config = _config(**overrides, boundary=boundary)
    model, params, tokens = _setup(config)
    segments = jnp.asarray(_SEGMENTS)
    parallel = _parallel(model, params, tokens, segments)
    scanned, memory = _scan(model, params, tokens, peers.init_memory(config, 2), segments)
    stepped, step_memory = _steps(model, params, tokens, _SEGMENTS)
    chex.assert_trees_all_close(scanned, parallel, atol=1e-4)
    chex.assert_trees_all_close(stepped, parallel, atol=1e-4)
    chex.assert_trees_all_close(memory, step_memory, atol=1e-5)
    self.assertEqual(int(memory.position), _T)
    np.testing.assert_array_equal(memory.segment_B, _SEGMENTS[:, -1])

  @parameterized.parameters("dense", "sliding_window")
  def test_scan_in_pieces_continues_the_stream(self, kind):
    config = _config(kind)
    model, params, tokens = _setup(config)
    # One document, then a second that starts mid-stream; segments=None continues the current.
    segments = np.array([[0] * 20 + [1] * 17] * 2, np.int32)
    parallel = _parallel(model, params, tokens, jnp.asarray(segments))
    memory = peers.init_memory(config, 2)
    first, memory = _scan(model, params, tokens[:, :13], memory)
    second, memory = _scan(model, params, tokens[:, 13:23], memory, jnp.asarray(segments[:, 13:23]))
    third, memory = _scan(model, params, tokens[:, 23:], memory)
    chex.assert_trees_all_close(jnp.concatenate([first, second, third], axis=1), parallel,
                                atol=1e-4)

  @parameterized.parameters("dense", "sliding_window")
  def test_causality_of_the_recurrent_form(self, kind):
    config = _config(kind)
    model, params, tokens = _setup(config)
    perturbed = tokens.at[:, 21:].set(_tokens(5)[:, 21:])
    memory = peers.init_memory(config, 2)
    logits, _ = _scan(model, params, tokens, memory)
    perturbed_logits, _ = _scan(model, params, perturbed, memory)
    chex.assert_trees_all_close(logits[:, :21], perturbed_logits[:, :21], atol=1e-5)
    self.assertGreater(_max_change(logits[:, 21:], perturbed_logits[:, 21:]), 1e-3)


class DocumentStreamTest(parameterized.TestCase):

  @parameterized.parameters(("dense", "reset"), ("dense", "carry"), ("sliding_window", "reset"),
                            ("sliding_window", "carry"))
  def test_earlier_documents_reach_the_last_only_under_carry(self, kind, boundary):
    config = _config(kind, boundary=boundary)
    model, params, tokens = _setup(config)
    segments = jnp.asarray(_SEGMENTS)
    earlier = np.arange(_T)[None, :] < np.array(_LAST_START)[:, None]
    replaced = jnp.where(earlier, (tokens + 7) % 32, tokens)
    logits = _parallel(model, params, tokens, segments)
    replaced_logits = _parallel(model, params, replaced, segments)
    for row, start in enumerate(_LAST_START):
      last, replaced_last = logits[row, start:], replaced_logits[row, start:]
      if boundary == "reset":
        chex.assert_trees_all_close(last, replaced_last, atol=1e-5)
      else:
        self.assertGreater(_max_change(last, replaced_last), 1e-3)

  @parameterized.parameters("dense", "sliding_window")
  def test_reset_document_equals_the_document_alone(self, kind):
    # RoPE scores depend on relative positions only, so a reset document is a fresh sequence.
    config = _config(kind)
    model, params, tokens = _setup(config)
    logits = _parallel(model, params, tokens, jnp.asarray(_SEGMENTS))
    for row, start in enumerate(_LAST_START):
      alone = _parallel(model, params, tokens[row:row + 1, start:])
      chex.assert_trees_all_close(logits[row:row + 1, start:], alone, atol=1e-4)

  def test_boundaries_of_the_family(self):
    for name in ("dense", "sliding_window"):
      for boundary in ("reset", "carry"):
        config = _config(name, boundary=boundary)
        self.assertEqual(family.of_config(config).boundaries(config),
                         {"attention": family.Boundary(boundary)})

  @parameterized.named_parameters(
      ("decreasing", np.array([[0, 1, 0, 1]] * 2, np.int32), "non-decreasing"),
      ("shape", np.zeros((2, 3), np.int32), "shape"),
      ("dtype", np.zeros((2, 4), np.float32), "integer"))
  def test_bad_segments_are_named(self, segments, regex):
    config = _config("sliding_window")
    model = peers.build_peer(config)
    tokens = _tokens(0, seq_len=4)
    params = model.init(jax.random.PRNGKey(1), tokens)["params"]
    with self.assertRaisesRegex(ValueError, regex):
      model.apply({"params": params}, tokens, segments)
    with self.assertRaisesRegex(ValueError, regex):
      model.apply({"params": params}, tokens, peers.init_memory(config, 2), segments,
                  method=model.scan)
    with self.assertRaisesRegex(ValueError, "segment must have the tokens' shape"):
      model.apply({"params": params}, tokens[:, 0], peers.init_memory(config, 2),
                  np.zeros((2, 1), np.int32), method=model.step)


class MemoryTest(parameterized.TestCase):

  def test_ring_buffer_size_does_not_grow_with_length(self):
    size = lambda config: memory_lib.memory_bytes(
        jax.eval_shape(lambda: peers.init_memory(config, 2)))
    short, long = _config("sliding_window"), _config("sliding_window", max_seq_len=4096)
    self.assertEqual(size(short), size(long))
    # 2 layers x (k, v) x [B, window, N, H] float32, plus the document ids and the position.
    self.assertEqual(size(short), 2 * 2 * 2 * 8 * 16 * 4 + 2 * 8 * 4 + 2 * 4 + 4)
    self.assertGreater(size(_config("dense", max_seq_len=4096)), size(_config("dense")))
    # Consuming a stream leaves the ring's shapes as they were.
    model, params, tokens = _setup(short)
    memory = peers.init_memory(short, 2)
    _, after = _scan(model, params, tokens, memory)
    chex.assert_trees_all_equal_shapes_and_dtypes(after, memory)

  def test_ring_slots_hold_the_last_window_positions(self):
    memory = peers.init_memory(_config("sliding_window", window=4), 1)
    positions = lambda p: np.asarray(memory.replace(position=jnp.int32(p)).slot_positions())
    np.testing.assert_array_equal(positions(0), [-4, -3, -2, -1])
    np.testing.assert_array_equal(positions(6), [4, 5, 2, 3])
    ring = memory_lib.write(jnp.zeros((1, 4), jnp.int32), jnp.arange(1, 7)[None], jnp.int32(3),
                            ring=True)
    np.testing.assert_array_equal(ring, [[6, 3, 4, 5]])  # positions 5..8 stay, slot p % 4

  def test_memory_mismatch_and_overflow_are_named(self):
    config = _config("dense", max_seq_len=40)
    model, params, tokens = _setup(config)
    with self.assertRaisesRegex(ValueError, "PeerMemory"):
      model.apply({"params": params}, tokens, {}, method=model.scan)
    with self.assertRaisesRegex(ValueError, "does not match"):
      model.apply({"params": params}, tokens, peers.init_memory(_config("sliding_window"), 2),
                  method=model.scan)
    _, memory = _scan(model, params, tokens, peers.init_memory(config, 2))
    with self.assertRaisesRegex(ValueError, "max_seq_len=40"):
      model.apply({"params": params}, tokens[:, :4], memory, method=model.scan)

  def test_family_init_memory(self):
    config = _config("dense")
    memory = family.init_memory(config, 3)
    self.assertIsInstance(memory, peers.PeerMemory)
    chex.assert_shape(memory.layers[0].k_BSNH, (3, 64, 2, 8))
    with self.assertRaisesRegex(ValueError, "batch_size"):
      peers.init_memory(config, 0)


if __name__ == "__main__":
  absltest.main()

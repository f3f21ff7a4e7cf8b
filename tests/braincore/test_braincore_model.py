"""The brain-core model: its three forms agree, it is causal, it reads before it writes, its
document boundaries hold in every form, plasticity off is the base model, and the writes train.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memkernel import costs
from memkernel import family as family_lib
from memkernel.braincore import episodic as em_lib
from memkernel.braincore.config import BrainCoreConfig
from memkernel.braincore.model import BrainCoreModel
from memkernel.braincore.state import init_memory
from memkernel.kernel.interventions import Interventions

SPAN = 8
CONFIG = BrainCoreConfig(vocab_size=32, d_model=16, num_layers=2, num_heads=2, mlp_ratio=2,
                         max_seq_len=64, window=12, em_items=4, em_k=2, em_key_dim=8, span=SPAN,
                         em_writes=2,
                         pm_rank=2, pm_lr=1.0, pm_budget=10.0)
T = 37  # four whole spans and a part


def _tokens(seed=1, b=2, t=T):
  return jax.random.randint(jax.random.key(seed), (b, t), 0, CONFIG.vocab_size)


@pytest.fixture(scope="module")
def model_and_params():
  model = BrainCoreModel(CONFIG)
  return model, model.init(jax.random.key(0), _tokens()[:, :SPAN])


def _forms(config):
  """Jitted (parallel, scan, step) of `config`'s model."""
  model = BrainCoreModel(config)
  parallel = jax.jit(lambda v, t, s: model.apply(v, t, s)[0])
  scan = jax.jit(lambda v, t, m, s: model.apply(v, t, m, s, method=model.scan))
  step = jax.jit(lambda v, t, m, s: model.apply(v, t, m, s, method=model.step))
  return parallel, scan, step


def _by_chunks(scan, variables, config, tokens, segments, sizes):
  memory, out, i = init_memory(config, tokens.shape[0]), [], 0
  for q in sizes:
    logits, memory = scan(variables, tokens[:, i:i + q], memory, segments[:, i:i + q])
    out.append(logits)
    i += q
  assert i == tokens.shape[1]
  return jnp.concatenate(out, axis=1), memory


def _by_steps(step, variables, config, tokens, segments):
  memory, out = init_memory(config, tokens.shape[0]), []
  for i in range(tokens.shape[1]):
    logits, memory = step(variables, tokens[:, i], memory, segments[:, i])
    out.append(logits)
  return jnp.stack(out, axis=1), memory


def _all_forms(config, variables, tokens, segments):
  """{form: logits} for the parallel form, scan in chunks that straddle span ends (12 tokens:
  a span end inside each, the second and third starting mid-span, then the last token alone;
  two chunk shapes, two compiles), and step."""
  parallel, scan, step = _forms(config)
  return {"parallel": parallel(variables, tokens, segments),
          "scan": _by_chunks(scan, variables, config, tokens, segments, [12, 12, 12, 1])[0],
          "step": _by_steps(step, variables, config, tokens, segments)[0]}


class TestForms:

  def test_three_forms_agree(self, model_and_params):
    _, variables = model_and_params
    tokens = _tokens()
    segments = jnp.zeros_like(tokens)
    logits = _all_forms(CONFIG, variables, tokens, segments)
    for name, value in logits.items():
      np.testing.assert_allclose(value, logits["parallel"], atol=1e-4, err_msg=name)

  def test_memories_agree(self, model_and_params):
    model, variables = model_and_params
    tokens = _tokens()
    _, scan, step = _forms(CONFIG)
    segments = jnp.zeros_like(tokens)
    parallel_memory = model.apply(variables, tokens)[1].memory
    ragged = _by_chunks(scan, variables, CONFIG, tokens, segments, [12, 12, 12, 1])[1]
    stepped = _by_steps(step, variables, CONFIG, tokens, segments)[1]
    for other in (ragged, stepped):
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4), parallel_memory,
                   other)
    assert int(ragged.position) == T

  def test_causal(self, model_and_params):
    _, variables = model_and_params
    parallel, _, _ = _forms(CONFIG)
    tokens = _tokens()
    cut = 19
    future = tokens.at[:, cut:].set((tokens[:, cut:] + 7) % CONFIG.vocab_size)
    segments = jnp.zeros_like(tokens)
    a, b = parallel(variables, tokens, segments), parallel(variables, future, segments)
    np.testing.assert_array_equal(a[:, :cut], b[:, :cut])
    assert float(jnp.max(jnp.abs(a[:, cut:] - b[:, cut:]))) > 1e-3

  def test_memory_is_bounded(self):
    short = costs.state_bytes(CONFIG)
    long = costs.state_bytes(dataclasses.replace(CONFIG, max_seq_len=1 << 20))
    assert short == long

  def test_memory_holds_no_buffer_twice(self):
    """The benchmark and the sampler donate the memory: one buffer in two leaves is an error."""
    leaves = jax.tree.leaves(init_memory(CONFIG, 2))
    assert len({id(x) for x in leaves}) == len(leaves)


def _first_difference(a, b):
  differs = np.any(np.abs(np.asarray(a) - np.asarray(b)) > 1e-6, axis=(0, 2))
  return int(np.argmax(differs)) if differs.any() else None


class TestReadsBeforeWrites:
  """A write at the end of span s is first read by span s + 1's first token, in every form."""

  @pytest.mark.parametrize("param", ["em_gate", "em_value", "pm_modulator"])
  def test_a_write_is_read_from_the_next_span(self, model_and_params, param):
    _, variables = model_and_params
    tokens, segments = _tokens(), jnp.zeros((2, T), jnp.int32)
    # These parameters shape only what a span end writes: the logits move from span 1 on.
    changed = jax.tree_util.tree_map_with_path(
        lambda path, x: x + 1.0 if any(getattr(k, "key", None) == param for k in path) else x,
        variables)
    before = _all_forms(CONFIG, variables, tokens, segments)
    after = _all_forms(CONFIG, changed, tokens, segments)
    for form in before:
      first = _first_difference(before[form], after[form])
      if param == "em_gate":  # A lone item's strength does not change its read: a span later.
        assert first in (SPAN, 2 * SPAN), form
      else:
        assert first == SPAN, form

  def test_span_zero_reads_nothing(self, model_and_params):
    model, variables = model_and_params
    tokens = _tokens()
    full = model.apply(variables, tokens)[0]
    dropped = model.apply(variables, tokens,
                          interventions=Interventions(drop=("episodic", "procedural")))[0]
    np.testing.assert_array_equal(full[:, :SPAN], dropped[:, :SPAN])
    assert _first_difference(full, dropped) == SPAN


class TestPlasticity:

  def test_off_is_the_base_model(self, model_and_params):
    model, variables = model_and_params
    base_config = dataclasses.replace(CONFIG, plasticity=False)
    base = BrainCoreModel(base_config)
    base_variables = base.init(jax.random.key(3), _tokens()[:, :SPAN])

    def pick(tree, like):  # The plastic model's parameters of the base model's layout.
      return {k: pick(tree[k], v) if isinstance(v, dict) else tree[k] for k, v in like.items()}

    shared = pick(jax.device_get(variables), jax.device_get(base_variables))
    tokens = _tokens(seed=4)
    base_logits = base.apply(shared, tokens)[0]
    off = model.apply(variables, tokens,
                      interventions=Interventions(drop=("episodic", "procedural")))[0]
    np.testing.assert_array_equal(base_logits, off)
    assert costs.num_params(base_config) < costs.num_params(CONFIG)
    # And in the recurrent forms of the base model itself.
    logits = _all_forms(base_config, shared, tokens, jnp.zeros_like(tokens))
    for name, value in logits.items():
      np.testing.assert_allclose(value, base_logits, atol=1e-4, err_msg=name)

  def test_writes_train(self, model_and_params):
    """Gradients reach every write's parameters from the spans after it, and none from the
    span before the first write."""
    model, variables = model_and_params
    tokens = _tokens()
    targets = jnp.roll(tokens, -1, axis=1)

    def loss(v, weights):  # The mean loss over the positions `weights` picks.
      logp = jax.nn.log_softmax(model.apply(v, tokens)[0])
      nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
      return jnp.sum(nll * weights) / (tokens.shape[0] * jnp.sum(weights))

    grad = jax.jit(jax.grad(loss))  # One compile: the positions are an argument.
    late = grad(variables, (jnp.arange(T) >= SPAN).astype(jnp.float32))["params"]
    early = grad(variables, (jnp.arange(T) < SPAN).astype(jnp.float32))["params"]
    for layer in ("layer_0", "layer_1"):
      for name in ("em_gate", "em_key", "em_value", "salience", "pm_modulator", "pm_code"):
        g_late = jax.tree.leaves(late[layer][name])
        g_early = jax.tree.leaves(early[layer][name])
        assert all(np.isfinite(g).all() for g in g_late), (layer, name)
        assert max(float(jnp.max(jnp.abs(g))) for g in g_late) > 0, (layer, name)
        if name != "pm_code":  # The code also carries the (empty) read in span 0.
          assert max(float(jnp.max(jnp.abs(g))) for g in g_early) == 0, (layer, name)

  def test_write_density_is_the_share_of_candidates_stored(self, model_and_params):
    """Into an empty memory every candidate lands (density 1); over a longer stream the
    density is a share, and the occupancy what the writes left."""
    model, variables = model_and_params
    _, first = model.apply(variables, _tokens(t=SPAN))
    _, stream = model.apply(variables, _tokens())
    for i in range(CONFIG.num_layers):
      assert float(first.metrics[f"layer_{i}/em_density"]) == 1.0
      assert 0.0 <= float(stream.metrics[f"layer_{i}/em_density"]) <= 1.0
      np.testing.assert_allclose(first.metrics[f"layer_{i}/em_occupancy"],
                                 CONFIG.em_writes / CONFIG.em_items)

  def test_the_teacher_teaches_the_gate_about_candidates_it_did_not_store(self):
    """With a threshold no gate clears, nothing is stored: the task loss gives the gate no
    gradient, the hindsight teacher does; it is a training loss only."""
    config = dataclasses.replace(CONFIG, num_layers=1, em_threshold=0.99, em_teacher=1.0)
    model = BrainCoreModel(config)
    tokens = _tokens()
    variables = model.init(jax.random.key(0), tokens)
    mask = jnp.ones(tokens.shape).at[:, :SPAN].set(0.0)

    def losses(v):
      logits, out = model.apply(v, tokens, train=True, loss_mask=mask)
      return jnp.mean(logits ** 2), out

    both = jax.jit(lambda v: (jax.value_and_grad(losses, has_aux=True)(v),
                              jax.grad(lambda w: losses(w)[1].losses["em_write"])(v)))
    ((_, out), task_grad), teacher_grad = both(variables)
    assert float(out.metrics["layer_0/em_density"]) == 0.0
    gate = lambda g: max(float(jnp.max(jnp.abs(x)))
                         for x in jax.tree.leaves(g["params"]["layer_0"]["em_gate"]))
    assert gate(task_grad) == 0.0 and gate(teacher_grad) > 0.0
    assert 0.0 < float(out.metrics["layer_0/em_target"]) < 1.0
    assert model.apply(variables, tokens)[1].losses == {}

  def test_the_novelty_prior_turns_a_repeated_span_away(self):
    """With `em_novelty_init` an untrained gate opens for new keys and stays shut for a span
    whose keys are already stored (the same tokens again)."""
    config = dataclasses.replace(CONFIG, num_layers=1, em_items=2 * SPAN, em_writes=SPAN,
                                 em_novelty_init=8.0)
    model = BrainCoreModel(config)
    span = _tokens(t=SPAN)
    variables = model.init(jax.random.key(0), span)
    gate = lambda t: float(model.apply(variables, t)[1].metrics["layer_0/em_gate"])
    first = gate(span)
    second = 2 * gate(jnp.concatenate([span, span], axis=1)) - first  # The mean of two spans.
    assert first > 0.9 and second < 0.5, (first, second)

  def test_forms_agree_when_a_threshold_turns_candidates_away(self):
    config = dataclasses.replace(CONFIG, num_layers=1, em_threshold=0.4)
    model = BrainCoreModel(config)
    tokens = _tokens()
    variables = model.init(jax.random.key(0), tokens)
    density = lambda c: float(BrainCoreModel(c).apply(variables, tokens)[1].metrics[
        "layer_0/em_density"])
    assert 0.0 < density(config) < density(dataclasses.replace(config, em_threshold=0.0))
    logits = _all_forms(config, variables, tokens, jnp.zeros_like(tokens))
    for name, value in logits.items():
      np.testing.assert_allclose(value, logits["parallel"], atol=1e-4, err_msg=name)

  def test_every_token_a_candidate_has_finite_gradients(self):
    """With `em_writes = span` a document's first token is a candidate with no predecessor: its
    key starts at exactly zero, and the novelty's cosine must not make the gradient NaN."""
    config = dataclasses.replace(CONFIG, num_layers=1, em_items=16, em_writes=SPAN)
    model = BrainCoreModel(config)
    tokens = _tokens(t=4 * SPAN)
    variables = model.init(jax.random.key(0), tokens)
    grads = jax.jit(jax.grad(lambda v: jnp.mean(model.apply(v, tokens)[0] ** 2)))(variables)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
      assert np.isfinite(g).all(), jax.tree_util.keystr(path)

  def test_a_shut_gate_is_no_episodic_memory_and_an_open_one_keeps_every_candidate(
      self, model_and_params):
    """The write-gate interventions on the same parameters: 'shut' stores nothing, so the
    model is the one with episodic memory dropped; 'open' stores every candidate (density 1,
    at a threshold no learned gate clears)."""
    model, variables = model_and_params
    tokens = _tokens()
    dropped = model.apply(variables, tokens, interventions=Interventions(drop=("episodic",)))[0]
    shut_model = BrainCoreModel(dataclasses.replace(CONFIG, em_write_gate="shut"))
    shut_logits, shut = shut_model.apply(variables, tokens)
    np.testing.assert_allclose(shut_logits, dropped, atol=1e-6)
    open_config = dataclasses.replace(CONFIG, em_write_gate="open", em_threshold=0.99)
    _, opened = BrainCoreModel(open_config).apply(variables, tokens)
    _, learned = BrainCoreModel(dataclasses.replace(CONFIG, em_threshold=0.99)).apply(
        variables, tokens)
    for i in range(CONFIG.num_layers):
      assert float(shut.metrics[f"layer_{i}/em_occupancy"]) == 0.0
      assert float(opened.metrics[f"layer_{i}/em_density"]) == 1.0
      assert float(learned.metrics[f"layer_{i}/em_density"]) == 0.0

  def test_interventions_name_sources(self, model_and_params):
    model, variables = model_and_params
    with pytest.raises(ValueError, match="sources are"):
      model.apply(variables, _tokens(), interventions=Interventions(drop=("tree",)))
    with pytest.raises(ValueError, match="no routes"):
      model.apply(variables, _tokens(), interventions=Interventions(next_best_span=True))


class TestDocuments:
  """Two documents in one stream; documents start on span boundaries. One layer: the rules are
  per layer, and each test compiles every form anew."""

  def _stream(self):
    tokens = _tokens(seed=5, t=T)
    segments = jnp.where(jnp.arange(T) >= 2 * SPAN, 1, 0)[None].repeat(2, 0).astype(jnp.int32)
    return tokens, segments

  def test_reset_everything_is_a_fresh_start(self):
    config = dataclasses.replace(CONFIG, num_layers=1, core_boundary="reset",
                                 wm_boundary="reset", em_boundary="reset", pm_boundary="reset")
    model = BrainCoreModel(config)
    variables = model.init(jax.random.key(0), _tokens()[:, :SPAN])
    tokens, segments = self._stream()
    alone = model.apply(variables, tokens[:, 2 * SPAN:])[0]
    for name, logits in _all_forms(config, variables, tokens, segments).items():
      np.testing.assert_allclose(logits[:, 2 * SPAN:], alone, atol=1e-4, err_msg=name)

  @pytest.mark.parametrize("memory", ["core", "wm", "em", "pm"])
  def test_a_carried_memory_crosses_the_boundary(self, memory):
    """Carrying any one memory makes the second document see the first, in every form alike."""
    rules = dict(core_boundary="reset", wm_boundary="reset", em_boundary="reset",
                 pm_boundary="reset")
    rules[f"{memory}_boundary"] = "carry"
    config = dataclasses.replace(CONFIG, num_layers=1, **rules)
    model = BrainCoreModel(config)
    variables = model.init(jax.random.key(0), _tokens()[:, :SPAN])
    tokens, segments = self._stream()
    alone = model.apply(variables, tokens[:, 2 * SPAN:])[0]
    forms = _all_forms(config, variables, tokens, segments)
    assert float(jnp.max(jnp.abs(forms["parallel"][:, 2 * SPAN:] - alone))) > 1e-4
    for name, logits in forms.items():
      np.testing.assert_allclose(logits, forms["parallel"], atol=1e-4, err_msg=name)

  @pytest.mark.parametrize("features", ["input", "mixed"])
  def test_a_token_finds_what_followed_it_in_the_last_document(self, features, monkeypatch):
    """With `em_features='input'` what an untrained layer's episodic read returns at each token
    of document 1 is, of all stored values, nearest the one written from the token that
    followed it in document 0: the stored key (its predecessor, projected as a query) and the
    query are one vector. With 'mixed' the features carry the context too: the read misses some."""
    config = dataclasses.replace(CONFIG, num_layers=1, em_items=16, em_writes=SPAN,
                                 em_features=features)
    model = BrainCoreModel(config)
    first = jax.random.permutation(jax.random.key(3), CONFIG.vocab_size)[:SPAN][None]
    asked = jax.random.permutation(jax.random.key(4), SPAN - 1)  # Token i is followed by i+1.
    tokens = jnp.concatenate([first, first[:, asked], first[:, :1]], axis=1).astype(jnp.int32)
    segments = jnp.repeat(jnp.arange(2, dtype=jnp.int32), SPAN)[None]
    variables = model.init(jax.random.key(0), tokens[:, :SPAN])
    reads, writes = [], []
    read, offer = em_lib.read, em_lib.offer
    monkeypatch.setattr(em_lib, "read", lambda m, q, k: reads.append(read(m, q, k)) or reads[-1])
    monkeypatch.setattr(em_lib, "offer",
                        lambda m, k, v, *rest: writes.append(v) or offer(m, k, v, *rest))
    memory = init_memory(config, 1)
    for begin in range(0, 2 * SPAN, SPAN // 2):  # Chunks shorter than a span run eagerly.
      _, memory = model.apply(variables, tokens[:, begin:begin + SPAN // 2], memory,
                              segments[:, begin:begin + SPAN // 2], method=model.scan)
    # Per chunk one write (committed by the second) and two reads (before and after its cut).
    values = writes[1][0]                                          # [SPAN, K], position order
    out = jnp.concatenate([reads[4][0][0], reads[6][0][0]])[:SPAN - 1]   # document 1's reads
    unit = lambda v: v / jnp.linalg.norm(v, axis=-1, keepdims=True)
    nearest = jnp.argmax(unit(out) @ unit(values[1:]).T, axis=-1) + 1  # Item 0 has a zero key.
    found = int(jnp.sum(nearest == asked + 1))
    if features == "input":
      assert found == SPAN - 1, (nearest, asked + 1)
    else:
      assert found < SPAN - 1, (nearest, asked + 1)
    # The same reads in the parallel form, by provenance: the item each token of document 1
    # reads first was written by the token that followed it in document 0.
    reads_0 = model.apply(variables, tokens[:, :2 * SPAN], segments, method=model.episodic_reads)[0]
    first_read = np.asarray(reads_0["read"][0, SPAN:2 * SPAN - 1, 0])
    live = np.asarray(reads_0["live"][0, 1])
    assert set(live[live >= 0]) <= set(range(SPAN)) and np.all(reads_0["live"][0, 0] == -1)
    if features == "input":
      np.testing.assert_array_equal(first_read, asked + 1)
      assert set(first_read) <= set(live)
    else:
      assert np.sum(first_read == np.asarray(asked) + 1) < SPAN - 1

  def test_misaligned_documents_are_refused(self, model_and_params):
    model, variables = model_and_params
    tokens = _tokens()
    segments = jnp.where(jnp.arange(T) >= SPAN + 3, 1, 0)[None].repeat(2, 0)
    with pytest.raises(ValueError, match=f"multiples of {SPAN}"):
      model.apply(variables, tokens, segments)


class TestWithout:
  """A memory left out (`without`, the sweep's ablations) has no parameters and no state, and
  the three forms still agree. One layer: each test compiles every form anew."""

  @pytest.mark.parametrize("memory", ["working", "episodic", "procedural"])
  def test_forms_agree_without_a_memory(self, memory):
    config = dataclasses.replace(CONFIG, num_layers=1, without=memory, em_teacher=1.0)
    model = BrainCoreModel(config)
    variables = model.init(jax.random.key(0), _tokens()[:, :SPAN])
    tokens = _tokens()
    logits = _all_forms(config, variables, tokens, jnp.zeros_like(tokens))
    for name, value in logits.items():
      np.testing.assert_allclose(value, logits["parallel"], atol=1e-4, err_msg=name)
    own = {"working": "wm", "episodic": "em_gate", "procedural": "pm_code"}
    names = set(variables["params"]["layer_0"])
    assert own[memory] not in names
    assert {v for k, v in own.items() if k != memory} <= names
    assert memory not in family_lib.get("braincore").sources(config)
    assert memory not in family_lib.get("braincore").boundaries(config)
    layer = init_memory(config, 2).layers[0]
    state = {"working": layer.window, "episodic": layer.episodic,
             "procedural": layer.procedural}
    assert [k for k, v in state.items() if v is None] == [memory]
    assert memory not in costs.flops_by_part(config, 64)
    assert costs.state_bytes(config) < costs.state_bytes(dataclasses.replace(config, without=""))
    with pytest.raises(ValueError, match="sources are"):
      model.apply(variables, tokens, interventions=Interventions(drop=(memory,)))
    train = model.apply(variables, tokens, train=True)[1]
    assert ("em_write" in train.losses) == (memory != "episodic")  # Nothing to teach without it.

  def test_without_both_plastic_memories_is_plasticity_off(self, model_and_params):
    _, variables = model_and_params
    off = dataclasses.replace(CONFIG, plasticity=False)
    without = dataclasses.replace(CONFIG, without="episodic,procedural")
    shapes = lambda c: jax.tree.map(jnp.shape, jax.eval_shape(
        BrainCoreModel(c).init, jax.random.key(0), _tokens()[:, :SPAN]))
    assert shapes(off) == shapes(without)
    assert costs.state_bytes(off) == costs.state_bytes(without)
    base = BrainCoreModel(off).init(jax.random.key(3), _tokens()[:, :SPAN])
    np.testing.assert_array_equal(BrainCoreModel(off).apply(base, _tokens())[0],
                                  BrainCoreModel(without).apply(base, _tokens())[0])


class TestFamily:

  def test_registered(self):
    family = family_lib.get("braincore")
    assert family.sources(CONFIG) == ("working", "episodic", "procedural")
    assert family.sources(dataclasses.replace(CONFIG, plasticity=False)) == ("working",)
    assert family.segment_align(CONFIG) == SPAN
    assert set(family.boundaries(CONFIG)) == {"core", "working", "episodic", "procedural"}
    parts = costs.flops_by_part(CONFIG, 64)
    assert set(parts) == {"core", "working", "episodic", "mlp", "procedural", "head"}
    assert costs.flops(CONFIG, 64, train=True) == 3 * costs.flops(CONFIG, 64)

  def test_bad_memory_is_refused(self, model_and_params):
    model, variables = model_and_params
    other = init_memory(dataclasses.replace(CONFIG, em_items=2, em_k=1), 2)
    with pytest.raises(ValueError, match="init_memory"):
      model.apply(variables, _tokens(), other, method=model.scan)
    with pytest.raises(ValueError, match="max_seq_len"):
      model.apply(variables, _tokens(t=65))

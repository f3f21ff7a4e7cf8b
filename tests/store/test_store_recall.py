"""The store in the model: the logits bias, kNN-LM lines, and recall across processes."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from memkernel import probes
from memkernel import store_bias
from memkernel import store_recall
from memkernel.store import MemoryLineStore

KEY = bytes(range(32))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TASK = probes.TaskConfig(name="mqar", layout="scattered", vocab_size=64, seq_len=128,
                         num_pairs=8, leaf_size=16)
# The model both processes build: the same config and init seed give the same parameters.
MODEL = """
import jax, jax.numpy as jnp
from memkernel import family
from memkernel.kernel.config import KernelConfig
config = KernelConfig(vocab_size=64, d_model=32, num_layers=1, max_seq_len=128, query_block=0)
model = family.build(config)
params = model.init(jax.random.key(0), jnp.zeros((1, 16), jnp.int32))["params"]
"""


def _model():
  scope = {}
  exec(MODEL, scope)  # pylint: disable=exec-used
  return scope["model"], scope["params"]


def test_store_bias_is_alpha_times_the_bias_vector(tmp_path):
  with MemoryLineStore.open(str(tmp_path), KEY, key_dim=4, value_dim=6) as store:
    store.put([1, 0, 0, 0], np.eye(6)[2])
    bias = store_bias.StoreBias(store, alpha=3.0, k=2, vocab_size=6)
    out = bias(np.array([[[1.0, 0, 0, 0], [0, 1.0, 0, 0]]]))   # [1, 2, D]
    assert out.shape == (1, 2, 6)
    np.testing.assert_allclose(out[0, 0], 3.0 * np.eye(6)[2], rtol=1e-6)
    np.testing.assert_array_equal(out[0, 1], np.zeros(6))   # cosine 0: below the floor
    with pytest.raises(ValueError, match="vocabulary size, 7"):
      store_bias.StoreBias(store, alpha=1.0, vocab_size=7)
    with pytest.raises(ValueError, match="alpha must be"):
      store_bias.StoreBias(store, alpha=-1.0)
    # Defaults from the store's config; an all-zero state has no direction: no bias.
    default = store_bias.StoreBias(store)
    assert (default.alpha, default.k) == (16.0, 5)
    np.testing.assert_array_equal(default(np.zeros((3, 4))), np.zeros((3, 6)))


def test_next_token_lines_hold_the_hidden_state_and_the_next_token(tmp_path):
  hidden = np.random.default_rng(0).normal(size=(2, 5, 4)).astype(np.float32)
  tokens = np.array([[1, 2, 3, 4, 5], [5, 4, 3, 2, 1]])
  with MemoryLineStore.open(str(tmp_path), KEY, key_dim=4, value_dim=6) as store:
    store_bias.write_next_token_lines(store, hidden, tokens, [(0, 1), (1, 3)], 6)
    by_seq = {l.seq: l for l in store.query(hidden[0, 1], 2) + store.query(hidden[1, 3], 2)}
    np.testing.assert_allclose(by_seq[0].key, hidden[0, 1], rtol=1e-6)
    np.testing.assert_array_equal(by_seq[0].value, np.eye(6)[3])
    np.testing.assert_array_equal(by_seq[1].value, np.eye(6)[1])
    assert by_seq[1].ctx == {"row": 1, "position": 3}
    with pytest.raises(ValueError, match="has no next token"):
      store_bias.write_next_token_lines(store, hidden, tokens, [(0, 4)], 6)
    with pytest.raises(ValueError, match="this model needs"):
      store_bias.write_next_token_lines(store, hidden, tokens, [(0, 1)], 7)
    with pytest.raises(ValueError, match="row 2 is not in a batch of 2"):
      store_bias.write_next_token_lines(store, hidden, tokens, [(2, 1)], 6)
    with pytest.raises(ValueError, match="same B and T"):
      store_bias.write_next_token_lines(store, hidden, tokens[:, :4], [(0, 1)], 6)
    with pytest.raises(ValueError, match="no positions"):
      store_bias.write_next_token_lines(store, hidden, tokens, [], 6)


def test_facts_written_by_one_process_are_recalled_by_another(tmp_path):
  # Keyed by the token embedding, a fact's line matches its question exactly (cosine 1): this
  # shows the path from one process's writes to another's logits, not recall by hidden states
  # (the study in docs/results/store/ measures that with the final hidden state too).
  model, params = _model()
  facts = store_recall.make_facts(TASK.vocab_size, 16, seed=0)
  with MemoryLineStore.open(str(tmp_path), KEY, key_dim=32, value_dim=64) as store:
    assert store_recall.write_facts(store, model, params, TASK, facts, site="embed") == 16
    store.seal()
  # A new process: the model's memory is empty, only the store holds the facts.
  script = MODEL + f"""
import json
from memkernel import store_bias, store_recall, probes
from memkernel.store import MemoryLineStore, verify
task = probes.TaskConfig(name="mqar", layout="scattered", vocab_size=64, seq_len=128,
                         num_pairs=8, leaf_size=16)
facts = store_recall.make_facts(64, 16, seed=0)
key = bytes(range(32))
assert verify({str(tmp_path)!r}, key).ok
out = {{}}
with MemoryLineStore.open({str(tmp_path)!r}, key, config={{"similarity_floor": 0.9}}) as store:
  bias = store_bias.StoreBias(store, alpha=50.0, k=5, vocab_size=64)
  for name, b in (("with", bias), ("without", None)):
    out[name] = store_recall.ask(model, params, task, facts, docs=4, stream=2, bias=b,
                                 site="embed")
    out[name + "_context"] = store_recall.in_context(model, params, task, facts, docs=2,
                                                     stream=2, bias=b, site="embed")
print(json.dumps(out))
"""
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=ROOT)
  assert result.returncode == 0, result.stderr
  out = json.loads(result.stdout.strip().splitlines()[-1])
  assert out["with"]["queries"] == 32
  assert out["with"]["accuracy"] == 1.0   # every fact recalled from the store
  assert out["without"]["accuracy"] < 0.2   # an untrained model with no facts: near chance
  # Keys no fact uses match no line at a 0.9 floor: the store changes nothing there.
  assert out["with_context"] == out["without_context"]


def test_in_context_documents_avoid_or_conflict_with_the_facts():
  facts = store_recall.make_facts(TASK.vocab_size, 16, seed=0)
  rng = np.random.default_rng(0)
  tokens, positions, mask, answers = store_recall.pair_documents(
      TASK, facts.keys, facts.values, rng)
  assert tokens.shape == (2, 128) and len(positions) == 16 and mask.sum() == 16
  for b, t in positions:   # each pair: the key, then its value
    k = int(tokens[b, t])
    assert int(tokens[b, t + 1]) == int(facts.values[list(facts.keys).index(k)])
  assert set(tokens[mask].tolist()) == set(facts.keys.tolist())
  with pytest.raises(ValueError, match="facts must number"):
    store_recall.make_facts(64, 40, seed=0)

"""A family's memory saved to the store by one process continues the stream in another."""

import os
import subprocess
import sys

import numpy as np
import pytest

from memkernel import memory_snapshot
from memkernel.store import MemoryLineStore, tamper

KEY = bytes(range(32))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SETUP = """
import jax, jax.numpy as jnp, numpy as np
from memkernel import family
from memkernel.kernel.config import KernelConfig
from memkernel.peers import PeerConfig
configs = {{"kernel": KernelConfig(vocab_size=32, d_model=32, num_layers=1, max_seq_len=64,
                                  query_block=0),
           "dense": PeerConfig(kind="dense", vocab_size=32, d_model=32, num_layers=1, window=8,
                               max_seq_len=64)}}
config = configs[{name!r}]
model = family.build(config)
params = model.init(jax.random.key(0), jnp.zeros((1, 16), jnp.int32))["params"]
tokens = jnp.asarray(np.random.RandomState(0).randint(0, 32, (2, 48)))
scan = jax.jit(lambda t, m: model.apply({{"params": params}}, t, m, method=model.scan))
"""


@pytest.mark.parametrize("name", ["kernel", "dense"])
def test_a_stream_resumes_in_a_new_process_exactly(tmp_path, name):
  scope = {}
  exec(SETUP.format(name=name), scope)  # pylint: disable=exec-used
  config, scan, tokens = scope["config"], scope["scan"], scope["tokens"]
  from memkernel import family
  full, _ = scan(tokens, family.init_memory(config, 2))
  _, memory = scan(tokens[:, :32], family.init_memory(config, 2))
  uninterrupted, _ = scan(tokens[:, 32:], memory)   # the same two calls, in this process
  with MemoryLineStore.open(str(tmp_path), KEY, key_dim=4, value_dim=256) as store:
    store.put(np.ones(4), np.ones(256), {"other": "line"})   # snapshots share a store
    seal = memory_snapshot.save_memory(store, memory, name="stream")
    with pytest.raises(ValueError, match="already holds a snapshot"):
      memory_snapshot.save_memory(store, memory, name="stream")
  with MemoryLineStore.open(str(tmp_path), KEY) as reopened:
    assert seal.count == len(reopened)
  script = SETUP.format(name=name) + f"""
from memkernel import memory_snapshot
memory = memory_snapshot.restore_memory({str(tmp_path)!r}, bytes(range(32)), name="stream",
                                        like=family.init_memory(config, 2))
rest, _ = scan(tokens[:, 32:], memory)
np.save({str(tmp_path / "rest.npy")!r}, np.asarray(rest))
"""
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=ROOT)
  assert result.returncode == 0, result.stderr
  # The resumed stream's logits are the uninterrupted stream's, bit for bit (and the one-call
  # stream's to float rounding: other shapes compile to other summation orders).
  resumed = np.load(tmp_path / "rest.npy")
  np.testing.assert_array_equal(resumed, np.asarray(uninterrupted))
  np.testing.assert_allclose(resumed, np.asarray(full[:, 32:]), atol=1e-4)


def test_restore_refuses_damage_and_mismatches(tmp_path):
  scope = {}
  exec(SETUP.format(name="kernel"), scope)  # pylint: disable=exec-used
  from memkernel import family
  config = scope["config"]
  memory = family.init_memory(config, 2)
  with MemoryLineStore.open(str(tmp_path / "s"), KEY, key_dim=4, value_dim=64) as store:
    memory_snapshot.save_memory(store, memory, name="m")
    store.put(np.ones(4), np.ones(64))   # after the seal
  like = family.init_memory(config, 2)
  restored = memory_snapshot.restore_memory(str(tmp_path / "s"), KEY, name="m", like=like)
  assert all(np.array_equal(a, b) for a, b in zip(
      scope["jax"].tree.leaves(restored), scope["jax"].tree.leaves(memory)))
  with pytest.raises(ValueError, match="no snapshot named 'x'"):
    memory_snapshot.restore_memory(str(tmp_path / "s"), KEY, name="x", like=like)
  with pytest.raises(ValueError, match="the memory expects"):
    memory_snapshot.restore_memory(str(tmp_path / "s"), KEY, name="m",
                                   like=family.init_memory(config, 3))
  tamper.flip_byte(str(tmp_path / "s"), 3, "value", 10)
  with pytest.raises(ValueError, match="does not verify: flipped_byte at line 3"):
    memory_snapshot.restore_memory(str(tmp_path / "s"), KEY, name="m", like=like)

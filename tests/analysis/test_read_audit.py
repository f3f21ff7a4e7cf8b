"""The read audit: a stored fact's provenance is counted where the read meets it, the
query-blind baseline is the strongest items', a memory too small forgets by the facts' age, and
runs it cannot read are refused by name."""

import dataclasses

import jax
import numpy as np
import pytest

from configs import cross_doc
from configs import passkey
from memkernel import experiment as experiment_lib
from memkernel.analysis import read_audit


@pytest.fixture(scope="module")
def experiment_and_params():
  config = cross_doc.get_config("smoke,braincore")
  config.braincore.update(dict(em_threshold=0.5, em_writes=16))
  experiment = experiment_lib.parse_config(config)
  seq_len = experiment.task.seq_len
  experiment = dataclasses.replace(  # Room for every token: nothing is evicted.
      experiment, model=dataclasses.replace(experiment.model, em_items=seq_len))
  model = experiment.family.build(experiment.model)
  params = model.init(jax.random.key(0), np.zeros((1, seq_len), np.int32))["params"]
  return experiment, params


def _with_gate_bias(params, bias):
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x * 0 + bias if "em_gate" in jax.tree_util.keystr(path)
      and "bias" in jax.tree_util.keystr(path) else x, params)


def test_every_stored_fact_is_counted_and_the_blind_read_is_a_baseline(experiment_and_params):
  experiment, params = experiment_and_params
  report = read_audit.audit_reads(experiment, _with_gate_bias(params, 30.0), batches=2)
  assert report["questions"] == 2 * experiment.eval.batch_size * experiment.task.num_pairs
  assert report["own_span"] == 0.0       # Document 1 asks only for document 0's tokens.
  for layer in report["layers"]:
    assert layer["stored"] == 1.0        # Every candidate lands in a memory with room for all.
    assert 0.0 <= layer["blind"] < 1.0   # 4 strongest of 64 items: not every fact.
    assert layer["found"] <= layer["stored"] and layer["first"] <= layer["found"]
  # Layer 0's untrained read already finds what followed the asked key in document 0 (the
  # token-shift prior: the stored key and the question's query are one vector).
  assert report["layers"][0]["found"] == 1.0
  nothing = read_audit.audit_reads(experiment, _with_gate_bias(params, -30.0), batches=1)
  for layer in nothing["layers"]:
    assert layer["stored"] == layer["found"] == layer["blind"] == 0.0
  text = read_audit.format_report(report)
  assert "query-blind" in text and "age" in text


def test_a_memory_smaller_than_its_facts_forgets_and_says_which(experiment_and_params):
  experiment, params = experiment_and_params
  small = dataclasses.replace(experiment, model=dataclasses.replace(experiment.model,
                                                                    em_items=32))
  report = read_audit.audit_reads(small, _with_gate_bias(params, 30.0), batches=2)
  asked = np.asarray(report["asked_by_age"])
  assert asked.sum() == report["questions"]
  for layer in report["layers"]:
    assert layer["stored"] < 1.0
    # The ages partition the questions: their stored shares add up to the whole.
    np.testing.assert_allclose(np.dot(layer["stored_by_age"], asked) / asked.sum(),
                               layer["stored"], rtol=1e-9)
    # Equal gates: strengths decay every span, so the oldest items are the weakest and go first.
    assert layer["stored_by_age"][0] < layer["stored_by_age"][-1] == 1.0


def test_runs_it_cannot_read_are_named(experiment_and_params):
  experiment, params = experiment_and_params
  pooled = dataclasses.replace(experiment, model=dataclasses.replace(experiment.model,
                                                                     em_writes=1))
  with pytest.raises(ValueError, match="every token a candidate"):
    read_audit.audit_reads(pooled, params, batches=1)
  with pytest.raises(ValueError, match="multiple of the span"):
    read_audit.audit_reads(experiment, params, batches=1, seq_len=70)
  kernel = experiment_lib.parse_config(cross_doc.get_config("smoke"))
  with pytest.raises(ValueError, match="brain-core"):
    read_audit.audit_reads(kernel, params, batches=1)


def test_a_fact_in_the_questions_own_span_is_never_stored_for_it():
  """Reads come before the span's writes: with every candidate stored, exactly the questions
  whose passkey lies in their own span find it missing."""
  config = passkey.get_config("smoke,braincore")
  # Spans of 32: the passkey, before the last 16-token leaf, may share the question's span.
  config.braincore.update(dict(em_threshold=0.5, span=32, em_writes=32, em_items=64))
  experiment = experiment_lib.parse_config(config)
  model = experiment.family.build(experiment.model)
  params = model.init(jax.random.key(0), np.zeros((1, 64), np.int32))["params"]
  report = read_audit.audit_reads(experiment, _with_gate_bias(params, 30.0), batches=4,
                                  batch_size=32)
  assert 0.0 < report["own_span"] < 1.0
  for layer in report["layers"]:
    assert layer["stored"] == pytest.approx(1.0 - report["own_span"])

"""The write audit: every scored answer's source counted once, shares that follow the gate, and
runs it cannot read refused by name."""

import dataclasses

import jax
import numpy as np
import pytest

from configs import cross_doc
from memkernel import experiment as experiment_lib
from memkernel.analysis import write_audit


@pytest.fixture(scope="module")
def experiment_and_params():
  config = cross_doc.get_config("smoke,braincore")
  config.braincore.update(dict(em_threshold=0.5, em_items=16, em_writes=16))
  experiment = experiment_lib.parse_config(config)
  model = experiment.family.build(experiment.model)
  tokens = np.zeros((1, experiment.task.seq_len), np.int32)
  return experiment, model.init(jax.random.key(0), tokens)["params"]


def _with_gate_bias(params, bias):
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x * 0 + bias if "em_gate" in jax.tree_util.keystr(path)
      and "bias" in jax.tree_util.keystr(path) else x, params)


@pytest.mark.parametrize("bias, share", [(30.0, 1.0), (-30.0, 0.0)])
def test_the_shares_follow_the_gate(experiment_and_params, bias, share):
  experiment, params = experiment_and_params
  report = write_audit.audit_writes(experiment, _with_gate_bias(params, bias), batches=2)
  queries = 2 * experiment.eval.batch_size * experiment.task.num_pairs
  for layer in report["layers"]:
    assert layer["sources"] == queries  # One distinct source per question.
    assert layer["sources"] + layer["others"] == 2 * experiment.eval.batch_size * (
        experiment.task.seq_len // experiment.model.span * experiment.model.span)
    assert layer["sources_open"] == share and layer["others_open"] == share
  assert "answer sources" in write_audit.format_report(report)


def test_runs_it_cannot_read_are_named(experiment_and_params):
  experiment, params = experiment_and_params
  pooled = dataclasses.replace(experiment, model=dataclasses.replace(experiment.model,
                                                                     em_writes=1))
  with pytest.raises(ValueError, match="every token a candidate"):
    write_audit.audit_writes(pooled, params, batches=1)
  kernel = experiment_lib.parse_config(cross_doc.get_config("smoke"))
  with pytest.raises(ValueError, match="brain-core"):
    write_audit.audit_writes(kernel, params, batches=1)

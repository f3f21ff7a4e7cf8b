"""Online adaptation: streams repeat a document (A, B, A), a memory reset at every boundary
scores the second A as the first, one that carries does not, and bad requests are named."""

import dataclasses
import os

import jax
import numpy as np
import pytest

from configs import cross_doc
from configs import text as text_config
from memkernel import experiment as experiment_lib
from memkernel import runs
from memkernel.analysis import adaptation


@pytest.fixture(scope="module")
def experiment_and_params(tmp_path_factory):
  root = tmp_path_factory.mktemp("corpus")
  rng = np.random.default_rng(0)
  for i in range(400):   # About 5% of the files land in the test split (a hash of the path).
    with open(os.path.join(root, f"doc_{i:03d}.txt"), "w") as f:
      f.write(f"# document {i}\n" + " ".join(rng.choice(["alpha", "beta", "gamma", "tree"], 40)))
  config = text_config.get_config("smoke,braincore")
  config.task.corpus, config.task.patterns = str(root), "*.txt"
  experiment = experiment_lib.parse_config(config)
  model = experiment.family.build(experiment.model)
  params = model.init(jax.random.key(0), np.zeros((1, 64), np.int32))["params"]
  return experiment, params


def test_streams_repeat_the_document_in_its_own_segment(experiment_and_params):
  experiment, _ = experiment_and_params
  tokens, segments, paths = adaptation.streams(experiment, 3, 64)
  assert tokens.shape == segments.shape == (3, 192) and len(paths) == 3
  np.testing.assert_array_equal(tokens[:, :64], tokens[:, 128:])
  np.testing.assert_array_equal(tokens[:2, 64:128], tokens[1:, :64])   # B_i is A_(i+1).
  np.testing.assert_array_equal(segments[0], np.repeat([0, 1, 2], 64))


def test_reset_scores_the_return_as_the_first_time_and_carry_does_not(experiment_and_params):
  experiment, params = experiment_and_params
  reset = runs.with_memory(experiment, {"em_boundary": "reset", "pm_boundary": "reset"})
  report = adaptation.measure(reset, params, documents=4, doc_len=64, batch_size=2)
  assert report["bytes_scored"] == 4 * 63
  np.testing.assert_allclose(report["second_bpb"], report["first_bpb"], rtol=1e-5)
  assert abs(report["gain_bpb"]) < 1e-4
  carry = runs.with_memory(experiment, {"em_boundary": "carry", "pm_boundary": "carry"})
  carried = adaptation.measure(carry, params, documents=4, doc_len=64, batch_size=2)
  assert carried["first_bpb"] == pytest.approx(report["first_bpb"], rel=1e-5)
  assert abs(carried["gain_bpb"]) > 1e-4
  assert "second A" in adaptation.format_report(carried)


def test_bad_requests_are_named(experiment_and_params):
  experiment, params = experiment_and_params
  with pytest.raises(ValueError, match="multiple of the family's document alignment"):
    adaptation.measure(experiment, params, documents=2, doc_len=40)
  with pytest.raises(ValueError, match="files of at least"):
    adaptation.measure(experiment, params, documents=2, doc_len=4096)
  with pytest.raises(ValueError, match="documents must be a positive integer"):
    adaptation.measure(experiment, params, documents=0)
  probe = dataclasses.replace(
      experiment, task=experiment_lib.parse_config(cross_doc.get_config("smoke,braincore")).task)
  with pytest.raises(ValueError, match="reads text documents"):
    adaptation.measure(probe, params)

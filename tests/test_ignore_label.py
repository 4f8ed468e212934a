"""nnU-Net v2's ignore label (a class named "ignore" holding the highest value): no logit channel, no loss, no score,
no report column. The end-to-end run is tests/test_own_dataset.py's organs dataset, which declares one."""

import numpy as np
import pytest

from autosam_jax.data.errors import DataError
from autosam_jax.data.labels import LabelTable


def test_the_ignore_label_is_no_class_of_the_models_or_the_reports():
  table = LabelTable.from_dataset_json("dataset.json", {"background": 0, "liver": 1, "tumour": 2, "ignore": 3})
  assert table.ignore == 3 and table.num_classes == 3  # logit channels: background, liver, tumour
  assert table.foreground == {1: "liver", 2: "tumour"} and table.foreground_names == ["liver", "tumour"]
  assert table.values == (0, 1, 2, 3)  # label files may hold it
  assert table.to_dict()["ignore"] == 3 and LabelTable.from_dict(table.to_dict(), "record") == table
  assert "3 ignore (not scored)" in table.describe()
  plain = LabelTable.from_dataset_json("dataset.json", {"background": 0, "liver": 1})
  assert plain.ignore is None and plain.num_classes == 2


@pytest.mark.parametrize("labels, message", [
    ({"background": 0, "ignore": 1, "liver": 2}, "not the highest"),
    ({"background": 0, "ignore": 1}, "only the background and 'ignore'"),
])
def test_an_ignore_label_that_breaks_nnunet_rules_is_refused(labels, message):
  with pytest.raises(DataError, match=message):
    LabelTable.from_dataset_json("dataset.json", labels)


def test_ignored_pixels_carry_no_loss():
  import jax.numpy as jnp

  from autosam_jax.train.losses import segmentation_loss

  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 8, 8, 3)).astype(np.float32)
  labels = rng.integers(0, 3, size=(2, 8, 8)).astype(np.int32)
  weights = np.ones((2, 8, 8), np.float32)
  unannotated = rng.random((2, 8, 8)) < 0.3
  with_ignore = np.where(unannotated, 3, labels)  # value 3: the ignore label of a 3-channel model
  loss, parts = segmentation_loss(jnp.asarray(logits), jnp.asarray(with_ignore), jnp.asarray(weights))
  # the same loss as the annotated pixels alone (the others weighing 0), whatever the logits are there
  expected, _ = segmentation_loss(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(np.where(unannotated, 0, 1.0)))
  noisy = np.where(unannotated[..., None], rng.normal(size=logits.shape) * 10, logits).astype(np.float32)
  moved, _ = segmentation_loss(jnp.asarray(noisy), jnp.asarray(with_ignore), jnp.asarray(weights))
  np.testing.assert_allclose(float(loss), float(expected), rtol=1e-6)
  np.testing.assert_allclose(float(moved), float(expected), rtol=1e-6)
  assert np.isfinite(float(parts["ce"]))


def test_ignored_pixels_count_for_no_score():
  """Dice and HD95 with the ignore label's pixels left out, against MONAI on the masked arrays (nnU-Net scores
  with that mask: a prediction there is neither a true nor a false positive)."""
  import torch
  from monai.metrics import DiceMetric

  from autosam_jax.evaluation.metrics import evaluate_volume

  rng = np.random.default_rng(1)
  truth = np.zeros((24, 24, 6), np.uint8)
  truth[4:14, 4:14] = 1
  truth[12:20, 10:22] = 2
  truth[:, :3] = 3  # an unannotated border
  prediction = truth.copy()
  prediction[truth == 3] = rng.integers(1, 3, size=int((truth == 3).sum()))  # anything where nobody annotated
  prediction[5:7, 5:9] = 2  # and a real mistake
  result = evaluate_volume(prediction, truth, (1.0, 1.0, 5.0), classes={1: "a", 2: "b"}, convention="standard",
                           ignore=3)
  assert list(result.labels) == ["a", "b"]
  masked_prediction, masked_truth = np.where(truth == 3, 0, prediction), np.where(truth == 3, 0, truth)
  metric = DiceMetric(include_background=True, reduction="none")
  for value, name in ((1, "a"), (2, "b")):
    as_batch = lambda mask: torch.from_numpy(np.ascontiguousarray(mask))[None, None].float()
    reference = float(metric(as_batch(masked_prediction == value), as_batch(masked_truth == value))[0, 0])
    assert result.dice[name].value == pytest.approx(reference, abs=1e-6)  # MONAI sums in float32
  unmasked = evaluate_volume(prediction, truth, (1.0, 1.0, 5.0), classes={1: "a", 2: "b"}, convention="standard")
  assert unmasked.dice["a"].value < result.dice["a"].value  # the border would count as false positives
  with pytest.raises(ValueError, match="cannot be a scored class"):
    evaluate_volume(prediction, truth, (1.0, 1.0, 5.0), classes={1: "a", 3: "c"}, convention="standard", ignore=3)

"""The label table: dataset.json's labels in nnU-Net's v1 and v2 forms, and the checks every later stage relies on."""

import json

import pytest

from autosam_jax.data.errors import DataError
from autosam_jax.data.labels import ACDC_TABLE, LabelTable, table_of_record
from autosam_jax.train.loop import TrainConfig, resolve_config


def test_v1_and_v2_forms_give_one_table():
  v2 = LabelTable.from_dataset_json("dataset.json", {"background": 0, "grey matter": 1, "white matter": 2})
  v1 = LabelTable.from_dataset_json("dataset.json", {"0": "background", "2": "white matter", "1": "grey matter"})
  assert v1 == v2
  assert v2.names == ("background", "grey matter", "white matter") and v2.num_classes == 3
  assert v2.foreground == {1: "grey matter", 2: "white matter"} and v2.foreground_names == ["grey matter",
                                                                                             "white matter"]
  # The record is the v2 form and reads back to the same table, through JSON.
  assert LabelTable.from_dict(json.loads(json.dumps(v2.to_dict())), "record") == v2
  assert ACDC_TABLE.foreground == {1: "RV", 2: "MYO", 3: "LV"}


@pytest.mark.parametrize("labels, message", [
    ({"background": 0, "a": 2}, "not consecutive"),
    ({"background": 1, "a": 2}, "not consecutive"),
    ({"background": 0, "a": 1, "b": 1}, "more than one class"),
    ({"0": "background", "1": "a", "2": "a"}, "not distinct"),
    ({"background": 0}, "only the background"),
    ({"background": 0, "a": [1, 2]}, "region-based"),
    ({"background": 0, "a": "1"}, "must map names to integers"),
    ({"background": 0, "a": True}, "must map names to integers"),
    ({}, "no 'labels'"),
    ([0, 1], "no 'labels'"),
])
def test_bad_label_declarations_are_one_line_naming_the_file(labels, message):
  with pytest.raises(DataError, match=message) as info:
    LabelTable.from_dataset_json("/data/Dataset001/dataset.json", labels)
  assert str(info.value).startswith("/data/Dataset001/dataset.json: ") and "\n" not in str(info.value)


def test_values_outside_the_table_and_other_tables_are_refused():
  table = LabelTable(("background", "tumour"))
  table.check_values([0, 1], "case.nii.gz")
  with pytest.raises(DataError, match=r"case.nii.gz: label values 2, 7 are not classes of this dataset"):
    table.check_values([0, 1, 2, 7], "case.nii.gz")
  table.check_same(LabelTable(("background", "tumour")), "model", "the model", "the cache")
  with pytest.raises(DataError, match="0 background, 1 tumour but the cache has 0 background, 1 RV, 2 MYO, 3 LV"):
    table.check_same(ACDC_TABLE, "model", "the model", "the cache")
  assert table_of_record({}, "labels", "manifest.json") is None
  assert table_of_record({"labels": table.to_dict()}, "labels", "manifest.json") == table


def test_num_classes_comes_from_the_data_and_a_disagreeing_config_is_refused():
  table = LabelTable(("background", "a", "b", "c", "d", "e"))
  assert resolve_config(TrainConfig(), table, "cache").num_classes == 6
  assert resolve_config(TrainConfig(num_classes=6), table, "cache").num_classes == 6
  with pytest.raises(DataError, match=r"cache: num_classes is 4 in the training config but the data has 6 classes"):
    resolve_config(TrainConfig(num_classes=4), table, "cache")
  with pytest.raises(DataError, match="at least 2"):
    TrainConfig(num_classes=1)

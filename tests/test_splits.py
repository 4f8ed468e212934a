"""Patient-level splits: protocol sizes, seeding, disjoint CV folds, nested tr_size, JSON files and their errors."""

import json
from pathlib import Path

import pytest

from autosam_jax.data.errors import DataError
from autosam_jax.data.splits import (Split, cross_validation_splits, load_splits, official_split, parse_val_patients,
                                     require_validation_patients, save_splits)

PATIENTS = [f"patient{i:03d}" for i in range(1, 101)]


def test_official_sizes_and_partition():
  split = official_split(PATIENTS, seed=3)
  assert (len(split.train), len(split.val), len(split.test)) == (70, 15, 15)
  assert sorted(split.patients) == PATIENTS
  assert split.seed == 3 and "3" in split.name


def test_official_is_seeded_and_ignores_listing_order():
  a = official_split(PATIENTS, seed=0)
  assert official_split(list(reversed(PATIENTS)), seed=0) == a
  b = official_split(PATIENTS, seed=1)
  assert b.train != a.train and b.test != a.test


def test_official_rejects_bad_ids_and_tiny_sets():
  with pytest.raises(DataError, match="twice"):
    official_split(PATIENTS + ["patient001"], seed=0)
  with pytest.raises(DataError, match="at least 2 patients"):
    official_split(["a"], seed=0)
  with pytest.raises(DataError, match="seed"):
    official_split(PATIENTS, seed=-1)


def test_cross_validation_folds_are_disjoint_and_cover_everyone():
  folds = cross_validation_splits(PATIENTS, num_folds=5, seed=7)
  assert len(folds) == 5
  tests = [set(f.test) for f in folds]
  assert sum(len(t) for t in tests) == 100 and set().union(*tests) == set(PATIENTS)
  for fold in folds:
    assert len(fold.val) == 15 and len(fold.train) == 65
    assert sorted(fold.patients) == PATIENTS  # the three parts partition the patients
    assert not set(fold.val) & (set(fold.train) | set(fold.test))
  # Validation parts differ between folds (each fold has its own inner shuffle).
  assert len({f.val for f in folds}) == 5
  assert cross_validation_splits(list(reversed(PATIENTS)), num_folds=5, seed=7) == folds
  assert cross_validation_splits(PATIENTS, num_folds=5, seed=8) != folds


def test_cross_validation_rejects_bad_arguments():
  with pytest.raises(DataError, match="num_folds"):
    cross_validation_splits(PATIENTS[:3], num_folds=4)
  with pytest.raises(DataError, match="val_patients"):
    cross_validation_splits(PATIENTS, val_patients=1.0)
  with pytest.raises(DataError, match="too few"):
    cross_validation_splits(PATIENTS[:4], num_folds=2, val_patients=0.5)


def test_labeled_is_nested_prefix_of_train():
  split = official_split(PATIENTS, seed=0)
  previous: list[str] = []
  for k in (1, 2, 5, 10, 70):
    labeled = split.labeled(k)
    assert len(labeled) == k and labeled[:len(previous)] == previous
    previous = labeled
  assert split.labeled(70) == list(split.train)
  with pytest.raises(DataError, match="has 70 patients"):
    split.labeled(71)
  with pytest.raises(DataError, match="positive integer"):
    split.labeled(0)


def test_json_round_trip(tmp_path):
  split = official_split(PATIENTS, seed=5)
  path = split.to_json(tmp_path / "sub" / "split.json")
  assert Split.from_json(path, known_patients=PATIENTS) == split
  assert [p.name for p in path.parent.iterdir()] == ["split.json"]  # no temporary file left behind
  split.to_json(path)  # overwriting is fine
  assert Split.from_json(path) == split

  folds = cross_validation_splits(PATIENTS, num_folds=3, seed=1)
  folds_path = save_splits(folds, tmp_path / "folds.json")
  assert load_splits(folds_path, known_patients=PATIENTS) == folds
  assert Split.from_json(folds_path, name=folds[2].name) == folds[2]
  assert load_splits(path) == [split]
  with pytest.raises(DataError, match="say which one"):
    Split.from_json(folds_path)
  with pytest.raises(DataError, match="no split named"):
    Split.from_json(folds_path, name="nope")


def test_hand_written_file_needs_only_the_parts(tmp_path):
  path = tmp_path / "mine.json"
  path.write_text(json.dumps({"train": ["a", "b"], "val": [], "test": ["c"]}))
  split = Split.from_json(path)
  assert split.name == "mine" and split.seed is None and split.labeled(2) == ["a", "b"]


GOOD = {"name": "s", "seed": 0, "train": ["a", "b"], "val": ["c"], "test": ["d"]}
BAD_FILES = {
    "not json": ("{train: ", "not valid JSON"),
    "not an object": ([1, 2], "JSON object"),
    "missing key": ({k: v for k, v in GOOD.items() if k != "test"}, "missing keys"),
    "unknown key": (GOOD | {"folds": 5}, "unknown keys"),
    "part not a list": (GOOD | {"train": "a,b"}, "must be a list"),
    "id not a string": (GOOD | {"val": [3]}, "not non-empty strings"),
    "seed not an int": (GOOD | {"seed": "0"}, "seed must be"),
    "name not a string": (GOOD | {"name": 1}, "name must be"),
    "wrong format": (GOOD | {"format": "other"}, "format is"),
    "wrong version": (GOOD | {"version": 9}, "version is"),
    "duplicate": (GOOD | {"train": ["a", "b", "a"]}, "listed twice in train"),
    "overlap": (GOOD | {"test": ["d", "a"]}, "both train and test"),
    "empty train": (GOOD | {"train": []}, "train part is empty"),
    "unknown patient": (GOOD | {"test": ["d", "zz"]}, "not in the dataset: 'zz'"),
    "bad entry in a set": ({"splits": [GOOD, GOOD | {"val": "c"}]}, r"\(split 1\).*must be a list"),
    "repeated names in a set": ({"splits": [GOOD, GOOD]}, "unique"),
    "empty set": ({"splits": []}, "non-empty list"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_split_file_names_the_file(tmp_path, case):
  content, problem = BAD_FILES[case]
  path = tmp_path / f"{case.replace(' ', '_')}.json"
  path.write_text(content if isinstance(content, str) else json.dumps(content))
  with pytest.raises(DataError, match=problem) as info:
    load_splits(path, known_patients=["a", "b", "c", "d"])
  message = str(info.value)
  assert message.startswith(str(path)) and "\n" not in message


def test_missing_split_file(tmp_path):
  with pytest.raises(DataError, match="not found") as info:
    Split.from_json(tmp_path / "none.json")
  assert str(tmp_path / "none.json") in str(info.value)


def test_split_constructor_checks_overlap():
  with pytest.raises(DataError, match="both train and val"):
    Split(name="x", seed=0, train=["a"], val=["a"], test=["b"])


# ---------------------------------------------------------------- the validation part: count, fraction, at least one


def _sizes(split: Split) -> tuple[int, int, int]:
  return len(split.train), len(split.val), len(split.test)


def test_val_patients_as_a_count_or_a_fraction():
  assert _sizes(official_split(PATIENTS, seed=0, val_patients=3)) == (70, 3, 27)
  assert official_split(PATIENTS, seed=0, val_patients=0.15) == official_split(PATIENTS, seed=0)
  for val_patients, expected in ((2, 2), ("2", 2), (0.25, 25), ("0.25", 25), (0, 0)):
    folds = cross_validation_splits(PATIENTS, num_folds=4, seed=1, val_patients=val_patients)
    assert [len(f.val) for f in folds] == [expected] * 4
    assert all(len(f.train) == 75 - expected and sorted(f.patients) == PATIENTS for f in folds)


def test_a_fraction_keeps_one_validation_patient_on_six_patients():
  six = PATIENTS[:6]
  assert _sizes(official_split(six, seed=0)) == (4, 1, 1)  # int(0.15 * 6) is 0
  folds = cross_validation_splits(six, num_folds=5, seed=0)
  assert [len(f.val) for f in folds] == [1] * 5
  assert all(len(f.train) >= 1 and len(f.test) >= 1 and sorted(f.patients) == six for f in folds)
  # a count is taken as given: 0 means no validation part
  assert [len(f.val) for f in cross_validation_splits(six, num_folds=5, seed=0, val_patients=0)] == [0] * 5
  assert official_split(six, seed=0, val_patients=0).val == ()


def test_at_least_one_only_where_train_and_test_keep_a_patient():
  three = PATIENTS[:3]
  # Two folds of three patients: fold 0 tests two and has one patient left, which must train.
  folds = cross_validation_splits(three, num_folds=2, seed=0)
  assert [(len(f.train), len(f.val), len(f.test)) for f in folds] == [(1, 0, 2), (2, 0, 1)]
  # Three folds of three patients leave two in every fold: one trains, one validates.
  assert [(len(f.train), len(f.val)) for f in cross_validation_splits(three, num_folds=3, seed=0)] == [(1, 1)] * 3
  assert _sizes(official_split(three, seed=0)) == (1, 1, 1)
  assert _sizes(official_split(PATIENTS[:2], seed=0)) == (1, 0, 1)
  with pytest.raises(DataError, match="too few for 1 validation"):
    cross_validation_splits(three, num_folds=2, seed=0, val_patients=1)
  with pytest.raises(DataError, match="no room for 2 validation"):
    official_split(three, seed=0, val_patients=2)


@pytest.mark.parametrize("value", ["-1", "1.5", "1.0", "0.0", "abc", "", -2, 1.0, True, None])
def test_bad_val_patients_are_refused(value):
  with pytest.raises(DataError) as info:
    parse_val_patients(value, "--val-patients")
  message = str(info.value)
  assert message.startswith("--val-patients: ") and "give a count" in message and "\n" not in message
  with pytest.raises(DataError, match="val_patients"):
    cross_validation_splits(PATIENTS, val_patients=value)


def test_make_splits_refuses_a_bad_val_patients_before_reading_the_data(tmp_path, capsys):
  from autosam_jax.cli import main

  out = tmp_path / "splits.json"
  assert main(["make-splits", str(tmp_path / "no-data"), "--val-patients", "1.5", "--out", str(out)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: --val-patients: 1.5 ") and "fraction" in err[0], err
  assert not out.exists()


def test_require_validation_patients():
  split = Split(name="s", seed=0, train=["a"], val=[], test=["b"])
  with pytest.raises(DataError, match=r"split s of f.json has no validation patients.*--val-patients 1"):
    require_validation_patients(split, "f.json")
  require_validation_patients(Split(name="s", seed=0, train=["a"], val=["c"], test=["b"]), "f.json")


@pytest.fixture(scope="module")
def six_patients(tmp_path_factory):
  from autosam_jax.data.synthetic import write_synthetic_acdc

  root = tmp_path_factory.mktemp("six") / "acdc"
  write_synthetic_acdc(root, 6, seed=3)
  return root


def test_make_splits_keeps_validation_and_improved_training_needs_it(six_patients, tmp_path, capsys):
  from autosam_jax.cli import main

  configs = Path(__file__).resolve().parents[1] / "experiments" / "configs"
  default, none = tmp_path / "cv5.json", tmp_path / "cv5-noval.json"
  assert main(["make-splits", str(six_patients), "--out", str(default)]) == 0
  assert [len(s.val) for s in load_splits(default)] == [1] * 5
  assert main(["make-splits", str(six_patients), "--protocol", "official", "--val-patients", "2", "--out",
               str(tmp_path / "official.json")]) == 0
  assert _sizes(load_splits(tmp_path / "official.json")[0]) == (3, 2, 1)
  assert main(["make-splits", str(six_patients), "--val-patients", "0", "--out", str(none)]) == 0
  assert [len(s.val) for s in load_splits(none)] == [0] * 5
  capsys.readouterr()

  run = tmp_path / "run"
  train = ["train", "--cache", str(tmp_path / "cache"), "--weights", str(tmp_path / "weights"), "--splits", str(none),
           "--fold", "cv5-seed0-fold2", "--tr-size", "1", "--out", str(run)]
  assert main([*train, "--config", str(configs / "autosam_improved.py")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1, err
  assert err[0].startswith(f"error: split cv5-seed0-fold2 of {none} has no validation patients") and \
      "improved protocol" in err[0] and "--val-patients 1" in err[0], err
  assert not run.exists()
  # The faithful protocol needs no validation patients: the same split passes the check (and fails later, on the
  # SAM weights this test does not provide).
  assert main([*train, "--config", str(configs / "autosam_faithful.py")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "no validation patients" not in err[0] and str(tmp_path / "weights") in err[0], err

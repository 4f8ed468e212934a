"""Patient-level splits: protocol sizes, seeding, disjoint CV folds, nested tr_size, JSON files and their errors."""

import json

import pytest

from autosam_jax.data.errors import DataError
from autosam_jax.data.splits import Split, cross_validation_splits, load_splits, official_split, save_splits

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
  with pytest.raises(DataError, match="val_fraction"):
    cross_validation_splits(PATIENTS, val_fraction=1.0)
  with pytest.raises(DataError, match="too few"):
    cross_validation_splits(PATIENTS[:4], num_folds=2, val_fraction=0.5)


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

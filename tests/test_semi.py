"""Semi-supervised training (train/semi.py) on a dataset that is not ACDC (2 classes, blobs, permuted voxel order):
strong views in the cache, pseudo-labels that never read an unlabeled patient's labels, exact resumption, the
sweep's semi column, one-line refusals. 1 vs 4 devices: tests/test_distributed.py."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from autosam_jax.train.loop import TrainConfig

CASES = [f"case_{i:03d}" for i in range(5)]
TRAIN, VAL, TEST = CASES[:3], CASES[3:4], CASES[4:]
# threshold 0: every pixel of an unlabeled slice carries its pseudo-label, so the unlabeled stream moves the head
SEMI = TrainConfig(head="linear", variant="improved", scheduler="plateau_val_dice", epochs=2, batch_size=2,
                   learning_rate=5e-3, checkpoint_every_steps=2, semi=True, semi_threshold=0.0, semi_ramp_epochs=1)


def _write_dataset(folder):
  from autosam_jax.data.shapes import write_shapes_dataset

  write_shapes_dataset(folder, num_cases=5, class_names=["cyst", "kidney"], seed=5, shape=(32, 40, 6),
                       voxel_order=(2, 0, 1), spacing=(1.0, 1.0, 1.0))


def _poison(source, target):
  """A copy of the dataset with the labels of the unlabeled training patients (case_001, case_002) changed: the
  classes swapped and the background's pixels given class 1."""
  import nibabel as nib

  shutil.copytree(source, target)
  for case in TRAIN[1:]:
    path = target / "labelsTr" / f"{case}.nii.gz"
    image = nib.load(path)
    label = np.asarray(image.dataobj)
    poisoned = np.select([label == 1, label == 2], [2, 1], 1).astype(label.dtype)
    assert (poisoned != label).mean() > 0.5
    nib.save(nib.Nifti1Image(poisoned, image.affine, image.header), path)


@pytest.fixture(scope="module")
def world(tiny_weights, tmp_path_factory):
  from autosam_jax.data.splits import Split
  from autosam_jax.features.precompute import PrecomputeOptions, precompute

  root = tmp_path_factory.mktemp("semi")
  _write_dataset(root / "data")
  _poison(root / "data", root / "poisoned")
  Split(name="s", seed=0, train=tuple(TRAIN), val=tuple(VAL), test=tuple(TEST)).to_json(root / "split.json")
  options = PrecomputeOptions(mode="improved", strong_views=1, dtype="float32", shard_size=32, batch_size=8)
  for name in ("data", "poisoned"):
    precompute(root / name, tiny_weights, root / f"cache-{name}", tfds_dir=root / f"tfds-{name}", options=options,
               splits_file=root / "split.json", progress=False)
  return root


def _factory(weights):
  def make(config):
    from flax import nnx

    from autosam_jax import load_sam
    from autosam_jax.models.heads import build_head
    return build_head(config.head, config.num_classes, variant=config.variant, sam=load_sam(weights),
                      rngs=nnx.Rngs(config.seed))
  return make


def _semi(world, weights, out, cache="cache-data", config=SEMI, **kwargs):
  from autosam_jax.train.semi import train_semi

  return train_semi(config, world / cache, _factory(weights), out, TRAIN[:1], VAL, TRAIN[1:], progress=False,
                    **kwargs)


def _params(run_dir, model="final_model"):
  import jax
  import orbax.checkpoint as ocp

  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore((run_dir / model / "state").absolute())
  return [np.asarray(x) for x in jax.tree.leaves(restored["params"])]


def _losses(run_dir):
  rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
  return [r["loss"] for r in rows if r["kind"] == "step"]


@pytest.fixture(scope="module")
def reference(world, tiny_weights):
  out = world / "runs" / "semi"
  return out, _semi(world, tiny_weights, out)


def test_strong_views_are_cached_for_training_patients_with_their_pixels_in_place(world):
  from autosam_jax.features.cache import FeatureCache

  cache = FeatureCache(world / "cache-data")
  depends_on = cache.manifest["depends_on"]
  assert depends_on["strong_views"] == 1 and depends_on["view_patients"] == TRAIN
  views = {}
  for i, item in enumerate(cache.items):
    views.setdefault(item["patient_id"], set()).add(item["view"])
  assert all(views[p] == {0, -1} for p in TRAIN) and all(views[p] == {0} for p in VAL + TEST)
  lookup = {(it["case_id"], it["slice_index"], it["view"]): i for i, it in enumerate(cache.items)}
  changed = 0
  for (case, z, view), i in lookup.items():
    if view < 0:
      clean, strong = cache[lookup[(case, z, 0)]], cache[i]
      np.testing.assert_array_equal(strong["target"], clean["target"])  # photometric only: nothing moved
      np.testing.assert_array_equal(strong["valid"], clean["valid"])
      changed += not np.allclose(strong["embedding"], clean["embedding"], atol=1e-3)
  assert changed >= 6  # the views differ from the clean features (some draws leave a slice almost as it was)


def test_photometric_views_change_intensities_and_move_no_pixel():
  import jax

  from autosam_jax.data.augment import AugmentConfig, augment_batch

  rng = np.random.default_rng(0)
  images = np.repeat(rng.uniform(0, 1, (6, 24, 20, 1)), 3, axis=-1).astype(np.float32)
  labels = rng.integers(0, 3, (6, 24, 20)).astype(np.int32)
  out, out_labels = augment_batch(jax.random.key(1), images, labels, AugmentConfig.photometric())
  np.testing.assert_array_equal(out_labels, labels)
  out = np.asarray(out)
  assert np.abs(out - images).max() > 0.05
  np.testing.assert_array_equal(out[..., 0], out[..., 2])  # one value for all channels: the image stays grey
  # each output pixel is a monotonic function of its own input pixel (plus noise): no pixel moved
  for sample in range(6):
    assert np.corrcoef(out[sample, ..., 0].ravel(), images[sample, ..., 0].ravel())[0, 1] > 0.5


def test_cutmix_boxes_fall_on_the_embedding_grid_so_every_resolution_mixes_the_same_pixels():
  import jax
  import jax.numpy as jnp

  from autosam_jax.train.semi import box_masks, cutmix_boxes

  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(3), i))(jnp.arange(64))
  boxes = cutmix_boxes(keys, 16, 0.5)
  coarse, fine = np.asarray(box_masks(boxes, 16)), np.asarray(box_masks(boxes, 64))
  np.testing.assert_array_equal(np.repeat(np.repeat(coarse, 4, axis=1), 4, axis=2), fine)
  areas = coarse.mean(axis=(1, 2))
  assert 15 <= (areas > 0).sum() <= 50 and areas.max() <= 0.6  # about half get a box, none the whole slice


def test_semi_learns_from_the_unlabeled_patients_without_reading_their_labels(world, tiny_weights, reference):
  out, result = reference
  assert result["steps"] == 6 and (out / "final_model").is_dir()
  record = json.loads((out / "run.json").read_text())["identity"]
  assert record["unlabeled_patients"] == TRAIN[1:] and record["labeled_patients"] == TRAIN[:1]
  assert record["config"]["semi"] is True and record["config"]["semi_threshold"] == 0.0
  # The same run on the dataset whose unlabeled patients' labels are swapped and smeared: the same parameters.
  poisoned = world / "runs" / "poisoned"
  _semi(world, tiny_weights, poisoned, cache="cache-poisoned")
  for a, b in zip(_params(out), _params(poisoned), strict=True):
    np.testing.assert_array_equal(a, b)
  assert _losses(out) == _losses(poisoned)
  # ... and the unlabeled patients do move the head: without them (supervised, same options) it ends elsewhere.
  from autosam_jax.models.trained import SEMI_FIELDS
  from autosam_jax.train.loop import train

  supervised = TrainConfig(**{k: v for k, v in SEMI.to_dict().items() if k not in ("semi", *SEMI_FIELDS)})
  train(supervised, world / "cache-data", _factory(tiny_weights), world / "runs" / "supervised", TRAIN[:1], VAL,
        progress=False)
  losses = _losses(world / "runs" / "supervised")
  assert len(losses) == len(_losses(out))
  assert max(abs(a - b) for a, b in zip(losses, _losses(out))) > 1e-3
  assert max(np.abs(a - b).max() for a, b in zip(_params(world / "runs" / "supervised"), _params(out))) > 1e-4


def test_a_killed_semi_run_resumes_to_the_same_parameters(world, tiny_weights, reference, kill_at):
  out = world / "runs" / "killed"
  assert _semi(world, tiny_weights, out, stop_after_steps=4) == {"stopped_at_step": 4}  # 2nd epoch, checkpointed
  kill_at("train.step:1", "INT")  # one step after the resumption, before the next checkpoint
  with pytest.raises(KeyboardInterrupt):
    _semi(world, tiny_weights, out)
  kill_at("none")
  _semi(world, tiny_weights, out)
  for a, b in zip(_params(reference[0]), _params(out), strict=True):
    np.testing.assert_array_equal(a, b)
  assert _losses(out) == _losses(reference[0])


def test_the_unlabeled_stream_is_refused_in_one_line(world, tiny_weights, tmp_path, capsys):
  from autosam_jax.cli import main

  config = Path(__file__).resolve().parents[1] / "experiments/configs/linear_improved.py"
  base = ["train", "--config", str(config), "--weights",
          str(tiny_weights), "--splits", str(world / "split.json"), "--set", "semi=True", "--set", "epochs=1"]
  cases = [  # (arguments, what the message says)
      (["--cache", str(world / "tiny-cache-without-views"), "--tr-size", "1"], "holds no strong views"),
      (["--cache", str(world / "cache-data"), "--tr-size", "3"], "needs unlabeled patients"),
      (["--cache", str(world / "cache-data"), "--tr-size", "1", "--set", "semi_ratio=0"], "semi_ratio"),
  ]
  from autosam_jax.features.precompute import PrecomputeOptions, precompute

  precompute(world / "data", tiny_weights, world / "tiny-cache-without-views", tfds_dir=world / "tfds-data",
             options=PrecomputeOptions(mode="improved", dtype="float32", shard_size=64), progress=False)
  for number, (extra, said) in enumerate(cases):
    out = tmp_path / f"run{number}"
    assert main([*base, *extra, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and said in err[0], err
    assert not out.exists()
  assert main(["precompute", "--data", str(world / "data"), "--weights", str(tiny_weights), "--out",
               str(tmp_path / "cache"), "--strong-views", "-1", "--splits", str(world / "split.json")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "--strong-views must be an integer, 0 or more" in err[0], err
  assert not (tmp_path / "cache").exists()


def test_the_sweep_runs_semi_beside_the_supervised_head_on_the_same_labeled_patients(world, tiny_weights, capsys):
  from autosam_jax.cli import main

  config = {"data": str(world / "data"), "encoders": {"tiny": str(tiny_weights)}, "methods": ["linear", "semi"],
            "mode": "improved", "splits": str(world / "split.json"), "tr_sizes": [1], "strong_views": 1,
            "dtype": "fp32", "train": {"epochs": 1, "learning_rate": 5e-3, "batch_size": 4},
            "method_train": {"semi": {"head": "linear", "semi_threshold": 0.0, "semi_ramp_epochs": 0}}}
  config["methods"].append("semi_sam")
  (world / "sweep.py").write_text(f"def get_config():\n  return {config!r}\n")
  out = world / "sweep"
  assert main(["sweep", "--config", str(world / "sweep.py"), "--out", str(out), "--no-progress"]) == 0
  assert "training semi--tiny--tr1--s on 1 labeled and 2 unlabeled patient(s)" in capsys.readouterr().out
  results = json.loads((out / "results.json").read_text())
  cells = {cell["method"]: cell for cell in results["cells"]}
  assert sorted(cells) == ["linear", "semi", "semi_sam"]
  assert cells["semi"]["head"] == cells["semi_sam"]["head"] == "linear"
  assert results["config"]["strong_views"] == 1
  table = (out / "results.md").read_text()
  assert "| Linear head (tiny) |" in table and "| Semi-supervised linear head (tiny) |" in table
  assert "| Semi-supervised linear head + SAM boxes (tiny) |" in table
  runs = {m: json.loads((out / cells[m]["run_dir"] / "run.json").read_text())["identity"] for m in cells}
  assert runs["semi"]["labeled_patients"] == runs["linear"]["labeled_patients"] == TRAIN[:1]
  assert runs["semi"]["unlabeled_patients"] == TRAIN[1:] and "unlabeled_patients" not in runs["linear"]
  assert runs["semi"]["cache"] == runs["linear"]["cache"]  # one cache: the supervised head ignores its strong views
  assert cells["semi"]["official"]["dice"] != cells["linear"]["official"]["dice"]
  semi_sam = json.loads((out / cells["semi_sam"]["run_dir"] / "run.json").read_text())["identity"]["config"]
  assert semi_sam["semi_sam_boxes"] is True and semi_sam["semi_threshold"] == 0.0  # semi's options, then its own
  assert runs["semi"]["config"]["semi_sam_boxes"] is False


def test_sam_box_labels_are_what_sam_decodes_for_each_class_box(world, tiny_weights):
  """SemiSAM's check: per class, the box around the predicted pixels (in the encoder's frame), SAM's mask for it;
  against `Sam.decode` (parity-tested with Meta's) called box by box."""
  import jax.numpy as jnp
  from flax import nnx

  from autosam_jax import load_sam
  from autosam_jax.features.cache import FeatureCache
  from autosam_jax.train.semi import SemiProgram, box_prompted

  sam = load_sam(tiny_weights)
  cache = FeatureCache(world / "cache-data")
  items = [cache[i] for i, it in enumerate(cache.items) if it["view"] == 0][2:5]
  embedding = jnp.asarray(np.stack([it["embedding"] for it in items]))
  predicted = np.stack([it["target"] for it in items]).astype(np.int32)  # labels as a student's prediction
  predicted[2] = np.where(predicted[2] == 2, 0, predicted[2])  # a slice without class 2: no box, no mask
  size = predicted.shape[1]
  scale = sam.config.image_size / size
  graphdef, state = nnx.split(box_prompted(sam, 3))
  program = SemiProgram(None, sam_graphdef=graphdef, input_scale=scale)
  import jax
  got = np.asarray(jax.jit(program.sam_labels)(state, {"embedding": embedding}, jnp.asarray(predicted)))
  assert got.shape == predicted.shape
  for n in range(len(items)):
    logits = np.full((2, size, size), -np.inf, np.float32)
    for k, value in enumerate((1, 2)):
      rows, cols = np.nonzero(predicted[n] == value)
      if len(rows):
        box = jnp.asarray([[cols.min(), rows.min(), cols.max(), rows.max()]], jnp.float32) * scale
        out = sam.predict(embedding[n:n + 1], (sam.config.image_size,) * 2, (size, size), boxes=box,
                          multimask_output=False)
        logits[k] = np.asarray(out["low_res_logits"])[0, ..., 0]
    expected = np.where(logits.max(0) > 0, 1 + logits.argmax(0), 0)
    np.testing.assert_array_equal(got[n], expected)
  assert (got > 0).any() and not (got[2] == 2).any()


def test_a_folder_of_scans_without_labels_joins_the_unlabeled_patients(world, tiny_weights, tmp_path, capsys):
  """precompute --unlabeled: plain and nnU-Net-named scans in another voxel order, cut in the dataset's frame and
  cached with their strong views; semi learns from them even with every training patient labeled. A scan with a
  NaN, and --unlabeled without --strong-views, are refused in one line with nothing written."""
  import nibabel as nib

  from autosam_jax.cli import main
  from autosam_jax.data.shapes import write_shapes_dataset
  from autosam_jax.features.cache import FeatureCache

  write_shapes_dataset(tmp_path / "other", num_cases=2, class_names=["cyst", "kidney"], seed=9, shape=(32, 40, 4),
                       voxel_order=(1, 2, 0))
  scans = tmp_path / "scans"
  scans.mkdir()
  shutil.copy(tmp_path / "other" / "imagesTr" / "case_000_0000.nii.gz", scans / "follow_up.nii.gz")
  shutil.copy(tmp_path / "other" / "imagesTr" / "case_001_0000.nii.gz", scans / "pt7_0000.nii.gz")
  cache = tmp_path / "cache"
  common = ["precompute", "--data", str(world / "data"), "--tfds-dir", str(world / "tfds-data"), "--weights",
            str(tiny_weights), "--mode", "improved", "--dtype", "fp32", "--splits", str(world / "split.json")]
  assert main([*common, "--out", str(cache), "--strong-views", "1", "--unlabeled", str(scans)]) == 0
  loaded = FeatureCache(cache)
  views = {}
  for item in loaded.items:
    views.setdefault(item["patient_id"], set()).add(item["view"])
  assert views["unlabeled:follow_up"] == views["unlabeled:pt7"] == {0, -1}
  record = loaded.manifest["depends_on"]["unlabeled"]
  assert record["patients"] == ["unlabeled:follow_up", "unlabeled:pt7"] and len(record["files"]) == 2
  # cut like the dataset's cases: 4 slices along the through-plane axis, stored as the files' first axis
  assert sum(1 for it in loaded.items if it["patient_id"] == "unlabeled:pt7" and it["view"] == 0) == 4

  out = tmp_path / "run"
  assert main(["train", "--config", str(Path(__file__).resolve().parents[1] / "experiments/configs/linear_improved.py"),
               "--cache", str(cache), "--weights", str(tiny_weights), "--splits", str(world / "split.json"),
               "--tr-size", "3", "--out", str(out), "--set", "semi=True", "--set", "epochs=1", "--no-progress"]) == 0
  identity = json.loads((out / "run.json").read_text())["identity"]
  assert identity["unlabeled_patients"] == ["unlabeled:follow_up", "unlabeled:pt7"]
  assert identity["labeled_patients"] == TRAIN
  capsys.readouterr()

  image = nib.load(scans / "follow_up.nii.gz")
  data = np.asarray(image.dataobj, np.float32)
  data[1, 2, 0] = np.nan
  nib.save(nib.Nifti1Image(data, image.affine), scans / "broken.nii.gz")
  for extra, said in ((["--strong-views", "1", "--unlabeled", str(scans)], "broken.nii.gz"),
                      (["--unlabeled", str(scans)], "give --strong-views")):
    assert main([*common, "--out", str(tmp_path / "refused"), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and said in err[0], err
    assert not (tmp_path / "refused").exists()


def test_semi_with_lora_adapts_the_encoder_from_the_unlabeled_patients(world, tiny_weights):
  """The encoder in the loop: an input cache with strong views (precompute --store inputs --strong-views), the
  teacher's and student's features from the adapted encoder, the feature dropout on its embedding; other factors
  than a supervised LoRA run's. (What an unlabeled example reads is the heads' code: the poisoned-labels test above.)"""
  from flax import nnx

  from autosam_jax import load_sam
  from autosam_jax.features.precompute import PrecomputeOptions, precompute
  from autosam_jax.models.trained import SEMI_FIELDS, build_model
  from autosam_jax.train.loop import train
  from autosam_jax.train.semi import train_semi

  precompute(world / "data", tiny_weights, world / "inputs", tfds_dir=world / "tfds-data",
             options=PrecomputeOptions(mode="improved", strong_views=1, dtype="float32", shard_size=64,
                                       store="inputs"), splits_file=world / "split.json", progress=False)
  config = TrainConfig(head="linear", variant="improved", scheduler="plateau_val_dice", epochs=1, batch_size=2,
                       learning_rate=5e-3, lora_rank=2, semi=True, semi_threshold=0.0, semi_ramp_epochs=0)
  factory = lambda config: build_model(config, load_sam(tiny_weights), rngs=nnx.Rngs(config.seed))
  train_semi(config, world / "inputs", factory, world / "runs" / "lora-semi", TRAIN[:1], VAL, TRAIN[1:],
             progress=False)
  record = json.loads((world / "runs" / "lora-semi" / "run.json").read_text())["identity"]
  assert record["config"]["lora_rank"] == 2 and record["unlabeled_patients"] == TRAIN[1:]
  supervised = TrainConfig(**{k: v for k, v in config.to_dict().items() if k not in ("semi", *SEMI_FIELDS)})
  train(supervised, world / "inputs", factory, world / "runs" / "lora-supervised", TRAIN[:1], VAL, progress=False)
  semi, alone = _params(world / "runs" / "lora-semi"), _params(world / "runs" / "lora-supervised")
  assert len(semi) == len(alone) > 2 and all(np.isfinite(a).all() for a in semi)  # the factors and the head
  assert max(np.abs(a - b).max() for a, b in zip(semi, alone)) > 1e-5

"""Both preprocessing modes on synthetic cardiac-like volumes: shapes, ranges, labels, geometry, round trips."""

import numpy as np
import pytest
from scipy import ndimage

from autosam_jax.data.errors import DataError
from autosam_jax.data.preprocess import (SAM_PIXEL_MEAN, SAM_PIXEL_STD, PreprocessConfig, SliceGeometry,
                                         _resize_like_skimage, _resize_linear, encoder_input, faithful_encoder_input,
                                         preprocess_volume, to_native)

FAITHFUL = PreprocessConfig("faithful")
IMPROVED = PreprocessConfig("improved")


def phantom(rows: int, cols: int, depth: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Nested ellipses (LV blob inside a myocardium ring, an RV crescent beside them) with noise; labels 0..3."""
  rng = np.random.default_rng(seed)
  r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
  labels = np.zeros((rows, cols, depth), np.uint8)
  image = np.zeros((rows, cols, depth))
  for z in range(depth):
    cr, cc = rows * (0.5 + 0.02 * z), cols * 0.55
    d = ((r - cr) / (0.22 * rows)) ** 2 + ((c - cc) / (0.2 * cols)) ** 2
    rv = ((r - cr) / (0.25 * rows)) ** 2 + ((c - cc + 0.22 * cols) / (0.12 * cols)) ** 2 < 1
    labels[..., z][rv] = 1
    labels[..., z][d < 1] = 2
    labels[..., z][d < 0.45] = 3
  image = 200.0 * (labels == 1) + 80.0 * (labels == 2) + 300.0 * (labels == 3) + rng.normal(50, 10, labels.shape)
  return image, labels


def dice_per_class(a: np.ndarray, b: np.ndarray) -> dict[int, float]:
  return {c: 2 * np.sum((a == c) & (b == c)) / (np.sum(a == c) + np.sum(b == c)) for c in np.unique(b) if c}


# Non-square, anisotropic in-plane spacing: rows upsampled (1.6 mm -> 1.25) and columns shrunk (1.1 mm -> 1.25).
ROWS, COLS, DEPTH, SPACING = 150, 190, 3, (1.6, 1.1, 10.0)


@pytest.fixture(scope="module")
def volume():
  return phantom(ROWS, COLS, DEPTH)


@pytest.fixture(scope="module")
def faithful(volume):
  return preprocess_volume(volume[0], SPACING, volume[1], FAITHFUL, name="patient001_frame01.nii.gz")


@pytest.fixture(scope="module")
def improved(volume):
  return preprocess_volume(volume[0], SPACING, volume[1], IMPROVED, name="patient001_frame01.nii.gz")


def test_config_dict_round_trip_and_validation():
  for config in (FAITHFUL, IMPROVED, PreprocessConfig("improved", clip_percentiles=(1, 99))):
    d = config.to_dict()
    assert d["mode"] == config.mode and "version" in d
    assert PreprocessConfig.from_dict(d) == config
  assert "clip_percentiles" not in FAITHFUL.to_dict() and "target_spacing" not in IMPROVED.to_dict()
  with pytest.raises(DataError, match="mode"):
    PreprocessConfig("fancy")
  with pytest.raises(DataError, match="clip_percentiles"):
    PreprocessConfig("improved", clip_percentiles=(99, 1))
  with pytest.raises(DataError, match="version"):
    PreprocessConfig.from_dict(FAITHFUL.to_dict() | {"version": -1})


def test_faithful_resamples_to_1p25_mm(faithful):
  geometry = faithful.geometry
  assert geometry.resampled_shape == (round(ROWS * 1.6 / 1.25), round(COLS * 1.1 / 1.25)) == (192, 167)
  assert geometry.native_shape == (ROWS, COLS) and geometry.spacing == (1.6, 1.1)
  assert SliceGeometry.from_dict(geometry.to_dict()) == geometry


def test_faithful_outputs(volume, faithful):
  images, targets = faithful.images, faithful.targets
  assert images.shape == (DEPTH, 224, 224, 3) and images.dtype == np.float32
  assert images.min() >= 0 and images.max() <= 1 and images.max() > 0.9
  assert np.array_equal(images[..., 0], images[..., 1]) and np.array_equal(images[..., 0], images[..., 2])
  assert targets.shape == (DEPTH, 224, 224) and targets.dtype == np.uint8
  assert set(np.unique(targets)) == set(np.unique(volume[1]))
  assert faithful.target_valid.shape == (224, 224) and faithful.target_valid.all()


def test_faithful_encoder_input_is_plain_bilinear(faithful):
  x = np.asarray(encoder_input(faithful.images[:2], faithful.geometry))
  assert x.shape == (2, 1024, 1024, 3) and x.dtype == np.float32
  assert x.min() >= 0 and x.max() <= 1 and np.array_equal(x[..., 0], x[..., 2])
  # align_corners=False bilinear (as F.interpolate), no normalisation.
  reference = _resize_linear(faithful.images[:2], (1, 2), (1024, 1024))
  np.testing.assert_allclose(x, reference, atol=1e-6)
  np.testing.assert_allclose(np.asarray(faithful_encoder_input(faithful.images[:1], encoder_size=64)),
                             _resize_linear(faithful.images[:1], (1, 2), (64, 64)), atol=1e-6)


def test_improved_outputs(volume, improved):
  geometry = improved.geometry
  # Physical extents 240 x 209 mm: rows are the long side; the aspect ratio is kept.
  assert geometry.model_shape == (1024, int(COLS * 1.1 * 1024 / (ROWS * 1.6) + 0.5)) == (1024, 892)
  assert geometry.resampled_shape is None and geometry.target_valid_shape == (256, 223)
  images = improved.images
  assert images.shape == (DEPTH, ROWS, COLS, 3) and images.dtype == np.float32
  assert images.min() == 0 and images.max() == 255
  targets = improved.targets
  assert targets.shape == (DEPTH, 256, 256) and targets.dtype == np.uint8
  assert set(np.unique(targets)) == set(np.unique(volume[1]))
  assert improved.target_valid[:, :223].all() and not improved.target_valid[:, 223:].any()
  assert not targets[:, :, 223:].any()


def test_improved_encoder_input_is_sam_normalised_and_padded(improved):
  x = np.asarray(encoder_input(improved.images[:1], improved.geometry))
  assert x.shape == (1, 1024, 1024, 3) and x.dtype == np.float32
  mean, std = np.asarray(SAM_PIXEL_MEAN), np.asarray(SAM_PIXEL_STD)
  # Meta's Sam.preprocess normalises first and pads afterwards, so the padding is 0 (the mean pixel), not -mean/std.
  assert np.all(x[:, :, 892:] == 0)
  valid = x[:, :, :892]
  np.testing.assert_allclose(valid.min(axis=(0, 1, 2)), -mean / std, atol=0.05)
  np.testing.assert_allclose(valid.max(axis=(0, 1, 2)), (255 - mean) / std, atol=0.05)


def test_improved_at_native_scale_is_exact():
  # A 256 x 256 slice at square pixels: the 256 target grid is the native grid, so targets and round trip are exact.
  image, labels = phantom(256, 256, 2, seed=1)
  out = preprocess_volume(image, (1.4, 1.4), labels, IMPROVED)
  assert out.geometry.model_shape == (1024, 1024) and out.target_valid.all()
  assert np.array_equal(out.targets, labels.transpose(2, 0, 1))
  assert np.array_equal(to_native(out.targets, out.geometry), labels.transpose(2, 0, 1))


@pytest.mark.parametrize("mode", ["faithful", "improved"])
@pytest.mark.parametrize("shape,spacing", [((150, 190, 3), (1.6, 1.1)), ((260, 110, 2), (0.9, 1.4))])
def test_round_trip_to_native(mode, shape, spacing):
  image, labels = phantom(*shape, seed=2)
  out = preprocess_volume(image, spacing, labels, PreprocessConfig(mode))
  native = labels.transpose(2, 0, 1)
  back = to_native(out.targets, out.geometry)
  assert back.shape == native.shape and back.dtype == native.dtype
  for c, dice in dice_per_class(back, native).items():
    assert dice > 0.95, (mode, c, dice)
  # Logits: one-hot scores mapped back and argmaxed agree with the label path.
  logits = np.eye(4, dtype=np.float32)[out.targets] * 10
  native_logits = to_native(logits, out.geometry)
  assert native_logits.shape == native.shape + (4,) and native_logits.dtype == np.float32
  assert np.mean(native_logits.argmax(-1) == back) > 0.99


def test_to_native_checks_the_grid(faithful):
  with pytest.raises(ValueError, match="224"):
    to_native(np.zeros((256, 256), np.uint8), faithful.geometry)


@pytest.mark.parametrize("config", [FAITHFUL, IMPROVED], ids=lambda c: c.mode)
def test_constant_slices_and_volumes_give_no_nan(config):
  image, labels = phantom(80, 96, 3)
  image[:, :, 1] = 7.0
  for volume in (image, np.full_like(image, 3.0)):
    out = preprocess_volume(volume, (1.3, 1.3), labels, config)
    assert np.isfinite(out.images).all()
    x = np.asarray(encoder_input(out.images, out.geometry))
    assert np.isfinite(x).all()
  # A constant volume scales to 0 in both modes (the official code would divide 0 by 0 here).
  assert not preprocess_volume(np.full((20, 30, 1), 5.0), (1, 1), None, config).images.any()


def test_no_labels_for_prediction(volume):
  out = preprocess_volume(volume[0], SPACING, None, FAITHFUL)
  assert out.targets is None and out.images.shape == (DEPTH, 224, 224, 3)


BAD = {
    "nan": (lambda i, l: (np.where(i > 1e9, 0, np.nan), l, (1, 1)), "NaN"),
    "2d image": (lambda i, l: (i[..., 0], None, (1, 1)), "3D image"),
    "label shape": (lambda i, l: (i, l[:-1], (1, 1)), "label shape"),
    "fractional labels": (lambda i, l: (i, l + 0.5, (1, 1)), "integer-valued"),
    "negative labels": (lambda i, l: (i, l.astype(int) - 1, (1, 1)), "0..255"),
    "zero spacing": (lambda i, l: (i, l, (0, 1)), "spacing"),
    "spacing length": (lambda i, l: (i, l, (1,)), "spacing"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_names_the_file(case):
  image, labels = phantom(20, 24, 1)
  make, problem = BAD[case]
  bad_image, bad_labels, spacing = make(image, labels)
  with pytest.raises(DataError, match=problem) as info:
    preprocess_volume(bad_image, spacing, bad_labels, FAITHFUL, name="patient007_frame01.nii.gz")
  assert str(info.value).startswith("patient007_frame01.nii.gz: ") and "\n" not in str(info.value)


def test_resampling_helpers_match_scipy_references():
  rng = np.random.default_rng(0)
  volume = rng.normal(size=(40, 30, 3))
  # skimage.resize(order=3, mode='edge') is a 3D zoom (after anti-aliasing); the per-slice 2D shortcut equals it.
  for out_xy in ((52, 24), (31, 45)):
    factors = np.divide(volume.shape[:2], out_xy)
    filtered = ndimage.gaussian_filter(volume, tuple(np.maximum(0, (factors - 1) / 2)) + (0,), mode="nearest")
    reference = ndimage.zoom(filtered, (out_xy[0] / 40, out_xy[1] / 30, 1), order=3, mode="nearest", grid_mode=True)
    reference = np.clip(reference, volume.min(), volume.max())
    np.testing.assert_allclose(_resize_like_skimage(volume, out_xy, 3), reference, atol=1e-10)
    # Linear with edge clamping / with zeros beyond the border (skimage modes 'edge' / 'constant').
    for zero_edges, mode in ((False, "nearest"), (True, "grid-constant")):
      reference = ndimage.zoom(volume[..., 0], np.divide(out_xy, (40, 30)), order=1, mode=mode, grid_mode=True)
      np.testing.assert_allclose(_resize_linear(volume[..., 0], (0, 1), out_xy, zero_edges=zero_edges), reference,
                                 atol=1e-12)


def test_faithful_matches_the_official_code_literally():
  """The official chain written out with skimage as PCL's generate_acdc.py, convert_to_imgs.py and batchgenerators'
  ResizeTransform call it. Skipped where scikit-image is not installed (it is no dependency of this package)."""
  resize = pytest.importorskip("skimage.transform").resize
  image, labels = phantom(150, 190, 2, seed=2)
  spacing = (1.6, 1.1)
  shape = tuple(int(np.round(s / 1.25 * float(n))) for s, n in zip(spacing, image.shape[:2])) + (image.shape[2],)
  volume = resize(image.astype(float), shape, order=3, mode="edge").astype(np.float32)
  volume -= volume.mean()
  volume /= volume.std()
  values = np.unique(labels)
  resampled = values[np.stack([resize((labels == c).astype(float), shape, 1, mode="edge") for c in values]).argmax(0)]
  png = np.clip((volume - volume.min()) / (volume.max() - volume.min()) * 127.5, 0, 255).astype(np.uint8)
  out = preprocess_volume(image, spacing, labels, FAITHFUL)
  for z in range(png.shape[2]):
    gray = png[:, :, z].astype(np.float32)
    gray = (gray - gray.min()) / (gray.max() - gray.min())
    expected = resize(gray.astype(float), (224, 224), 1, "constant", 0, True, anti_aliasing=False)
    np.testing.assert_allclose(out.images[z, ..., 0], expected, atol=1e-6)
    target = np.zeros((224, 224), np.uint8)
    for c in np.unique(resampled[:, :, z]):
      seg = (resampled[:, :, z] == c).astype(float)
      target[resize(seg, (224, 224), 1, mode="edge", clip=True, anti_aliasing=False) >= 0.5] = c
    assert np.array_equal(out.targets[z], target)

"""Augmentation: determinism, label integrity, image/label consistency, batchgenerators parity of the building blocks
(scipy's gaussian_filter and map_coordinates), and the parameter distributions of both modes."""

import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from autosam_jax.data import augment
from autosam_jax.data.augment import AugmentConfig, augment_batch, sample_params

ALL_OFF = dict(p_brightness=0.0, p_gamma=0.0, p_noise=0.0, p_mirror=0.0, p_elastic=0.0, p_rotation=0.0, p_scale=0.0)


def _phantom(batch: int, height: int, width: int, seed: int = 0, label_dtype=np.uint8):
  """Slices with nested ellipses labelled 0..3 (off-centre, so flips and warps show) and a smooth image in [0, 1]."""
  rng = np.random.default_rng(seed)
  rows, cols = np.mgrid[:height, :width].astype(np.float32)
  labels = np.zeros((batch, height, width), label_dtype)
  for b in range(batch):
    cy, cx = height * rng.uniform(0.35, 0.6), width * rng.uniform(0.3, 0.45)
    radius = ((rows - cy) / (0.35 * height)) ** 2 + ((cols - cx) / (0.3 * width)) ** 2
    labels[b][radius < 1.0] = 1
    labels[b][radius < 0.5] = 2
    labels[b][radius < 0.2] = 3
  images = 0.2 * labels[..., None].astype(np.float32) + 0.1 * rng.random((batch, height, width, 3), np.float32)
  images += (cols / width)[None, :, :, None] * 0.3  # a left-right ramp, so a mirror is visible everywhere
  return jnp.asarray(images), jnp.asarray(labels)


def _draws(config: AugmentConfig, count: int = 200, seed: int = 0):
  keys = jax.random.split(jax.random.key(seed), count)
  draws = jax.vmap(lambda k: sample_params(k, config))(keys)._asdict()
  return types.SimpleNamespace(**{name: np.asarray(value) for name, value in draws.items() if "key" not in name})


# --- configuration ---------------------------------------------------------------------------------------------------


def test_config_presets_round_trip_and_validation():
  faithful, improved = AugmentConfig.faithful(), AugmentConfig.improved()
  assert faithful == AugmentConfig() and AugmentConfig.for_mode("improved") == improved
  assert faithful.brightness_mu == 1.0 and faithful.brightness_per_channel and faithful.p_elastic == 1.0
  assert faithful.scale_range == (0.5, 1.9) and faithful.image_order == 3
  for config in (faithful, improved):
    as_json = json.loads(json.dumps(config.to_dict()))
    assert AugmentConfig(**as_json) == config  # lists come back as tuples
    hash(config)
  assert abs(improved.rotation_range[1] - np.deg2rad(15.0)) < 1e-9
  with pytest.raises(ValueError, match="p_mirror"):
    AugmentConfig(p_mirror=1.5)
  with pytest.raises(ValueError, match="scale_range"):
    AugmentConfig(scale_range=(1.2, 0.8))
  with pytest.raises(ValueError, match="mode"):
    AugmentConfig.for_mode("strong")
  images, labels = _phantom(1, 8, 8)
  with pytest.raises(ValueError, match="integer labels"):
    augment_batch(jax.random.key(0), images, labels.astype(jnp.float32), AugmentConfig(**ALL_OFF))


# --- building blocks against scipy (what batchgenerators calls) -----------------------------------------------------


@pytest.mark.parametrize("size,sigma", [(224, 51.7), (48, 3.3)])
def test_elastic_smoothing_matches_scipy_gaussian_filter(size, sigma):
  noise = np.random.default_rng(1).uniform(-1, 1, (size, size))
  matrix = np.asarray(augment.gaussian_smoothing_matrix(size, jnp.float32(sigma), 4.0, 60.0), np.float64)
  expected = ndimage.gaussian_filter(noise, sigma, mode="constant", cval=0.0)
  np.testing.assert_allclose(matrix @ noise @ matrix.T, expected, atol=1e-6 * np.abs(expected).max())


@pytest.mark.parametrize("order", [0, 1, 3])
def test_resample_matches_scipy_map_coordinates_nearest(order):
  rng = np.random.default_rng(2)
  image = rng.random((30, 40, 3)).astype(np.float32)
  # Positions inside, near and far outside the image (mode 'nearest' border).
  coords = np.stack([rng.uniform(-12, 42, (20, 25)), rng.uniform(-12, 52, (20, 25))]).astype(np.float32)
  resample = jax.jit(augment.resample, static_argnames="order")  # eagerly, every primitive would compile alone
  ours = np.asarray(resample(jnp.asarray(image), jnp.asarray(coords), order=order))
  expected = np.stack([ndimage.map_coordinates(image[..., c].astype(np.float64), coords.astype(np.float64),
                                               order=order, mode="nearest") for c in range(3)], axis=-1)
  np.testing.assert_allclose(ours, expected, atol=1e-5)
  labels = rng.integers(0, 4, (30, 40)).astype(np.uint8)
  moved = np.asarray(resample(jnp.asarray(labels), jnp.asarray(coords), order=0))
  assert moved.dtype == np.uint8
  np.testing.assert_array_equal(moved, ndimage.map_coordinates(labels, coords, order=0, mode="nearest"))


def test_spatial_transform_matches_a_scipy_transcription_of_augment_spatial():
  """batchgenerators' augment_spatial (random_crop=False, patch = input size), re-done in numpy/scipy with our draws."""
  config = AugmentConfig.faithful(**{**ALL_OFF, "p_elastic": 1.0, "p_rotation": 1.0, "p_scale": 1.0},
                                  elastic_sigma=(6.0, 8.0), rotation_range=(0.2, 0.4), scale_range=(1.2, 1.4))
  images, labels = _phantom(1, 40, 48, seed=4)
  key = jax.random.key(9)
  out_images, out_labels = map(np.asarray, augment_batch(key, images, labels, config))
  params = sample_params(jax.random.split(key, 1)[0], config)
  height, width = 40, 48
  coords = np.stack(np.meshgrid(np.arange(height), np.arange(width), indexing="ij")).astype(np.float64)
  coords -= np.array([(height - 1) / 2, (width - 1) / 2])[:, None, None]
  noise = np.asarray(jax.random.uniform(params.elastic_key, (2, height, width), jnp.float32, -1.0, 1.0), np.float64)
  sigma, alpha = float(params.elastic_sigma), float(params.elastic_alpha)
  coords += np.stack([ndimage.gaussian_filter(n, sigma, mode="constant", cval=0) * alpha for n in noise])
  angle = float(params.rotation_angle)
  rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
  coords = np.dot(coords.reshape(2, -1).T, rotation).T.reshape(coords.shape) * float(params.scale)
  coords += np.array([height / 2 - 0.5, width / 2 - 0.5])[:, None, None]
  image = np.asarray(images[0], np.float64)
  expected = np.stack([ndimage.map_coordinates(image[..., c], coords, order=3, mode="nearest") for c in range(3)], -1)
  np.testing.assert_allclose(out_images[0], expected, atol=1e-4)
  expected_labels = ndimage.map_coordinates(np.asarray(labels[0]), coords, order=0, mode="nearest")
  assert np.mean(out_labels[0] == expected_labels) > 0.999  # float32 vs float64 grids may round a rare x.5 apart


# --- end to end ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode,label_dtype", [("faithful", np.uint8), ("improved", np.int32)])
def test_deterministic_shapes_dtypes_and_label_set(mode, label_dtype):
  config = AugmentConfig.for_mode(mode)
  images, labels = _phantom(4, 32, 40, label_dtype=label_dtype)
  labels = labels.at[:, :2].set(0)
  images, labels = images.at[1].set(images[0]), labels.at[1].set(labels[0])  # twins, to show independent keys
  out_a = augment_batch(jax.random.key(7), images, labels, config)
  out_b = augment_batch(jax.random.key(7), images, labels, config)
  out_c = augment_batch(jax.random.key(8), images, labels, config)
  for array, reference in zip(out_a, (images, labels)):
    assert array.shape == reference.shape and array.dtype == reference.dtype
  np.testing.assert_array_equal(out_a[0], out_b[0])
  np.testing.assert_array_equal(out_a[1], out_b[1])
  assert not np.array_equal(out_a[0], out_c[0])
  assert set(np.unique(out_a[1])) <= set(np.unique(labels))
  assert np.all(np.isfinite(out_a[0]))
  assert not np.array_equal(out_a[0][0], out_a[0][1])


def test_spatial_transform_moves_image_and_label_together():
  # Strong warps (rotation well beyond faithful's) on a non-square slice, so a swapped axis or a sign would show.
  config = AugmentConfig.faithful(**{**ALL_OFF, "p_elastic": 1.0, "p_rotation": 1.0, "p_scale": 1.0},
                                  rotation_range=(0.3, 0.6), elastic_sigma=(8.0, 10.0), elastic_alpha=(150.0, 250.0))
  images, labels = _phantom(6, 48, 64, seed=3)
  images = images.at[..., 0].set(labels.astype(jnp.float32))
  warped_images, warped_labels = map(np.asarray, augment_batch(jax.random.key(1), images, labels, config))
  assert np.mean(warped_labels != np.asarray(labels)) > 0.05  # it did move things
  from_image = np.clip(np.rint(warped_images[..., 0]), 0, 3)
  # Away from label edges (constant 5x5 neighbourhood), cubic interpolation of the label-as-float rounds back to it.
  interior = np.stack([ndimage.maximum_filter(w, 5) == ndimage.minimum_filter(w, 5) for w in warped_labels])
  assert interior.mean() > 0.5
  assert np.mean(from_image[interior] == warped_labels[interior]) > 0.99
  assert np.mean(from_image == warped_labels) > 0.9


@pytest.mark.parametrize("transform", ["p_brightness", "p_gamma", "p_noise"])
def test_intensity_transforms_leave_labels_untouched(transform):
  images, labels = _phantom(3, 24, 24)
  out_images, out_labels = augment_batch(jax.random.key(0), images, labels, AugmentConfig(**{**ALL_OFF, transform: 1}))
  np.testing.assert_array_equal(out_labels, labels)
  assert np.all(np.abs(np.asarray(out_images) - np.asarray(images)).max(axis=(1, 2, 3)) > 1e-3)


def test_gamma_keeps_each_sample_range():
  images, labels = _phantom(4, 24, 24)
  out, _ = augment_batch(jax.random.key(0), images, labels, AugmentConfig(**{**ALL_OFF, "p_gamma": 1}))
  np.testing.assert_allclose(np.min(out, axis=(1, 2, 3)), np.min(images, axis=(1, 2, 3)), atol=1e-6)
  np.testing.assert_allclose(np.max(out, axis=(1, 2, 3)), np.max(images, axis=(1, 2, 3)), atol=1e-5)


def test_mirror_flips_width_exactly_when_forced():
  images, labels = _phantom(3, 20, 28)
  out_images, out_labels = augment_batch(jax.random.key(0), images, labels, AugmentConfig(**{**ALL_OFF, "p_mirror": 1}))
  np.testing.assert_array_equal(out_images, images[:, :, ::-1])
  np.testing.assert_array_equal(out_labels, labels[:, :, ::-1])


def test_mirror_follows_the_documented_per_sample_keys():
  config = AugmentConfig(**{**ALL_OFF, "p_mirror": 0.5})
  images, labels = _phantom(200, 6, 6)
  images = jnp.broadcast_to(images[:1], images.shape)
  labels = jnp.broadcast_to(labels[:1], labels.shape)
  key = jax.random.key(11)
  _, out_labels = augment_batch(key, images, labels, config)
  flipped = np.all(np.asarray(out_labels) == np.asarray(labels[:, :, ::-1]), axis=(1, 2))
  expected = jax.vmap(lambda k: sample_params(k, config).mirror_applied)(jax.random.split(key, 200))
  np.testing.assert_array_equal(flipped, np.asarray(expected))
  assert 0.4 < flipped.mean() < 0.6


def test_identity_when_nothing_is_drawn():
  images, labels = _phantom(3, 32, 32)
  out_images, out_labels = augment_batch(jax.random.key(0), images, labels, AugmentConfig(**ALL_OFF))
  np.testing.assert_array_equal(out_images, images)
  np.testing.assert_array_equal(out_labels, labels)
  # Elastic always on but with alpha 0: the grid is "modified", so the image goes through cubic resampling.
  config = AugmentConfig.faithful(**{**ALL_OFF, "p_elastic": 1.0}, elastic_alpha=(0.0, 0.0))
  out_images, out_labels = augment_batch(jax.random.key(0), images, labels, config)
  np.testing.assert_array_equal(out_labels, labels)
  np.testing.assert_allclose(out_images, images, atol=1e-5)


def test_faithful_brightness_is_per_channel_and_improved_is_shared():
  images, labels = _phantom(8, 12, 12)
  for mode, per_channel in (("faithful", True), ("improved", False)):
    config = AugmentConfig.for_mode(mode, **{**ALL_OFF, "p_brightness": 1.0})
    out, _ = augment_batch(jax.random.key(5), images, labels, config)
    shift = np.asarray(out) - np.asarray(images)
    per_sample_channel = shift[:, 0, 0, :]
    np.testing.assert_allclose(shift, np.broadcast_to(per_sample_channel[:, None, None, :], shift.shape), atol=1e-5)
    channel_spread = per_sample_channel.max(axis=1) - per_sample_channel.min(axis=1)
    if per_channel:
      assert np.all(channel_spread > 1e-3)
      assert 0.0 < per_sample_channel.mean() < 2.0  # N(1, 1) offsets on a [0, 1] image
    else:
      np.testing.assert_allclose(channel_spread, 0.0, atol=1e-6)
      assert np.abs(per_sample_channel).max() < 0.5  # N(0, 0.1)


def test_noise_fields_per_channel_in_faithful_shared_in_improved():
  images, labels = _phantom(2, 16, 16)
  images = jnp.broadcast_to(images[..., :1], images.shape)  # a grey slice: three equal channels
  for mode, stays_grey in (("faithful", False), ("improved", True)):
    config = AugmentConfig.for_mode(mode, **{**ALL_OFF, "p_noise": 1.0})
    out = np.asarray(augment_batch(jax.random.key(2), images, labels, config)[0])
    assert np.array_equal(out[..., 0], out[..., 1]) == stays_grey


# --- parameter distributions -----------------------------------------------------------------------------------------


def test_faithful_parameter_draws_follow_spec_2_5():
  draws = _draws(AugmentConfig.faithful())
  for name in ("brightness_applied", "gamma_applied", "noise_applied", "mirror_applied", "rotation_applied",
               "scale_applied"):
    assert 0.4 < getattr(draws, name).mean() < 0.6, name
  assert draws.elastic_applied.all()
  offsets = draws.brightness_offsets
  assert offsets.shape == (200, 3) and np.all(offsets[:, 0] != offsets[:, 1])
  assert abs(offsets.mean() - 1.0) < 0.15 and abs(offsets.std() - 1.0) < 0.15
  assert draws.gamma.min() >= 0.5 and draws.gamma.max() <= 2.0 and 0.4 < np.mean(draws.gamma < 1.0) < 0.6
  assert draws.noise_std.min() >= 0.0 and draws.noise_std.max() <= 0.1
  assert draws.elastic_alpha.min() >= 100 and draws.elastic_alpha.max() <= 350
  assert draws.elastic_sigma.min() >= 40 and draws.elastic_sigma.max() <= 60
  assert np.abs(draws.rotation_angle).max() <= 0.1 and draws.rotation_angle.std() > 0.04
  # batchgenerators' scale draw: U(0.5, 1) or U(1, 1.9) with prob. 0.5 each (not U(0.5, 1.9), which is 5/14 below 1)
  assert draws.scale.min() >= 0.5 and draws.scale.max() <= 1.9 and 0.4 < np.mean(draws.scale < 1.0) < 0.6


def test_improved_parameter_draws():
  draws = _draws(AugmentConfig.improved())
  np.testing.assert_array_equal(draws.brightness_offsets[:, 0], draws.brightness_offsets[:, 2])
  assert np.abs(draws.brightness_offsets).max() < 0.5
  assert 0.1 < draws.elastic_applied.mean() < 0.3
  assert np.abs(draws.rotation_angle).max() <= np.deg2rad(15) and np.abs(draws.rotation_angle).max() > np.deg2rad(12)
  assert draws.scale.min() >= 0.85 and draws.scale.max() <= 1.15
  assert draws.noise_std.max() <= 0.05

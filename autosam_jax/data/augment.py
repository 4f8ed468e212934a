"""Seeded, jit-compiled training augmentation of 2D slices: the official AutoSAM batchgenerators pipeline, in JAX.

`augment_batch(key, images, labels, config)` takes images (B, H, W, C) float and integer labels (B, H, W) and returns
both augmented, same shapes and dtypes. Every sample gets its own key from `jax.random.split`, so the output is a pure
function of (key, inputs, config): the same key gives bit-identical output on the same device.

Two configurations:
- `AugmentConfig.faithful()`: paper-protocol 2.5 exactly as batchgenerators runs it, in its order (brightness, gamma,
  noise, mirror, spatial), quirks included. Spec 2.5's ResizeTransform to 224 is not here: slices arrive at 224 already
  (preprocess), and the spatial transform's patch equals the input size.
- `AugmentConfig.improved()`: milder, SAM-friendly settings (see the field comments there).

What batchgenerators does, and what we assume (its code, `augmentations/{color,noise}_augmentations.py`,
`spatial_transformations.py:augment_spatial`, `utils.py`), coordinates as (row, column) = (H, W):
- Brightness: per sample with p; per channel (per_channel=True) its own offset N(mu, sigma), added to the channel.
- Gamma (per_channel=False, retain_stats=False): with prob. 0.5 (when the range starts below 1) gamma ~ U(lo, 1),
  else U(max(lo, 1), hi); x -> ((x - min) / (max - min + 1e-7)) ** gamma * (max - min) + min, min/max over the whole
  sample (all channels).
- Gaussian noise: the drawn "variance" is passed to `np.random.normal` as its *scale*, so it is really the standard
  deviation; one value per sample, but an independent noise field for every channel. (Some batchgenerators versions
  add a full-sample field once per channel, i.e. std * sqrt(C); we follow the per-channel fix.)
- Mirror(axes=(1,)): the second spatial axis, W, flipped with p 0.5.
- Spatial: a zero-centred grid; then, in this order, elastic (offsets = gaussian_filter(U(-1, 1) noise, sigma,
  mode='constant', truncate=4) * alpha, one field per axis), rotation (coords @ [[cos, -sin], [sin, cos]]), scale
  (coords *= s: s > 1 samples a larger area, i.e. zooms out; s drawn like gamma: U(lo, 1) or U(1, hi) with prob. 0.5
  each, not U(lo, hi)); centre (random_crop=False) at size / 2 - 0.5; `scipy.ndimage.map_coordinates` with order 3
  (cubic B-spline, prefiltered) for the image and order 0 for labels, mode 'nearest'. A sample whose grid nothing
  modified is centre-cropped instead, which at patch size = input size is the identity.

Deviations from batchgenerators (tests/test_augment.py checks the blocks against scipy, which it calls):
- Random streams are JAX's (threefry), not numpy's: same distributions, different numbers.
- Grids and interpolation run in float32 (scipy: float64): images differ by ~1e-5; a label can differ where a grid
  position lands within float32 rounding of a half-pixel tie.
- The cubic prefilter is the B-spline inverse filter truncated at 16 taps on an edge-extended copy, not scipy's exact
  recursive filter on its 12-pixel padding: the difference at image pixels is ~1e-7.
- Spec 2.5's table reads the scale draw as U(0.5, 1.9); batchgenerators draws U(0.5, 1) or U(1, 1.9) with prob. 0.5
  each, and so do we. Spec 6.6 reads the noise range as a variance (sigma up to 0.32); it is a std up to 0.1.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

MODES = ("faithful", "improved")

# scipy.ndimage.map_coordinates pads by 12 (edge values) before the spline prefilter in mode 'nearest'; we do the same
# so that pixels near the border interpolate like scipy's.
_SPLINE_PAD = 12
# Taps of the truncated prefilter on each side: |z|^16 = 7e-10 with the cubic B-spline pole z = sqrt(3) - 2.
_PREFILTER_HALF_WIDTH = 16
_GAMMA_EPSILON = 1e-7  # batchgenerators' augment_gamma epsilon


def _pair(value: Any) -> tuple[float, float]:
  lo, hi = (float(v) for v in value)
  return lo, hi


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """Every parameter of the augmentation; hashable, so it is a static jit argument. Defaults are `faithful()`.

  Probabilities are per sample. Ranges are (low, high) of uniform draws unless the field says otherwise. Angles are in
  radians.
  """

  mode: str = "faithful"
  # 1. brightness: x + N(mu, sigma), one offset per channel or one for all
  p_brightness: float = 0.5
  brightness_mu: float = 1.0
  brightness_sigma: float = 1.0
  brightness_per_channel: bool = True
  # 2. gamma over the whole sample (batchgenerators per_channel=False)
  p_gamma: float = 0.5
  gamma_range: tuple[float, float] = (0.5, 2.0)
  gamma_retain_stats: bool = False
  # 3. additive Gaussian noise; the range is of the standard deviation (batchgenerators calls it "variance")
  p_noise: float = 0.5
  noise_std_range: tuple[float, float] = (0.0, 0.1)
  noise_per_channel: bool = True
  # 4. mirror along W
  p_mirror: float = 0.5
  # 5. spatial: elastic, then rotation, then scale; one resampling
  p_elastic: float = 1.0
  elastic_alpha: tuple[float, float] = (100.0, 350.0)
  elastic_sigma: tuple[float, float] = (40.0, 60.0)
  elastic_truncate: float = 4.0  # scipy.ndimage.gaussian_filter's default, which batchgenerators uses
  p_rotation: float = 0.5
  rotation_range: tuple[float, float] = (-0.1, 0.1)
  p_scale: float = 0.5
  scale_range: tuple[float, float] = (0.5, 1.9)
  image_order: int = 3  # 0 nearest, 1 linear, 3 cubic B-spline (scipy's order 3); labels are always order 0

  def __post_init__(self):
    for name in ("gamma_range", "noise_std_range", "elastic_alpha", "elastic_sigma", "rotation_range", "scale_range"):
      object.__setattr__(self, name, _pair(getattr(self, name)))
    if self.mode not in MODES:
      raise ValueError(f"AugmentConfig.mode must be one of {MODES}, got {self.mode!r}")
    for name in ("p_brightness", "p_gamma", "p_noise", "p_mirror", "p_elastic", "p_rotation", "p_scale"):
      value = getattr(self, name)
      if not 0.0 <= value <= 1.0:
        raise ValueError(f"AugmentConfig.{name} must be a probability in [0, 1], got {value}")
    for name in ("gamma_range", "noise_std_range", "elastic_alpha", "elastic_sigma", "rotation_range", "scale_range"):
      lo, hi = getattr(self, name)
      if lo > hi:
        raise ValueError(f"AugmentConfig.{name} must be (low, high) with low <= high, got {(lo, hi)}")
    if self.gamma_range[0] <= 0 or self.scale_range[0] <= 0:
      raise ValueError("AugmentConfig.gamma_range and scale_range must be positive")
    if self.noise_std_range[0] < 0 or self.brightness_sigma < 0:
      raise ValueError("AugmentConfig.noise_std_range and brightness_sigma must be non-negative")
    if self.p_elastic > 0 and (self.elastic_sigma[0] <= 0 or self.elastic_truncate <= 0):
      raise ValueError("AugmentConfig.elastic_sigma and elastic_truncate must be positive when p_elastic > 0")
    if self.image_order not in (0, 1, 3):
      raise ValueError(f"AugmentConfig.image_order must be 0, 1 or 3, got {self.image_order}")

  @classmethod
  def faithful(cls, **overrides: Any) -> AugmentConfig:
    """Spec 2.5: the official training augmentation (batchgenerators), quirks included."""
    return cls(**{"mode": "faithful", **overrides})

  @classmethod
  def improved(cls, **overrides: Any) -> AugmentConfig:
    """Milder augmentation that keeps the slice grey (SAM sees three equal channels); gamma and mirror as faithful."""
    settings = dict(
        mode="improved",
        brightness_mu=0.0, brightness_sigma=0.1,  # a small shift, same for all channels: the image stays grey
        brightness_per_channel=False,
        noise_std_range=(0.0, 0.05),  # half faithful's real std range (batchgenerators' "variance" is a std)
        noise_per_channel=False,  # one field for all channels, so the image stays grey
        p_elastic=0.2, elastic_alpha=(0.0, 200.0),  # rarer and weaker; at sigma 40-60 px it moves pixels < 1 px
        rotation_range=(-math.radians(15.0), math.radians(15.0)),  # cardiac slices vary in in-plane orientation
        scale_range=(0.85, 1.15),  # 0.5-1.9 shrinks or crops the heart; the split-at-1 draw is U(0.85, 1.15) here
    )
    settings.update(overrides)
    return cls(**settings)

  @classmethod
  def photometric(cls, **overrides: Any) -> AugmentConfig:
    """The strong views of semi-supervised training (precompute --strong-views): intensity only (brightness, gamma,
    noise, each with p 0.8, stronger than `improved()`'s), no mirror and no spatial transform, so every pixel of a
    view stays where it is in the clean slice and the clean slice's pseudo-labels fit it. Applied to images in
    [0, 1]; one value for all channels, so the image stays grey."""
    settings = dict(
        mode="improved",
        p_brightness=0.8, brightness_mu=0.0, brightness_sigma=0.2, brightness_per_channel=False,
        p_gamma=0.8, gamma_range=(0.5, 2.0),
        p_noise=0.8, noise_std_range=(0.0, 0.1), noise_per_channel=False,
        p_mirror=0.0, p_elastic=0.0, p_rotation=0.0, p_scale=0.0,
    )
    settings.update(overrides)
    return cls(**settings)

  @classmethod
  def for_mode(cls, mode: str, **overrides: Any) -> AugmentConfig:
    if mode not in MODES:
      raise ValueError(f"augmentation mode must be one of {MODES}, got {mode!r}")
    return cls.faithful(**overrides) if mode == "faithful" else cls.improved(**overrides)

  def to_dict(self) -> dict[str, Any]:
    """JSON-ready (tuples become lists), for cache manifests."""
    return {key: list(value) if isinstance(value, tuple) else value for key, value in dataclasses.asdict(self).items()}

  @property
  def spatial_enabled(self) -> bool:
    return self.p_elastic > 0 or self.p_rotation > 0 or self.p_scale > 0


class AugmentParams(NamedTuple):
  """One sample's random draws. The `*_applied` flags are bool scalars; values are drawn even when not applied."""

  brightness_applied: jax.Array
  brightness_offsets: jax.Array  # (C,); equal entries when brightness_per_channel is False
  gamma_applied: jax.Array
  gamma: jax.Array
  noise_applied: jax.Array
  noise_std: jax.Array
  noise_key: jax.Array
  mirror_applied: jax.Array
  elastic_applied: jax.Array
  elastic_alpha: jax.Array
  elastic_sigma: jax.Array
  elastic_key: jax.Array
  rotation_applied: jax.Array
  rotation_angle: jax.Array
  scale_applied: jax.Array
  scale: jax.Array


def _in_range(u: jax.Array, bounds: tuple[float, float]) -> jax.Array:
  return bounds[0] + u * (bounds[1] - bounds[0])


def _split_at_one(branch_u: jax.Array, value_u: jax.Array, bounds: tuple[float, float]) -> jax.Array:
  """batchgenerators' gamma and scale draw: U(lo, 1) or U(max(lo, 1), hi), each branch with prob. 0.5 (if lo < 1)."""
  lo, hi = bounds
  above = _in_range(value_u, (max(lo, 1.0), hi))
  if lo >= 1.0:
    return above
  return jnp.where(branch_u < 0.5, _in_range(value_u, (lo, min(1.0, hi))), above)


def sample_params(key: jax.Array, config: AugmentConfig, num_channels: int = 3) -> AugmentParams:
  """Draws one sample's parameters from `key`. `augment_batch` uses exactly these, so tests can check them."""
  # One uniform vector for every scalar draw instead of one call each: each call inlines a threefry graph, and
  # fifteen of them made compilation about a second slower.
  uniform_key, normal_key, noise_key, elastic_key = jax.random.split(key, 4)
  u = jax.random.uniform(uniform_key, (15,), jnp.float32)
  offsets = jax.random.normal(normal_key, (num_channels if config.brightness_per_channel else 1,), jnp.float32)
  offsets = jnp.broadcast_to(config.brightness_mu + config.brightness_sigma * offsets, (num_channels,))
  return AugmentParams(
      brightness_applied=u[0] < config.p_brightness,
      brightness_offsets=offsets,
      gamma_applied=u[1] < config.p_gamma,
      gamma=_split_at_one(u[2], u[3], config.gamma_range),
      noise_applied=u[4] < config.p_noise,
      noise_std=_in_range(u[5], config.noise_std_range),
      noise_key=noise_key,
      mirror_applied=u[6] < config.p_mirror,
      elastic_applied=u[7] < config.p_elastic,
      elastic_alpha=_in_range(u[8], config.elastic_alpha),
      elastic_sigma=_in_range(u[9], config.elastic_sigma),
      elastic_key=elastic_key,
      rotation_applied=u[10] < config.p_rotation,
      rotation_angle=_in_range(u[11], config.rotation_range),
      scale_applied=u[12] < config.p_scale,
      scale=_split_at_one(u[13], u[14], config.scale_range),
  )


# ---------------------------------------------------------------------------------------------------------------------
# Intensity transforms. A transform not applied to a sample returns its input bit for bit (select, not arithmetic).


def _brightness(image: jax.Array, params: AugmentParams) -> jax.Array:
  return jnp.where(params.brightness_applied, image + params.brightness_offsets, image)


def _gamma(image: jax.Array, params: AugmentParams, retain_stats: bool) -> jax.Array:
  low = jnp.min(image)
  spread = jnp.max(image) - low
  out = jnp.power((image - low) / (spread + _GAMMA_EPSILON), params.gamma) * spread + low
  if retain_stats:
    # batchgenerators: back to the input's mean and std (std + 1e-8 guards a constant output)
    out = (out - jnp.mean(out)) / (jnp.std(out) + 1e-8) * jnp.std(image) + jnp.mean(image)
  return jnp.where(params.gamma_applied, out, image)


def _noise(image: jax.Array, params: AugmentParams, per_channel: bool) -> jax.Array:
  shape = image.shape if per_channel else (*image.shape[:-1], 1)
  noise = params.noise_std * jax.random.normal(params.noise_key, shape, jnp.float32)
  return jnp.where(params.noise_applied, image + noise, image)


# ---------------------------------------------------------------------------------------------------------------------
# Spatial transform


def gaussian_smoothing_matrix(size: int, sigma: jax.Array, truncate: float, max_sigma: float) -> jax.Array:
  """(size, size) matrix M with M @ x == scipy.ndimage.gaussian_filter1d(x, sigma, mode='constant', truncate=...).

  The elastic sigma is 40-60 px on a 224 image, so the truncated kernel (radius int(4 sigma + 0.5) up to 240) spans
  the whole axis: a dense matrix product is then the cheapest exact form of the zero-padded convolution (224 MACs per
  output, no padding, one batched matmul on accelerators), and sigma can be a traced per-sample value. `max_sigma`
  bounds the kernel radius statically for the normaliser, which scipy takes over the full kernel, outside pixels
  included.
  """
  radius = jnp.floor(truncate * sigma + 0.5)
  max_radius = int(truncate * max_sigma + 0.5)
  taps = jnp.arange(-max_radius, max_radius + 1, dtype=jnp.float32)
  norm = jnp.sum(jnp.where(jnp.abs(taps) <= radius, jnp.exp(-0.5 * (taps / sigma) ** 2), 0.0))
  distance = (jnp.arange(size)[:, None] - jnp.arange(size)[None, :]).astype(jnp.float32)
  weights = jnp.where(jnp.abs(distance) <= radius, jnp.exp(-0.5 * (distance / sigma) ** 2), 0.0)
  return weights / norm


def _elastic_offsets(params: AugmentParams, shape: tuple[int, int], config: AugmentConfig) -> jax.Array:
  """(2, H, W) displacement in pixels: uniform noise in [-1, 1), Gaussian-smoothed (zero padding), times alpha."""
  height, width = shape
  noise = jax.random.uniform(params.elastic_key, (2, height, width), jnp.float32, -1.0, 1.0)
  rows = gaussian_smoothing_matrix(height, params.elastic_sigma, config.elastic_truncate, config.elastic_sigma[1])
  cols = rows if width == height else gaussian_smoothing_matrix(width, params.elastic_sigma, config.elastic_truncate,
                                                                config.elastic_sigma[1])
  highest = jax.lax.Precision.HIGHEST  # TF32 matmuls would make GPU and CPU fields differ at 1e-3
  smoothed = jnp.einsum("ij,djk,lk->dil", rows, noise, cols, precision=highest)
  return smoothed * params.elastic_alpha


def _sampling_coordinates(params: AugmentParams, shape: tuple[int, int], config: AugmentConfig) -> jax.Array:
  """(2, H, W) input (row, column) positions of each output pixel, as batchgenerators' augment_spatial builds them."""
  height, width = shape
  centre_row, centre_col = (height - 1) / 2.0, (width - 1) / 2.0
  rows = jnp.arange(height, dtype=jnp.float32)[:, None] - centre_row
  cols = jnp.arange(width, dtype=jnp.float32)[None, :] - centre_col
  coords = jnp.stack(jnp.broadcast_arrays(rows, cols))
  if config.p_elastic > 0:
    coords = coords + jnp.where(params.elastic_applied, _elastic_offsets(params, shape, config), 0.0)
  if config.p_rotation > 0:
    angle = jnp.where(params.rotation_applied, params.rotation_angle, 0.0)
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    # batchgenerators rotate_coords_2d: (N, 2) row vectors times [[cos, -sin], [sin, cos]]
    coords = jnp.stack([coords[0] * cos + coords[1] * sin, coords[1] * cos - coords[0] * sin])
  if config.p_scale > 0:
    coords = coords * jnp.where(params.scale_applied, params.scale, 1.0)
  # random_crop=False: the patch centre is the input's centre, size / 2 - 0.5 (equal to the mesh offset above)
  return coords + jnp.array([height / 2.0 - 0.5, width / 2.0 - 0.5], jnp.float32)[:, None, None]


def _bspline_prefilter_taps() -> np.ndarray:
  # Inverse of the cubic B-spline sampling filter (1, 4, 1) / 6 on an infinite signal: sqrt(3) * z^|k|.
  pole = math.sqrt(3.0) - 2.0
  k = np.arange(-_PREFILTER_HALF_WIDTH, _PREFILTER_HALF_WIDTH + 1)
  taps = -6.0 * pole / (1.0 - pole**2) * pole ** np.abs(k)
  return (taps / taps.sum()).astype(np.float32)  # renormalise so constants stay exactly constant after truncation


def _fir(values: jax.Array, taps: np.ndarray, axis: int) -> jax.Array:
  """'valid' correlation along `axis` with a short static filter (shifted slices; XLA fuses them into one loop)."""
  out_len = values.shape[axis] - len(taps) + 1
  return sum(float(t) * jax.lax.slice_in_dim(values, i, i + out_len, axis=axis) for i, t in enumerate(taps))


def bspline_coefficients(image: jax.Array) -> jax.Array:
  """Cubic B-spline coefficients of (H, W, C), edge-padded by 12 per side like scipy's mode='nearest' prefilter.

  scipy solves the prefilter exactly on the padded array; we convolve with the truncated inverse filter on a further
  edge-extended copy. The two differ at the padded border, which is 12 px (|z|^12 ~ 1e-7) from any image pixel.
  """
  taps = _bspline_prefilter_taps()
  pad = _SPLINE_PAD + _PREFILTER_HALF_WIDTH
  padded = jnp.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
  return _fir(_fir(padded, taps, 0), taps, 1)


def _cubic_bspline_weights(t: jax.Array) -> list[jax.Array]:
  s = 1.0 - t
  return [s**3 / 6.0, (3.0 * t**3 - 6.0 * t**2 + 4.0) / 6.0, (3.0 * s**3 - 6.0 * s**2 + 4.0) / 6.0, t**3 / 6.0]


def _taps_1d(position: jax.Array, size: int, order: int) -> tuple[list[jax.Array], list[jax.Array]]:
  """Indices (clamped: mode 'nearest') and weights of the interpolation taps along one axis, as scipy places them."""
  if order == 0:
    # scipy rounds half up for even orders: floor(x + 0.5)
    return [jnp.clip(jnp.floor(position + 0.5).astype(jnp.int32), 0, size - 1)], [jnp.ones_like(position)]
  base = jnp.floor(position)
  t = position - base
  base = base.astype(jnp.int32)
  if order == 1:
    return [jnp.clip(base + i, 0, size - 1) for i in (0, 1)], [1.0 - t, t]
  return [jnp.clip(base + i, 0, size - 1) for i in (-1, 0, 1, 2)], _cubic_bspline_weights(t)


def resample(image: jax.Array, coords: jax.Array, order: int) -> jax.Array:
  """(H, W, C) sampled at (2, H', W') input positions; scipy.ndimage.map_coordinates(order, mode='nearest') per channel.

  Order 3 is scipy's prefiltered cubic B-spline (scipy pads 12 edge pixels before prefiltering, and so do we). Order 0
  gathers without arithmetic, so it keeps integer dtypes and values exactly (labels).
  """
  if order == 3:
    source = bspline_coefficients(image)
    coords = coords + _SPLINE_PAD
  else:
    source = image
  height, width = source.shape[:2]
  row_index, row_weight = _taps_1d(coords[0], height, order)
  col_index, col_weight = _taps_1d(coords[1], width, order)
  if order == 0:
    return source[row_index[0], col_index[0]]
  out = None
  for r_index, r_weight in zip(row_index, row_weight):
    for c_index, c_weight in zip(col_index, col_weight):
      term = (r_weight * c_weight)[..., None] * source[r_index, c_index]
      out = term if out is None else out + term
  return out


def _spatial(image: jax.Array, label: jax.Array, params: AugmentParams,
             config: AugmentConfig) -> tuple[jax.Array, jax.Array]:
  coords = _sampling_coordinates(params, label.shape, config)
  modified = jnp.zeros((), bool)
  for probability, applied in ((config.p_elastic, params.elastic_applied),
                               (config.p_rotation, params.rotation_applied),
                               (config.p_scale, params.scale_applied)):
    if probability > 0:
      modified = modified | applied
  warped_image = resample(image, coords, config.image_order).astype(image.dtype)
  warped_label = resample(label, coords, 0)
  return jnp.where(modified, warped_image, image), jnp.where(modified, warped_label, label)


# ---------------------------------------------------------------------------------------------------------------------
# Public entry points


def augment_sample(key: jax.Array, image: jax.Array, label: jax.Array,
                   config: AugmentConfig) -> tuple[jax.Array, jax.Array]:
  """One (H, W, C) image and (H, W) label; the order of paper-protocol 2.5. Transforms with probability 0 are not
  traced."""
  params = sample_params(key, config, image.shape[-1])
  out_dtype = image.dtype
  image = image.astype(jnp.float32)
  if config.p_brightness > 0:
    image = _brightness(image, params)
  if config.p_gamma > 0:
    image = _gamma(image, params, config.gamma_retain_stats)
  if config.p_noise > 0:
    image = _noise(image, params, config.noise_per_channel)
  if config.p_mirror > 0:
    image = jnp.where(params.mirror_applied, image[:, ::-1], image)
    label = jnp.where(params.mirror_applied, label[:, ::-1], label)
  if config.spatial_enabled:
    image, label = _spatial(image, label, params, config)
  return image.astype(out_dtype), label


@functools.partial(jax.jit, static_argnames=("config",))
def augment_batch(key: jax.Array, images: jax.Array, labels: jax.Array,
                  config: AugmentConfig) -> tuple[jax.Array, jax.Array]:
  """Augments images (B, H, W, C) float and labels (B, H, W) integer; returns both with unchanged shapes and dtypes.

  Sample i uses `jax.random.split(key, B)[i]`, so samples are independent and the result is deterministic in `key`.
  Labels are only ever moved (nearest neighbour), never mixed: the output's label values are a subset of the input's.
  """
  if images.ndim != 4 or labels.ndim != 3 or images.shape[:3] != labels.shape:
    raise ValueError(f"augment_batch expects images (B, H, W, C) and labels (B, H, W); got {images.shape} and "
                     f"{labels.shape}")
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise ValueError(f"augment_batch expects floating-point images, got {images.dtype}")
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"augment_batch expects integer labels, got {labels.dtype}")
  keys = jax.random.split(key, images.shape[0])
  return jax.vmap(augment_sample, in_axes=(0, 0, 0, None))(keys, images, labels, config)

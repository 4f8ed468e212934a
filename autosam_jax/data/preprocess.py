"""From a 3D volume (X, Y, Z) to SAM encoder inputs and head targets, in the `faithful` or the `improved` mode.

Slices are `volume[:, :, z]`: a slice's rows are X and its columns Y. Each mode is split in two stages:

1. `preprocess_volume` (numpy/scipy, on the host): the per-volume work. It returns, per slice, a small "model image"
   (Z, H, W, 3) float32, the head targets (Z, T, T) uint8 with their validity mask, and one `SliceGeometry` that all
   slices of the volume share.
2. `encoder_input` (JAX, jit-able, meant for the accelerator during feature precompute): model images ->
   (B, 1024, 1024, 3) encoder input. `faithful_encoder_input` and `improved_encoder_input` are the pure functions;
   `encoder_input` dispatches to jitted versions of them.

`to_native` maps head logits or labels on the target grid back to the native slice grid of either mode.

faithful (paper-protocol 2.1-2.4, the official pipeline as it ran, so results compare with the paper):
  volume: resample in-plane to 1.25 x 1.25 mm keeping z (image: cubic spline, edge mode, anti-aliased when shrinking,
  clipped to the input range, as `skimage.transform.resize(order=3, mode='edge')` with its defaults; labels: one-hot,
  the same with order 1, argmax) -> z-score -> per-volume min-max to 0..127 uint8 (the PNG step, x127.5).
  slice: gray -> 3 channels -> per-slice min-max to [0, 1] -> 224 x 224 bilinear (batchgenerators' ResizeTransform:
  no anti-aliasing, zeros beyond the border so an upsampled edge fades by up to half a pixel; labels one-hot,
  linear with edge mode, >= 0.5, higher label wins a tie) -> model image (224, 224, 3) in [0, 1].
  encoder: bilinear 224 -> 1024 (half-pixel centres, no anti-aliasing), no pixel normalisation.
  target: the 224 label.
  Departures from the official code, all where it would crash or produce NaN: a constant volume or slice scales to 0
  (not NaN), and the label one-hot uses the label values present (PCL's `convert_to_one_hot` indexes channels by
  position, which scrambles volumes that lack a label value).

improved (the fixes of paper-protocol 6.5 and 6.7):
  volume: clip at the 0.5/99.5 percentiles and scale to 0..255 (no resampling; the native grid is kept).
  encoder: resize so the longer side is 1024 keeping the physical aspect ratio (bilinear, anti-aliased when
  shrinking), SAM pixel normalisation, then zero padding bottom/right. This is Meta's `Sam.preprocess` order, so the
  padded area is 0 in normalised units (the mean pixel), as SAM saw it in training.
  target: 256 x 256 (the head's native output) in the same padded geometry, labels by nearest neighbour, with a mask
  of the target pixels that hold image.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

from autosam_jax.data.errors import DataError
from autosam_jax import memory
from autosam_jax.data.nifti import SPACING_RANGE_VARIABLE, spacing_range
from autosam_jax.memory import size_text

MODES = ("faithful", "improved")
NORMALIZATIONS = ("mean_std", "min_max")
RESIZES = ("longest_side", "square")
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)
# Bumped whenever an output of this module changes for the same config, so that feature caches keyed on
# `PreprocessConfig.to_dict()` are invalidated.
PREPROCESS_VERSION = 1


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
  """Preprocessing parameters; frozen and hashable. Fields not used by `mode` are ignored and left out of `to_dict`
  (so changing them does not invalidate a cache)."""

  mode: str = "faithful"
  encoder_size: int = 1024
  # faithful only
  target_spacing: tuple[float, float] = (1.25, 1.25)
  slice_size: int = 224
  # improved only
  clip_percentiles: tuple[float, float] = (0.5, 99.5)
  head_size: int = 256
  # How the encoder's inputs are normalised (improved mode; faithful mode feeds [0, 1] as the official code did): the
  # converted weights' own (`SamConfig.normalization`): "mean_std" with pixel_mean/pixel_std on 0..255 (SAM,
  # MobileSAM), "min_max" (each resized image to [0, 1], MedSAM's LiteMedSAM inference).
  normalization: str = "mean_std"
  pixel_mean: tuple[float, float, float] = SAM_PIXEL_MEAN
  pixel_std: tuple[float, float, float] = SAM_PIXEL_STD
  # How a slice becomes the encoder's square input (improved mode; `SamConfig.resize`): "longest_side" keeps the
  # physical aspect and pads (SAM, MedSAM); "square" stretches it to fill the input, as SAM 2 was trained.
  resize: str = "longest_side"

  def __post_init__(self):
    object.__setattr__(self, "target_spacing", tuple(float(s) for s in self.target_spacing))
    object.__setattr__(self, "clip_percentiles", tuple(float(p) for p in self.clip_percentiles))
    object.__setattr__(self, "pixel_mean", tuple(float(p) for p in self.pixel_mean))
    object.__setattr__(self, "pixel_std", tuple(float(p) for p in self.pixel_std))
    if self.resize not in RESIZES:
      raise DataError(f"preprocess config: resize must be one of {RESIZES}, got {self.resize!r}")
    if self.normalization not in NORMALIZATIONS:
      raise DataError(f"preprocess config: normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}")
    if self.mode not in MODES:
      raise DataError(f"preprocess config: mode must be one of {MODES}, got {self.mode!r}")
    for field in ("encoder_size", "slice_size", "head_size"):
      value = getattr(self, field)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DataError(f"preprocess config: {field} must be a positive integer, got {value!r}")
    if len(self.target_spacing) != 2 or not all(math.isfinite(s) and s > 0 for s in self.target_spacing):
      raise DataError(f"preprocess config: target_spacing must be two positive numbers, got {self.target_spacing}")
    low, high = spacing_range()
    if not all(low <= s <= high for s in self.target_spacing):
      raise DataError(f"preprocess config: target_spacing {self.target_spacing} mm is outside the plausible "
                      f"{low:g}-{high:g} mm range; give the model grid's pixel size in mm (1.25 is the official one), "
                      f"or set {SPACING_RANGE_VARIABLE}=LOW,HIGH (mm) to a range that holds it")
    if len(self.clip_percentiles) != 2 or not 0 <= self.clip_percentiles[0] < self.clip_percentiles[1] <= 100:
      raise DataError(f"preprocess config: clip_percentiles must be (low, high) with 0 <= low < high <= 100, "
                      f"got {self.clip_percentiles}")
    if self.mode == "improved" and self.head_size > self.encoder_size:  # faithful ignores head_size
      raise DataError(f"preprocess config: head_size {self.head_size} exceeds encoder_size {self.encoder_size}")

  def to_dict(self) -> dict[str, Any]:
    """JSON-able parameters that determine the output (for cache manifests), including the algorithm version."""
    common = {"version": PREPROCESS_VERSION, "mode": self.mode, "encoder_size": self.encoder_size}
    if self.mode == "faithful":
      return common | {"target_spacing": list(self.target_spacing), "slice_size": self.slice_size}
    improved = common | {"clip_percentiles": list(self.clip_percentiles), "head_size": self.head_size}
    # SAM's normalisation is left out, so caches made before other encoders existed stay valid.
    if self.normalization == "min_max":
      improved["normalization"] = "min_max"
    elif (self.pixel_mean, self.pixel_std) != (SAM_PIXEL_MEAN, SAM_PIXEL_STD):
      improved |= {"pixel_mean": list(self.pixel_mean), "pixel_std": list(self.pixel_std)}
    if self.resize != "longest_side":
      improved["resize"] = self.resize
    return improved

  @classmethod
  def for_encoder(cls, mode: str, encoder: Any, **values: Any) -> PreprocessConfig:
    """The preprocessing of `mode` for the converted weights whose `SamConfig` is `encoder`: its input size, its
    head targets at 4x its embedding grid, its normalisation."""
    return cls(mode=mode, encoder_size=encoder.image_size, head_size=4 * encoder.image_embedding_size,
               normalization=encoder.normalization, pixel_mean=tuple(encoder.pixel_mean),
               pixel_std=tuple(encoder.pixel_std), resize=getattr(encoder, "resize", "longest_side"), **values)

  @classmethod
  def from_dict(cls, data: dict[str, Any]) -> PreprocessConfig:
    data = dict(data)
    version = data.pop("version", PREPROCESS_VERSION)
    if version != PREPROCESS_VERSION:
      raise DataError(f"preprocess config: version {version} was written by other code (this is version "
                      f"{PREPROCESS_VERSION}); recompute the cache")
    unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
      raise DataError(f"preprocess config: unknown keys {unknown}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})

  @property
  def target_size(self) -> int:
    return self.slice_size if self.mode == "faithful" else self.head_size


@dataclasses.dataclass(frozen=True)
class SliceGeometry:
  """How a volume's slices map between the native grid and model space (shared by all slices of a volume).

  native_shape: (rows, cols) of a native slice; spacing: its in-plane spacing in mm.
  resampled_shape: faithful only, the 1.25 mm grid (None in improved mode).
  model_shape: the image inside the encoder frame: faithful (224, 224) (stretched to fill it), improved the resized
    (h, w) with longer side `encoder_size`, before padding.
  target_shape: the head target grid; target_extent: how many of its rows/cols the image spans (fractional in
    improved mode, since the image ends mid-pixel); target_valid_shape: the rows/cols touching the image.
  """

  mode: str
  native_shape: tuple[int, int]
  spacing: tuple[float, float]
  resampled_shape: tuple[int, int] | None
  model_shape: tuple[int, int]
  encoder_size: int
  target_shape: tuple[int, int]
  target_extent: tuple[float, float]
  # improved mode: the encoder's normalisation (PreprocessConfig's)
  normalization: str = "mean_std"
  pixel_mean: tuple[float, float, float] = SAM_PIXEL_MEAN
  pixel_std: tuple[float, float, float] = SAM_PIXEL_STD

  @property
  def target_valid_shape(self) -> tuple[int, int]:
    return tuple(min(math.ceil(e - 1e-9), t) for e, t in zip(self.target_extent, self.target_shape))

  def target_valid(self) -> np.ndarray:
    """(T, T) bool: target pixels that hold image (all of them in faithful mode)."""
    valid = np.zeros(self.target_shape, bool)
    vh, vw = self.target_valid_shape
    valid[:vh, :vw] = True
    return valid

  def to_dict(self) -> dict[str, Any]:
    values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}

  @classmethod
  def from_dict(cls, data: dict[str, Any]) -> SliceGeometry:
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


@dataclasses.dataclass
class PreprocessedVolume:
  """images: (Z, H, W, 3) float32 model images, the input of `encoder_input` (faithful: 224 x 224 in [0, 1];
  improved: the native grid on 0..255). targets: (Z, T, T) uint8 head targets, None without labels.
  target_valid: (T, T) bool. geometry: shared by every slice."""

  images: np.ndarray
  targets: np.ndarray | None
  target_valid: np.ndarray
  geometry: SliceGeometry


# ---------------------------------------------------------------------------------------------------------------------
# Resampling helpers (numpy/scipy)


def _linear_taps(out_size: int, extent: float, limit: int, zero_edges: bool) -> tuple[np.ndarray, np.ndarray,
                                                                                          np.ndarray]:
  """Two-tap linear interpolation with half-pixel centres (PyTorch `align_corners=False`, skimage, batchgenerators).

  The output's `out_size` pixels span `extent` input pixels (fractional when the image ends inside a padded pixel).
  Indices are into the input padded by one pixel on each side: with `zero_edges` that pixel is 0 (skimage
  mode='constant'), otherwise samples are clamped to the first `limit` input pixels, which is what edge and
  half-sample-reflect modes amount to at order 1.
  """
  src = (np.arange(out_size) + 0.5) * (extent / out_size) - 0.5
  src = np.clip(src, -1.0, limit) if zero_edges else np.clip(src, 0.0, limit - 1)
  i0 = np.floor(src).astype(np.intp)
  weight = src - i0
  return i0 + 1, np.minimum(i0 + 2, limit + 1), weight


def _resize_linear(array: np.ndarray, axes: Sequence[int], out_shape: Sequence[int],
                   extent: Sequence[float] | None = None, limit: Sequence[int] | None = None,
                   zero_edges: bool = False) -> np.ndarray:
  """Separable linear resize of `axes` to `out_shape` (float64; no anti-aliasing)."""
  out = np.asarray(array, np.float64)
  for k, axis in enumerate(axes):
    n = out.shape[axis]
    lim = n if limit is None else limit[k]
    i0, i1, w = _linear_taps(out_shape[k], n if extent is None else extent[k], lim, zero_edges)
    pad = [(0, 0)] * out.ndim
    pad[axis] = (1, 1)
    padded = np.pad(np.take(out, np.arange(lim), axis), pad)
    w = w.reshape([-1 if a == axis % out.ndim else 1 for a in range(out.ndim)])
    out = np.take(padded, i0, axis) * (1.0 - w) + np.take(padded, i1, axis) * w
  return out


def _resize_like_skimage(volume: np.ndarray, out_xy: tuple[int, int], order: int) -> np.ndarray:
  """`skimage.transform.resize(volume, (*out_xy, Z), order, mode='edge')` with its default anti-aliasing and clip.

  skimage >= 0.19 does a Gaussian pre-filter (sigma (factor - 1) / 2) on shrinking axes, then
  `ndimage.zoom(grid_mode=True, mode='nearest')`, then clips to the input's range. z is unchanged, and a spline
  evaluated at its own nodes returns the data, so resizing slice by slice in 2D gives the same values at a quarter of
  the cost of the 3D spline.
  """
  volume = np.asarray(volume, np.float64)
  in_xy = volume.shape[:2]
  lo, hi = volume.min(), volume.max()
  factors = np.divide(in_xy, out_xy)
  if np.any(factors > 1):
    sigma = tuple(np.maximum(0.0, (factors - 1) / 2)) + (0.0,)
    volume = ndimage.gaussian_filter(volume, sigma, mode="nearest")
  zoom = np.divide(out_xy, in_xy)
  out = np.empty(tuple(out_xy) + volume.shape[2:], np.float64)
  for z in range(volume.shape[2]):
    out[:, :, z] = ndimage.zoom(volume[:, :, z], zoom, order=order, mode="nearest", grid_mode=True)
  return np.clip(out, lo, hi, out=out)


def _minmax(x: np.ndarray, axis: tuple[int, ...] | None, scale: float) -> np.ndarray:
  """(x - min) / (max - min) * scale; where max == min the result is 0 rather than the official code's NaN."""
  lo = x.min(axis=axis, keepdims=True)
  span = x.max(axis=axis, keepdims=True) - lo
  return np.where(span > 0, (x - lo) / np.where(span > 0, span, 1.0), 0.0) * scale


def _sam_resized_shape(rows: int, cols: int, spacing: tuple[float, float], long_side: int) -> tuple[int, int]:
  """Meta's `ResizeLongestSide.get_preprocess_shape`, on physical extents when the pixels are not square."""
  extent_rows, extent_cols = (float(rows), float(cols)) if spacing[0] == spacing[1] else \
      (rows * spacing[0], cols * spacing[1])
  scale = long_side * 1.0 / max(extent_rows, extent_cols)
  return (min(max(int(extent_rows * scale + 0.5), 1), long_side),
          min(max(int(extent_cols * scale + 0.5), 1), long_side))


# ---------------------------------------------------------------------------------------------------------------------
# Per-volume preprocessing


def _check_inputs(image: Any, spacing: Any, labels: Any, name: str) -> tuple[np.ndarray, tuple[float, float],
                                                                              np.ndarray | None]:
  image = np.asarray(image)
  if image.ndim != 3 or min(image.shape) < 1:
    raise DataError(f"{name}: expected a 3D image (X, Y, Z), got shape {image.shape}")
  if not (np.issubdtype(image.dtype, np.floating) or np.issubdtype(image.dtype, np.integer)):
    raise DataError(f"{name}: image dtype {image.dtype} is not numeric")
  if not np.isfinite(image).all():
    raise DataError(f"{name}: image holds {int(np.size(image) - np.isfinite(image).sum())} NaN or infinite voxels")
  try:
    spacing = tuple(float(s) for s in spacing)
  except (TypeError, ValueError):
    raise DataError(f"{name}: spacing must be numbers, got {spacing!r}") from None
  if len(spacing) not in (2, 3) or not all(math.isfinite(s) and s > 0 for s in spacing):
    raise DataError(f"{name}: spacing must be 2 or 3 positive numbers (mm), got {spacing}")
  if labels is not None:
    labels = np.asarray(labels)
    if labels.shape != image.shape:
      raise DataError(f"{name}: label shape {labels.shape} differs from image shape {image.shape}")
    if np.issubdtype(labels.dtype, np.floating):
      if not np.isfinite(labels).all() or np.any(labels != np.round(labels)):
        raise DataError(f"{name}: labels are not integer-valued")
    elif not np.issubdtype(labels.dtype, np.integer) and labels.dtype != bool:
      raise DataError(f"{name}: label dtype {labels.dtype} is not integer")
    if labels.min() < 0 or labels.max() > 255:
      raise DataError(f"{name}: label values must be in 0..255, got {labels.min()}..{labels.max()}")
    labels = labels.astype(np.uint8)
  return image, spacing[:2], labels


def _faithful_resampled_shape(rows: int, cols: int, spacing: tuple[float, float],
                              config: PreprocessConfig) -> tuple[int, int]:
  # PCL's resize_image: int(np.round(old_spacing / new_spacing * shape)).
  return tuple(max(1, int(np.round(s / t * float(n)))) for s, t, n in zip(spacing, config.target_spacing, (rows, cols)))


# Peak bytes of `_faithful` per voxel, measured with tracemalloc and rounded up: the float64 spline output and the
# float32/float64 normalisation temporaries per resampled voxel, the float64 copy (and blur) of the input per native
# voxel, and a float64 one-hot channel (with its share of the argmax) per label value present.
_FAITHFUL_BYTES_PER_OUTPUT_VOXEL, _FAITHFUL_BYTES_PER_INPUT_VOXEL, _FAITHFUL_BYTES_PER_LABEL_VOXEL = 56, 16, 13


def _check_faithful_memory(image: np.ndarray, spacing: tuple[float, float], labels: np.ndarray | None,
                           config: PreprocessConfig, name: str) -> None:
  """`DataError` when resampling would need more memory than is available (an implausible spacing, say), before any
  of it is allocated."""
  rows, cols, depth = image.shape
  resampled = _faithful_resampled_shape(rows, cols, spacing, config)
  num_out, num_in = resampled[0] * resampled[1] * depth, image.size
  per_output = _FAITHFUL_BYTES_PER_OUTPUT_VOXEL
  if labels is not None:
    num_classes = int(np.count_nonzero(np.bincount(labels.ravel(), minlength=1)))
    per_output += _FAITHFUL_BYTES_PER_LABEL_VOXEL * num_classes
  needed = num_out * per_output + num_in * _FAITHFUL_BYTES_PER_INPUT_VOXEL
  available = memory.available_bytes()
  if available is not None and needed > available:
    raise DataError(f"{name}: resampling {rows}x{cols}x{depth} voxels of {spacing[0]:g}x{spacing[1]:g} mm to "
                    f"{config.target_spacing[0]:g}x{config.target_spacing[1]:g} mm would produce "
                    f"{resampled[0]}x{resampled[1]}x{depth} voxels and need about {size_text(needed)} of memory, but "
                    f"{size_text(available)} is available; check the voxel spacing (pixdim, mm) in the file's header "
                    "and the target spacing")


def _faithful(image: np.ndarray, spacing: tuple[float, float], labels: np.ndarray | None,
              config: PreprocessConfig) -> PreprocessedVolume:
  rows, cols, _ = image.shape
  resampled = _faithful_resampled_shape(rows, cols, spacing, config)
  volume = _resize_like_skimage(image, resampled, order=3).astype(np.float32)
  volume -= volume.mean()
  std = volume.std()
  volume = volume / std if std > 0 else np.zeros_like(volume)
  # float32 as the official npy files hold it, so the uint8 truncation lands where it did there.
  png = np.clip(_minmax(volume, None, 127.5), 0, 255).astype(np.uint8)
  # PNG -> float -> per-slice min-max over all three (equal) channels -> 224 bilinear; done on gray, then replicated.
  unit = _minmax(png.astype(np.float64), (0, 1), 1.0)
  size = config.slice_size
  # batchgenerators resizes data with skimage mode='constant', cval=0: upsampled borders fade towards 0.
  small = _resize_linear(unit, (0, 1), (size, size), zero_edges=True)
  images = np.repeat(small.transpose(2, 0, 1)[..., None], 3, axis=-1).astype(np.float32)

  targets = None
  if labels is not None:
    classes = np.unique(labels)
    onehot = np.stack([_resize_like_skimage(labels == c, resampled, order=1) for c in classes])
    labels_resampled = classes[onehot.argmax(0)]
    targets = np.zeros((size, size, labels.shape[2]), np.uint8)
    # batchgenerators' resize_segmentation: classes in increasing order, later ones overwrite.
    for c in np.unique(labels_resampled):
      targets[_resize_linear(labels_resampled == c, (0, 1), (size, size)) >= 0.5] = c
    targets = np.ascontiguousarray(targets.transpose(2, 0, 1))

  geometry = SliceGeometry(mode="faithful", native_shape=(rows, cols), spacing=spacing, resampled_shape=resampled,
                           model_shape=(size, size), encoder_size=config.encoder_size, target_shape=(size, size),
                           target_extent=(float(size), float(size)))
  return PreprocessedVolume(images, targets, geometry.target_valid(), geometry)


def _improved(image: np.ndarray, spacing: tuple[float, float], labels: np.ndarray | None,
              config: PreprocessConfig) -> PreprocessedVolume:
  rows, cols, _ = image.shape
  volume = image.astype(np.float64)
  lo, hi = np.percentile(volume, config.clip_percentiles)
  scaled = (np.clip(volume, lo, hi) - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(volume)
  images = np.repeat(scaled.transpose(2, 0, 1)[..., None], 3, axis=-1).astype(np.float32)

  resized = (config.encoder_size, config.encoder_size) if config.resize == "square" else \
      _sam_resized_shape(rows, cols, spacing, config.encoder_size)
  size = config.head_size
  geometry = SliceGeometry(mode="improved", native_shape=(rows, cols), spacing=spacing, resampled_shape=None,
                           model_shape=resized, encoder_size=config.encoder_size, target_shape=(size, size),
                           target_extent=tuple(n * size / config.encoder_size for n in resized),
                           normalization=config.normalization, pixel_mean=config.pixel_mean,
                           pixel_std=config.pixel_std)
  targets = None if labels is None else improved_targets(labels, geometry)
  return PreprocessedVolume(images, targets, geometry.target_valid(), geometry)


def improved_targets(labels: np.ndarray, geometry: SliceGeometry) -> np.ndarray:
  """Native labels (X, Y, Z) -> improved-mode head targets (Z, T, T) by nearest neighbour: each valid target pixel
  takes the native pixel under its centre (clamped to the image); the padded area is 0."""
  rows, cols = geometry.native_shape
  size = geometry.target_shape[0]
  vh, vw = geometry.target_valid_shape
  idx = [np.clip(np.floor((np.arange(v) + 0.5) * (n / e)).astype(np.intp), 0, n - 1)
         for v, n, e in zip((vh, vw), (rows, cols), geometry.target_extent)]
  targets = np.zeros((labels.shape[2], size, size), np.uint8)
  targets[:, :vh, :vw] = labels[np.ix_(idx[0], idx[1])].transpose(2, 0, 1)
  return targets


def preprocess_volume(image: Any, spacing: Sequence[float], labels: Any = None,
                      config: PreprocessConfig | None = None, name: str = "volume") -> PreprocessedVolume:
  """Host-side preprocessing of one volume (X, Y, Z) with in-plane `spacing` (sx, sy[, sz]) in mm.

  `labels` (same shape, integer values 0..255) is optional (prediction has none). `name` (usually the file) starts
  every DataError message. `config` defaults to `PreprocessConfig()`.
  """
  config = PreprocessConfig() if config is None else config
  image, spacing, labels = _check_inputs(image, spacing, labels, name)
  if config.mode == "faithful":
    _check_faithful_memory(image, spacing, labels, config, name)
  return (_faithful if config.mode == "faithful" else _improved)(image, spacing, labels, config)


# ---------------------------------------------------------------------------------------------------------------------
# Encoder input (JAX, jit-able)


def faithful_encoder_input(images: jax.Array, encoder_size: int = 1024) -> jax.Array:
  """(B, h, w, 3) model images in [0, 1] -> (B, E, E, 3): bilinear upsample with half-pixel centres and no
  anti-aliasing (`F.interpolate(..., 'bilinear', align_corners=False)`), and no pixel normalisation."""
  b, _, _, c = images.shape
  return jax.image.resize(jnp.asarray(images, jnp.float32), (b, encoder_size, encoder_size, c), "bilinear",
                          antialias=False)


def improved_encoder_input(images: jax.Array, resized_shape: tuple[int, int], encoder_size: int = 1024,
                           normalization: str = "mean_std", pixel_mean: tuple[float, ...] = SAM_PIXEL_MEAN,
                           pixel_std: tuple[float, ...] = SAM_PIXEL_STD) -> jax.Array:
  """(B, h, w, 3) model images on 0..255 -> (B, E, E, 3): resize to `resized_shape` (bilinear; anti-aliased when
  shrinking, like PIL), normalisation, zero padding bottom/right (Meta's `Sam.preprocess` order; MedSAM's LiteMedSAM
  inference too).

  normalization "mean_std": (x - pixel_mean) / pixel_std. "min_max": each image scaled to [0, 1] by its own minimum
  and maximum (a constant image to 0), as MedSAM's inference does after its resize (which uses OpenCV's area
  interpolation where this is an anti-aliased bilinear one)."""
  b, _, _, c = images.shape
  x = jax.image.resize(jnp.asarray(images, jnp.float32), (b, *resized_shape, c), "bilinear", antialias=True)
  if normalization == "min_max":
    low = x.min(axis=(1, 2, 3), keepdims=True)
    x = (x - low) / jnp.maximum(x.max(axis=(1, 2, 3), keepdims=True) - low, 1e-8)
  else:
    x = (x - jnp.asarray(pixel_mean, jnp.float32)) / jnp.asarray(pixel_std, jnp.float32)
  return jnp.pad(x, ((0, 0), (0, encoder_size - resized_shape[0]), (0, encoder_size - resized_shape[1]), (0, 0)))


_faithful_encoder_input_jit = jax.jit(faithful_encoder_input, static_argnames=("encoder_size",))
_improved_encoder_input_jit = jax.jit(improved_encoder_input, static_argnames=(
    "resized_shape", "encoder_size", "normalization", "pixel_mean", "pixel_std"))


def encoder_input(images: Any, geometry: SliceGeometry) -> jax.Array:
  """Jitted encoder input for a batch of model images that share `geometry` (one volume's, or in faithful mode any
  224 x 224 slices: only the encoder size is static there, so batches may mix volumes without recompiling)."""
  if geometry.mode == "faithful":
    return _faithful_encoder_input_jit(images, encoder_size=geometry.encoder_size)
  return _improved_encoder_input_jit(images, resized_shape=tuple(geometry.model_shape),
                                     encoder_size=geometry.encoder_size, normalization=geometry.normalization,
                                     pixel_mean=tuple(geometry.pixel_mean), pixel_std=tuple(geometry.pixel_std))


# ---------------------------------------------------------------------------------------------------------------------
# Back to the native grid


def to_native(logits_or_labels: Any, geometry: SliceGeometry) -> np.ndarray:
  """Head logits (..., T, T, C) float or labels (..., T, T) integer on the target grid -> the native slice grid.

  Logits are resized bilinearly (float32 out); labels one-hot, bilinearly, then argmax (same dtype out). Faithful
  mode maps 224 -> resampled -> native; both steps stretch the full extent, so they compose into one resize from 224
  to native, which is what is done (one interpolation, not two). Improved mode reads only the target pixels that hold
  image, so the padding never leaks in, and undoes the aspect-preserving resize.
  """
  x = np.asarray(logits_or_labels)
  is_labels = np.issubdtype(x.dtype, np.integer) or x.dtype == bool
  spatial = (-2, -1) if is_labels else (-3, -2)
  if x.ndim < len(spatial) or tuple(x.shape[a] for a in spatial) != tuple(geometry.target_shape):
    kind = "labels (..., T, T)" if is_labels else "logits (..., T, T, C)"
    raise ValueError(f"to_native expects {kind} with T x T = {geometry.target_shape}, got shape {x.shape}")
  resize = functools.partial(_resize_linear, axes=[a % x.ndim for a in spatial], out_shape=geometry.native_shape,
                             extent=geometry.target_extent, limit=geometry.target_valid_shape)
  if not is_labels:
    return resize(x).astype(np.float32)
  classes = np.unique(x)
  scores = np.stack([resize(x == c) for c in classes])
  return classes[scores.argmax(0)].astype(x.dtype)

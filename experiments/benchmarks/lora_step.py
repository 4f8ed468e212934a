"""A LoRA train step of SAM's image encoder: ours (jit, optax Adam on the factors only) against segment-anything's
PyTorch encoder adapted by `peft` (torch Adam on the factors only), the same random base weights on both sides, in
one process; then the peak memory of a full-size step from XLA's memory analysis of the compiled step.

  python -m experiments.benchmarks.lora_step                      # tiny and vit_b at 256, then vit_b at 1024 memory
  python -m experiments.benchmarks.lora_step --sizes tiny --memory-batches ""   # the quick part only

The step: embeddings of a batch, mean squared error to a fixed random target (a stand-in for a head's loss, the
same on both sides), gradients of the LoRA factors, one Adam update. LoRA on the fused qkv (the target both
implementations support as a whole linear), rank 4, alpha 4. Times are medians over --steps rounds, after two
warm-up steps of each side (compilation on our side); a round runs one step of every side in turn, so that a change
of the machine's speed during the run falls on every side alike. The ratio is PyTorch's time over ours (above 1:
ours is faster).
The memory rows compile the vit_b step at --memory-image-size (1024 x 1024, SAM's) without running it (abstract
inputs), with and without per-block rematerialisation, and print XLA's figure for arguments + temporaries + outputs.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import numpy as np

from autosam_jax.models.config import PRESETS, SamConfig

RANK, ALPHA = 4, 4.0
TINY = SamConfig(image_size=128, encoder_embed_dim=64, encoder_depth=2, encoder_num_heads=4, encoder_mlp_dim=256,
                 encoder_global_attn_indexes=(1,), window_size=5)
SIZES = {"tiny": (TINY, 2), "vit_b@256": (dataclasses.replace(PRESETS["vit_b"], image_size=256), 2)}


def _interleaved_medians(steps: dict, rounds: int) -> dict:
  """Median seconds of each of `steps` (name -> callable): two warm-up calls each, then `rounds` rounds that call
  every step once in turn, so that a change of this machine's speed during the run falls on all sides alike."""
  for step in steps.values():
    for _ in range(2):
      step()
  times = {name: [] for name in steps}
  for _ in range(rounds):
    for name, step in steps.items():
      start = time.perf_counter()
      step()
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(t) for name, t in times.items()}


def _median_seconds(step, steps: int) -> float:
  """Median seconds of one `step` over `steps` calls, after two warm-up calls."""
  return _interleaved_medians({"step": step}, steps)["step"]


def _torch_step(torch_encoder, images: np.ndarray, target: np.ndarray):
  import torch
  from peft import LoraConfig as PeftLoraConfig, inject_adapter_in_model

  encoder = inject_adapter_in_model(PeftLoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                                   target_modules=r"blocks\.\d+\.attn\.qkv"), torch_encoder)
  for name, p in encoder.named_parameters():
    p.requires_grad_("lora_" in name)
  trainable = [p for p in encoder.parameters() if p.requires_grad]
  optimizer = torch.optim.Adam(trainable, lr=1e-3)
  x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
  y = torch.from_numpy(target).permute(0, 3, 1, 2).contiguous()

  def step():
    optimizer.zero_grad(set_to_none=True)
    loss = torch.nn.functional.mse_loss(encoder(x), y)
    loss.backward()
    optimizer.step()
    return float(loss.detach())

  return step, sum(p.numel() for p in trainable)


def _our_step(encoder, remat: bool = False):
  """(jitted step(lora, opt_state, rest, images, target) -> (lora, opt_state, loss), graphdef, optimizer)."""
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx

  from autosam_jax.models.lora import LoraConfig, LoraParam, add_lora

  add_lora(encoder, LoraConfig(rank=RANK, alpha=ALPHA, targets=("qkv",)), rngs=nnx.Rngs(0))
  encoder.remat = remat
  graphdef, lora, rest = nnx.split(encoder, LoraParam, ...)
  optimizer = optax.adam(1e-3)

  def loss_fn(lora, rest, images, target):
    return jnp.mean((nnx.merge(graphdef, lora, rest)(images) - target) ** 2)

  @jax.jit
  def step(lora, opt_state, rest, images, target):
    loss, grads = jax.value_and_grad(loss_fn)(lora, rest, images, target)
    updates, opt_state = optimizer.update(grads, opt_state, lora)
    return optax.apply_updates(lora, updates), opt_state, loss

  return step, lora, rest, optimizer


def time_size(name: str, steps: int) -> dict:
  import jax

  from weights_conversion.meta_reference import build_meta_sam
  from weights_conversion.parity import sam_from_torch

  config, batch = SIZES[name]
  torch_sam = build_meta_sam(config, seed=0)
  rng = np.random.default_rng(0)
  images = rng.normal(size=(batch, config.image_size, config.image_size, 3)).astype(np.float32)
  grid = config.image_embedding_size
  target = rng.normal(size=(batch, grid, grid, config.prompt_embed_dim)).astype(np.float32)

  def our_step(encoder_dtype):
    step, lora, rest, optimizer = _our_step(sam_from_torch(torch_sam, encoder_dtype=encoder_dtype).image_encoder)
    state = {"lora": lora, "opt": optimizer.init(lora)}

    def ours():
      state["lora"], state["opt"], loss = step(state["lora"], state["opt"], rest, images, target)
      jax.block_until_ready(loss)

    return ours

  import jax.numpy as jnp

  sides = {"ours_s": our_step(None), "ours_bf16_s": our_step(jnp.bfloat16)}
  sides["torch_peft_s"], trainable = _torch_step(torch_sam.image_encoder.train(), images, target)
  seconds = _interleaved_medians(sides, steps)
  return {"size": name, "batch": batch, "lora_params": trainable, **seconds,
          "ratio": seconds["torch_peft_s"] / seconds["ours_s"],
          "ratio_bf16": seconds["torch_peft_s"] / seconds["ours_bf16_s"]}


def step_memory(batch: int, remat: bool, attention: str = "xla", image_size: int = 1024) -> int:
  """Bytes XLA's memory analysis gives for the compiled vit_b LoRA step at `image_size` (arguments, temporaries,
  outputs), the encoder's attention computed by `attention` (image_encoder.ATTENTION_IMPLEMENTATIONS)."""
  import jax
  from flax import nnx

  from autosam_jax.models.image_encoder import ImageEncoderViT

  config = dataclasses.replace(PRESETS["vit_b"], image_size=image_size)
  encoder = nnx.eval_shape(lambda: ImageEncoderViT(config, attention=attention, rngs=nnx.Rngs(0)))
  step, lora, rest, optimizer = _our_step(encoder, remat=remat)
  grid = image_size // config.patch_size
  images = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), np.float32)
  target = jax.ShapeDtypeStruct((batch, grid, grid, config.prompt_embed_dim), np.float32)
  opt_state = jax.eval_shape(optimizer.init, lora)
  analysis = step.lower(lora, opt_state, rest, images, target).compile().memory_analysis()
  return (analysis.argument_size_in_bytes + analysis.temp_size_in_bytes + analysis.output_size_in_bytes
          - analysis.alias_size_in_bytes)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--sizes", default="tiny,vit_b@256", help=f"comma-separated, of {', '.join(SIZES)}")
  parser.add_argument("--steps", type=int, default=5, help="timed rounds (one step of each side per round, after two warm-up steps each)")
  parser.add_argument("--memory-batches", default="4", help="vit_b batch sizes for the memory rows ('' none)")
  parser.add_argument("--memory-image-size", type=int, default=1024,
                      help="image size of the memory rows' vit_b (a multiple of 16; SAM's is 1024)")
  parser.add_argument("--memory-attention", default="xla,chunked",
                      help="attention implementations of the memory rows: xla (jax.nn.dot_product_attention, as on "
                           "GPU without cuDNN) and chunked (query chunks, each recomputed in the backward pass)")
  args = parser.parse_args(argv)
  if args.memory_image_size <= 0 or args.memory_image_size % 16:
    parser.error(f"--memory-image-size: {args.memory_image_size} is not a positive multiple of 16 (the patch size)")
  sizes = [s for s in args.sizes.split(",") if s]
  unknown = [s for s in sizes if s not in SIZES]
  if unknown:
    parser.error(f"--sizes: {', '.join(unknown)} not among {', '.join(SIZES)}")
  import torch

  print(f"torch threads {torch.get_num_threads()}; LoRA on qkv, rank {RANK}, alpha {ALPHA}; medians of {args.steps}")
  print("| encoder | batch | LoRA params | ours fp32 (s/step) | ours bf16 matmuls (s/step) | PyTorch + peft fp32 "
        "(s/step) | PyTorch / ours fp32 | PyTorch / ours bf16 |")
  print("|---|---|---|---|---|---|---|---|")
  for name in sizes:
    row = time_size(name, args.steps)
    print(f"| {row['size']} | {row['batch']} | {row['lora_params']:,} | {row['ours_s']:.3f} | "
          f"{row['ours_bf16_s']:.3f} | {row['torch_peft_s']:.3f} | {row['ratio']:.2f}x | {row['ratio_bf16']:.2f}x |",
          flush=True)
  batches = [int(b) for b in args.memory_batches.split(",") if b]
  if batches:
    print(f"\n| vit_b at {args.memory_image_size}, LoRA step | attention | batch | XLA memory analysis (GiB) |")
    print("|---|---|---|---|")
    for attention in [a for a in args.memory_attention.split(",") if a]:
      for batch in batches:
        for remat in (False, True):
          gib = step_memory(batch, remat, attention, args.memory_image_size) / 2 ** 30
          print(f"| {'remat per block' if remat else 'no remat'} | {attention} | {batch} | {gib:.2f} |", flush=True)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())

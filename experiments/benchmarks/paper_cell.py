"""One paper cell end to end (tr_size 1, 120 epochs, validation every epoch): our cached pipeline against the official
schedule, which runs the frozen encoder on every training batch and every validation slice of every epoch.

  python -m experiments.benchmarks.paper_cell                 # tiny SAM (256px, dim 192, depth 4), AutoSAM faithful
  python -m experiments.benchmarks.paper_cell --val-patients 2 --views 1 --our-epochs 2 --official-epochs 1  # check
  python -m experiments.benchmarks.paper_cell --model-type vit_b   # vit_b at 1024: composed from measured parts

Data: synthetic ACDC phantoms, 1 labeled patient and --val-patients validation patients (the paper's split has 15);
test evaluation, done once by both, is left out. Random SAM weights in Meta's format, converted for ours.

Ours, as `autosam-jax precompute` and `autosam-jax train` run it (the sweep's faithful recipe: bf16 encoder and
cache, 4 augmented views of each training slice): the precompute's wall time, then `train()` for --our-epochs
epochs; its epochs' durations (every step, validation, checkpoint and log of an epoch) are taken between the ends of
consecutive validations, and the remaining epochs are extrapolated from their median.
Official: Meta's PyTorch ImageEncoderViT (fp32, no_grad) on each batch's 224 -> encoder-size bilinear upsample, then
the PyTorch head's train step (experiments/benchmarks/torch_heads.py) for training batches, or its forward and loss
for validation batches, batch 4, last batch partial; --official-epochs epochs are timed and 120 extrapolated from
their median. Its data loading and batchgenerators augmentation are not timed (they would only add to it).

With --model-type (vit_b, ...), running whole epochs of the official schedule would take hours on a CPU, so the cell
is composed from parts measured in this process on the same random weights: seconds per image of each side's
encoder (PyTorch fp32 as the official code; ours bf16 as precompute runs it), seconds per train step and per
validation batch of each side's head on the encoder's real embedding grid (64x64 for 1024-pixel SAM), and our
per-epoch checkpoint save. Slice counts are ACDC's (1,902 ED+ES slices over 100 patients: 19 per patient): tr_size
1 trains on 19 slices (5 steps of 4), 15 validation patients give 285 slices (72 batches); our cache holds 4
augmented views of the training slices besides the clean ones.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from autosam_jax.models.config import SamConfig

TINY = SamConfig(image_size=256, encoder_embed_dim=192, encoder_depth=4, encoder_num_heads=6, encoder_mlp_dim=768,
                 encoder_global_attn_indexes=(1, 3), window_size=7)


def batch_sizes(n: int, batch_size: int) -> list[int]:
  return [min(batch_size, n - start) for start in range(0, n, batch_size)]


def time_ours(args, work: Path, weights: Path, train_patients: list[str], val_patients: list[str]) -> dict:
  """Precompute wall time, then `train()` with the end of each epoch's validation time-stamped."""
  from flax import nnx

  from autosam_jax.features.precompute import PrecomputeOptions, precompute
  from autosam_jax.models.loading import load_sam
  from autosam_jax.train import loop

  options = PrecomputeOptions(mode="faithful", views=args.views, dtype="bfloat16", batch_size=8)
  start = time.perf_counter()
  summary = precompute(work / "acdc", weights, work / "cache", tfds_dir=work / "tfds", options=options,
                       view_patients=set(train_patients), progress=False)
  precompute_seconds = time.perf_counter() - start

  config = loop.TrainConfig(head=args.head, variant="faithful", epochs=args.our_epochs, batch_size=4,
                            learning_rate=5e-4, scheduler="plateau_train_loss")
  factory = lambda: loop.build_model(config, load_sam(weights), rngs=nnx.Rngs(0))
  ends = []
  validate = loop.validate

  def stamped_validate(*a, **k):  # train() looks `validate` up in its module on every epoch
    result = validate(*a, **k)
    ends.append(time.perf_counter())
    return result

  loop.validate = stamped_validate
  try:
    start = time.perf_counter()
    loop.train(config, work / "cache", factory, work / "run", train_patients, val_patients, progress=False)
    train_seconds = time.perf_counter() - start
  finally:
    loop.validate = validate
  epochs = np.diff(ends).tolist()  # epoch k + 1: from the end of epoch k's validation to the end of its own
  return {"precompute": precompute_seconds, "cached_items": summary["items"], "train": train_seconds,
          "first_epoch": ends[0] - start, "epochs": epochs}


def time_official(args, torch_sam, n_train: int, n_val: int) -> list[float]:
  """Seconds of each of --official-epochs epochs of the official schedule (after one untimed warm-up batch)."""
  import torch
  import torch.nn.functional as F

  from experiments.benchmarks import torch_heads

  encoder = torch_sam.image_encoder.eval()
  size = torch_sam.image_encoder.img_size
  torch.manual_seed(0)
  head = torch_heads.build(args.head, 4, "faithful")
  train_step, eval_step = torch_heads.make_train_step(head), torch_heads.make_eval_step(head)
  generator = torch.Generator().manual_seed(0)

  def batch(b):  # images as the data loader gives them (224, [0, 1]) and labels
    return torch.rand(b, 3, 224, 224, generator=generator), torch.randint(0, 4, (b, 224, 224), generator=generator)

  def embed(images):
    with torch.no_grad():  # frozen encoder: the official code records no graph for it either
      return encoder(F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False))

  images, labels = batch(4)
  train_step(embed(images), labels)
  eval_step(embed(images), labels)
  seconds = []
  for _ in range(args.official_epochs):
    start = time.perf_counter()
    for b in batch_sizes(n_train, 4):
      images, labels = batch(b)
      train_step(embed(images), labels)
    head.eval()
    for b in batch_sizes(n_val, 4):
      images, labels = batch(b)
      eval_step(embed(images), labels)
    head.train()
    seconds.append(time.perf_counter() - start)
  return seconds


ACDC_SLICES_PER_PATIENT = 19  # 1,902 ED+ES slices over ACDC's 100 training patients


def composed(args) -> int:
  """The paper cell for a full-size SAM, composed from per-image and per-step times measured here."""
  import resource
  import tempfile

  import jax
  import jax.numpy as jnp
  import torch
  from flax import nnx

  from autosam_jax.models.config import PRESETS
  from autosam_jax.models.heads import build_head
  from autosam_jax.train.checkpointing import RunCheckpoints
  from experiments.benchmarks import torch_heads
  from experiments.benchmarks.encoder_throughput import median_seconds
  from experiments.benchmarks.head_step import our_steps
  from weights_conversion.meta_reference import build_meta_sam
  from weights_conversion.parity import sam_from_torch

  torch.set_num_threads(os.cpu_count() or 1)
  config = TINY if args.model_type == "tiny" else PRESETS[args.model_type]
  size, grid = config.image_size, config.image_size // 16
  torch_sam = build_meta_sam(config, seed=0)
  rng = np.random.default_rng(0)
  image = rng.random((1, size, size, 3), dtype=np.float32)
  print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
  print(f"{args.model_type} at {size}x{size} -> {grid}x{grid}x256 embeddings; {args.head} head, faithful; medians of "
        f"{args.repeats} after one warm-up call\n")

  encoder = torch_sam.image_encoder.eval()
  x_torch = torch.from_numpy(image.transpose(0, 3, 1, 2).copy())
  with torch.inference_mode():
    torch_encoder, _ = median_seconds(lambda: encoder(x_torch), args.repeats)
  sam = sam_from_torch(torch_sam, encoder_dtype=jnp.bfloat16)
  graphdef, state = nnx.split(sam.image_encoder)
  encode = jax.jit(lambda state, images: nnx.merge(graphdef, state)(images))
  x_jax = jnp.asarray(image)
  our_encoder, our_compile = median_seconds(lambda: encode(state, x_jax).block_until_ready(), args.repeats)
  print(f"encoder, s/image: PyTorch fp32 {torch_encoder:.2f}, ours bf16 {our_encoder:.2f} (first call, compilation "
        f"included: {our_compile:.1f})")

  b, num_classes = 4, 4
  embeddings = rng.normal(size=(b, grid, grid, 256)).astype(np.float32)
  targets = rng.integers(0, num_classes, size=(b, 224, 224)).astype(np.int32)
  batch = {"embedding": embeddings, "target": targets, "weight": np.ones((b, 224, 224), np.float32)}
  x_emb, y_torch = torch.from_numpy(embeddings.transpose(0, 3, 1, 2).copy()), torch.from_numpy(targets.astype(np.int64))
  torch.manual_seed(0)
  reference = torch_heads.build(args.head, num_classes, "faithful")
  torch_train, torch_eval = torch_heads.make_train_step(reference), torch_heads.make_eval_step(reference)
  times = {"torch_train": median_seconds(lambda: torch_train(x_emb, y_torch), args.repeats)[0]}
  reference.eval()
  times["torch_eval"] = median_seconds(lambda: torch_eval(x_emb, y_torch), args.repeats)[0]
  head = build_head(args.head, num_classes, variant="faithful", rngs=nnx.Rngs(0))
  our_train, our_eval = our_steps(head)
  times["our_train"] = median_seconds(lambda: our_train(batch), args.repeats)[0]
  times["our_eval"] = median_seconds(lambda: our_eval(batch), args.repeats)[0]
  # a fresh head: the train steps above donated the first one's arrays
  _, params, _ = nnx.split(build_head(args.head, num_classes, variant="faithful", rngs=nnx.Rngs(1)), nnx.Param, ...)
  import optax
  run_state = {"params": params, "opt_state": optax.adam(1.0).init(params), "step": np.int32(0)}
  with tempfile.TemporaryDirectory() as tmp:
    checkpoints = RunCheckpoints(Path(tmp) / "checkpoints")
    step = iter(range(1, 1000))
    times["our_checkpoint"] = median_seconds(lambda: checkpoints.save(next(step), run_state, {"epoch": 0}),
                                              args.repeats)[0]
    checkpoints.close()
  print("head, s per batch of 4: " + ", ".join(f"{k} {v:.3f}" for k, v in times.items()))

  n_train = ACDC_SLICES_PER_PATIENT * 1
  n_val = ACDC_SLICES_PER_PATIENT * args.val_patients
  steps, val_batches = -(-n_train // b), -(-n_val // b)
  official_epoch = (n_train + n_val) * torch_encoder + steps * times["torch_train"] + val_batches * times["torch_eval"]
  cached = n_train * (1 + args.views) + n_val
  our_precompute = cached * our_encoder
  our_epoch = steps * times["our_train"] + val_batches * times["our_eval"] + times["our_checkpoint"]
  e = args.epochs
  ours_total, official_total = our_precompute + e * our_epoch, e * official_epoch
  print(f"\ncomposed for tr_size 1 ({n_train} slices, {steps} steps/epoch), {args.val_patients} validation patients "
        f"({n_val} slices, {val_batches} batches), {e} epochs")
  print(f"  official: {e} x ({n_train + n_val} encoder passes + {steps} train steps + {val_batches} validation "
        f"batches) = {e} x {official_epoch:.0f} s = {official_total / 3600:.1f} h")
  print(f"  ours: precompute {cached} images x {our_encoder:.2f} s = {our_precompute / 60:.1f} min, then {e} x "
        f"{our_epoch:.1f} s = {e * our_epoch / 60:.1f} min; total {ours_total / 60:.1f} min")
  print(f"  ours is {official_total / ours_total:.0f}x faster end to end (per epoch after precompute: "
        f"{official_epoch / our_epoch:.0f}x)")
  print(f"\npeak host RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
  return 0


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--head", choices=["autosam", "cnn", "linear"], default="autosam")
  parser.add_argument("--val-patients", type=int, default=15)
  parser.add_argument("--views", type=int, default=4, help="augmented views per training slice in our cache")
  parser.add_argument("--epochs", type=int, default=120, help="the cell's epochs (extrapolated to)")
  parser.add_argument("--our-epochs", type=int, default=4, help="epochs of ours run and timed (at least 2)")
  parser.add_argument("--official-epochs", type=int, default=2, help="epochs of the official schedule timed")
  parser.add_argument("--model-type", choices=["vit_b", "vit_l", "vit_h", "tiny"],
                      help="compose the cell for a full-size SAM from measured parts (see above; tiny: seconds, "
                      "checks the script)")
  parser.add_argument("--repeats", type=int, default=3, help="--model-type: timed calls per part")
  args = parser.parse_args(argv)
  if args.model_type:
    return composed(args)
  if args.our_epochs < 2 or args.official_epochs < 1 or args.our_epochs > args.epochs:
    parser.error("need 2 <= --our-epochs <= --epochs and --official-epochs >= 1")

  import jax
  import torch

  from autosam_jax.data.synthetic import write_synthetic_acdc
  from autosam_jax.data.volumes import load_volumes
  from autosam_jax.features.cache import FeatureCache
  from weights_conversion import convert
  from weights_conversion.meta_reference import build_meta_sam, save_meta_checkpoint

  torch.set_num_threads(os.cpu_count() or 1)
  work = Path(tempfile.mkdtemp(prefix="autosam-paper-cell-bench-"))
  torch_sam = build_meta_sam(TINY, seed=0)
  save_meta_checkpoint(torch_sam, work / "sam.pth")
  weights, _ = convert(work / "sam.pth", work / "weights")
  write_synthetic_acdc(work / "acdc", 1 + args.val_patients, seed=0)
  load_volumes(work / "acdc", work / "tfds")  # builds the dataset: data preparation, untimed on both sides
  train_patients = ["patient001"]
  val_patients = [f"patient{i:03d}" for i in range(2, 2 + args.val_patients)]

  ours = time_ours(args, work, weights, train_patients, val_patients)
  cache = FeatureCache(work / "cache")
  n_train, n_val = len(cache.indices(train_patients)), len(cache.indices(val_patients))
  official = time_official(args, torch_sam, n_train, n_val)

  e = args.epochs
  our_epoch, official_epoch = statistics.median(ours["epochs"]), statistics.median(official)
  our_train = ours["train"] + (e - args.our_epochs) * our_epoch
  our_cell = ours["precompute"] + our_train
  official_cell = e * official_epoch
  print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
  print(f"tiny SAM (256px, dim 192, depth 4) -> 16x16x256 embeddings; {args.head} head, faithful; tr_size 1: "
        f"{n_train} training slices ({-(-n_train // 4)} steps/epoch), {args.val_patients} validation patients: "
        f"{n_val} slices ({-(-n_val // 4)} batches/epoch)\n")
  print("measured")
  print(f"  ours: precompute {ours['cached_items']} items ({n_train} x {1 + args.views} views + {n_val}), bf16, "
        f"compilation included: {ours['precompute']:.1f} s")
  print(f"  ours: train() for {args.our_epochs} epochs: {ours['train']:.1f} s (first epoch, compilation included: "
        f"{ours['first_epoch']:.1f} s; later epochs {', '.join(f'{s:.2f}' for s in ours['epochs'])} s)")
  print(f"  official: {args.official_epochs} epoch(s): {', '.join(f'{s:.2f}' for s in official)} s")
  print(f"extrapolated to {e} epochs (median epoch x remaining epochs)")
  print(f"  ours: {ours['precompute']:.1f} s precompute + {our_train:.1f} s training = {our_cell:.1f} s "
        f"({our_cell / 60:.1f} min)")
  print(f"  official: {e} x {official_epoch:.2f} s = {official_cell:.1f} s ({official_cell / 60:.1f} min)")
  print(f"  ours is {official_cell / our_cell:.1f}x faster end to end (per epoch after precompute: "
        f"{official_epoch / our_epoch:.1f}x)")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())

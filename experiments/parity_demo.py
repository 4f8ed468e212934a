"""Convert a randomly initialised SAM checkpoint and print how closely we match Meta's PyTorch code.

  autosam-jax parity-demo                      # a small non-preset architecture, about a minute on 2 CPU cores
  autosam-jax parity-demo --model-type vit_b   # full-size vit_b at 1024 (a few minutes on CPU)

Builds Meta's `segment-anything` SAM with every tensor random, saves it with `torch.save(model.state_dict())` as
Meta's files are saved, converts it with `autosam-jax convert`, then runs the same image and prompts through both and
prints the largest absolute difference of each output against its tolerance.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from autosam_jax.models.config import PRESETS, SamConfig

DEMO_CONFIG = SamConfig(image_size=256, encoder_embed_dim=192, encoder_depth=4, encoder_num_heads=6,
                        encoder_mlp_dim=768, encoder_global_attn_indexes=(1, 3), window_size=7)


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--model-type", choices=sorted(PRESETS), default=None,
                      help="full-size preset to check (default: a small 256-pixel, depth-4 architecture)")
  parser.add_argument("--out", type=Path, default=None,
                      help="keep the random checkpoint and the converted weights here (default: a temporary dir)")
  parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
  from autosam_jax import load_sam
  from weights_conversion.convert import ConversionError, convert
  from weights_conversion.meta_reference import build_meta_sam, save_meta_checkpoint
  from weights_conversion.parity import (TOLERANCES, jax_outputs, max_abs_differences, meta_outputs,
                                         random_prompts)

  config = PRESETS[args.model_type] if args.model_type else DEMO_CONFIG
  workdir = args.out or Path(tempfile.mkdtemp(prefix="autosam-parity-"))
  workdir.mkdir(parents=True, exist_ok=True)
  print(f"architecture: image {config.image_size}, dim {config.encoder_embed_dim}, depth {config.encoder_depth}, "
        f"heads {config.encoder_num_heads}, window {config.window_size}, "
        f"global blocks {list(config.encoder_global_attn_indexes)}")
  start = time.perf_counter()
  torch_sam = build_meta_sam(config, args.seed)
  checkpoint = save_meta_checkpoint(torch_sam, workdir / "sam_random.pth")
  print(f"saved Meta-format checkpoint {checkpoint} ({checkpoint.stat().st_size / 2**20:.1f} MiB) "
        f"in {time.perf_counter() - start:.1f}s")
  start = time.perf_counter()
  try:
    out_dir, inferred = convert(checkpoint, workdir / "converted", model_type=args.model_type, overwrite=True)
  except ConversionError as err:
    print(f"error: {err}")
    return 2
  print(f"converted to {out_dir} in {time.perf_counter() - start:.1f}s; inferred config "
        f"{'equals' if inferred == config else 'DIFFERS FROM'} the one built")
  sam = load_sam(out_dir)

  rng = np.random.default_rng(args.seed)
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
    diffs = max_abs_differences(reference, ours)
    for key, value in diffs.items():
      worst[key] = max(worst.get(key, 0.0), value)
    print(f"case '{title}': PyTorch {torch_time:.1f}s, JAX {jax_time:.1f}s (first call includes compilation)")

  print(f"\n{'output':<20}{'max |ours - Meta|':>20}{'tolerance':>12}  ok")
  failed = False
  for key, value in worst.items():
    ok = value <= TOLERANCES[key]
    failed |= not ok
    print(f"{key:<20}{value:>20.3e}{TOLERANCES[key]:>12.0e}  {'yes' if ok else 'NO'}")
  print(f"\nparity {'FAILED' if failed else 'holds'}; files in {workdir}")
  return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  add_arguments(parser)
  return run(parser.parse_args(argv))


if __name__ == "__main__":
  raise SystemExit(main())

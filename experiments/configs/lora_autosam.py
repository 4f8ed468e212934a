"""LoRA on SAM's encoder with the improved AutoSAM head (joint decoding): rank 4 on the q and v parts of every
block's qkv, the encoder in bf16 and rematerialised per block, trained on an input cache.

  autosam-jax precompute --data ~/data/ACDC --weights weights/vit_b --out cache/vit_b_improved_inputs \\
      --mode improved --store inputs --views 4 --splits splits/cv5.json
  autosam-jax train --config experiments/configs/lora_autosam.py --cache cache/vit_b_improved_inputs \\
      --weights weights/vit_b --splits splits/cv5.json --fold cv5-seed0-fold0 --tr-size 1 --out runs/lora_tr1
"""


from autosam_jax.experiment.recipes import lora_recipe


def get_config() -> dict:
  return lora_recipe("improved")

"""The label-efficiency experiment under the improved protocol: SAM's pixel normalisation and aspect-preserving
resize, the improved heads (SAM's positional encoding, no-mask embedding and mask tokens), plateau on validation Dice
with the best epoch kept, and the zero-shot baseline with its normalisation fixed. The UNet baselines keep their
official recipe.

  autosam-jax sweep --config experiments/configs/sweep_improved.py --out sweeps/improved \\
      --set data=~/data/ACDC/training --set "encoders={'vit_b': 'sam_vit_b_01ec64.pth'}"
"""


def get_config() -> dict:
  return {
      "data": "~/data/ACDC/training",
      "encoders": {"vit_b": "sam_vit_b_01ec64.pth"},
      "methods": ["autosam", "cnn", "linear", "unet", "simclr", "zero_shot_box", "zero_shot_point"],
      "mode": "improved",
      "tr_sizes": [1, 2, 5, 10, 20],
      "num_folds": 5,
      "views": 4,
      "dtype": "bf16",
  }

"""The paper's label-efficiency experiment under its own protocol (faithful): every head on every SAM size, the UNet
from scratch and after SimCLR, and zero-shot SAM with ground-truth boxes and points, on 5 cross-validation folds.

  autosam-jax sweep --config experiments/configs/sweep_paper.py --out sweeps/paper \\
      --set data=~/data/ACDC/training \\
      --set "encoders={'vit_b': 'sam_vit_b_01ec64.pth', 'vit_l': 'sam_vit_l_0b3195.pth', 'vit_h': 'sam_vit_h_4b8939.pth'}"

ACDC's 100 training patients give folds of 20 test, 15 validation and 65 training patients; tr_size k takes the first
k of a fold's seeded training order, so smaller sets nest in larger ones. Views: the official code augments every
training slice every epoch; here each training slice gets `views` augmented embeddings in the cache (2 MiB each at
vit_b's 64 x 64 x 256 in bf16), and each epoch draws one of them or the clean slice.
"""


def get_config() -> dict:
  return {
      "data": "~/data/ACDC/training",
      "encoders": {"vit_b": "sam_vit_b_01ec64.pth"},
      "methods": ["autosam", "cnn", "linear", "unet", "simclr", "zero_shot_box", "zero_shot_point"],
      "mode": "faithful",
      "tr_sizes": [1, 2, 5, 10, 20],
      "num_folds": 5,
      "views": 4,
      "dtype": "bf16",
  }

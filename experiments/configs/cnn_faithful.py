"""CNN head (paper-protocol 1b, 20.7M parameters), the paper's protocol.

  autosam-jax train --config experiments/configs/cnn_faithful.py --cache cache/vit_b_faithful \\
      --weights weights/vit_b --splits splits/cv5.json --fold cv5-seed0-fold0 --tr-size 1 --out runs/cnn_tr1
"""


from autosam_jax.experiment.recipes import train_recipe


def get_config() -> dict:
  return train_recipe("cnn", "faithful")

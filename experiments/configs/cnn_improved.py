"""CNN head (paper-protocol 1b), improved protocol: the same head on the improved-mode cache, plateau on validation
Dice, and the best epoch by validation Dice kept.

  autosam-jax train --config experiments/configs/cnn_improved.py --cache cache/vit_b_improved \\
      --weights weights/vit_b --splits splits/cv5.json --fold cv5-seed0-fold0 --tr-size 1 --out runs/cnn_imp_tr1
"""


from autosam_jax.experiment.recipes import train_recipe


def get_config() -> dict:
  return train_recipe("cnn", "improved")

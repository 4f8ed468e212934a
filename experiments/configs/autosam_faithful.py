"""AutoSAM head, the paper's protocol (faithful): Adam 5e-4, batch 4, 120 epochs, plateau on the last training
batch's loss from epoch 10, last-epoch model.

  autosam-jax train --config experiments/configs/autosam_faithful.py --cache cache/vit_b_faithful \\
      --weights weights/vit_b --splits splits/cv5.json --fold cv5-seed0-fold0 --tr-size 1 --out runs/autosam_tr1

Expect on real ACDC with vit_b: about 600 steps at tr_size 1 (about 20 slices, 5 steps per epoch).
"""


from autosam_jax.experiment.recipes import train_recipe


def get_config() -> dict:
  return train_recipe("autosam", "faithful")

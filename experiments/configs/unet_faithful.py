"""UNet baseline trained from scratch on images (faithful): Adam 5e-4, batch 4, 120 epochs, plateau on the last
training batch's loss from epoch 10, last-epoch model; the official batchgenerators augmentation on the fly.

  autosam-jax image-cache --data ~/data/ACDC --out cache/images_faithful
  autosam-jax train --config experiments/configs/unet_faithful.py --cache cache/images_faithful \\
      --splits splits/cv5.json --fold cv5-seed0-fold0 --tr-size 1 --out runs/unet_tr1

No --weights: nothing comes from SAM.
"""


from autosam_jax.experiment.recipes import train_recipe


def get_config() -> dict:
  return train_recipe("unet", "faithful")

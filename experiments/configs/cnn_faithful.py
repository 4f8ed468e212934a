"""CNN head (spec 1b, 20.7M parameters), the paper's protocol.

  autosam-jax train --config experiments/configs/cnn_faithful.py --cache cache/vit_b_faithful \\
      --weights weights/vit_b --splits splits/cv5.json --fold cv5-seed0-fold0 --tr-size 1 --out runs/cnn_tr1
"""


def get_config() -> dict:
  return {"head": "cnn", "variant": "faithful", "epochs": 120, "batch_size": 4, "learning_rate": 5e-4,
          "scheduler": "plateau_train_loss"}

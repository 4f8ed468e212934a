"""SimCLR pretraining of the UNet encoder (faithful): the official `main_simclr.py` options. Adam 3e-4 with L2 weight
decay 1e-5, batch 8, 100 epochs, NT-Xent at temperature 0.5, the official cosine quirk (T_max in iterations, stepped
once per epoch from epoch 10), the official augmentation for both views (drawn independently; paper-protocol 6.21).

  autosam-jax pretrain-simclr --config experiments/configs/simclr_pretrain.py ...   (autosam-jax pretrain-simclr -h)

Pretraining uses every training patient of the fold (labels unused); fine-tuning then starts the UNet's encoder
from runs/simclr_fold0/encoder and its decoder from random, as the official `main_baseline.py --saved_model_path`
does. Use the same fold for both, so the test patients are never seen. `--set schedule=improved` gives a cosine
over all steps instead.
"""


from autosam_jax.experiment.recipes import SIMCLR


def get_config() -> dict:
  return dict(SIMCLR)

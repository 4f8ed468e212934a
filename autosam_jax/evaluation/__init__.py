"""Segmentation metrics (Dice, HD95) under the paper's convention and under a MONAI-compatible one: see `metrics`."""

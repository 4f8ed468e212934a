"""Medical data in: NIfTI reading and validation, synthetic ACDC phantoms, TFDS builders, preprocessing, splits,
augmentation and grain loaders."""

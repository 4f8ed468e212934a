"""The experiments as library code: the label-efficiency sweep (`sweep`), the demo (`demo`) and the training recipe
of each method under each protocol (`recipes`), which the files in `experiments/configs/` return."""

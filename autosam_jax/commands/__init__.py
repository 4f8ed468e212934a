"""One thin module per `autosam-jax` command: its arguments, one library call, what it prints.

Each module holds `DESCRIPTION`, `add_arguments(parser)` and `run(args) -> int`, imports only argparse-level things
at import time (the library is imported inside `run`), and raises the library's errors (`autosam_jax.errors`) for
`faults.run_command` to print. `cli.py` imports a module only when its command runs or its help is asked for.
"""

# command -> (module under autosam_jax.commands, one-line help)
COMMANDS = {
    "convert": ("convert", "convert Meta or Hugging Face SAM weights to a Flax checkpoint"),
    "parity-demo": ("parity_demo", "convert a random SAM checkpoint and print parity with Meta's code"),
    "synth-acdc": ("synth_acdc", "write synthetic cardiac MRI phantoms in ACDC's file layout"),
    "make-mni-dataset": ("make_mni_dataset", "write real MRI in nnU-Net layout: MNI152 template slabs, GM/WM labels"),
    "validate": ("validate", "check an ACDC or nnU-Net NIfTI folder for broken or mismatched files"),
    "build-dataset": ("build_dataset", "build a TFDS dataset of 2D slices from ACDC or nnU-Net folders"),
    "make-splits": ("make_splits", "write seeded patient-level splits (official or cross-validation)"),
    "precompute": ("precompute", "encode every slice once with the frozen SAM encoder into a cache"),
    "image-cache": ("image_cache", "write the model images of every slice, for the UNet baseline"),
    "pretrain-simclr": ("pretrain_simclr", "SimCLR pretraining of the UNet encoder on unlabeled slices"),
    "train": ("train", "train a prompt-free head on cached embeddings (or with LoRA on SAM's encoder)"),
    "evaluate": ("evaluate", "score a trained head on a split's test patients (Dice, HD95)"),
    "predict": ("predict", "segment NIfTI images with a trained head"),
    "export-merged": ("export_merged", "fold a LoRA model's factors into SAM's encoder, as converted weights"),
    "zero-shot": ("zero_shot", "score SAM itself, prompted from the ground truth (box or point)"),
    "sweep": ("sweep", "the label-efficiency experiment: every method x encoder x tr_size x fold"),
    "demo": ("demo", "the whole pipeline on synthetic phantoms with a small SAM, in minutes on a CPU"),
}
